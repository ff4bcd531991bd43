"""What a bench run is asked for: the engines, the timed phases, BenchConfig, and the machine it ran on."""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


PHASES = ("prefill", "decode", "total")


# The engines (--engine, run --bench-engine, the recipe's bench.engine) and what each times (docs/bench.md's table)
ENGINE_NOTES = {
    "ort": "the whole model with its KV cache in ONNX Runtime: prefill, decode, end to end",
    "sparse-cpu": "a `--target sparse-cpu` export in sparsedeploy's own kernels against the dense export in "
    "ONNX Runtime",
    "deepsparse": "DeepSparse 1.8 (own virtualenv): the decoder-stack graphs for prefill and a decode step, and "
    "generation through them, each against ONNX Runtime on the same graphs",
    "torch": "PyTorch on a GPU (`--device cuda`): 2:4 semi-structured kernels, eager or replayed as CUDA graphs",
    "tensorrt": "dense and 2:4-sparse TensorRT engines built from the export (`--device cuda`; needs NVIDIA's "
    "`tensorrt` package)",
}
ENGINES = tuple(ENGINE_NOTES)


@dataclass
class BenchConfig:
    model: str
    baseline: str | None = None
    engine: str = "ort"
    batches: list[int] = field(default_factory=lambda: [1, 8])
    prompt_len: int = 128
    gen_len: int = 64
    threads: int = 1
    rounds: int = 3
    per_round: int = 1
    warmup: int = 1
    device: str = "cpu"
    dtype: str = "float16"
    deepsparse_venv: str | None = None
    cache_dir: str | None = None
    max_seconds: float | None = None
    cuda_graphs: bool = False
    # ort / sparse-cpu engines: every prompt position's logits at prefill (the export's whole output) instead of the
    # last position's, which is what generation reads (onnx/last_logits.py); the same for every variant either way
    all_logits: bool = False
    # sparse-cpu engine: also time the sparse export run whole in ONNX Runtime with sparsedeploy's custom-op library
    # (this file; scripts/build_ort_op.sh builds it), as a third variant "sparse-ort-op"
    ort_op_library: str | None = None


def machine_info(threads: int) -> dict:
    try:
        cpu = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            "?",
        )
    except OSError:
        cpu = platform.processor() or "?"
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": threads, "python": platform.python_version()}


# A core-to-core round trip above this (ns) says two threads sat in different L3 domains (AMD CCDs, or virtual CPUs a
# host moved between them): on a Zen 4 VM 89-103 ns inside one (58-72 ns by a bare C ping-pong), 257-438 ns across
# (the C ping-pong; docs/sparse_cpu.md).
SPLIT_L3_ROUND_TRIP_NS = 200.0


def round_trip_note(before: float | None, after: float | None) -> str:
    """The report's words for the core-to-core round trips measured before and after a multi-thread run."""
    if before is None or after is None:
        return "core-to-core round trip not measured (one CPU)"
    split = max(before, after) > SPLIT_L3_ROUND_TRIP_NS
    return f"core-to-core round trip {before:.0f} / {after:.0f} ns (before / after)" + (
        ": the threads sat in different L3 domains, where every multi-thread call pays for moving data between "
        "them (docs/sparse_cpu.md)"
        if split
        else ""
    )
