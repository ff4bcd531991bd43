"""The CI speed gate: benchmarks/speed.py --ci times the tracked kernels and compares with the committed baseline."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from sparsedeploy.runtimes.deepsparse_env import platform_problem


@pytest.mark.slow
def test_speed_ci_gate_passes_and_tracks_deepsparse(tmp_path):
    baseline = json.loads((REPO / "benchmarks" / "results" / "speed_baseline.json").read_text())
    tracked = {k for entry in baseline["machines"].values() for k in entry["tracked"]} | set(baseline["generic_floor"])
    assert any(k.startswith("deepsparse|") for k in tracked) and any(k.startswith("ort|") for k in tracked)
    # --install-deepsparse: creates DeepSparse's own venv on first use (PyPI), so this machine measures it too
    proc = subprocess.run(
        [sys.executable, "benchmarks/speed.py", "--ci", "--install-deepsparse", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "NM_DISABLE_ANALYTICS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "speed_ci.json").read_text())
    measured = {f"{r['engine']}|{r['shape']}|b{r['batch']}|{r['pattern']}": r for r in result["rows"]}
    assert "floor" in proc.stdout  # each tracked ratio is printed with the floor it was held to
    for key in tracked:
        if key.startswith("deepsparse|") and platform_problem() is not None:
            assert "SKIPPED" in proc.stdout  # said plainly, never silently passed
            continue
        assert key in measured, key
        assert measured[key]["speedup"] > 0
    if platform_problem() is None:
        assert result["deepsparse"] == "measured"


def _speed_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("speed_bench", REPO / "benchmarks" / "speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gate_uses_this_cpus_baseline_else_the_generic_floor(tmp_path, monkeypatch, capsys):
    import argparse

    speed = _speed_module()
    k = "deepsparse|shape|b64|0.7"
    monkeypatch.setattr(speed, "BASELINE", tmp_path / "b.json")
    monkeypatch.setattr(speed, "CI_TRACKED", [("deepsparse", "shape", 64, "0.7")])
    (tmp_path / "b.json").write_text(
        json.dumps({"tolerance": 0.25, "generic_floor": {k: 1.15}, "machines": {"CPU A": {"tracked": {k: 2.0}}}})
    )
    rows = [{"engine": "deepsparse", "shape": "shape", "batch": 64, "pattern": "0.7", "speedup": 1.4, "noisy": False}]
    args = argparse.Namespace(write_baseline=False, tolerance=0.25, threads=1, rounds=None)
    monkeypatch.setattr(speed, "machine", lambda: {"cpu": "CPU A"})
    assert speed.check(rows, True, args) == 1  # 1.4 < 2.0 * 0.75 on the CPU that measured 2.0
    monkeypatch.setattr(speed, "machine", lambda: {"cpu": "CPU B"})
    assert speed.check(rows, True, args) == 0  # a new CPU: held to the generic floor 1.15
    assert "no baseline for CPU 'CPU B'" in capsys.readouterr().out
    args.write_baseline = True
    assert speed.check(rows, True, args) == 0
    assert json.loads((tmp_path / "b.json").read_text())["machines"]["CPU B"]["tracked"] == {k: 1.4}
