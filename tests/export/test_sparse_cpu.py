"""export --target sparse-cpu: the decoder linears stored only in the bitmask16 format, verified against PyTorch
(every zero, logits, greedy tokens) through ONNX Runtime segments + sparsedeploy's kernels."""

from __future__ import annotations

import onnx
import pytest
from onnx_helpers import pruned_tiny_checkpoint

from sparsedeploy.common.errors import UserError
from sparsedeploy.export.run import ExportConfig, export_checkpoint
from sparsedeploy.onnx.segmented import SegmentedSession
from sparsedeploy.onnx.sparse_linear import OP_TYPE
from sparsedeploy.onnx.storage import session_from_path


def test_export_packs_every_decoder_linear_and_verifies(sparse_cpu_export):
    _checkpoint, out, report = sparse_cpu_export
    assert report["verification"]["ok"], report["verification"]["problems"]
    sparsity = report["verification"]["sparsity"]
    assert sparsity["linears"] == 14 and sparsity["zeros_onnx"] == sparsity["zeros_torch"]
    assert report["verification"]["parity"]["greedy_identical"]
    assert report["sparse_cpu"]["linears"] == 14 and report["sparse_cpu"]["nodes"] == 8  # q/k/v and gate/up fused
    model = onnx.load(str(out / "model.onnx"))
    assert sum(n.op_type == OP_TYPE for n in model.graph.node) == 8
    weights = {i.name for i in model.graph.initializer}
    dense = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert dense == ["/lm_head/MatMul"]  # the decoder linears have no dense copy left; lm_head stays dense
    assert isinstance(session_from_path(out / "model.onnx"), SegmentedSession)


def test_float16_is_refused_before_work(sparse_cpu_export, tmp_path):
    checkpoint, _out, _report = sparse_cpu_export
    with pytest.raises(UserError, match="float32"):
        export_checkpoint(ExportConfig(model=str(checkpoint), target="sparse-cpu", dtype="float16"), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_dense_model_is_refused_and_nothing_written(tmp_path):
    checkpoint = pruned_tiny_checkpoint(tmp_path / "dense", "0.1")  # below the packing threshold everywhere
    with pytest.raises(UserError, match="no decoder linear"):
        export_checkpoint(ExportConfig(model=str(checkpoint), target="sparse-cpu"), tmp_path / "o")
    assert not (tmp_path / "o").exists()
