"""The static forms DeepSparse and TensorRT time: the decoder-stack files each export wrote and lists in its report
(`static_forms`: prefill, a decode step over a KV cache, generation bundles), else the linear skeleton of the
export's MatMuls. Nothing here loads a checkpoint or traces a graph from one."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsedeploy.bench.config import BenchConfig
from sparsedeploy.bench.report import phase_rows
from sparsedeploy.common.errors import UserError
from sparsedeploy.common.timing import Interleaved
from sparsedeploy.runtimes import stack_forms as sf

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


VARIANT_FLAGS = {"sparse": "--model", "dense": "--baseline"}


def stack_manifests(variants: dict[str, Path]) -> dict[str, dict] | None:
    """Each variant's `static_forms` (from its export_report.json); None when no export lists any (the linear
    skeleton then stands in); UserError when some do and some do not (the two would be timed on different forms)."""
    manifests = {name: sf.read_manifest(path.parent) for name, path in variants.items()}
    if not any(manifests.values()):
        return None
    lacking = [name for name, manifest in manifests.items() if not manifest]
    if lacking:
        name = lacking[0]
        raise UserError(
            f"{VARIANT_FLAGS.get(name, name)} {variants[name].parent} lists no static forms (export_report.json "
            "static_forms) while the other export does: export it with the same --target (deepsparse or tensorrt), "
            "--bench-batch and --bench-prompt-len"
        )
    return manifests


def lookup(variants: dict[str, Path], manifests: dict[str, dict], spec: sf.FormSpec, cfg: BenchConfig) -> dict:
    """{variant: path} of one form in every export; UserError naming the export option when one was not written."""
    paths = {}
    for name, path in variants.items():
        try:
            paths[name] = sf.find_form(path.parent, manifests[name], spec)
        except sf.MissingForm as exc:
            flag = f"{VARIANT_FLAGS.get(name, name)} {path.parent}"
            manifest = manifests[name]
            exported = f"exported: batch {manifest.get('batches')}, prompt {manifest.get('prompt_len')}"
            if str(exc) != "not exported":
                raise UserError(f"{flag}: {exc}: export it again") from None
            if spec.phase == sf.PREFILL or spec.past == cfg.prompt_len:
                batches = sorted({*manifest.get("batches", []), *cfg.batches})
                fix = f"--bench-batch {','.join(map(str, batches))} --bench-prompt-len {cfg.prompt_len}"
            else:
                fix = f"--target deepsparse --bench-gen-len {cfg.gen_len} (or bench with --gen-len 0)"
            raise UserError(
                f"{flag} has no {spec.phase} form for batch {spec.batch}, {spec.seq} tokens, cache {spec.past} "
                f"({exported}, gen {manifest.get('gen_len')}): export it again with {fix}"
            ) from None
    return paths


@dataclass
class StaticForm:
    """One static-shape graph per variant for one (batch, phase): what DeepSparse and TensorRT time."""

    batch: int
    phase: str  # prefill | decode-step
    stack: bool  # decoder stack (else linear skeleton)
    rows: int  # token rows through the linears
    paths: dict[str, Path]
    form: str  # what the graph holds, as the report names it


def static_forms(cfg: BenchConfig, variants: dict[str, Path], tmp: Path, notes: dict) -> list[StaticForm]:
    """The forms to time, every file looked up before any is timed: the decoder stack each export wrote (over the
    prompt for prefill, one token over a cache of the prompt's length for a decode step) when the exports list
    static forms; else the linear skeleton with as many rows as tokens go through the linears, written into `tmp`
    from each export's own model.onnx."""
    manifests = stack_manifests(variants)
    forms = []
    if manifests is None:
        notes["stack"] = (
            "the exports list no decoder-stack forms (export_report.json static_forms): timed on the linear "
            "skeleton; export both with --target deepsparse or tensorrt to time the decoder stack"
        )
        log.warning("%s", notes["stack"])
    for batch in cfg.batches:
        for phase, spec in zip(("prefill", "decode-step"), sf.static_specs(batch, cfg.prompt_len), strict=True):
            rows_n = batch * cfg.prompt_len if phase == "prefill" else batch
            if manifests is not None:
                paths = lookup(variants, manifests, spec, cfg)
                forms.append(
                    StaticForm(batch, phase, True, rows_n, paths, STACK_FORM if phase == "prefill" else STEP_FORM)
                )
                continue
            paths = {name: tmp / f"{name}_{phase}_b{batch}.onnx" for name in variants}
            forms.append(StaticForm(batch, phase, False, rows_n, paths, SKELETON_FORM))
    return forms


def build_skeletons(form: StaticForm, variants: dict[str, Path], notes: dict) -> None:
    """Write a skeleton form's graphs (weights read per skeleton, not held: a 1B model's are 4.7 GB per variant)."""
    for name, path in form.paths.items():
        notes.setdefault("skeleton", {})[name] = build_linear_skeleton(matmul_weights(variants[name]), form.rows, path)


def free_skeletons(form: StaticForm) -> None:
    """Delete a timed skeleton's files (the export's own stack files are never touched)."""
    from sparsedeploy.onnx.storage import external_data_path

    if form.stack:
        return
    for path in form.paths.values():
        for file in [path, external_data_path(path)]:
            file.unlink(missing_ok=True)


def generation_bundles(cfg: BenchConfig, variants: dict[str, Path]) -> dict[int, dict[str, dict[str, Path]]] | None:
    """{batch: {variant: {"prefill", "step", "head"}}} of the generation forms each export wrote (prompt + gen_len
    cache slots); None without static forms; UserError when a requested one was not exported."""
    manifests = stack_manifests(variants)
    if manifests is None:
        return None
    out: dict[int, dict[str, dict[str, Path]]] = {}
    for batch in cfg.batches:
        specs = sf.generation_specs(batch, cfg.prompt_len, cfg.prompt_len + cfg.gen_len)
        found = {kind: lookup(variants, manifests, spec, cfg) for kind, spec in specs.items()}
        out[batch] = {name: {kind: found[kind][name] for kind in specs} for name in variants}
    return out


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
