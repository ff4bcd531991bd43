"""The whole export (export_checkpoint, `sparsedeploy export`): targets, refused options, outputs, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sparsedeploy.common.errors import UserError
from sparsedeploy.export.run import ExportConfig, export_checkpoint
from sparsedeploy.onnx.verify import FP32_ATOL


@pytest.mark.parametrize("target, opset", [("deepsparse", 14), ("tensorrt", 17)])
def test_targets_use_standard_ops_and_their_opset(pruned_checkpoints, tmp_path, target, opset):
    import onnx

    report = export_checkpoint(
        ExportConfig(model=str(pruned_checkpoints["2:4"]), target=target, greedy_tokens=4), tmp_path / target
    )
    assert report["verification"]["ok"]
    model = onnx.load(str(tmp_path / target / "model.onnx"))
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == opset
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    stack = tmp_path / target / "deepsparse_decoder_stack.onnx"
    if target == "deepsparse":  # the form DeepSparse's engine compiles, written beside the export, zeros verified
        form = report["deepsparse_form"]
        assert (form["batch"], form["seq"], form["context"]) == (1, 128, 256)
        assert all(c["zeros_onnx"] == c["zeros_torch"] > 0 for c in form["zeros"].values())
        assert all((tmp_path / target / f).is_file() for f in form["files"].values())
        stack_model = onnx.load(str(stack))
        assert [i.name for i in stack_model.graph.input] == ["hidden", "cos", "sin", "mask"]
        assert next(o.version for o in stack_model.opset_import if o.domain in ("", "ai.onnx")) == 14
        step = onnx.load(str(tmp_path / target / "deepsparse_decode_step.onnx"))
        assert [i.name for i in step.graph.input][4:6] == ["past_key_0", "past_value_0"]
        # greedy generation through prefill graph + decode-step graph + head equals PyTorch's tokens
        assert form["generation"]["identical"] and all(r["new_tokens"] == 4 for r in form["generation"]["prompts"])
    else:
        assert not stack.exists() and "deepsparse_form" not in report
    # bench's forms at its defaults (batch 1,8, prompt 128; generations of 64 tokens for deepsparse), each listed once
    forms = report["static_forms"]
    files = {(e["phase"], e["batch"], e["seq"], e["past"]): e["file"] for e in forms["files"]}
    assert (forms["engine"], forms["batches"], forms["prompt_len"]) == (target, [1, 8], 128)
    assert files[("decode-step", 8, 1, 128)] == "stack_step_b8_c128.onnx"
    assert (("head", 8, 128, 192) in files) == (target == "deepsparse")
    assert files[("prefill", 1, 128, 0)] == (  # generate's prefill graph is bench's too: written once
        "deepsparse_decoder_stack.onnx" if target == "deepsparse" else "stack_prefill_b1_s128.onnx"
    )


@pytest.mark.parametrize(
    "options, words",
    [
        ({"optimize": "all"}, "hardware specific"),
        ({"target": "deepsparse", "optimize": "extended"}, "com.microsoft"),
        ({"target": "tensorrt", "storage": "sparse"}, "--storage dense"),
        ({"opset": 9}, "--opset"),
    ],
)
def test_refused_options_write_nothing(pruned_checkpoints, tmp_path, options, words):
    with pytest.raises(UserError, match=words):
        export_checkpoint(ExportConfig(model=str(pruned_checkpoints["0.5"]), **options), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_no_verify_skips(pruned_checkpoints, tmp_path):
    report = export_checkpoint(ExportConfig(model=str(pruned_checkpoints["0.5"]), verify=False), tmp_path / "n")
    assert report["verification"] is None and (tmp_path / "n" / "model.onnx").is_file()


def test_existing_output_needs_overwrite(pruned_exports, pruned_checkpoints):
    with pytest.raises(UserError, match="--overwrite"):
        export_checkpoint(ExportConfig(model=str(pruned_checkpoints["0.5"])), pruned_exports["0.5"][0])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sparsedeploy", "-q", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_export_inspect_generate(pruned_checkpoints, tmp_path):
    out = tmp_path / "cli"
    proc = _cli("export", "--model", str(pruned_checkpoints["2:4"]), "-o", str(out), "--greedy-tokens", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["zeros_onnx"] == data["zeros_torch"] and data["nm_qualifying"] == 14
    proc = _cli("inspect", str(out / "model.onnx"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["nm_qualifying"] == 14
    proc = _cli("generate", "--onnx", str(out), "--prompt", "The capital of", "--max-new-tokens", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["new_tokens"] >= 1


def test_cli_bad_model_is_one_line(tmp_path):
    proc = _cli("export", "--model", str(tmp_path / "missing"), "-o", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_external_data_export_verifies(pruned_checkpoints, tmp_path):
    """The > 2 GB path (forced here): weights in model.onnx_data, still verified and loadable."""
    report = export_checkpoint(
        ExportConfig(model=str(pruned_checkpoints["2:4"]), external_data=True, greedy_tokens=4), tmp_path / "e"
    )
    assert (tmp_path / "e" / "model.onnx_data").is_file()
    assert (tmp_path / "e" / "model.onnx").stat().st_size < 100_000
    assert report["verification"]["ok"] and report["verification"]["sparsity"]["nm_qualifying"] == 14


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_smollm2_pruned_export_end_to_end(smollm, cache_dir, tmp_path, pattern):
    """Real smollm2-135m pruned by Wanda (small calibration): export, sparsity equality, parity, readable text."""
    import torch
    from safetensors.torch import save_file

    from sparsedeploy.common.data import calibration_samples
    from sparsedeploy.common.files import write_json_atomic
    from sparsedeploy.common.models import LoadedModel, load_model, save_checkpoint
    from sparsedeploy.common.sparsity import parse_sparsity
    from sparsedeploy.onnx.decoder import generate_text
    from sparsedeploy.prune.blocks import prune_model
    from sparsedeploy.prune.methods import build_method

    lm = load_model("smollm2-135m", "float32", cache_dir)  # a fresh copy: the session fixture stays dense
    spec = parse_sparsity(pattern)
    samples = calibration_samples(lm.tokenizer, "gensim-wiki", 8, 128, 0)
    masks = prune_model(
        lm.model, samples, build_method("wanda"), lambda _i, _n: spec, torch.device("cpu"), show_progress=False
    )
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_checkpoint(LoadedModel(lm.model, lm.tokenizer, ckpt), ckpt)
    save_file({k: v.contiguous() for k, v in masks.items()}, str(ckpt / "masks.safetensors"))
    write_json_atomic(ckpt / "report.json", {"method": "wanda", "sparsity_spec": str(spec)})

    report = export_checkpoint(
        ExportConfig(model=str(ckpt), decode_steps=3, greedy_tokens=32, prompts=("The capital of France is",)),
        tmp_path / "onnx",
    )
    verification = report["verification"]
    assert verification["ok"], verification["problems"]
    sparsity = verification["sparsity"]
    assert sparsity["linears"] == 30 * 7 and sparsity["zeros_onnx"] == sparsity["zeros_torch"]
    assert 0.49 < sparsity["sparsity"] <= 0.5 + 1e-4  # weights that were already exactly 0 count too
    if spec.is_nm:
        assert sparsity["nm_qualifying"] == sparsity["linears"]
    parity = verification["parity"]
    assert parity["max_abs_diff"] <= FP32_ATOL and parity["greedy_identical"]
    out = generate_text(tmp_path / "onnx", "The capital of France is", max_new_tokens=16)
    words = out["completion"].split()
    assert len(words) >= 3 and sum(w.isascii() for w in words) >= len(words) - 1, out["completion"]
