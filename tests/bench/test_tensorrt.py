"""--engine tensorrt: refused without a GPU, reported when unavailable, and (on a GPU) engines that agree with ORT."""

from __future__ import annotations

import pytest
from cli_helpers import pair_config
from cli_helpers import run_cli_subprocess as cli

from sparsedeploy.bench.run import run_bench

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def test_tensorrt_needs_a_gpu_device_and_says_so(tiny_exports, tmp_path):
    proc = cli("bench", "--model", str(tiny_exports["sparse"]), "--engine", "tensorrt")
    assert (
        proc.returncode == 2
        and proc.stderr.strip() == "error: --engine tensorrt runs on a GPU, not on --device cpu: add --device cuda"
    )


@pytest.mark.skipif(
    __import__("torch").cuda.is_available() and __import__("importlib").util.find_spec("tensorrt") is not None,
    reason="CUDA and tensorrt present: the not-available path is for machines without them",
)
def test_tensorrt_unavailable_is_reported_and_writes_nothing(tiny_exports, tmp_path):
    proc = cli(
        "bench",
        "--model",
        str(tiny_exports["sparse"]),
        "--engine",
        "tensorrt",
        "--device",
        "cuda",
        "-o",
        str(tmp_path / "out"),
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: no measurement: --engine tensorrt: not run: ")
    assert "CUDA is not available" in proc.stderr or "tensorrt package" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.cuda
@pytest.mark.skipif(
    not (__import__("torch").cuda.is_available() and __import__("importlib").util.find_spec("tensorrt") is not None),
    reason="needs a CUDA GPU and the tensorrt package (not installable in this project's workplace)",
)
def test_tensorrt_engines_from_the_2of4_export_run_and_agree_with_ort(tiny_exports):
    config = pair_config(tiny_exports, engine="tensorrt", device="cuda", dtype="float32", batches=[1], prompt_len=8)
    result = run_bench(config)  # prompt 8 and batch 1: forms tiny_exports wrote
    assert {(r["phase"], r["form"].split(" (")[0]) for r in result["rows"] if "speedup" in r} == {
        ("prefill", "decoder stack"),
        ("decode-step", "decoder stack + KV cache"),
    }
    builds = result["notes"]["builds"]
    assert len(builds) == 4 and all(b["max_rel_err_vs_ort"] < 1e-2 for b in builds)
    assert all(b["eligible_layers"] == 0 for b in builds if b["variant"] == "dense")
