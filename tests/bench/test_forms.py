"""The static forms DeepSparse and TensorRT time: the decoder-stack files each export lists (static_forms in
export_report.json), looked up without a checkpoint; the refusal when one was not exported; the linear skeleton."""

from __future__ import annotations

import json

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


def test_static_forms_are_the_exports_own_files_and_stay(tiny_exports, tmp_path):
    from sparsedeploy.bench.forms import free_skeletons, static_forms

    variants = {n: onnx_file(p) for n, p in tiny_exports.items()}
    forms = static_forms(BenchConfig(model="x", batches=[1, 2], prompt_len=8), variants, tmp_path, notes := {})
    assert [(f.batch, f.phase, f.stack, f.rows) for f in forms] == [
        (1, "prefill", True, 8),
        (1, "decode-step", True, 1),
        (2, "prefill", True, 16),
        (2, "decode-step", True, 2),
    ]
    assert [f.form.split(" (")[0] for f in forms[:2]] == ["decoder stack", "decoder stack + KV cache"]
    for form in forms:
        assert {p.parent for p in form.paths.values()} == {tiny_exports["dense"], tiny_exports["sparse"]}
        free_skeletons(form)
        assert all(p.is_file() for p in form.paths.values())  # timed, never deleted: they are the export's
    assert forms[2].paths["sparse"].name == "stack_prefill_b2_s8.onnx"
    assert not any(tmp_path.iterdir()) and "skeleton" not in notes and "stack" not in notes


def test_bench_forms_are_written_and_named_in_the_export_report(tiny_exports):
    """Every file under static_forms exists with its recorded size, and the specs are exactly what the bench needs."""
    from sparsedeploy.runtimes import stack_forms as sf

    report = json.loads((tiny_exports["sparse"] / "export_report.json").read_text())
    manifest = report["static_forms"]
    assert (manifest["engine"], manifest["batches"], manifest["prompt_len"], manifest["gen_len"]) == (
        "deepsparse",
        [1, 2],
        8,
        4,
    )
    specs = {sf.FormSpec(e["phase"], e["batch"], e["seq"], e["past"]) for e in manifest["files"]}
    assert specs == set(sf.bench_specs([1, 2], 8, 4)) and len(manifest["files"]) == 8
    for e in manifest["files"]:
        assert sf.files_bytes(tiny_exports["sparse"] / e["file"]) == e["bytes"] > 0
    session = ort.InferenceSession(
        str(tiny_exports["sparse"] / "stack_step_b2_c8.onnx"), providers=["CPUExecutionProvider"]
    )
    assert session.get_inputs()[0].shape == [2, 1, 64] and session.get_inputs()[4].shape[2] == 8


def test_tensorrt_target_writes_the_static_forms_without_generation(tmp_path):
    from onnx_helpers import pruned_tiny_checkpoint

    from sparsedeploy.export.config import ExportConfig
    from sparsedeploy.export.run import export_checkpoint

    ckpt = pruned_tiny_checkpoint(tmp_path / "model", "2:4")
    report = export_checkpoint(
        ExportConfig(model=str(ckpt), target="tensorrt", bench_batch=(3,), bench_prompt_len=5), tmp_path / "onnx"
    )
    files = {(e["phase"], e["batch"], e["seq"], e["past"]): e["file"] for e in report["static_forms"]["files"]}
    assert files == {
        ("prefill", 3, 5, 0): "stack_prefill_b3_s5.onnx",
        ("decode-step", 3, 1, 5): "stack_step_b3_c5.onnx",
    }
    assert set(report["static_forms"]["zeros"]) == set(files.values())  # verified: zeros equal PyTorch's
    assert all(z["zeros_onnx"] == z["zeros_torch"] > 0 for z in report["static_forms"]["zeros"].values())
    plain = export_checkpoint(ExportConfig(model=str(ckpt), verify=False), tmp_path / "ort")
    assert "static_forms" not in plain and not list((tmp_path / "ort").glob("stack_*"))


