"""The graph between exporter and file: ORT optimisation kept only while every zero survives, rewrites verified."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparsedeploy.common.errors import UserError
from sparsedeploy.export.run import ExportConfig, export_checkpoint


def test_extended_optimisation_keeps_zeros(pruned_checkpoints, tmp_path):
    report = export_checkpoint(
        ExportConfig(model=str(pruned_checkpoints["2:4"]), optimize="extended", greedy_tokens=4), tmp_path / "o"
    )
    assert report["verification"]["ok"] and report["verification"]["sparsity"]["nm_qualifying"] == 14


def test_optimisation_that_breaks_zeros_is_refused(pruned_checkpoints, tmp_path, monkeypatch):
    """If ONNX Runtime's offline optimisation ever densified a pruned weight, the level is refused, nothing written."""
    import onnx
    from onnx import numpy_helper

    import sparsedeploy.export.run as export_mod

    real = export_mod.ort_optimize

    def damaging(model_file, level, out_file):
        real(model_file, level, out_file)
        model = onnx.load(str(out_file))
        for init in model.graph.initializer:
            array = numpy_helper.to_array(init)
            if array.ndim == 2 and (array == 0).mean() > 0.4:
                init.CopyFrom(numpy_helper.from_array(np.where(array == 0, np.float32(1e-3), array), init.name))
                break
        onnx.save(model, str(out_file))

    monkeypatch.setattr(export_mod, "ort_optimize", damaging)
    with pytest.raises(UserError, match="refusing --optimize basic: .*no longer intact"):
        export_checkpoint(
            ExportConfig(model=str(pruned_checkpoints["0.5"]), optimize="basic", greedy_tokens=4), tmp_path / "o"
        )
    assert not (tmp_path / "o").exists()


def test_rewrite_that_fills_zeros_fails_and_writes_nothing(pruned_checkpoints, tmp_path):
    from onnx import numpy_helper

    def densify(model):
        for init in model.graph.initializer:
            array = numpy_helper.to_array(init)
            if array.ndim == 2 and (array == 0).mean() > 0.4:
                init.CopyFrom(numpy_helper.from_array(np.where(array == 0, np.float32(1e-3), array), init.name))
                break
        return model

    with pytest.raises(UserError, match="zeros but the PyTorch weight has"):
        export_checkpoint(
            ExportConfig(model=str(pruned_checkpoints["0.5"]), greedy_tokens=4), tmp_path / "r", rewrite=densify
        )
    assert not (tmp_path / "r").exists()
    failed = json.loads((tmp_path / ".r.export_report.failed.json").read_text())
    assert failed["verification"]["ok"] is False


def test_rewrite_for_an_unknown_target_is_refused():
    from sparsedeploy.export.graph import register_rewrite, target_rewrites

    with pytest.raises(UserError, match="unknown target 'onnx-next': choose one of ort, "):
        register_rewrite("onnx-next", lambda model: model)
    assert target_rewrites("onnx-next") == []


def test_operator_domain_the_target_does_not_run_is_refused():
    from onnx import TensorProto, helper

    from sparsedeploy.export.config import TARGETS
    from sparsedeploy.export.graph import check_domains

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("FastGelu", ["y"], ["z"], domain="com.microsoft")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("z", 1, [2])]))
    check_domains(model, TARGETS["ort"])  # ONNX Runtime runs its contrib ops
    with pytest.raises(UserError, match=r"com.microsoft \(FastGelu\) that --target tensorrt does not run"):
        check_domains(model, TARGETS["tensorrt"])
