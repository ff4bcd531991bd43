"""`bench --engine tensorrt`: the static forms each export wrote (export_report.json static_forms) built into
TensorRT engines on a GPU, checked against ONNX Runtime."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from sparsedeploy.bench.config import BenchConfig
from sparsedeploy.bench.forms import build_skeletons, form_rows, free_skeletons, static_forms
from sparsedeploy.common.timing import run_interleaved
from sparsedeploy.onnx.storage import session_from_path

log = logging.getLogger(__name__)


def bench_tensorrt(cfg: BenchConfig, variants: dict[str, Path], progress=None) -> tuple[list[dict], dict]:
    """TensorRT on the static forms: the dense variant built dense, the sparse one with SPARSE_WEIGHTS.

    Each engine's output is compared with ONNX Runtime's on the same graph and inputs (CPU), so a wrong
    sparse kernel shows; the layers TensorRT built with sparse kernels are listed per form.
    """
    import torch

    from sparsedeploy.common.models import resolve_device
    from sparsedeploy.runtimes import tensorrt_runner as te

    device = resolve_device(cfg.device)
    notes: dict = {"device": str(device), "gpu": torch.cuda.get_device_name(device), "builds": []}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="sd-tensorrt-forms-") as tmp:
        for form in static_forms(cfg, variants, Path(tmp), notes):  # every form looked up before any is built
            if not form.stack:
                build_skeletons(form, variants, notes)
            runners = {}
            for name, path in form.paths.items():
                built = te.build_engine(path, sparse=name != "dense", fp16=cfg.dtype != "float32")
                runners[name] = te.EngineRunner(built, device, seed=0)
                ref = session_from_path(path, threads=None).run(None, runners[name].numpy_inputs())[0]
                runners[name]()
                got = next(iter(runners[name].numpy_outputs().values()))
                rel = float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))
                notes["builds"].append(
                    {
                        "variant": name,
                        "batch": form.batch,
                        "phase": form.phase,
                        "precision": built.precision,
                        "build_seconds": round(built.build_seconds, 1),
                        "max_rel_err_vs_ort": rel,
                        "sparse_layers": len(built.layers["picked_sparse"]),
                        "eligible_layers": len(built.layers["eligible"]),
                        "layers": built.layers,
                    }
                )
            times = run_interleaved(
                runners, rounds=max(cfg.rounds, 3), per_round=3, warmup=cfg.warmup, min_sample_s=0.02
            ).times
            rows.extend(form_rows(form, times, "tensorrt", cfg, progress))
            del runners
            torch.cuda.empty_cache()
            free_skeletons(form)
    return rows, notes