def test_bench_uses_the_forms_after_the_checkpoint_is_gone(tmp_path):
    """No checkpoint, no directory layout: the run directory moved and its checkpoint deleted, the forms still load."""
    import os
    import shutil

    from onnx_helpers import forms_export_config, pruned_tiny_checkpoint

    from sparsedeploy.bench.forms import generation_bundles, static_forms
    from sparsedeploy.export.run import export_checkpoint

    ckpt = pruned_tiny_checkpoint(tmp_path / "run" / "model", "2:4")
    export_checkpoint(forms_export_config(ckpt, bench_batch=(1,)), tmp_path / "run" / "onnx")
    os.replace(tmp_path / "run", tmp_path / "moved")
    shutil.rmtree(tmp_path / "moved" / "model")
    variants = {"sparse": onnx_file(tmp_path / "moved" / "onnx")}
    cfg = BenchConfig(model="x", batches=[1], prompt_len=8, gen_len=4)
    forms = static_forms(cfg, variants, tmp_path / "scratch", {})
    assert all(f.stack for f in forms) and forms[0].paths["sparse"].parent == tmp_path / "moved" / "onnx"
    bundle = generation_bundles(cfg, variants)[1]["sparse"]
    assert {k: p.name for k, p in bundle.items()} == {
        "prefill": "stack_prefill_b1_s8.onnx",
        "step": "stack_step_b1_c12.onnx",
        "head": "stack_head_b1_s8_c12.npz",
    }
    for path in (forms[0].paths["sparse"], bundle["step"]):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {i.name: np.zeros(i.shape, np.float32) for i in session.get_inputs()}
        assert np.isfinite(session.run(None, feeds)[0]).all()


@pytest.mark.parametrize(
    ("change", "fix"),
    [
        ({"batches": [4]}, "--bench-batch 1,2,4 --bench-prompt-len 8"),
        ({"prompt_len": 16}, "--bench-batch 1,2 --bench-prompt-len 16"),
        ({"gen_len": 9}, "--bench-gen-len 9"),
    ],
)
def test_a_form_that_was_not_exported_exits_2_naming_the_export_option(tiny_exports, tmp_path, change, fix):
    from cli_helpers import run_cli_subprocess as cli

    args = {"batches": [1], "prompt_len": 8, "gen_len": 4, **change}
    shapes = (
        f"--batch {','.join(map(str, args['batches']))} --prompt-len {args['prompt_len']} --gen-len {args['gen_len']}"
    )
    exports = ["--model", str(tiny_exports["sparse"]), "--baseline", str(tiny_exports["dense"])]
    proc = cli("bench", "--engine", "deepsparse", *shapes.split(), *exports, "-o", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fix in lines[0] and "no " in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_baseline_without_forms_or_a_changed_form_file_is_refused(tiny_exports, tiny_onnx, tmp_path):
    import shutil

    from sparsedeploy.bench.forms import static_forms
    from sparsedeploy.common.errors import UserError

    cfg = BenchConfig(model="x", batches=[1], prompt_len=8)
    variants = {"dense": onnx_file(tiny_onnx["dense"]), "sparse": onnx_file(tiny_exports["sparse"])}
    with pytest.raises(UserError, match=r"--baseline .* lists no static forms .* same --target"):
        static_forms(cfg, variants, tmp_path, {})
    copy = tmp_path / "copy"
    shutil.copytree(tiny_exports["sparse"], copy)
    with open(copy / "stack_prefill_b1_s8.onnx", "ab") as f:
        f.write(b"x")
    with pytest.raises(UserError, match=r"stack_prefill_b1_s8.onnx has \d+ bytes, export_report.json says"):
        static_forms(cfg, {"sparse": onnx_file(copy)}, tmp_path, {})
    # exports without any forms (optimum's own here): the linear skeleton, and the report says how to get the stack
    notes: dict = {}
    forms = static_forms(cfg, {n: onnx_file(p) for n, p in tiny_onnx.items()}, tmp_path, notes)
    assert not any(f.stack for f in forms) and "--target deepsparse" in notes["stack"]
