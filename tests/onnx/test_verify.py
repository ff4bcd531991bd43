"""Verification catches what it must: lost zeros, broken N:M, changed values, broken files."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx_helpers import pruned_tiny_checkpoint

from sparsedeploy.common.errors import UserError
from sparsedeploy.export.run import ExportConfig, export_checkpoint
from sparsedeploy.onnx.storage import load_model_proto
from sparsedeploy.onnx.verify import FP32_ATOL, checkpoint_reference, verify_parity, verify_sparsity


def _q_proj_initializer(model) -> onnx.TensorProto:
    node = next(n for n in model.graph.node if "layers.0/self_attn/q_proj" in n.name and n.op_type == "MatMul")
    return next(i for i in model.graph.initializer if i.name == node.input[1])


def test_clean_export_passes(nm_export):
    ckpt, out = nm_export
    reference, masks, nm = checkpoint_reference(ckpt)
    assert nm == (2, 4) and len(reference) == len(masks) == 14
    report = verify_sparsity(load_model_proto(out), reference, masks, nm)
    assert report.ok and report.to_dict()["nm_qualifying"] == 14


def test_zeroed_weight_made_dense_is_caught(nm_export):
    ckpt, out = nm_export
    model = load_model_proto(out)
    init = _q_proj_initializer(model)
    array = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array(np.where(array == 0, np.float32(0.01), array), init.name))
    reference, masks, nm = checkpoint_reference(ckpt)
    report = verify_sparsity(model, reference, masks, nm)
    assert not report.ok
    assert len(report.problems) == 1
    problem = report.problems[0]
    assert problem.startswith("model.layers.0.self_attn.q_proj:") and "0 zeros but the PyTorch weight has" in problem


def test_broken_nm_group_with_same_zero_count_is_caught(nm_export):
    """Moving one zero across groups keeps the zero count but breaks 2:4 and the mask."""
    ckpt, out = nm_export
    model = load_model_proto(out)
    init = _q_proj_initializer(model)
    array = numpy_helper.to_array(init).copy()  # [K, N]
    col = array[:, 0]
    zero_first, nonzero_second = np.flatnonzero(col[:4] == 0)[0], 4 + np.flatnonzero(col[4:8] != 0)[0]
    col[zero_first], col[nonzero_second] = col[nonzero_second], 0.0
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    reference, masks, nm = checkpoint_reference(ckpt)
    report = verify_sparsity(model, reference, masks, nm)
    row = next(layer for layer in report.layers if layer.name == "model.layers.0.self_attn.q_proj")
    assert row.zeros_onnx == row.zeros_torch and not row.ok and row.pruned_nonzero_in_onnx == 1
    assert row.nm_ok is False and "more than 2" in row.nm_reason


def test_renamed_and_transposed_initializer_is_still_found(nm_export):
    """A weight stored as [N, K] under another name behind a Transpose node is matched and checked along K."""
    ckpt, out = nm_export
    model = load_model_proto(out)
    init = _q_proj_initializer(model)
    node = next(n for n in model.graph.node if len(n.input) > 1 and n.input[1] == init.name)
    stored = numpy_helper.to_array(init).T.copy()
    model.graph.initializer.remove(init)
    model.graph.initializer.append(numpy_helper.from_array(stored, "renamed_weight_NK"))
    model.graph.node.insert(0, helper.make_node("Transpose", ["renamed_weight_NK"], ["renamed_weight_KN"], perm=[1, 0]))
    node.input[1] = "renamed_weight_KN"
    node.name = "anonymous"
    reference, masks, nm = checkpoint_reference(ckpt)
    report = verify_sparsity(model, reference, masks, nm)
    row = next(layer for layer in report.layers if layer.name == "model.layers.0.self_attn.q_proj")
    assert report.ok and row.onnx_source == "renamed_weight_NK" and row.transposed and row.matched_by == "exact values"


def test_unstructured_model_reports_why_not_nm(tmp_path):
    ckpt = pruned_tiny_checkpoint(tmp_path / "u", "0.5")
    export_checkpoint(ExportConfig(model=str(ckpt), verify=False), tmp_path / "o")
    reference, masks, _ = checkpoint_reference(ckpt)
    report = verify_sparsity(load_model_proto(tmp_path / "o"), reference, masks, (2, 4))
    assert not report.ok and all(layer.ok for layer in report.layers)  # zeros intact, pattern not 2:4
    assert all(not layer.nm_ok and "more than 2 non-zeros" in layer.nm_reason for layer in report.layers)


def test_parity_detects_a_changed_weight(nm_export, tmp_path):
    ckpt, out = nm_export
    model = load_model_proto(out)
    init = next(i for i in model.graph.initializer if i.name == "model.embed_tokens.weight")
    array = numpy_helper.to_array(init) * np.float32(1.01)
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(model, str(tmp_path / "model.onnx"))
    report = verify_parity(ckpt, tmp_path / "model.onnx", decode_steps=2, greedy_tokens=4)
    assert report.max_abs_diff > FP32_ATOL and not report.ok
    clean = verify_parity(ckpt, out / "model.onnx", decode_steps=2, greedy_tokens=4)
    assert clean.ok and clean.max_abs_diff <= FP32_ATOL


def test_truncated_file_is_one_clear_line(nm_export, tmp_path):
    _, out = nm_export
    data = (out / "model.onnx").read_bytes()
    (tmp_path / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_model_proto(tmp_path / "model.onnx")
    proc = subprocess.run(
        [sys.executable, "-m", "sparsedeploy", "inspect", str(tmp_path / "model.onnx")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot read ONNX model") and "export it again" in lines[0]
