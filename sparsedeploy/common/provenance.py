"""Provenance of a run's outputs: library versions and machine, and peak memory."""

from __future__ import annotations

import platform
import resource

import torch

import sparsedeploy


def peak_memory(device: torch.device) -> dict:
    peak = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device.type == "cuda":
        peak["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def versions() -> dict:
    import transformers

    return {
        "sparsedeploy": sparsedeploy.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch_threads": torch.get_num_threads(),
    }
