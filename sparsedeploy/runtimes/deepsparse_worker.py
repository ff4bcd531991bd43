"""Runs INSIDE the DeepSparse virtualenv (numpy<2, onnx 1.14, deepsparse 1.8): one JSON request on stdin,
one JSON reply line on stdout. Imports nothing from the main environment except sparsedeploy.common.timing
(standard library only), so dense and sparse models are timed by the same interleaving loop.

Requests:
  {"action": "info"}
  {"action": "check", "models": {"model": PATH}, "batch": B, "threads": T}
  {"action": "bench", "models": {NAME: PATH, ...}, "batch": B, "threads": T, "rounds": R, "per_round": K,
   "warmup": W, "max_seconds": S}
  {"action": "generate", "models": {"prefill": PATH, "step": PATH}, "head": NPZ, "ids": [[...]], "new_tokens": N,
   "batch": B, "threads": T}: greedy generation through the decoder-stack graphs (sparsedeploy.runtimes.decoder_stack)
  {"action": "bench_generate", "models": {NAME: {"prefill": PATH, "step": PATH, "head": NPZ}, ...}, "batch": B,
   "threads": T, "prompt_len": P, "gen_len": G, "rounds": R, "per_round": K, "warmup": W}: generations of P + G
   tokens timed per phase, the variants alternating
PATHs are copies made by the caller: this worker never touches a user's file.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
# Only the copies of common/timing.py and runtimes/decoder_stack.py the caller prepared (never the main
# environment's site-packages); run by hand from a source checkout, the checkout itself.
sys.path.insert(0, os.environ.get("SPARSEDEPLOY_WORKER_LIB") or str(Path(__file__).resolve().parents[2]))

from sparsedeploy.common.timing import run_interleaved  # noqa: E402

_DTYPES = {1: "float32", 10: "float16", 6: "int32", 7: "int64", 9: "bool"}


def _inputs(path: str, batch: int):
    import numpy as np
    import onnx

    model = onnx.load(path, load_external_data=False)
    init = {i.name for i in model.graph.initializer}
    rng = np.random.default_rng(0)
    arrays = []
    names = {inp.name for inp in model.graph.input}
    decoder = "input_ids" in names and any(n.startswith("past_key_values.") for n in names)
    past = 16  # an optimum decoder step: consistent lengths (mask = past + 1), else its Gather nodes fail
    for inp in model.graph.input:
        if inp.name in init:
            continue
        t = inp.type.tensor_type
        dims = [d.dim_value if d.dim_value > 0 else (batch if i == 0 else 1) for i, d in enumerate(t.shape.dim)]
        dims[0] = batch if dims else batch
        dtype = _DTYPES.get(t.elem_type, "float32")
        if decoder and inp.name == "attention_mask":
            dims = [batch, past + 1]
        elif decoder and inp.name == "position_ids":
            arrays.append(np.full((batch, 1), past, dtype=dtype))
            continue
        elif decoder and inp.name.startswith("past_key_values."):
            dims[2] = past
        if dtype.startswith("float"):
            arrays.append(rng.standard_normal(dims).astype(dtype))
        elif dtype == "bool":
            arrays.append(np.ones(dims, dtype=bool))
        else:
            arrays.append(np.ones(dims, dtype=dtype))
    return arrays


def _engine(path: str, batch: int, threads: int, input_shapes=None):
    from deepsparse import Engine

    return Engine(model=path, batch_size=batch, num_cores=threads, input_shapes=input_shapes)


def _timing_reply(res, per_sample: dict, compile_s: dict, threads: int, batch: int) -> dict:
    """The reply of a timing action: each round's times, `per_sample` (inner repeats or phases), the order."""
    return {
        "times": res.times,
        **per_sample,
        "order": res.order,
        "compile_s": compile_s,
        "threads": threads,
        "batch": batch,
    }


