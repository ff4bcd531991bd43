"""Verification of an export: every zero kept (N:M along K), logits and greedy tokens PyTorch's."""

from __future__ import annotations

import json

import pytest

from sparsedeploy.export.run import ExportConfig, export_checkpoint
from sparsedeploy.onnx.verify import FP16_ATOL, FP32_ATOL


@pytest.mark.parametrize("key", ["0.5", "2:4"])
def test_export_keeps_every_zero_and_matches_pytorch(pruned_exports, pruned_checkpoints, key):
    out, report = pruned_exports[key]
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


def test_nm_export_qualifies_along_k_and_unstructured_does_not(pruned_exports):
    nm = pruned_exports["2:4"][1]["verification"]["sparsity"]
    assert nm["nm_pattern"] == "2:4" and nm["nm_qualifying"] == nm["linears"]
    assert all("at most 2" in layer["nm_reason"] for layer in nm["layers"])
    assert pruned_exports["0.5"][1]["verification"]["sparsity"]["nm_pattern"] is None


def test_float16_export_within_measured_bound(pruned_checkpoints, tmp_path):
    report = export_checkpoint(
        ExportConfig(model=str(pruned_checkpoints["2:4"]), dtype="float16", greedy_tokens=8), tmp_path / "h"
    )
    verification = report["verification"]
    assert verification["parity"]["dtype"] == "float16"
    assert FP32_ATOL < verification["parity"]["max_abs_diff"] <= FP16_ATOL  # fp16 is measurably worse, within bound
    assert verification["sparsity"]["ok"] and verification["sparsity"]["nm_qualifying"] == 14
    assert report["storage"]["model_bytes"] < export_bytes_fp32(pruned_checkpoints, tmp_path)


def export_bytes_fp32(pruned_checkpoints, tmp_path) -> int:
    return export_checkpoint(ExportConfig(model=str(pruned_checkpoints["2:4"]), verify=False), tmp_path / "f32")[
        "storage"
    ]["model_bytes"]
