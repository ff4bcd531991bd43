"""The README's main job, as a user runs it: examples/quickstart.yaml end to end on the real model, offline."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_quickstart_recipe_runs_end_to_end(tmp_path, wikitext_test, cache_dir):
    out = tmp_path / "quickstart"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparsedeploy",
            "-q",
            "run",
            str(REPO / "examples" / "quickstart.yaml"),
            "--output",
            str(out),
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "SPARSEDEPLOY_CACHE": str(cache_dir)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["gate"]["passed"] and summary["sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert summary["dense_ppl"] < summary["pruned_ppl"] < 3 * summary["dense_ppl"]
    report = json.loads((out / "report.json").read_text())
    export = json.loads((out / "onnx" / "export_report.json").read_text())
    assert export["verification"]["ok"]  # zeros equal PyTorch's, logits within 1e-4, same greedy text
    assert (
        export["target"]["name"] == "sparse-cpu" and export["sparse_cpu"]["linears"] == 30 * 7
    )  # every decoder linear
    assert json.loads((out / "bench" / "bench.json").read_text())["engine"] == "sparse-cpu"
    assert (out / "REPORT.md").is_file() and (out / "bench" / "bench.json").is_file()
    assert "speedup" in (out / "REPORT.md").read_text().lower() and report["gate"]["passed"]
    bench = json.loads((out / "bench" / "bench.json").read_text())
    # of 121: 60 residual + RMSNorm (the final norm too: the int8 lm_head after it is a native step), 30 SiLU * up and
    # 30 attention (the one left builds the mask and rotary tables)
    assert bench["notes"]["kernels"]["segments_native"] == 120
    # the GGUF's Q8_0 tied embedding / lm_head, stored once as scaled-int8: one Int8Gather and one Int8Linear node
    assert export["sparse_cpu"]["scaled_int8"]["weights"] == ["model.embed_tokens.weight"]
    assert bench["notes"]["kernels"]["int8_nodes"] == 2
