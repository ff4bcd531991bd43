"""ONNX Runtime decoding: KV cache and full recompute agree; generate_text works end to end."""

from __future__ import annotations

import numpy as np
import pytest
from onnx_helpers import pruned_tiny_checkpoint

from sparsedeploy.common.errors import UserError
from sparsedeploy.export.run import ExportConfig, export_checkpoint
from sparsedeploy.onnx import storage
from sparsedeploy.onnx.decoder import OnnxDecoder, generate_text


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt")
    ckpt = pruned_tiny_checkpoint(root / "ckpt", "2:4")
    export_checkpoint(ExportConfig(model=str(ckpt), verify=False), root / "past")
    no_past = export_checkpoint(ExportConfig(model=str(ckpt), task="text-generation", greedy_tokens=8), root / "nopast")
    return root, no_past


def test_kv_cache_and_recompute_agree(exports):
    root, no_past = exports
    assert no_past["verification"]["ok"], no_past["verification"]["problems"]
    with_past, without = OnnxDecoder.load(root / "past"), OnnxDecoder.load(root / "nopast")
    assert with_past.with_past and not without.with_past
    ids = np.array([[5, 17, 42, 7, 99]], np.int64)
    a, b = [], []
    tokens_a = with_past.greedy(ids, 12, step_logits=a)
    tokens_b = without.greedy(ids, 12, step_logits=b)
    assert tokens_a.tolist() == tokens_b.tolist()
    assert max(float(np.abs(x - y).max()) for x, y in zip(a, b)) < 1e-4


def test_generate_text(exports):
    root, _ = exports
    out = generate_text(root / "past", "The capital of France is", max_new_tokens=6)
    assert 1 <= out["new_tokens"] <= 6 and out["kv_cache"] and isinstance(out["completion"], str)
    with pytest.raises(UserError, match="at least 1"):
        generate_text(root / "past", "x", max_new_tokens=0)


def test_generate_text_runs_a_sparse_cpu_export_whole_with_the_custom_op_library(
    sparse_cpu_export, ort_op_library, monkeypatch
):
    _, out, _ = sparse_cpu_export
    reads = []
    real = storage.load_model_proto
    monkeypatch.setattr(storage, "load_model_proto", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    whole = generate_text(
        out, "The capital of France is", max_new_tokens=8, threads=1, custom_op_library=ort_op_library
    )
    assert len(reads) == 1  # the graph is read once: the session counts its kernel nodes
    segmented = generate_text(out, "The capital of France is", max_new_tokens=8, threads=1, engine="sparse-cpu")
    assert whole["engine"] == "sparse-cpu" and whole["custom_op_library"] == str(ort_op_library)
    assert whole["tokens"] == segmented["tokens"] and segmented["custom_op_library"] is None


def test_non_decoder_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    with pytest.raises(UserError, match="input_ids"):
        OnnxDecoder.load(tmp_path)
