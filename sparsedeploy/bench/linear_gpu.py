"""Kernel-level GPU speed: a linear layer's 2:4 semi-structured sparse kernel against dense cuBLAS.

For each weight shape ``[out, in]`` (nn.Linear layout), a random weight is pruned 2:4 along the input
(K) dimension by magnitude -- speed depends on the shape and the pattern, not on the values -- and
``F.linear(x, W)`` is timed for ``x`` of ``tokens`` rows: dense (the pruned weight as an ordinary
tensor, so both sides do the same arithmetic) against the same weight compressed by
``torch.sparse``'s semi-structured tensors, through cuSPARSELt and through CUTLASS. Variants run
alternately, round after round, each sample timed with CUDA events over enough back-to-back calls to
last a few milliseconds; the speedup is the per-round ratio dense/sparse (median, p10-p90).

The sparse output is also checked against the dense one (max relative error), so a kernel that is
fast but wrong shows up in the table.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsedeploy.bench.matmul_cpu import random_pruned_linear
from sparsedeploy.common.sparsity import SparsitySpec
from sparsedeploy.common.timing import summarize

log = logging.getLogger(__name__)

TWO_FOUR = SparsitySpec.nm(2, 4)


@dataclass(frozen=True)
class LinearShape:
    name: str
    out_features: int
    in_features: int
    model: str
    speed_only: bool = False  # random-weight shape, not tied to a checkpoint's quality


SMOLLM2_LINEARS = [
    LinearShape("q_proj/o_proj", 576, 576, "smollm2-135m"),
    LinearShape("k_proj/v_proj", 192, 576, "smollm2-135m"),
    LinearShape("gate_proj/up_proj", 1536, 576, "smollm2-135m"),
    LinearShape("down_proj", 576, 1536, "smollm2-135m"),
]
LLAMA1B_LINEARS = [
    LinearShape("1B q_proj/o_proj", 2048, 2048, "LLaMA-1B-like", True),
    LinearShape("1B gate_proj/up_proj", 5632, 2048, "LLaMA-1B-like", True),
    LinearShape("1B down_proj", 2048, 5632, "LLaMA-1B-like", True),
]
LLAMA8B_LINEARS = [
    LinearShape("8B q_proj/o_proj", 4096, 4096, "LLaMA-8B-like", True),
    LinearShape("8B gate_proj/up_proj", 14336, 4096, "LLaMA-8B-like", True),
    LinearShape("8B down_proj", 4096, 14336, "LLaMA-8B-like", True),
]
DEFAULT_TOKENS = [1, 16, 128, 1024, 4096]
BACKENDS = ("cusparselt", "cutlass")
MODES = ("eager", "graph")


def pruned_weight(shape: LinearShape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    """A random weight pruned 2:4 along K by magnitude, on `device` in `dtype`."""
    return random_pruned_linear(shape.out_features, shape.in_features, TWO_FOUR, seed).to(device=device, dtype=dtype)


def backend_available(backend: str, device: torch.device | None = None) -> tuple[bool, str]:
    """(usable, why not): cuSPARSELt needs a torch built with it; torch's CUTLASS 2:4 kernels run on sm_8x only."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if backend == "cusparselt":
        ok = bool(getattr(torch.backends, "cusparselt", None) and torch.backends.cusparselt.is_available())
        return ok, "" if ok else "this torch build has no cuSPARSELt"
    major, minor = torch.cuda.get_device_capability(device)
    if backend == "cutlass" and major != 8:
        return False, f"torch's CUTLASS 2:4 kernels run on compute capability 8.x only (this GPU is {major}.{minor})"
    return backend == "cutlass", ""


