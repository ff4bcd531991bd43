"""`sparsedeploy bench`: dense vs sparse inference speed of whole models.

Engines:
- ``ort``: an optimum ONNX export with KV cache (``model.onnx`` taking ``past_key_values.*``), run in
  ONNX Runtime: prefill latency (prompt of P tokens), decode tokens/s (G steps reusing the KV cache)
  and end-to-end time.
- ``deepsparse``: DeepSparse 1.8 in its own venv (see engines/deepsparse_env.py). Its engine aborts on
  optimum's Llama export with static shapes (and with dynamic shapes it only hands the graph to its
  bundled ONNX Runtime), so the bench first *tries* the full graph and records the verdict, then
  measures the most complete forms that compile: the **decoder stack** -- every block (attention,
  norms, MLP, residuals) with its real weights, static shapes, eager attention, rotary tables and mask
  as inputs, each layer's new keys/values as outputs -- over the prompt for prefill, and for a decode
  step over one token attending to a KV cache of the prompt's length (cache tensors as inputs). The
  embedding lookup and lm_head stay outside. Without the source checkpoints the **linear skeleton** --
  every MatMul with its real (pruned) weights, a ReLU after each, residual adds -- stands in. With
  ``--gen-len`` > 0 it then times **whole generations** through the two stack graphs with the embedding
  lookup and lm_head in NumPy (sparsedeploy.stack_generate, what ``generate --engine deepsparse`` runs):
  prefill, decode tokens/s and end-to-end, in DeepSparse and in ONNX Runtime on the same files. The
  report names the form of every row.
- ``torch``: a Hugging Face checkpoint directory in PyTorch. On CUDA the sparse model's 2:4 linears
  are converted with ``torch.sparse.to_sparse_semi_structured`` (fp16/bf16); without CUDA and with
  ``--device cuda`` the command says so and stops cleanly. Eager by default (a DynamicCache, every
  kernel's host-side setup paid per call); with ``--cuda-graphs`` the prefill and each decode step are
  replayed as CUDA graphs over a static KV cache (sparsedeploy.static_generate).
- ``tensorrt``: the same static forms as DeepSparse (decoder stack, or linear skeleton) built into TensorRT
  engines on a GPU (engines/tensorrt_engine.py): the dense export dense, the sparse one with
  SPARSE_WEIGHTS; outputs checked against ONNX Runtime, sparse-kernel layers listed. Without CUDA or the
  tensorrt package the command says which is missing and stops cleanly.

Dense and sparse models run alternately in the same process (sparsedeploy.timing), so the ratio is
taken per round and machine drift cancels.
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sparsedeploy.errors import UserError
from sparsedeploy.export import export_decoder_stack  # noqa: F401 - the DeepSparse form, timed here
from sparsedeploy.timing import Interleaved, run_interleaved, summarize

log = logging.getLogger(__name__)

PHASES = ("prefill", "decode", "total")


ENGINES = ("ort", "deepsparse", "torch", "tensorrt")


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


def machine_info(threads: int) -> dict:
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), "?")
    except OSError:
        cpu = platform.processor() or "?"
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": threads, "python": platform.python_version()}


# ----------------------------------------------------------------------------------------------
# ONNX Runtime: optimum export with KV cache
# ----------------------------------------------------------------------------------------------

def find_onnx(model_dir: str | os.PathLike, what: str = "--model") -> Path:
    path = Path(model_dir)
    if path.is_file() and path.suffix == ".onnx":
        return path
    if not path.exists():
        raise UserError(f"{what} {path} does not exist: give a directory holding model.onnx (e.g. from `sparsedeploy export`)")
    if not path.is_dir():
        raise UserError(f"{what} {path} is not a directory or .onnx file")
    for name in ("model.onnx", "decoder_model_merged.onnx", "decoder_with_past_model.onnx"):
        if (path / name).is_file():
            return path / name
    found = sorted(path.glob("*.onnx"))
    if len(found) == 1:
        return found[0]
    raise UserError(f"no model.onnx in {path}: point {what} at an ONNX export directory")


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


class OrtCausalLM:
    """Greedy generation over an optimum-style decoder export (input_ids, attention_mask, [position_ids], past_key_values.*)."""

    def __init__(self, path: Path, threads: int) -> None:
        from sparsedeploy.kernels import ort_session

        self.path = path
        self.session = ort_session(path, threads)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        if "input_ids" not in self.inputs:
            raise UserError(f"{path} has no input_ids input: --engine ort expects a causal-LM export (text-generation-with-past)")
        self.past = sorted(n for n in self.inputs if n.startswith("past_key_values."))
        if not self.past:
            raise UserError(f"{path} has no past_key_values inputs: export with KV cache (task text-generation-with-past) to time decode")
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.vocab = self._vocab_size()

    def _vocab_size(self) -> int:
        """Token ids must stay inside the embedding: the logits' static width, else config.json beside the model."""
        logits = next((o for o in self.session.get_outputs() if o.name == "logits"), None)
        if logits is not None and isinstance(logits.shape[-1], int):
            return logits.shape[-1]
        config = self.path.parent / "config.json"
        if config.is_file():
            import json

            vocab = json.loads(config.read_text()).get("vocab_size")
            if isinstance(vocab, int) and vocab > 0:
                return vocab
        raise UserError(f"{self.path}: cannot tell the vocabulary size (no static logits width, no config.json beside it)")

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        past = {}
        for name in self.past:
            info = self.inputs[name]
            dims = [d if isinstance(d, int) else None for d in info.shape]
            heads, head_dim = dims[1], dims[3]
            if heads is None or head_dim is None:
                raise UserError(f"{self.path}: cannot read KV heads/head size from input {name} {info.shape}")
            past[name] = np.zeros((batch, heads, 0, head_dim), dtype=_ORT_TYPES.get(info.type, np.float32))
        return past

    def _step(self, ids: np.ndarray, mask: np.ndarray, start: int, past: dict[str, np.ndarray]):
        feed = {"input_ids": ids, "attention_mask": mask, **past}
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.broadcast_to(np.arange(start, start + ids.shape[1], dtype=np.int64), ids.shape).copy()
        outs = dict(zip(self.outputs, self.session.run(self.outputs, feed)))
        new_past = {name: outs[name.replace("past_key_values.", "present.")] for name in self.past}
        return outs["logits"], new_past

    def generate(self, batch: int, prompt_len: int, gen_len: int, seed: int = 0) -> dict[str, float]:
        """Prefill `prompt_len` random tokens then decode `gen_len` greedy tokens; returns seconds per phase."""
        ids = np.random.default_rng(seed).integers(min(10, self.vocab - 1), self.vocab, size=(batch, prompt_len), dtype=np.int64)
        mask = np.ones((batch, prompt_len), dtype=np.int64)
        t0 = time.perf_counter()
        logits, past = self._step(ids, mask, 0, self._empty_past(batch))
        t1 = time.perf_counter()
        for step in range(gen_len):
            nxt = logits[:, -1, :].argmax(-1).astype(np.int64)[:, None]
            mask = np.ones((batch, prompt_len + step + 1), dtype=np.int64)
            logits, past = self._step(nxt, mask, prompt_len + step, past)
        t2 = time.perf_counter()
        return {"prefill": t1 - t0, "decode": t2 - t1, "total": t2 - t0}


