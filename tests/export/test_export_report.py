"""The export report's measures and its one-line summary."""

from __future__ import annotations

from sparsedeploy.export.report import dir_bytes, summary


def _report(verification=None, deepsparse_form=None) -> dict:
    report = {
        "model": "ckpt",
        "exporter": "optimum",
        "opset": 18,
        "target": {"name": "ort"},
        "storage": {"kind": "dense", "model_bytes": 3 * 2**20, "ort_load_seconds": 0.25},
        "verification": verification,
    }
    if deepsparse_form is not None:
        report["deepsparse_form"] = deepsparse_form
    return report


def test_unverified_summary_says_so():
    data, text = summary(_report(), "out")
    assert (
        text
        == "exported ckpt -> out (optimum, opset 18, target ort, dense storage 3.0 MiB); not verified (--no-verify)"
    )
    assert data["verified"] is False and data["model_bytes"] == 3 * 2**20 and "zeros_onnx" not in data


def test_verified_summary_names_zeros_nm_and_parity():
    sparsity = {"zeros_torch": 10, "zeros_onnx": 10, "linears": 14, "nm_pattern": "2:4", "nm_qualifying": 14}
    parity = {"max_abs_diff": 1.5e-6, "greedy_identical": False, "dtype": "float32", "greedy_tokens": 32}
    form = {"generation": {"identical": True, "prompts": [{"new_tokens": 4}, {"new_tokens": 6}]}}
    data, text = summary(_report({"sparsity": sparsity, "parity": parity}, form), "out")
    assert "; verified: 14 linears, zeros 10 == 10, 14/14 satisfy 2:4 along K" in text
    assert "max |delta logits| 1.50e-06 (float32), greedy 32 tokens DIFFER" in text
    assert text.endswith("DeepSparse graphs (prefill + decode step): greedy 4 tokens identical to PyTorch")
    assert data["greedy_identical"] is False and data["deepsparse_greedy_identical"] is True


def test_dir_bytes_lists_files_only(tmp_path):
    (tmp_path / "a.onnx").write_bytes(b"x" * 7)
    (tmp_path / "sub").mkdir()
    assert dir_bytes(tmp_path) == {"a.onnx": 7}