def compress(weight: torch.Tensor, backend: str):
    """The weight as a semi-structured sparse tensor of the chosen backend."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cls = SparseSemiStructuredTensorCUSPARSELT if backend == "cusparselt" else SparseSemiStructuredTensorCUTLASS
    return cls.from_dense(weight)


def _time_calls(fn, calls: int, device: torch.device) -> float:
    """Seconds per call of `fn`, `calls` back to back between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    stream = torch.cuda.current_stream(device)
    start.record(stream)
    for _ in range(calls):
        fn()
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def graphed(fn, device: torch.device):
    """`fn` captured once in a CUDA graph; the returned replay runs its kernels without Python or host-side setup."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"


def time_linear(
    shape: LinearShape,
    tokens: int,
    dtype: torch.dtype,
    device: torch.device,
    backends=BACKENDS,
    modes=MODES,
    rounds: int = 7,
    sample_s: float = 0.005,
) -> list[dict]:
    """Dense vs each sparse backend for one shape and token count, eager and CUDA-graph replayed.

    One row per (backend, mode). `eager` is what a PyTorch program pays per call (Python dispatch and the
    kernel library's host-side setup included); `graph` replays the captured kernels, i.e. GPU time.
    """
    weight = pruned_weight(shape, dtype, device)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(tokens, shape.in_features, generator=gen, device=device, dtype=dtype)
    weights = {"dense": weight}
    errors: dict[str, str] = {}
    max_err: dict[str, float] = {}
    with torch.inference_mode():
        reference = F.linear(x, weight).float()
        for backend in backends:
            ok, why = backend_available(backend, device)
            if not ok:
                errors[backend] = why
                continue
            try:
                w = compress(weight, backend)
                out = F.linear(x, w).float()
            except (RuntimeError, ValueError, NotImplementedError) as exc:  # e.g. a shape the kernel refuses
                errors[backend] = _first_line(exc)
                continue
            weights[backend] = w
            max_err[backend] = float((out - reference).abs().max() / reference.abs().max().clamp_min(1e-12))
        fns = {}
        for name, w in weights.items():
            eager = lambda w=w: F.linear(x, w)  # noqa: E731
            if "eager" in modes:
                fns[(name, "eager")] = eager
            if "graph" in modes:
                try:
                    fns[(name, "graph")] = graphed(eager, device)
                except RuntimeError as exc:
                    errors[f"{name}/graph"] = _first_line(exc)
        calls = {}
        for key, fn in fns.items():  # warm up, then size a sample to last about `sample_s`
            for _ in range(3):
                fn()
            once = _time_calls(fn, 10, device)
            calls[key] = max(10, min(20_000, int(sample_s / max(once, 1e-7))))
        times: dict[tuple, list[float]] = {key: [] for key in fns}
        for r in range(rounds):
            for key in list(fns) if r % 2 == 0 else list(fns)[::-1]:
                times[key].append(_time_calls(fns[key], calls[key], device))
    flops = 2 * tokens * shape.in_features * shape.out_features
    rows = []
    for mode in modes:
        dense = times.get(("dense", mode))
        for backend in backends:
            row = {
                "shape": shape.name,
                "out_features": shape.out_features,
                "in_features": shape.in_features,
                "model": shape.model,
                "speed_only": shape.speed_only,
                "tokens": tokens,
                "dtype": str(dtype).replace("torch.", ""),
                "backend": backend,
                "mode": mode,
            }
            if dense:
                row.update(
                    dense_us=statistics.median(dense) * 1e6, dense_tflops=flops / statistics.median(dense) / 1e12
                )
            sparse = times.get((backend, mode))
            if dense and sparse:
                ratio = summarize([d / s for d, s in zip(dense, sparse)])
                row.update(
                    sparse_us=statistics.median(sparse) * 1e6,
                    speedup=ratio.median,
                    speedup_p10=ratio.p10,
                    speedup_p90=ratio.p90,
                    noisy=ratio.noisy,
                    max_rel_error=max_err[backend],
                    rounds=ratio.n,
                )
            else:
                row["error"] = (
                    errors.get(backend) or errors.get(f"{backend}/{mode}") or errors.get(f"dense/{mode}", "not run")
                )
            rows.append(row)
    return rows


def bench_linears(
    shapes: list[LinearShape],
    tokens: list[int],
    dtypes: list[torch.dtype],
    device: torch.device,
    rounds: int = 7,
    progress=None,
) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for shape in shapes:
            for t in tokens:
                new = time_linear(shape, t, dtype, device, rounds=rounds)
                rows.extend(new)
                if progress:
                    progress(new)
    return rows


def linear_markdown(rows: list[dict]) -> str:
    """One line per shape, dtype and token count: dense time, then each backend's speedup eager and replayed."""
    names = {"cusparselt": "cuSPARSELt", "cutlass": "CUTLASS"}
    timed = {r["backend"] for r in rows if "speedup" in r}
    notes = [
        f"- {names[b]} not timed: {sorted({r['error'] for r in rows if r['backend'] == b})[0]}"
        for b in BACKENDS
        if b not in timed and any(r["backend"] == b for r in rows)
    ]
    cols = [
        (b, m)
        for b in BACKENDS
        for m in MODES
        if b in timed and any(r["backend"] == b and r["mode"] == m for r in rows)
    ]
    lines = (
        notes
        + ([""] if notes else [])
        + [
            "| shape [out x in] | dtype | tokens | dense eager | dense graph (TFLOP/s) | "
            + " | ".join(f"{names[b]} {m}" for b, m in cols)
            + " | max rel. error |",
            "|---|---|---:|---:|---:|" + "---|" * len(cols) + "---|",
        ]
    )
    keyed: dict[tuple, dict[tuple, dict]] = {}
    for r in rows:
        keyed.setdefault((r["shape"], r["out_features"], r["in_features"], r["dtype"], r["tokens"]), {})[
            (r["backend"], r["mode"])
        ] = r

    def cell(r: dict | None) -> str:
        if r is None:
            return ""
        if "speedup" not in r:
            return f"n/a ({r['error'][:70]})"
        return f"{r['speedup']:.2f}x ({r['speedup_p10']:.2f}-{r['speedup_p90']:.2f}){' NOISY' if r['noisy'] else ''}"

    for (name, out, inp, dtype, tokens), by in keyed.items():

        def dense(mode: str, flops: bool = False) -> str:
            r = next((v for (b, m), v in by.items() if m == mode and "dense_us" in v), None)
            if r is None:
                return ""
            return f"{r['dense_us']:.1f} us" + (f" ({r['dense_tflops']:.0f})" if flops else "")

        errs = ", ".join(sorted({f"{b} {r['max_rel_error']:.1e}" for (b, _m), r in by.items() if "max_rel_error" in r}))
        lines.append(
            f"| {name} [{out} x {inp}] | {dtype} | {tokens} | {dense('eager')} | {dense('graph', True)} | "
            + " | ".join(cell(by.get(c)) for c in cols)
            + f" | {errs} |"
        )
    return "\n".join(lines) + "\n"
