"""The static forms DeepSparse and TensorRT time (linear skeleton, decoder stack), and the checkpoint they are built
from."""

from __future__ import annotations

import numpy as np
import pytest

from sparsedeploy.bench.config import BenchConfig
from sparsedeploy.bench.forms import build_linear_skeleton, matmul_weights
from sparsedeploy.onnx.storage import onnx_file

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def test_linear_skeleton_keeps_every_matmul_and_its_zeros(tiny_onnx, tmp_path):
    weights = matmul_weights(onnx_file(tiny_onnx["sparse"]))
    assert len(weights) >= 2 * 7  # 2 blocks x 7 linears (plus lm_head when exported as a constant MatMul)
    info = build_linear_skeleton(weights, rows=5, out=tmp_path / "s.onnx")
    model = onnx.load(str(tmp_path / "s.onnx"))
    onnx.checker.check_model(model)
    assert info["matmuls"] == len(weights) == sum(n.op_type == "MatMul" for n in model.graph.node)
    assert 0.3 < info["sparsity"] < 0.6  # the zeroed block linears carried into the skeleton
    sess = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.ones(i.shape, np.float32) for i in sess.get_inputs()}
    outs = sess.run(None, feeds)
    assert all(o.shape[0] == 5 for o in outs)


@pytest.mark.slow
def test_linear_skeleton_runs_in_deepsparse(tiny_onnx, tmp_path, deepsparse_env):
    """The skeleton form is what DeepSparse 1.8 accepts."""
    from sparsedeploy.runtimes import deepsparse_env as ds

    env = deepsparse_env
    path = tmp_path / "s.onnx"
    build_linear_skeleton(matmul_weights(onnx_file(tiny_onnx["sparse"])), rows=4, out=path)
    info = ds.check_model(env, path, batch=4, threads=1)
    assert info["ok"] and info["fraction_supported"] == 1.0


def test_static_forms_free_each_form_once_it_is_timed(tiny_exports, tmp_path):
    from sparsedeploy.bench.forms import static_forms

    variants = {n: onnx_file(p) for n, p in tiny_exports.items()}
    seen = []
    for form in static_forms(BenchConfig(model="x", batches=[1, 2], prompt_len=8), variants, tmp_path, notes := {}):
        assert all(p.is_file() for p in form.paths.values())
        seen.append(form)
    assert [(f.batch, f.phase, f.stack, f.rows) for f in seen] == [
        (1, "prefill", True, 8),
        (1, "decode-step", True, 1),
        (2, "prefill", True, 16),
        (2, "decode-step", True, 2),
    ]
    assert [f.form.split(" (")[0] for f in seen[:2]] == ["decoder stack", "decoder stack + KV cache"]
    assert not any(tmp_path.iterdir())  # every form's files deleted after its turn
    assert "skeleton" not in notes and "stack" not in notes


def test_bench_finds_the_source_checkpoint_from_the_export_report_after_a_move(tmp_path):
    """No directory-layout guess: the export records its checkpoint (absolute and relative), bench reads that."""
    import os

    from onnx_helpers import pruned_tiny_checkpoint

    from sparsedeploy.bench.forms import source_checkpoint
    from sparsedeploy.export.run import ExportConfig, export_checkpoint

    ckpt = pruned_tiny_checkpoint(tmp_path / "run" / "model", "2:4")
    report = export_checkpoint(ExportConfig(model=str(ckpt), verify=False), tmp_path / "run" / "onnx")
    assert report["model_path_relative"] == os.path.join("..", "model")
    assert source_checkpoint(tmp_path / "run" / "onnx") == ckpt
    os.replace(tmp_path / "run", tmp_path / "moved")
    found = source_checkpoint(tmp_path / "moved" / "onnx")
    assert found is not None and found.resolve() == (tmp_path / "moved" / "model").resolve()
    (tmp_path / "moved" / "model" / "config.json").unlink()  # the checkpoint is gone: nothing is guessed
    assert source_checkpoint(tmp_path / "moved" / "onnx") is None
