"""The static forms DeepSparse and TensorRT time: the decoder stack (prefill, and a decode step over a KV cache)
built from the checkpoint each export's report names, else the linear skeleton of the export's MatMuls."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsedeploy.bench.config import BenchConfig
from sparsedeploy.bench.report import phase_rows
from sparsedeploy.common.errors import UserError
from sparsedeploy.common.timing import Interleaved
from sparsedeploy.runtimes.stack_graphs import export_decoder_stack

log = logging.getLogger(__name__)


def matmul_weights(path: Path) -> list[tuple[str, np.ndarray]]:
    """(name, weight [k, n]) for every MatMul/Gemm(no transpose) of `path` whose weight is a 2-D initializer, in graph
    order."""
    import onnx
    from onnx import numpy_helper

    from sparsedeploy.common.files import safe_external_data

    safe_external_data(path)
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            if w.ndim == 2:
                out.append((node.name or node.input[1], w.astype(np.float32)))
    return out


def build_linear_skeleton(weights: list[tuple[str, np.ndarray]], rows: int, out: Path) -> dict:
    """Write the linear skeleton ONNX (static [rows, k] input, opset 13, IR 8) and describe it.

    Data flow per MatMul (k -> n): reads the current tensor of width k; its output, through a ReLU,
    becomes the current tensor of width n, added to the previous one of that width if any (like a
    residual stream). Every final tensor is a graph output so no MatMul is dead code. The ReLU stands in
    for the model's elementwise ops and is what DeepSparse 1.8 needs: a MatMul feeding an Add directly
    aborts its planner (planner.hpp:70, measured on smollm2-135m's skeleton).
    """
    from onnx import TensorProto, helper, numpy_helper

    from sparsedeploy.onnx.storage import save_model_proto

    if not weights:
        raise UserError(
            "the ONNX model has no MatMul with a constant 2-D weight: nothing to benchmark in the linear skeleton"
        )
    first_k = weights[0][1].shape[0]
    state = {first_k: "x"}
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, first_k])]
    nodes, inits = [], []
    for i, (_, w) in enumerate(weights):
        k, n = w.shape
        if k not in state:  # a width never produced so far (rare): feed it from an extra graph input
            state[k] = f"x{k}"
            inputs.append(helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [rows, k]))
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [state[k], f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"y{i}"]))
        if n in state and state[n] != "x":
            nodes.append(helper.make_node("Add", [state[n], f"y{i}"], [f"s{i}"]))
            state[n] = f"s{i}"
        else:
            state[n] = f"y{i}"
    outputs = [
        helper.make_tensor_value_info(t, TensorProto.FLOAT, [rows, n])
        for n, t in state.items()
        if not t.startswith("x")
    ]
    graph = helper.make_graph(nodes, "linear_skeleton", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="sparsedeploy")
    model.ir_version = 8
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model_proto(model, out)  # external data past 2 GB (a 1B model's linears)
    total = sum(w.size for _, w in weights)
    zeros = sum(int((w == 0).sum()) for _, w in weights)
    return {"matmuls": len(weights), "params": int(total), "sparsity": zeros / max(total, 1), "rows": rows}


STACK_FORM = (
    "decoder stack (every block: attention, norms, MLP, residuals, real weights; static shapes, eager attention; "
    "no embedding lookup or lm_head)"
)
STEP_FORM = (
    "decoder stack + KV cache (one new token per sequence through every block, attending to a cache of the "
    "prompt's length given as inputs; static shapes, eager attention; no embedding lookup or lm_head)"
)
GENERATION_FORM = (
    "whole model, stack graphs (prefill graph, then one decode-step graph per token over a static KV cache of "
    "prompt + generated slots; embedding lookup and lm_head in NumPy, as `generate --engine deepsparse` runs it)"
)
SKELETON_FORM = "linear skeleton (all MatMuls, real weights, ReLU between; no attention core/norms/KV)"


def source_checkpoint(onnx_dir: Path) -> Path | None:
    """The PyTorch checkpoint an export came from, as its export_report.json records it (model_path, else
    model_path_relative to the export, which survives moving a pipeline's run directory), if it is still there."""
    import json

    report = Path(onnx_dir) / "export_report.json"
    if not report.is_file():
        return None
    data = json.loads(report.read_text())
    candidates = [Path(data["model_path"])] if data.get("model_path") else []
    if data.get("model_path_relative"):
        candidates.append(Path(onnx_dir) / data["model_path_relative"])
    return next((path for path in candidates if (path / "config.json").is_file()), None)


@dataclass
class StaticForm:
    """One static-shape graph per variant for one (batch, phase): what DeepSparse and TensorRT time."""

    batch: int
    phase: str  # prefill | decode-step
    stack: bool  # decoder stack (else linear skeleton)
    rows: int  # token rows through the linears
    paths: dict[str, Path]
    form: str  # what the graph holds, as the report names it


def static_forms(cfg: BenchConfig, variants: dict[str, Path], tmp: Path, notes: dict):
    """The decoder stack when every variant's source checkpoint is at hand (the most complete form DeepSparse
    compiles): over the prompt for prefill, one token over a cache of the prompt's length for a decode step;
    else the linear skeleton with as many rows as tokens go through the linears."""
    from sparsedeploy.onnx.storage import external_data_path

    checkpoints = {name: source_checkpoint(path.parent) for name, path in variants.items()}
    use_stack = all(checkpoints.values())
    if not use_stack:
        notes["stack"] = (
            "no source checkpoint beside an export (export_report.json model_path): timed on the linear skeleton"
        )
    for batch in cfg.batches:
        for phase in ("prefill", "decode-step"):
            stack = use_stack
            rows_n = batch * cfg.prompt_len if phase == "prefill" else batch
            paths = {}
            for name in variants:
                paths[name] = tmp / f"{name}_{phase}_b{batch}.onnx"
                if stack and phase == "prefill":
                    export_decoder_stack(checkpoints[name], paths[name], batch, cfg.prompt_len)
                elif stack:
                    export_decoder_stack(checkpoints[name], paths[name], batch, 1, past=cfg.prompt_len)
                else:  # weights read per skeleton, not held: a 1B model's are 4.7 GB per variant in fp32
                    notes.setdefault("skeleton", {})[name] = build_linear_skeleton(
                        matmul_weights(variants[name]), rows_n, paths[name]
                    )
            form = (STACK_FORM if phase == "prefill" else STEP_FORM) if stack else SKELETON_FORM
            yield StaticForm(batch, phase, stack, rows_n, paths, form)
            for path in paths.values():  # timed: free the disk (a 1B model's stack is 4 GB per variant)
                for file in [path, external_data_path(path)]:
                    file.unlink(missing_ok=True)


def form_rows(
    form: StaticForm, times: dict[str, list[float]], engine: str, cfg: BenchConfig, progress=None
) -> list[dict]:
    res = Interleaved(times=times, phases={n: {form.phase: t} for n, t in times.items()})
    new = phase_rows(res, list(form.paths), form.batch, cfg.prompt_len, 0, form.form, engine)
    for r in new:
        r["rows"] = form.rows
    if progress:
        progress(new)
    return new