def phase_rows(res: Interleaved, variants: list[str], batch: int, prompt_len: int, gen_len: int, form: str, engine: str) -> list[dict]:
    """Per variant and phase: median/spread, prefill ms, decode tok/s, and the per-round speedup vs dense."""
    rows = []
    for name in variants:
        for phase, values in res.phases[name].items():
            s = summarize(values)
            row = {"engine": engine, "form": form, "variant": name, "batch": batch, "phase": phase, "median_s": s.median,
                   "p10_s": s.p10, "p90_s": s.p90, "spread": s.spread, "noisy": s.noisy, "rounds": s.n}
            if phase == "decode" and gen_len:
                row["tokens_per_s"] = batch * gen_len / s.median
            if phase == "prefill":
                row["prompt_tokens_per_s"] = batch * prompt_len / s.median
            if name != "dense" and "dense" in res.phases:
                r = res.phase_ratio("dense", name, phase)
                row.update(speedup=r.median, speedup_p10=r.p10, speedup_p90=r.p90, noisy=bool(row["noisy"] or r.noisy))
            rows.append(row)
    return rows


def bench_ort(cfg: BenchConfig, variants: dict[str, Path], progress=None) -> list[dict]:
    models = {name: OrtCausalLM(path, cfg.threads) for name, path in variants.items()}
    rows = []
    for batch in cfg.batches:
        runners = {name: (lambda m=m: m.generate(batch, cfg.prompt_len, cfg.gen_len)) for name, m in models.items()}
        res = run_interleaved(runners, rounds=cfg.rounds, per_round=cfg.per_round, warmup=cfg.warmup, max_seconds=cfg.max_seconds)
        new = phase_rows(res, list(variants), batch, cfg.prompt_len, cfg.gen_len, "full model with KV cache (optimum export)", "ort")
        rows.extend(new)
        if progress:
            progress(new)
    return rows


