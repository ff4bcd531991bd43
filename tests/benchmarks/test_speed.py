"""The CI speed gate: benchmarks/speed.py --ci times the tracked kernels and compares with the committed baseline."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from sparsedeploy.engines.deepsparse_env import platform_problem


@pytest.mark.slow
def test_speed_ci_gate_passes_and_tracks_deepsparse(tmp_path):
    baseline = json.loads((REPO / "benchmarks" / "results" / "speed_baseline.json").read_text())
    assert any(k.startswith("deepsparse|") for k in baseline["tracked"]) and any(k.startswith("ort|") for k in baseline["tracked"])
    # --install-deepsparse: creates DeepSparse's own venv on first use (PyPI), so this machine measures it too
    proc = subprocess.run([sys.executable, "benchmarks/speed.py", "--ci", "--install-deepsparse", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "NM_DISABLE_ANALYTICS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "speed_ci.json").read_text())
    measured = {f"{r['engine']}|{r['shape']}|b{r['batch']}|{r['pattern']}": r for r in result["rows"]}
    for key in baseline["tracked"]:
        if key.startswith("deepsparse|") and platform_problem() is not None:
            assert "SKIPPED" in proc.stdout  # said plainly, never silently passed
            continue
        assert key in measured, key
        assert measured[key]["speedup"] > 0
    if platform_problem() is None:
        assert result["deepsparse"] == "measured"
