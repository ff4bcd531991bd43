"""Export of pruned checkpoints to ONNX: every verification passes on good exports, bad options are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx_helpers import pruned_tiny_checkpoint

from sparsedeploy.common.errors import UserError
from sparsedeploy.export.run import ExportConfig, export_checkpoint
from sparsedeploy.onnx.verify import FP16_ATOL, FP32_ATOL


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "0.5": pruned_tiny_checkpoint(root / "unstructured", "0.5"),
        "2:4": pruned_tiny_checkpoint(root / "nm", "2:4"),
    }


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    return {
        key: (
            root / key.replace(":", "_"),
            export_checkpoint(ExportConfig(model=str(path)), root / key.replace(":", "_")),
        )
        for key, path in checkpoints.items()
    }


def _onnx_io(path: Path) -> tuple[list[str], list[str]]:
    import onnx

    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output]


@pytest.mark.parametrize("key", ["0.5", "2:4"])
def test_export_keeps_every_zero_and_matches_pytorch(exported, checkpoints, key):
    out, report = exported[key]
    verification = report["verification"]
    assert verification["ok"], verification["problems"]
    sparsity = verification["sparsity"]
    assert sparsity["linears"] == 14  # 7 linears x 2 blocks
    assert sparsity["zeros_onnx"] == sparsity["zeros_torch"] > 0
    assert all(
        layer["zeros_onnx"] == layer["zeros_torch"] and layer["pruned_nonzero_in_onnx"] == 0
        for layer in sparsity["layers"]
    )
    parity = verification["parity"]
    assert parity["max_abs_diff"] <= FP32_ATOL
    assert parity["greedy_identical"] and all(len(p["onnx_tokens"]) == 32 for p in parity["prompts"])
    assert all(len(p["decode_max_abs_diff"]) == 4 for p in parity["prompts"])
    on_disk = json.loads((out / "export_report.json").read_text())
    assert on_disk["verification"]["sparsity"]["zeros_onnx"] == sparsity["zeros_onnx"]
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_io_names_follow_optimum(exported):
    inputs, outputs = _onnx_io(exported["0.5"][0])
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs[3:] == [f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")]
    assert outputs == ["logits"] + [f"present.{i}.{k}" for i in range(2) for k in ("key", "value")]


def test_nm_export_qualifies_along_k_and_unstructured_does_not(exported):
    nm = exported["2:4"][1]["verification"]["sparsity"]
    assert nm["nm_pattern"] == "2:4" and nm["nm_qualifying"] == nm["linears"]
    assert all("at most 2" in layer["nm_reason"] for layer in nm["layers"])
    assert exported["0.5"][1]["verification"]["sparsity"]["nm_pattern"] is None


def test_loads_in_optimum_ortmodel(exported):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    out, report = exported["2:4"]
    model = ORTModelForCausalLM.from_pretrained(str(out))
    prompt = report["verification"]["parity"]["prompts"][0]
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(out))(prompt["prompt"], return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))
    assert generated[0, ids.shape[1] :].tolist() == prompt["onnx_tokens"][:8]


def test_torch_fallback_has_the_same_names_and_verifies(checkpoints, exported, tmp_path):
    report = export_checkpoint(
        ExportConfig(model=str(checkpoints["2:4"]), exporter="torch", greedy_tokens=8), tmp_path / "t"
    )
    assert report["exporter"] == "torch" and report["verification"]["ok"], report["verification"]["problems"]
    assert _onnx_io(tmp_path / "t") == _onnx_io(exported["2:4"][0])


def test_float16_export_within_measured_bound(checkpoints, tmp_path):
    report = export_checkpoint(
        ExportConfig(model=str(checkpoints["2:4"]), dtype="float16", greedy_tokens=8), tmp_path / "h"
    )
    verification = report["verification"]
    assert verification["parity"]["dtype"] == "float16"
    assert FP32_ATOL < verification["parity"]["max_abs_diff"] <= FP16_ATOL  # fp16 is measurably worse, within bound
    assert verification["sparsity"]["ok"] and verification["sparsity"]["nm_qualifying"] == 14
    assert report["storage"]["model_bytes"] < export_bytes_fp32(checkpoints, tmp_path)


def export_bytes_fp32(checkpoints, tmp_path) -> int:
    return export_checkpoint(ExportConfig(model=str(checkpoints["2:4"]), verify=False), tmp_path / "f32")["storage"][
        "model_bytes"
    ]


@pytest.mark.parametrize("target, opset", [("deepsparse", 14), ("tensorrt", 17)])
def test_targets_use_standard_ops_and_their_opset(checkpoints, tmp_path, target, opset):
    import onnx

    report = export_checkpoint(
        ExportConfig(model=str(checkpoints["2:4"]), target=target, greedy_tokens=4), tmp_path / target
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


@pytest.mark.parametrize(
    "options, words",
    [
        ({"optimize": "all"}, "hardware specific"),
        ({"target": "deepsparse", "optimize": "extended"}, "com.microsoft"),
        ({"target": "tensorrt", "storage": "sparse"}, "--storage dense"),
        ({"opset": 9}, "--opset"),
    ],
)
def test_refused_options_write_nothing(checkpoints, tmp_path, options, words):
    with pytest.raises(UserError, match=words):
        export_checkpoint(ExportConfig(model=str(checkpoints["0.5"]), **options), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_extended_optimisation_keeps_zeros(checkpoints, tmp_path):
    report = export_checkpoint(
        ExportConfig(model=str(checkpoints["2:4"]), optimize="extended", greedy_tokens=4), tmp_path / "o"
    )
    assert report["verification"]["ok"] and report["verification"]["sparsity"]["nm_qualifying"] == 14


def test_rewrite_that_fills_zeros_fails_and_writes_nothing(checkpoints, tmp_path):
    from onnx import numpy_helper

    def densify(model):
        for init in model.graph.initializer:
            array = numpy_helper.to_array(init)
            if array.ndim == 2 and (array == 0).mean() > 0.4:
                init.CopyFrom(numpy_helper.from_array(np.where(array == 0, np.float32(1e-3), array), init.name))
                break
        return model

    with pytest.raises(UserError, match="zeros but the PyTorch weight has"):
        export_checkpoint(ExportConfig(model=str(checkpoints["0.5"]), greedy_tokens=4), tmp_path / "r", rewrite=densify)
    assert not (tmp_path / "r").exists()
    failed = json.loads((tmp_path / ".r.export_report.failed.json").read_text())
    assert failed["verification"]["ok"] is False


def test_no_verify_skips(checkpoints, tmp_path):
    report = export_checkpoint(ExportConfig(model=str(checkpoints["0.5"]), verify=False), tmp_path / "n")
    assert report["verification"] is None and (tmp_path / "n" / "model.onnx").is_file()


def test_existing_output_needs_overwrite(exported, checkpoints):
    with pytest.raises(UserError, match="--overwrite"):
        export_checkpoint(ExportConfig(model=str(checkpoints["0.5"])), exported["0.5"][0])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sparsedeploy", "-q", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_export_inspect_generate(checkpoints, tmp_path):
    out = tmp_path / "cli"
    proc = _cli("export", "--model", str(checkpoints["2:4"]), "-o", str(out), "--greedy-tokens", "4", "--json")
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


def test_external_data_export_verifies(checkpoints, tmp_path):
    """The > 2 GB path (forced here): weights in model.onnx_data, still verified and loadable."""
    report = export_checkpoint(
        ExportConfig(model=str(checkpoints["2:4"]), external_data=True, greedy_tokens=4), tmp_path / "e"
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


def test_optimisation_that_breaks_zeros_is_refused(checkpoints, tmp_path, monkeypatch):
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
            ExportConfig(model=str(checkpoints["0.5"]), optimize="basic", greedy_tokens=4), tmp_path / "o"
        )
    assert not (tmp_path / "o").exists()


def test_auto_exporter_falls_back_to_torch_for_a_model_type_optimum_does_not_know(checkpoints, tmp_path, monkeypatch):
    import sparsedeploy.export.run as export_mod
    from sparsedeploy.export.run import optimum_supports

    assert optimum_supports(checkpoints["0.5"], "text-generation-with-past")  # llama: optimum's exporter by default
    monkeypatch.setattr(export_mod, "optimum_supports", lambda _dir, _task: False)
    report = export_checkpoint(ExportConfig(model=str(checkpoints["0.5"]), greedy_tokens=4), tmp_path / "t")
    assert report["exporter"] == "torch" and report["verification"]["ok"]


def test_inspect_table_for_people(exported):
    from sparsedeploy.onnx.inspect import format_inspect, inspect_onnx

    out, _ = exported["2:4"]
    text = format_inspect(inspect_onnx(out / "model.onnx"))
    lines = text.splitlines()
    assert lines[0].split() == ["weight", "shape", "dtype", "sparsity", "2:4", "used", "by"]
    rows = [line for line in lines[1:] if "MatMul /" in line]
    assert len(rows) == 15 and sum(line.split()[4] == "yes" for line in rows) == 14  # every decoder linear, not lm_head
    assert all("q_proj" not in line or "0.5000" in line for line in rows)
    assert any(line.startswith("total:") and "14/15 MatMul/Gemm weights satisfy 2:4 along K" in line for line in lines)
