"""`sparsedeploy bench` as a whole (run_bench and the CLI): bad input is one line, a run writes json, md, png."""

from __future__ import annotations

import json

import pytest
from cli_helpers import run_cli_subprocess as cli

from sparsedeploy.common.errors import UserError
from sparsedeploy.onnx.storage import onnx_file

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def test_missing_model_dir_is_one_clear_line(tmp_path):
    proc = cli("bench", "--model", str(tmp_path / "nope"))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --model") and "does not exist" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_dir_without_onnx(tmp_path):
    with pytest.raises(UserError, match="no model.onnx"):
        onnx_file(tmp_path)


def test_bad_batch_list(tmp_path):
    proc = cli("bench", "--model", str(tmp_path), "--batch", "1,x")
    assert proc.returncode == 2 and "--batch" in proc.stderr


def test_torch_cuda_without_cuda_exits_nonzero_with_the_reason(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: the clean-exit path is for machines without it")
    (tmp_path / "config.json").write_text("{}")
    proc = cli("bench", "--model", str(tmp_path), "--engine", "torch", "--device", "cuda")
    assert proc.returncode == 2  # a requested measurement that did not happen is not a success
    assert proc.stderr.startswith("error: no measurement: ") and "CUDA is not available" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_bench_writes_json_md_png(tiny_onnx, tmp_path):
    out = tmp_path / "res"
    proc = cli(
        "-q",
        "bench",
        "--model",
        str(tiny_onnx["sparse"]),
        "--baseline",
        str(tiny_onnx["dense"]),
        "--batch",
        "1",
        "--prompt-len",
        "4",
        "--gen-len",
        "1",
        "--rounds",
        "1",
        "-o",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [".sparsedeploy-output", "bench.json", "bench.md", "bench.png"]
    data = json.loads((out / "bench.json").read_text())
    assert data["engine"] == "ort" and data["rows"]
    # both models computed the last position's logits only (the default), and the report says so
    assert all(r["form"].endswith("; last-position logits") for r in data["rows"]) and not data["config"]["all_logits"]


def test_all_logits_is_timed_when_asked_and_refused_where_it_means_nothing(tiny_onnx, tmp_path):
    args = ["--model", str(tiny_onnx["sparse"]), "--baseline", str(tiny_onnx["dense"]), "--batch", "1"]
    out = tmp_path / "res"
    proc = cli(
        "-q", "bench", *args, "--prompt-len", "4", "--gen-len", "1", "--rounds", "1", "--all-logits", "-o", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    assert all(r["form"].endswith("; all logits") for r in json.loads((out / "bench.json").read_text())["rows"])
    proc = cli("bench", *args, "--engine", "deepsparse", "--all-logits", "-o", str(tmp_path / "ds"))
    assert proc.returncode == 2 and not (tmp_path / "ds").exists()
    assert proc.stderr.strip() == (
        "error: --all-logits is for --engine ort / sparse-cpu (ONNX exports in ONNX Runtime), not --engine deepsparse: "
        "drop --all-logits"
    )
