"""`sparsedeploy inspect`: per-weight sparsity and N:M counts, and the polygraphy cross-check."""

import pytest

onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402

from sparsedeploy.onnx.inspect import inspect_onnx  # noqa: E402


def test_inspect_counts_match_numpy(nm_export):
    _, out = nm_export
    data = inspect_onnx(out)
    model = onnx.load(str(out / "model.onnx"))
    arrays = [numpy_helper.to_array(i) for i in model.graph.initializer]
    arrays = [a for a in arrays if a.ndim >= 2 and a.dtype.kind == "f"]
    assert data["weights"] == len(arrays)
    assert data["zeros"] == sum(int((a == 0).sum()) for a in arrays)
    assert data["nm_qualifying"] == 14 and data["matmul_weights"] == 15  # lm_head is dense
    assert data["domains"] == ["ai.onnx"]


def test_polygraphy_verdict_agrees_when_installed(nm_export):
    pytest.importorskip("polygraphy", reason="polygraphy not installed (pip install '.[polygraphy]')")
    _, out = nm_export
    poly = inspect_onnx(out)["polygraphy"]
    assert poly["ran"], poly
    assert poly["agree"] and poly["polygraphy_2_4_weights"] == 14


def test_inspect_table_for_people(pruned_exports):
    from sparsedeploy.onnx.inspect import format_inspect, inspect_onnx

    out, _ = pruned_exports["2:4"]
    text = format_inspect(inspect_onnx(out / "model.onnx"))
    lines = text.splitlines()
    assert lines[0].split() == ["weight", "shape", "dtype", "sparsity", "2:4", "used", "by"]
    rows = [line for line in lines[1:] if "MatMul /" in line]
    assert len(rows) == 15 and sum(line.split()[4] == "yes" for line in rows) == 14  # every decoder linear, not lm_head
    assert all("q_proj" not in line or "0.5000" in line for line in rows)
    assert any(line.startswith("total:") and "14/15 MatMul/Gemm weights satisfy 2:4 along K" in line for line in lines)
