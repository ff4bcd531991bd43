"""--engine ort: the ONNX Runtime generation loop, its report, and an export with sparse storage."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_helpers import run_cli_subprocess as cli

from sparsedeploy.bench.config import BenchConfig
from sparsedeploy.bench.ort import OrtCausalLM
from sparsedeploy.bench.report import markdown, plot
from sparsedeploy.bench.run import run_bench
from sparsedeploy.onnx.storage import onnx_file

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def test_ort_generate_phases(tiny_onnx):
    lm = OrtCausalLM(onnx_file(tiny_onnx["dense"]), threads=1)
    t = lm.generate(batch=2, prompt_len=8, gen_len=3)
    assert set(t) == {"prefill", "decode", "total"}
    assert t["prefill"] > 0 and t["decode"] > 0 and t["total"] == pytest.approx(t["prefill"] + t["decode"])


def test_ort_bench_report(tiny_onnx, tmp_path):
    cfg = BenchConfig(
        model=str(tiny_onnx["sparse"]),
        baseline=str(tiny_onnx["dense"]),
        engine="ort",
        batches=[1, 2],
        prompt_len=8,
        gen_len=2,
        rounds=2,
    )
    result = run_bench(cfg)
    rows = result["rows"]
    assert {(r["variant"], r["batch"], r["phase"]) for r in rows} == {
        (v, b, p) for v in ("dense", "sparse") for b in (1, 2) for p in ("prefill", "decode", "total")
    }
    sparse = [r for r in rows if r["variant"] == "sparse"]
    assert all("speedup" in r and r["speedup"] > 0 for r in sparse)
    assert all("speedup" not in r for r in rows if r["variant"] == "dense")
    assert result["machine"]["threads"] == 1
    md = markdown(result)
    assert "full model with KV cache" in md and "| ort |" in md and "prompt 8 tokens, 2 generated" in md
    png = plot(result, tmp_path / "b.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_ort_bench_loads_a_sparse_storage_export(tmp_path):
    """`--storage sparse` keeps the weights' values in a side file: bench must open it through the one session
    factory that unpacks it, and the unpacked model must compute what the dense-storage export of it computes."""
    from onnx_helpers import pruned_tiny_checkpoint

    from sparsedeploy.export.run import ExportConfig, export_checkpoint
    from sparsedeploy.onnx.storage import SPARSE_FILE

    ckpt = pruned_tiny_checkpoint(tmp_path / "ckpt", "2:4")
    for storage in ("dense", "sparse"):
        export_checkpoint(ExportConfig(model=str(ckpt), storage=storage, verify=False), tmp_path / storage)
    assert (tmp_path / "sparse" / SPARSE_FILE).is_file()
    proc = cli(
        "bench",
        "--engine",
        "ort",
        "--model",
        str(tmp_path / "sparse"),
        "--baseline",
        str(tmp_path / "dense"),
        "--batch",
        "1",
        "--prompt-len",
        "4",
        "--gen-len",
        "2",
        "--rounds",
        "1",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    assert {r["variant"] for r in rows} == {"dense", "sparse"} and all(r["median_s"] > 0 for r in rows)
    lms = {s: OrtCausalLM(onnx_file(tmp_path / s), threads=1) for s in ("dense", "sparse")}
    ids = np.arange(1, 7, dtype=np.int64).reshape(1, 6)
    logits = {s: lm.decoder.run(ids, np.ones_like(ids), None)[0] for s, lm in lms.items()}
    np.testing.assert_array_equal(logits["sparse"], logits["dense"])
