"""`bench --engine sparse-cpu`: a sparse-cpu export (ONNX Runtime segments + sparsedeploy's kernels) against the dense
export in plain ONNX Runtime, whole generations with the KV cache, alternating in one process; with
``--ort-op-library`` also the same export run whole in ONNX Runtime with sparsedeploy's custom-op library."""

from __future__ import annotations

from pathlib import Path

from sparsedeploy.bench.config import BenchConfig
from sparsedeploy.bench.ort import load_models, time_generations
from sparsedeploy.common.errors import UserError
from sparsedeploy.kernels import native
from sparsedeploy.onnx.segmented import SegmentedSession

ORT_OP_VARIANT = "sparse-ort-op"  # the sparse export whole in ONNX Runtime with the custom-op library


def bench_sparse_cpu(cfg: BenchConfig, variants: dict[str, Path], progress=None) -> tuple[list[dict], dict]:
    libraries = {}
    if cfg.ort_op_library:
        variants = {**variants, ORT_OP_VARIANT: variants["sparse"]}
        libraries[ORT_OP_VARIANT] = cfg.ort_op_library
    models, logits = load_models(cfg, variants, libraries)
    if not isinstance(models["sparse"].session, SegmentedSession):
        raise UserError(
            f"--model {variants['sparse']} has no SparseLinear nodes, so nothing would run in sparsedeploy's "
            "kernels: export it with --target sparse-cpu"
        )
    if "dense" in models and isinstance(models["dense"].session, SegmentedSession):
        raise UserError(
            f"--baseline {variants['dense']} is a sparse-cpu export: give the dense model's ONNX export "
            "(--target ort), the baseline runs in plain ONNX Runtime"
        )
    session = models["sparse"].session
    rows = time_generations(
        cfg,
        models,
        f"full model with KV cache; sparse linears in sparsedeploy's kernels; {logits}",
        "sparse-cpu",
        progress,
    )
    notes = {
        "kernels": {
            "isa": native.best_isa(),
            "threads": cfg.threads,
            "sparse_linear_nodes": session.linear_count,
            "int8_nodes": session.int8_node_count,  # Int8Gather / Int8Linear: a dense weight stored as scaled-int8
            "segments": session.segment_count,
            "segments_native": session.fused_segment_count(),  # add + RMSNorm, SiLU * up, attention (after a run)
        },
        "form": "sparse: ONNX Runtime runs the standard operators, sparsedeploy's kernels each SparseLinear node, "
        "each Int8Gather / Int8Linear node (a dense weight that is exactly int8 x scale, e.g. a GGUF Q8_0 tied "
        "embedding / lm_head) and the residual add + RMSNorm, SiLU * up and attention segments; dense: the whole graph "
        "in ONNX Runtime",
    }
    if cfg.ort_op_library:
        notes[ORT_OP_VARIANT] = (
            f"the sparse export whole in one ONNX Runtime session with the custom-op library {cfg.ort_op_library} "
            "(SparseLinear / Int8Linear / Int8Gather nodes in sparsedeploy's kernels, the bitmask form at every batch; "
            "everything else, attention included, in ONNX Runtime)"
        )
    return rows, notes