# ----------------------------------------------------------------------------------------------
# Linear skeleton: the form DeepSparse 1.8 runs
# ----------------------------------------------------------------------------------------------

def matmul_weights(path: Path) -> list[tuple[str, np.ndarray]]:
    """(name, weight [k, n]) for every MatMul/Gemm(no transpose) of `path` whose weight is a 2-D initializer, in graph order."""
    import onnx
    from onnx import numpy_helper

    from sparsedeploy.fsutil import safe_external_data

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

    from sparsedeploy.onnx_storage import save_model_proto

    if not weights:
        raise UserError("the ONNX model has no MatMul with a constant 2-D weight: nothing to benchmark in the linear skeleton")
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
    outputs = [helper.make_tensor_value_info(t, TensorProto.FLOAT, [rows, n]) for n, t in state.items() if not t.startswith("x")]
    graph = helper.make_graph(nodes, "linear_skeleton", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="sparsedeploy")
    model.ir_version = 8
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model_proto(model, out)  # external data past 2 GB (a 1B model's linears)
    total = sum(w.size for _, w in weights)
    zeros = sum(int((w == 0).sum()) for _, w in weights)
    return {"matmuls": len(weights), "params": int(total), "sparsity": zeros / max(total, 1), "rows": rows}


STACK_FORM = ("decoder stack (every block: attention, norms, MLP, residuals, real weights; static shapes, eager attention; "
              "no embedding lookup or lm_head)")
STEP_FORM = ("decoder stack + KV cache (one new token per sequence through every block, attending to a cache of the "
             "prompt's length given as inputs; static shapes, eager attention; no embedding lookup or lm_head)")
GENERATION_FORM = ("whole model, stack graphs (prefill graph, then one decode-step graph per token over a static KV cache of "
                   "prompt + generated slots; embedding lookup and lm_head in NumPy, as `generate --engine deepsparse` runs it)")
SKELETON_FORM = "linear skeleton (all MatMuls, real weights, ReLU between; no attention core/norms/KV)"


def source_checkpoint(onnx_dir: Path) -> Path | None:
    """The PyTorch checkpoint an export came from (export_report.json's model_path), if it is still there."""
    import json

    report = Path(onnx_dir) / "export_report.json"
    if report.is_file():
        path = Path(json.loads(report.read_text()).get("model_path", ""))
        if (path / "config.json").is_file():
            return path
    beside = Path(onnx_dir).parent / "model"  # a `sparsedeploy run` directory: onnx/ next to model/
    return beside if (beside / "config.json").is_file() else None


