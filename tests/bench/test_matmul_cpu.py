"""Kernel bench: graph construction and a tiny real run on ONNX Runtime (no timing asserted)."""

from __future__ import annotations

import numpy as np
import pytest

from sparsedeploy.bench.matmul_cpu import KernelShape, bench_kernels, build_chain, kernel_markdown, sparse_weight
from sparsedeploy.common.sparsity import parse_sparsity, satisfies_nm

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def test_sparse_weight_patterns():
    w = sparse_weight(64, 32, parse_sparsity("0.75"))
    assert w.shape == (64, 32)
    assert ((w == 0).sum(axis=0) == 48).all()  # per output column (a row of the nn.Linear weight)
    nm = sparse_weight(64, 32, parse_sparsity("2:4"))
    import torch

    assert satisfies_nm(torch.from_numpy(nm.T.copy()), 2, 4)
    assert (sparse_weight(64, 32, None) != 0).all()


def test_chain_graph_computes_relu_matmuls(tmp_path):
    path = build_chain(tmp_path / "c.onnx", 16, 24, batch=3, spec=parse_sparsity("0.5"), depth=3)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert model.ir_version == 8 and model.opset_import[0].version == 13
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert [weights[f"w{i}"].shape for i in range(3)] == [(16, 24), (24, 16), (16, 24)]
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    ref = x
    for i in range(3):
        ref = np.maximum(ref @ weights[f"w{i}"], 0)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_tiny_kernel_bench_runs_on_ort():
    rows = bench_kernels(
        [KernelShape("tiny", 32, 64, "test")],
        ["0.5", "2:4"],
        [1, 4],
        ["ort"],
        threads=1,
        rounds=2,
        per_round=1,
        depth=2,
        min_sample_s=0.0,
    )
    assert len(rows) == 4
    assert {r["pattern"] for r in rows} == {"0.5", "2:4"} and {r["batch"] for r in rows} == {1, 4}
    for r in rows:
        assert r["dense_ms"] > 0 and r["sparse_ms"] > 0 and r["speedup"] > 0 and r["threads"] == 1 and r["rounds"] == 2
    md = kernel_markdown(rows)
    assert md.count("\n") == 2 + len(rows) and "| ort | tiny |" in md
