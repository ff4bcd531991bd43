"""Kernel-level speed: a model's own MatMul shapes timed dense versus sparse, in ONNX Runtime and DeepSparse.

Each test graph is a chain ``x -> MatMul(W1) -> ReLU -> MatMul(W2) -> ReLU -> ...`` of `depth` MatMuls
that alternates K->N and N->K (so 576x1536 and 1536x576 are timed together, like an MLP's up and
down projections), with static shapes, opset 13 and IR version 8 so that DeepSparse 1.8's onnx 1.14
reads it. Weights are random: speed depends on the shape and the zero pattern, not on the values.
Sparse variants prune each output row's lowest-magnitude inputs (the same per-row rule the pruning
methods use) to a ratio or an N:M pattern along the input (K) dimension.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparsedeploy.common.sparsity import SparsitySpec, mask_lowest_per_row, parse_sparsity
from sparsedeploy.common.timing import run_interleaved, summarize
from sparsedeploy.onnx.storage import session_from_path

log = logging.getLogger(__name__)

ONNX_OPSET = 13
ONNX_IR = 8


@dataclass(frozen=True)
class KernelShape:
    name: str
    k: int  # input features
    n: int  # output features
    model: str  # where the shape comes from
    speed_only: bool = False  # random-weight shape not tied to a real checkpoint's quality


SMOLLM2_SHAPES = [
    KernelShape("q_proj/o_proj 576x576", 576, 576, "smollm2-135m"),
    KernelShape("k_proj/v_proj 576x192", 576, 192, "smollm2-135m"),
    KernelShape("gate/up 576x1536 + down 1536x576", 576, 1536, "smollm2-135m"),
]
LLAMA1B_SHAPES = [
    KernelShape("1B-like MLP 2048x5632 + 5632x2048", 2048, 5632, "LLaMA-1B-like (random weights)", speed_only=True),
]
DEFAULT_PATTERNS = ["0.5", "0.7", "0.9", "2:4"]


def random_pruned_linear(n: int, k: int, spec: SparsitySpec | None, seed: int = 0) -> torch.Tensor:
    """A random float32 nn.Linear weight [out n, in k], each row pruned by magnitude along k (or dense for None)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) / k**0.5
    if spec is not None and (spec.is_nm or spec.ratio > 0):
        w = w * mask_lowest_per_row(w.abs(), spec)
    return w


def sparse_weight(k: int, n: int, spec: SparsitySpec | None, seed: int = 0) -> np.ndarray:
    """A random float32 weight in ONNX MatMul layout [k, n], pruned per output column along k."""
    return np.ascontiguousarray(random_pruned_linear(n, k, spec, seed).T.numpy())


