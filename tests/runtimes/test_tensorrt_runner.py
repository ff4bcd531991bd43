"""The TensorRT runner's reading of its build log."""

from __future__ import annotations

import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def test_tensorrt_sparse_layer_report_parses_its_log_lines():
    from sparsedeploy.runtimes.tensorrt_runner import sparse_layer_report

    messages = [
        "Compiler backend is used during engine build.",
        "(Sparsity) Layers eligible for sparse math: /layers.0/mlp/up_proj/MatMul, /layers.0/mlp/down_proj/MatMul",
        "(Sparsity) TRT inference plan picked sparse implementation for layers: /layers.0/mlp/down_proj/MatMul",
    ]
    assert sparse_layer_report(messages) == {
        "eligible": ["/layers.0/mlp/up_proj/MatMul", "/layers.0/mlp/down_proj/MatMul"],
        "picked_sparse": ["/layers.0/mlp/down_proj/MatMul"],
    }
    assert sparse_layer_report(["no sparsity lines"]) == {"eligible": [], "picked_sparse": []}