def handle(req: dict) -> dict:
    action = req.get("action")
    if action == "environment":  # what the worker sees: its import path, environment names, sparsedeploy modules
        return {
            "sys_path": sys.path,
            "environ": sorted(os.environ),
            "isolated": bool(sys.flags.isolated),
            "modules": {
                name: getattr(mod, "__file__", None)
                for name, mod in sys.modules.items()
                if name.split(".")[0] == "sparsedeploy"
            },
        }
    if action == "info":
        import deepsparse
        import numpy
        import onnx
        from deepsparse.cpu import cpu_architecture

        arch = cpu_architecture()
        return {
            "deepsparse": deepsparse.__version__,
            "numpy": numpy.__version__,
            "onnx": onnx.__version__,
            "python": sys.version.split()[0],
            "cpu": {"isa": str(arch.isa), "vnni": bool(arch.vnni), "cores": int(arch.num_available_physical_cores)},
        }
    from sparsedeploy.runtimes import decoder_stack  # NumPy only; imported here so that "environment" needs no NumPy

    batch, threads = int(req["batch"]), int(req["threads"])
    models = req["models"]
    if action == "check":
        t0 = time.perf_counter()
        path = models["model"]
        data = _inputs(path, batch)
        # static shapes: with dynamic ones DeepSparse disables its optimized runtime and hands the graph to its
        # bundled ONNX Runtime ("Optimized runtime disabled - Detected dynamic input"), which proves nothing
        engine = _engine(path, batch, threads, [list(a.shape) for a in data])
        out = engine.run(data)
        return {
            "ok": True,
            "compile_and_run_s": time.perf_counter() - t0,
            "outputs": [list(o.shape) for o in out],
            "fraction_supported": float(getattr(engine, "fraction_of_supported_ops", 1.0)),
        }
    if action == "bench":
        runners = {}
        compile_s = {}
        for name, path in models.items():
            t0 = time.perf_counter()
            engine = _engine(path, batch, threads)
            compile_s[name] = time.perf_counter() - t0
            data = _inputs(path, batch)
            runners[name] = lambda e=engine, d=data: e.run(d)
        res = run_interleaved(
            runners,
            rounds=int(req.get("rounds", 5)),
            per_round=int(req.get("per_round", 3)),
            warmup=int(req.get("warmup", 2)),
            max_seconds=req.get("max_seconds"),
            min_sample_s=float(req.get("min_sample_s", 0.0)),
        )
        return _timing_reply(res, {"inner": res.inner}, compile_s, threads, batch)
    if action == "bench_generate":
        runners, compile_s = {}, {}
        for name, files in models.items():
            t0 = time.perf_counter()
            head = decoder_stack.StackHead.load(files["head"])
            prefill, step = (_engine(files[k], batch, threads) for k in ("prefill", "step"))
            compile_s[name] = time.perf_counter() - t0
            ids = decoder_stack.random_prompt(head, int(req["prompt_len"]))
            runners[name] = lambda h=head, p=prefill, s=step, i=ids: decoder_stack.generation_phases(
                h, p.run, s.run, i, int(req["gen_len"])
            )
        res = run_interleaved(
            runners,
            rounds=int(req.get("rounds", 3)),
            per_round=int(req.get("per_round", 1)),
            warmup=int(req.get("warmup", 1)),
        )
        return _timing_reply(res, {"phases": res.phases}, compile_s, threads, batch)
    if action == "generate":
        import numpy as np

        head = decoder_stack.StackHead.load(req["head"])
        t0 = time.perf_counter()
        engines = {name: _engine(models[name], batch, threads).run for name in ("prefill", "step")}
        compile_s = time.perf_counter() - t0
        timings: dict = {}
        tokens = decoder_stack.greedy(
            head, engines["prefill"], engines["step"], np.asarray(req["ids"], np.int64), int(req["new_tokens"]), timings
        )
        return {
            "tokens": tokens.tolist(),
            "timings": timings,
            "compile_s": compile_s,
            "threads": threads,
            "batch": batch,
        }
    return {"error": f"unknown action {action!r}"}


def main() -> None:
    req = json.loads(sys.stdin.read())
    try:
        reply = handle(req)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one JSON line
        reply = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    sys.stdout.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