def build_chain(
    path: Path, k: int, n: int, batch: int, spec: SparsitySpec | None, depth: int = 4, seed: int = 0
) -> Path:
    """Write the MatMul+ReLU chain (alternating [k,n] and [n,k] weights) as an ONNX file."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    cur, dim = "x", k
    for i in range(depth):
        out_dim = n if dim == k else k
        w = sparse_weight(dim, out_dim, spec, seed=seed + i)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [f"m{i}"]))
        last = i == depth - 1
        nodes.append(helper.make_node("Relu", [f"m{i}"], ["y" if last else f"r{i}"]))
        cur, dim = f"r{i}", out_dim
    graph = helper.make_graph(
        nodes,
        "matmul_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, dim])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name="sparsedeploy")
    model.ir_version = ONNX_IR
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def time_ort(
    paths: dict[str, Path],
    batch: int,
    k: int,
    threads: int,
    rounds: int,
    per_round: int,
    warmup: int = 2,
    max_seconds: float | None = None,
    min_sample_s: float = 0.02,
) -> dict[str, list[float]]:
    x = np.random.default_rng(0).standard_normal((batch, k)).astype(np.float32)
    runners = {}
    for name, path in paths.items():
        sess = session_from_path(path, threads=threads)
        runners[name] = lambda s=sess: s.run(None, {"x": x})
    return run_interleaved(
        runners, rounds=rounds, per_round=per_round, warmup=warmup, max_seconds=max_seconds, min_sample_s=min_sample_s
    ).times


def time_ort_static(
    paths: dict[str, Path], threads: int, rounds: int, per_round: int, warmup: int = 2, min_sample_s: float = 0.02
) -> dict[str, list[float]]:
    """Like time_ort for graphs with any static float inputs (random values; timing does not depend on them)."""
    runners = {}
    for name, path in paths.items():
        sess = session_from_path(path, threads=threads)
        rng = np.random.default_rng(0)
        feed = {i.name: rng.standard_normal([int(d) for d in i.shape]).astype(np.float32) for i in sess.get_inputs()}
        runners[name] = lambda s=sess, f=feed: s.run(None, f)
    return run_interleaved(runners, rounds=rounds, per_round=per_round, warmup=warmup, min_sample_s=min_sample_s).times


def ratio_rows(
    times: dict[str, list[float]], engine: str, shape: KernelShape, batch: int, threads: int, depth: int
) -> list[dict]:
    """One row per sparse variant: medians and the per-round dense/sparse speedup."""
    dense = times["dense"]
    rows = []
    for name, t in times.items():
        if name == "dense":
            continue
        speed = summarize([d / s for d, s in zip(dense, t) if s > 0])
        rows.append(
            {
                "engine": engine,
                "shape": shape.name,
                "k": shape.k,
                "n": shape.n,
                "model": shape.model,
                "speed_only": shape.speed_only,
                "batch": batch,
                "threads": threads,
                "depth": depth,
                "pattern": name,
                "dense_ms": summarize(dense).median * 1e3,
                "dense_spread": summarize(dense).spread,
                "sparse_ms": summarize(t).median * 1e3,
                "sparse_spread": summarize(t).spread,
                "speedup": speed.median,
                "speedup_p10": speed.p10,
                "speedup_p90": speed.p90,
                "noisy": bool(speed.noisy or summarize(dense).noisy or summarize(t).noisy),
                "rounds": len(t),
            }
        )
    return rows


def bench_kernels(
    shapes: list[KernelShape],
    patterns: list[str],
    batches: list[int],
    engines: list[str],
    threads: int = 1,
    rounds: int = 5,
    per_round: int = 3,
    depth: int = 4,
    deepsparse_env=None,
    workdir: Path | None = None,
    progress=None,
    min_sample_s: float = 0.02,
) -> list[dict]:
    """Dense vs each sparse pattern for every shape x batch x engine; variants interleaved within one process."""
    specs = {p: parse_sparsity(p) for p in patterns}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="sd-kernels-") as tmp:
        root = Path(workdir or tmp)
        for shape in shapes:
            for batch in batches:
                paths = {
                    "dense": build_chain(
                        root / f"{shape.k}x{shape.n}_b{batch}_dense.onnx", shape.k, shape.n, batch, None, depth
                    )
                }
                for p, spec in specs.items():
                    paths[p] = build_chain(
                        root / f"{shape.k}x{shape.n}_b{batch}_{p.replace(':', 'of')}.onnx",
                        shape.k,
                        shape.n,
                        batch,
                        spec,
                        depth,
                    )
                for engine in engines:
                    log.info("kernel %s batch %d on %s (%d threads)", shape.name, batch, engine, threads)
                    if engine == "ort":
                        times = time_ort(paths, batch, shape.k, threads, rounds, per_round, min_sample_s=min_sample_s)
                    elif engine == "deepsparse":
                        from sparsedeploy.runtimes.deepsparse_env import bench_models

                        times = bench_models(
                            deepsparse_env, paths, batch, threads, rounds, per_round, min_sample_s=min_sample_s
                        )["times"]
                    else:
                        raise ValueError(f"unknown kernel engine {engine}")
                    rows.extend(ratio_rows(times, engine, shape, batch, threads, depth))
                    if progress:
                        progress(rows[-len(specs) :])
    return rows


def kernel_markdown(rows: list[dict]) -> str:
    lines = [
        "| engine | shape | batch | threads | pattern | dense ms | sparse ms | speedup (p10-p90) | note |",
        "|---|---|---:|---:|---|---:|---:|---|---|",
    ]
    for r in rows:
        note = []
        if r["speed_only"]:
            note.append("speed-only shape")
        if r["noisy"]:
            note.append("NOISY")
        lines.append(
            f"| {r['engine']} | {r['shape']} | {r['batch']} | {r['threads']} | {r['pattern']} | {r['dense_ms']:.3f} | "
            f"{r['sparse_ms']:.3f} | {r['speedup']:.2f}x ({r['speedup_p10']:.2f}-{r['speedup_p90']:.2f}) | "
            f"{', '.join(note)} |"
        )
    return "\n".join(lines) + "\n"