def bench_deepsparse(cfg: BenchConfig, variants: dict[str, Path], progress=None) -> tuple[list[dict], dict]:
    from sparsedeploy.engines import deepsparse_env as ds

    env = ds.require_env(cfg.deepsparse_venv, cfg.cache_dir)
    notes: dict = {"full_graph": {}}
    rows: list[dict] = []
    # 1. The full graph, as exported: report whether DeepSparse accepts it.
    first = next(iter(variants.values()))
    try:
        info = ds.check_model(env, first, batch=1, threads=cfg.threads)
        notes["full_graph"] = {"runs": True, **info}
        log.warning("DeepSparse compiled the full graph %s with static shapes; this release still times the decoder stack", first)
    except ds.EngineFailed as exc:
        notes["full_graph"] = {"runs": False, "reason": str(exc), "stderr": exc.stderr_tail[-500:]}
        log.info("DeepSparse rejects the full graph with static shapes (%s): timing the decoder stack / linear skeleton", exc)
    # 2. Prefill and a decode step on the decoder stack (or the linear skeleton), each timed in DeepSparse
    #    and, on the same graph, in ONNX Runtime.
    from sparsedeploy.kernels import time_ort_static

    with tempfile.TemporaryDirectory(prefix="sd-deepsparse-forms-") as tmp:
        for form in static_forms(cfg, variants, Path(tmp), notes):
            for engine in ("deepsparse", "ort"):
                if engine == "deepsparse":
                    times = ds.bench_models(env, form.paths, form.batch if form.stack else form.rows,
                                            cfg.threads, rounds=max(cfg.rounds, 3), per_round=3, min_sample_s=0.02)["times"]
                else:
                    times = time_ort_static(form.paths, cfg.threads, max(cfg.rounds, 3), 3)
                rows.extend(form_rows(form, times, engine, cfg, progress))
    # 3. Whole generations (prompt + gen_len tokens) through both stack graphs with the embedding lookup and
    #    lm_head around them: the complete model as DeepSparse runs it, and ONNX Runtime on the same files.
    checkpoints = {name: source_checkpoint(path.parent) for name, path in variants.items()}
    if cfg.gen_len > 0 and all(checkpoints.values()):
        from sparsedeploy.export import write_stack_files

        for batch in cfg.batches:
            with tempfile.TemporaryDirectory(prefix="sd-deepsparse-generate-") as tmp:
                bundles = {name: write_stack_files(checkpoints[name], Path(tmp) / name, batch, cfg.prompt_len,
                                                   cfg.prompt_len + cfg.gen_len) for name in variants}
                reply = ds.bench_generation(env, bundles, batch, cfg.prompt_len, cfg.gen_len, cfg.threads, rounds=cfg.rounds,
                                            per_round=cfg.per_round, warmup=cfg.warmup)
                for engine, res in (("deepsparse", Interleaved(times=reply["times"], phases=reply["phases"])),
                                    ("ort", time_ort_generation(bundles, cfg, batch))):
                    new = phase_rows(res, list(variants), batch, cfg.prompt_len, cfg.gen_len, GENERATION_FORM, engine)
                    rows.extend(new)
                    if progress:
                        progress(new)
    elif cfg.gen_len > 0:
        notes["generation"] = "not timed: needs each export's source checkpoint (export_report.json model_path)"
    return rows, notes


def time_ort_generation(bundles: dict[str, dict[str, Path]], cfg: BenchConfig, batch: int) -> Interleaved:
    """ONNX Runtime running the same stack files and NumPy glue as the DeepSparse generation rows (NumPy's BLAS
    held to --threads, as the DeepSparse worker's is through OMP_NUM_THREADS)."""
    from threadpoolctl import threadpool_limits

    from sparsedeploy.kernels import ort_session
    from sparsedeploy.stack_generate import StackHead, generation_phases, random_prompt, session_graph

    runners = {}
    for name, files in bundles.items():
        head = StackHead.load(files["head"])
        graphs = [session_graph(ort_session(files[kind], cfg.threads)) for kind in ("prefill", "step")]
        ids = random_prompt(head, cfg.prompt_len)
        runners[name] = (lambda h=head, g=graphs, i=ids: generation_phases(h, g[0], g[1], i, cfg.gen_len))
    with threadpool_limits(limits=cfg.threads, user_api="blas"):
        return run_interleaved(runners, rounds=cfg.rounds, per_round=cfg.per_round, warmup=cfg.warmup)


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
    from sparsedeploy.onnx_storage import external_data_path

    checkpoints = {name: source_checkpoint(path.parent) for name, path in variants.items()}
    use_stack = all(checkpoints.values())
    if not use_stack:
        notes["stack"] = "no source checkpoint beside an export (export_report.json model_path): timed on the linear skeleton"
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
                    notes.setdefault("skeleton", {})[name] = build_linear_skeleton(matmul_weights(variants[name]), rows_n, paths[name])
            form = (STACK_FORM if phase == "prefill" else STEP_FORM) if stack else SKELETON_FORM
            yield StaticForm(batch, phase, stack, rows_n, paths, form)
            for path in paths.values():  # timed: free the disk (a 1B model's stack is 4 GB per variant)
                for file in [path, external_data_path(path)]:
                    file.unlink(missing_ok=True)


