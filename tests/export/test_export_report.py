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


def test_sparse_cpu_summary_gives_the_size_against_dense_weights():
    report = _report()
    report["target"] = {"name": "sparse-cpu"}
    report["storage"]["model_bytes"] = 60 * 2**20
    report["sparse_cpu"] = {
        "linears": 7,
        "layout": "bitmask16-v2",
        "packed_bytes": 40 * 2**20,
        "dense_bytes": 80 * 2**20,
        "scaled_int8": {"weights": ["emb"], "packed_bytes": 10 * 2**20, "dense_bytes": 38 * 2**20},
    }
    data, text = summary(report, "out")
    # dense: 60 - 40 - 10 + 80 + 38 = 128 MiB
    assert data["dense_equivalent_bytes"] == 128 * 2**20 and abs(data["size_vs_dense"] - 60 / 128) < 1e-12
    assert (
        "target sparse-cpu, 60.0 MiB = 0.47x the 128.0 MiB of the same export with dense weights: 7 linears in "
        "bitmask16-v2, 1 dense weight(s) as int8 x a scale per 32)" in text
    )
    report["sparse_cpu"]["scaled_int8"] = {"weights": [], "packed_bytes": 0, "dense_bytes": 0}
    assert "7 linears in bitmask16-v2)" in summary(report, "out")[1]
