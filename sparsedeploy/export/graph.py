"""The exported graph between exporter and file: registered target rewrites, ONNX Runtime's offline
optimisation, and the checks that refuse a graph its target cannot take (pruned weights no longer intact,
operator domains the target does not run)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from sparsedeploy.common.errors import UserError
from sparsedeploy.export.config import TARGETS, ExportConfig, TargetProfile

Rewrite = Callable[["object"], "object"]  # onnx.ModelProto -> onnx.ModelProto


_REWRITES: dict[str, list[Rewrite]] = {}


def register_rewrite(target: str, fn: Rewrite) -> None:
    """Register a graph rewrite (ModelProto -> ModelProto) applied for `target` before verification.

    This is the hook for runtime-specific graph surgery (e.g. a DeepSparse-friendly form); the
    verification runs on the rewritten graph, so a rewrite that loses zeros fails the export.
    """
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    _REWRITES.setdefault(target, []).append(fn)


def target_rewrites(target: str) -> list[Rewrite]:
    """The rewrites registered for `target`, in registration order."""
    return list(_REWRITES.get(target, []))


def ort_optimize(model_file: Path, level: str, out_file: Path) -> None:
    """Run ONNX Runtime's offline graph optimisation at `level` and save the optimised graph."""
    import onnxruntime as ort

    from sparsedeploy.onnx.storage import external_data_path

    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[level]
    options.optimized_model_filepath = str(out_file)
    options.log_severity_level = 3
    if external_data_path(model_file).exists():
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", external_data_path(out_file).name
        )
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(model_file), sess_options=options, providers=["CPUExecutionProvider"])


def refuse_if_weights_changed(model, model_dir: Path, config: ExportConfig) -> None:
    """After an ORT optimisation: every pruned weight must still be found intact (zeros and N:M), else refuse the
    level."""
    from sparsedeploy.onnx.verify import checkpoint_reference, verify_sparsity

    reference, masks, nm = checkpoint_reference(model_dir, np.float16 if config.dtype == "float16" else np.float32)
    result = verify_sparsity(model, reference, masks, nm)
    if not result.ok:
        raise UserError(
            f"refusing --optimize {config.optimize}: ONNX Runtime's optimisation at this level folded, fused or "
            f"transposed weights so that the pruned zeros or N:M groups are no longer intact ({len(result.problems)} "
            f"weight(s), e.g. {result.problems[0]}); use --optimize none or basic"
        )


def check_domains(model, target: TargetProfile) -> None:
    used = sorted({node.domain for node in model.graph.node} - target.domains)
    if used:
        ops = sorted({node.op_type for node in model.graph.node if node.domain in used})
        raise UserError(
            f"the exported graph uses operator domain(s) {', '.join(used)} ({', '.join(ops[:6])}) that "
            f"--target {target.name} does not run: export without --optimize or for --target ort"
        )