def form_rows(form: StaticForm, times: dict[str, list[float]], engine: str, cfg: BenchConfig, progress=None) -> list[dict]:
    res = Interleaved(times=times, phases={n: {form.phase: t} for n, t in times.items()})
    new = phase_rows(res, list(form.paths), form.batch, cfg.prompt_len, 0, form.form, engine)
    for r in new:
        r["rows"] = form.rows
    if progress:
        progress(new)
    return new


def bench_tensorrt(cfg: BenchConfig, variants: dict[str, Path], progress=None) -> tuple[list[dict], dict]:
    """TensorRT on the static forms: the dense variant built dense, the sparse one with SPARSE_WEIGHTS.

    Each engine's output is compared with ONNX Runtime's on the same graph and inputs (CPU), so a wrong
    sparse kernel shows; the layers TensorRT built with sparse kernels are listed per form.
    """
    import torch

    from sparsedeploy.engines import tensorrt_engine as te
    from sparsedeploy.models import resolve_device
    from sparsedeploy.onnx_storage import session_from_path

    device = resolve_device(cfg.device)
    notes: dict = {"device": str(device), "gpu": torch.cuda.get_device_name(device), "builds": []}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="sd-tensorrt-forms-") as tmp:
        for form in static_forms(cfg, variants, Path(tmp), notes):
            runners = {}
            for name, path in form.paths.items():
                built = te.build_engine(path, sparse=name != "dense", fp16=cfg.dtype != "float32")
                runners[name] = te.EngineRunner(built, device, seed=0)
                ref = session_from_path(path, threads=None).run(None, runners[name].numpy_inputs())[0]
                runners[name]()
                got = next(iter(runners[name].numpy_outputs().values()))
                rel = float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))
                notes["builds"].append({"variant": name, "batch": form.batch, "phase": form.phase, "precision": built.precision,
                                        "build_seconds": round(built.build_seconds, 1), "max_rel_err_vs_ort": rel,
                                        "sparse_layers": len(built.layers["picked_sparse"]),
                                        "eligible_layers": len(built.layers["eligible"]), "layers": built.layers})
            times = run_interleaved(runners, rounds=max(cfg.rounds, 3), per_round=3, warmup=cfg.warmup, min_sample_s=0.02).times
            rows.extend(form_rows(form, times, "tensorrt", cfg, progress))
            del runners
            torch.cuda.empty_cache()
    return rows, notes


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# sparsedeploy bench: {result['engine']}", "",
             f"- model: `{result['model']}`" + (f" vs dense baseline `{result['baseline']}`" if result.get("baseline") else ""),
             f"- machine: {m['cpu']}, {m['logical_cpus']} logical CPUs; threads: {m['threads']}"
             + (f"; GPU: {m['gpu']} (torch {m.get('torch', '?')})" if m.get("gpu") else ""),
             f"- prompt {result['prompt_len']} tokens"
             + (f", {result['gen_len']} generated" if any(r["phase"] == "decode" for r in result["rows"]) else ", no generation (static forms)")
             + f"; rounds {result['rounds']} (dense and sparse alternating)",
             f"- form measured: {'; '.join(sorted({r['form'] for r in result['rows']}))}", ""]
    if result.get("notes", {}).get("full_graph"):
        fg = result["notes"]["full_graph"]
        lines += [f"- full graph in DeepSparse: {'runs' if fg.get('runs') else 'rejected: ' + fg.get('reason', '?')}", ""]
    lines += ["| engine | form | batch | phase | variant | median | p10-p90 | tok/s | speedup vs dense | note |",
              "|---|---|---:|---|---|---:|---|---:|---|---|"]
    for r in result["rows"]:
        tps = r.get("tokens_per_s") or r.get("prompt_tokens_per_s")
        speed = f"{r['speedup']:.2f}x ({r['speedup_p10']:.2f}-{r['speedup_p90']:.2f})" if "speedup" in r else ""
        form = r["form"].split(" (")[0]
        lines.append(f"| {r['engine']} | {form} | {r['batch']} | {r['phase']} | {r['variant']} | {r['median_s'] * 1e3:.1f} ms | "
                     f"{r['p10_s'] * 1e3:.1f}-{r['p90_s'] * 1e3:.1f} | {f'{tps:.1f}' if tps else ''} | {speed} | "
                     f"{'NOISY' if r['noisy'] else ''} |")
    if result.get("licence"):
        lines += ["", result["licence"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path | None:
    """Speedup vs batch, one line per (engine, phase). Returns None when there is nothing to plot."""
    points: dict[str, list[tuple[int, float]]] = {}
    for r in result["rows"]:
        if "speedup" in r:
            points.setdefault(f"{r['engine']} {r['phase']}", []).append((r["batch"], r["speedup"]))
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in sorted(points.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("speedup (dense time / sparse time)")
    ax.set_title(f"{Path(result['model']).name}: sparse vs dense ({result['machine']['threads']} thread(s))", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Torch (GPU 2:4 semi-structured)
# ----------------------------------------------------------------------------------------------

def to_semi_structured(model, min_dim: int = 64) -> int:
    """Replace every 2:4-sparse nn.Linear weight by a torch semi-structured sparse tensor; returns how many."""
    import torch
    from torch.sparse import to_sparse_semi_structured

    from sparsedeploy.sparsity import satisfies_nm

    count = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in name and min(mod.weight.shape) >= min_dim \
                and satisfies_nm(mod.weight.detach(), 2, 4):
            mod.weight = torch.nn.Parameter(to_sparse_semi_structured(mod.weight.detach()), requires_grad=False)
            count += 1
    return count


class TorchCausalLM:
    """A checkpoint in PyTorch, timed over greedy generation: eager with a DynamicCache, or (``graphs``) each
    phase replayed as a CUDA graph over a static KV cache (sparsedeploy.static_generate)."""

    def __init__(self, path: Path, device, dtype, semi_structured: bool, graphs: bool = False) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.device, self.graphs = device, graphs
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
        self.converted = to_semi_structured(self.model) if semi_structured else 0
        self.torch = torch
        self.static = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def _prompt(self, batch: int, prompt_len: int):
        gen = self.torch.Generator().manual_seed(0)
        vocab = int(self.model.config.vocab_size)
        return self.torch.randint(min(10, vocab - 1), vocab, (batch, prompt_len), generator=gen).to(self.device)

    def prepare(self, batch: int, prompt_len: int, gen_len: int) -> None:
        """With graphs: allocate the static cache and capture both phases for this shape (once per shape, before
        the timed part of the first generate)."""
        from sparsedeploy.static_generate import GenerationShape, StaticGenerator

        if not self.graphs:
            return
        shape = GenerationShape(batch, prompt_len, gen_len)
        if self.static is None or self.static.shape != shape:
            self.static = None  # free the previous shape's cache and graphs first
            try:
                self.static = StaticGenerator(self.model, shape, self.device, graphs=True)
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UserError(f"CUDA graph capture failed for this model ({first}): run the bench without --cuda-graphs") from exc

    def generate(self, batch: int, prompt_len: int, gen_len: int) -> dict[str, float]:
        if self.graphs:
            return self._generate_graphed(batch, prompt_len, gen_len)
        torch = self.torch
        ids = self._prompt(batch, prompt_len)
        with torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            out = self.model(input_ids=ids, use_cache=True)
            self._sync()
            t1 = time.perf_counter()
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(gen_len):
                out = self.model(input_ids=nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            self._sync()
            t2 = time.perf_counter()
        return {"prefill": t1 - t0, "decode": t2 - t1, "total": t2 - t0}

    def _generate_graphed(self, batch: int, prompt_len: int, gen_len: int) -> dict[str, float]:
        self.prepare(batch, prompt_len, gen_len)
        ids = self._prompt(batch, prompt_len)
        self._sync()
        t0 = time.perf_counter()
        self.static.prefill(ids)
        self._sync()
        t1 = time.perf_counter()
        for _ in range(gen_len):
            self.static.decode()
        self._sync()
        t2 = time.perf_counter()
        return {"prefill": t1 - t0, "decode": t2 - t1, "total": t2 - t0}


def bench_torch(cfg: BenchConfig, variants: dict[str, Path], progress=None) -> tuple[list[dict], dict]:
    import torch

    from sparsedeploy.models import resolve_device, resolve_dtype

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype)
    semi = device.type == "cuda"
    if semi and dtype not in (torch.float16, torch.bfloat16):
        raise UserError("2:4 semi-structured kernels need --dtype float16 or bfloat16")
    torch.set_num_threads(cfg.threads)
    models = {name: TorchCausalLM(path, device, dtype, semi and name != "dense", graphs=cfg.cuda_graphs)
              for name, path in variants.items()}
    notes = {"device": str(device), "dtype": cfg.dtype, "semi_structured_linears": {n: m.converted for n, m in models.items()},
             "cuda_graphs": cfg.cuda_graphs,
             "tensorrt": ("not measured: the tensorrt package is not importable here" if not _importable("tensorrt") else
                          "not measured in this run: `sparsedeploy bench --engine tensorrt --device cuda` builds dense and "
                          "2:4-sparse TensorRT engines from the exports")}
    form = "full model, torch " + ("2:4 semi-structured sparse linears" if semi else "dense kernels on zeroed weights (CPU: no 2:4 kernels)")
    form += (", each phase replayed as a CUDA graph over a static KV cache" if cfg.cuda_graphs
             else ", eager (host-side dispatch and kernel setup included)")
    rows = []
    for batch in cfg.batches:
        runners = {name: (lambda m=m: m.generate(batch, cfg.prompt_len, cfg.gen_len)) for name, m in models.items()}
        res = run_interleaved(runners, rounds=cfg.rounds, per_round=cfg.per_round, warmup=cfg.warmup, max_seconds=cfg.max_seconds)
        new = phase_rows(res, list(variants), batch, cfg.prompt_len, cfg.gen_len, form, "torch")
        rows.extend(new)
        if progress:
            progress(new)
    return rows, notes


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ----------------------------------------------------------------------------------------------
# Entry point used by the CLI
# ----------------------------------------------------------------------------------------------

def run_bench(cfg: BenchConfig, progress=None) -> dict:
    if cfg.engine not in ENGINES:
        raise UserError(f"unknown --engine {cfg.engine!r}: use {', '.join(ENGINES)}")
    if any(b < 1 for b in cfg.batches) or cfg.prompt_len < 1 or cfg.gen_len < 0 or cfg.threads < 1 or cfg.rounds < 1:
        raise UserError("--batch, --prompt-len, --threads and --rounds must be positive and --gen-len >= 0")
    if cfg.cuda_graphs and cfg.engine != "torch":
        raise UserError(f"--cuda-graphs is for --engine torch (checkpoints on a GPU), not --engine {cfg.engine}: drop --cuda-graphs")
    if cfg.cuda_graphs and not cfg.device.startswith("cuda"):
        raise UserError(f"--cuda-graphs needs a GPU, not --device {cfg.device}: add --device cuda or drop --cuda-graphs")
    if cfg.engine == "torch":
        for what, p in (("--model", cfg.model), ("--baseline", cfg.baseline)):
            if p and not Path(p, "config.json").is_file():
                raise UserError(f"{what} {p} is not a Hugging Face checkpoint directory (no config.json): --engine torch times checkpoints, not ONNX")
        variants = {**({"dense": Path(cfg.baseline)} if cfg.baseline else {}), "sparse": Path(cfg.model)}
    else:
        variants = {**({"dense": find_onnx(cfg.baseline, "--baseline")} if cfg.baseline else {}), "sparse": find_onnx(cfg.model)}
    if cfg.engine == "tensorrt":
        from sparsedeploy.engines.tensorrt_engine import unavailable_reason

        if not cfg.device.startswith("cuda"):
            raise UserError(f"--engine tensorrt runs on a GPU, not on --device {cfg.device}: add --device cuda")
        reason = unavailable_reason()
        if reason:
            return {"skipped": f"--engine tensorrt: not run: {reason}"}
    if cfg.engine == "torch" and cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return {"skipped": f"--engine torch --device {cfg.device}: CUDA is not available on this machine, so the 2:4 "
                               "semi-structured GPU benchmark was not run (use --engine ort or deepsparse on CPU)"}
    machine = machine_info(cfg.threads)
    if cfg.engine in ("torch", "tensorrt") and cfg.device.startswith("cuda"):
        import torch

        machine.update(gpu=torch.cuda.get_device_name(torch.device(cfg.device)), torch=torch.__version__)
    result = {"model": str(cfg.model), "baseline": cfg.baseline, "engine": cfg.engine, "prompt_len": cfg.prompt_len,
              "gen_len": cfg.gen_len, "batches": cfg.batches, "rounds": cfg.rounds, "machine": machine,
              "config": asdict(cfg), "notes": {}}
    if cfg.engine == "ort":
        result["rows"] = bench_ort(cfg, variants, progress)
    elif cfg.engine == "deepsparse":
        from sparsedeploy.engines.deepsparse_env import LICENCE_NOTE

        result["rows"], result["notes"] = bench_deepsparse(cfg, variants, progress)
        result["licence"] = LICENCE_NOTE
    elif cfg.engine == "tensorrt":
        result["rows"], result["notes"] = bench_tensorrt(cfg, variants, progress)
    else:
        result["rows"], result["notes"] = bench_torch(cfg, variants, progress)
    return result


def bench_stage(recipe, model_dir: Path, onnx_dir: Path, out_dir: Path) -> dict:
    """The pipeline's bench stage (`bench:` section of a recipe): the pruned model against the dense one.

    ort/deepsparse time the verified export of the export stage against a dense export made here (deleted
    afterwards); torch times the two checkpoints. Writes bench.json/.md/.png into `out_dir`.
    """
    import shutil

    from sparsedeploy.fsutil import write_json_atomic
    from sparsedeploy.models import resolve_model_path

    section = recipe.bench
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = out_dir / ".dense_onnx"
    device = recipe.device if recipe.device != "auto" else ("cuda" if section.engine == "tensorrt" else "cpu")
    if section.engine == "tensorrt":
        from sparsedeploy.engines.tensorrt_engine import unavailable_reason

        reason = unavailable_reason()
        if reason:  # say so before exporting a dense baseline nobody will time
            message = f"bench engine tensorrt: not run: {reason}"
            return {"skipped": message, "markdown": message}
    cfg = BenchConfig(model=str(onnx_dir), engine=section.engine, batches=list(section.batch), prompt_len=section.prompt_len,
                      gen_len=section.gen_len, threads=section.threads, device=device)
    try:
        if section.engine == "torch":
            cfg.model, cfg.baseline = str(model_dir), str(resolve_model_path(recipe.model))
        else:
            from sparsedeploy.export import ExportConfig, export_checkpoint

            log.info("exporting the dense model %s for the baseline timings", recipe.model)
            export_checkpoint(ExportConfig(model=recipe.model, dtype=recipe.export.dtype, opset=recipe.export.opset,
                                           target=recipe.export.target, verify=False), scratch, overwrite=True)
            cfg.baseline = str(scratch)
        result = run_bench(cfg)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if "skipped" in result:
        return {"skipped": result["skipped"], "markdown": result["skipped"]}
    md = markdown(result)
    write_json_atomic(out_dir / "bench.json", result)
    (out_dir / "bench.md").write_text(md)
    png = plot(result, out_dir / "bench.png")
    speedups = {f"batch {r['batch']} {r['phase']}": r["speedup"] for r in result["rows"] if "speedup" in r}
    body = md.split("\n", 2)[2] if md.startswith("# ") else md  # REPORT.md gives the heading
    if png is not None:
        body += f"\n![speedup](bench/{png.name})\n"
    return {"engine": section.engine, "threads": section.threads, "speedups": speedups, "markdown": body,
            "form": sorted({r["form"] for r in result["rows"]})}
