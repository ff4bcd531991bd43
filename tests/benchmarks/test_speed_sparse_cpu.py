"""The sparse-cpu kernel suite: its CI gate (70 % batch-1 1B-like ratio vs the committed figure) and its report."""

import json
import subprocess
import sys

import pytest
from conftest import REPO


def _module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("speed_sparse_cpu", REPO / "benchmarks" / "speed_sparse_cpu.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class body runs
    spec.loader.exec_module(mod)
    return mod


def test_gate_fails_a_regression_beyond_15_percent_of_the_committed_figure():
    mod = _module()
    committed = {"cpu": "CPU A", "isa": "avx512", "ratio": 2.4}
    rows = [{"speedup": 2.4 * 0.9}] * 3  # 10 % below: within tolerance
    assert mod.ci_check(rows, committed, "CPU A", "avx512")[0] == 0
    rc, msg = mod.ci_check([{"speedup": 2.4 * 0.8}] * 3, committed, "CPU A", "avx512")  # 20 % below
    assert rc == 1 and "FAIL" in msg and "2.04x" in msg
    rc, msg = mod.ci_check([{"speedup": 1.3}] * 3, committed, "CPU B", "avx2")  # another CPU: the generic floor
    assert rc == 0 and "generic floor" in msg
    assert mod.ci_check([{"speedup": 0.95}] * 3, committed, "CPU B", "avx2")[0] == 1  # sparse slower than dense
    assert mod.ci_check([{"speedup": 2.0}] * 3, committed, "CPU A", "avx2")[0] == 0  # same CPU name, other path


def test_gate_measures_once_more_below_the_floor_and_fails_only_when_every_attempt_is_below():
    mod = _module()
    committed = {"cpu": "CPU A", "isa": "avx512", "ratio": 2.0}  # floor 1.7

    def measurements(*ratios):
        queue = [[{"speedup": r}] * 3 for r in ratios]
        calls = []
        return (lambda: calls.append(1) or queue.pop(0)), calls

    measure, calls = measurements(2.1)
    rc, msg, rows, attempts = mod.ci_gate(measure, committed, "CPU A", "avx512")
    assert rc == 0 and len(calls) == 1 and len(attempts) == 1 and "attempt" not in msg  # no second run when it passes
    measure, calls = measurements(1.6, 1.9)  # noise once: the second run passes
    rc, msg, rows, attempts = mod.ci_gate(measure, committed, "CPU A", "avx512")
    assert rc == 0 and len(calls) == 2 and rows[0]["speedup"] == 1.9
    assert "PASS (attempt 2 of 2; before: " in msg and "1.60x" in msg
    measure, calls = measurements(1.6, 1.5)  # a regression: below in both
    rc, msg, rows, attempts = mod.ci_gate(measure, committed, "CPU A", "avx512")
    assert rc == 1 and len(calls) == mod.CI_ATTEMPTS == 2 and "FAIL" in attempts[0] and "FAIL" in attempts[1]


def test_each_machine_keeps_its_own_committed_gate_figure():
    """The AMD run is the main results, the Intel one a subfolder; the gate finds each CPU's own figure."""
    mod = _module()
    results = REPO / "benchmarks" / "results" / "speed_sparse_cpu"
    for path in (results / "speed_sparse_cpu.json", results / "intel_xeon" / "speed_sparse_cpu.json"):
        baseline = json.loads(path.read_text())["ci_baseline"]
        assert mod.committed_ci_baseline(baseline["cpu"], baseline["isa"]) == baseline
    assert mod.committed_ci_baseline("Some Other CPU", "avx512") is None


def test_committed_results_carry_the_gate_figure_and_every_shape():
    data = json.loads((REPO / "benchmarks" / "results" / "speed_sparse_cpu" / "speed_sparse_cpu.json").read_text())
    assert data["ci_baseline"]["ratio"] > 1.0 and data["ci_baseline"]["threads"] == 1
    shapes = {r["shape"] for r in data["rows"]}
    assert {"576x576", "576x192", "576x1536", "1536x576", "2048x2048", "2048x5632", "5632x2048"} <= shapes
    assert {r["pattern"] for r in data["rows"]} >= {"0.5", "0.7", "0.8", "0.9", "2:4"}
    assert {r["batch"] for r in data["rows"]} >= {1, 8, 128} and {r["threads"] for r in data["rows"]} >= {1, 2}
    assert all(r["max_rel_err"] < 1e-4 for r in data["rows"])  # every timed kernel also computed the right thing
    assert (REPO / "benchmarks" / "results" / "speed_sparse_cpu" / "speed_sparse_cpu.png").stat().st_size > 10_000


@pytest.mark.slow
def test_ci_mode_runs_and_passes(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/speed_sparse_cpu.py", "--ci", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sparse-cpu CI gate" in proc.stdout and "PASS" in proc.stdout
    result = json.loads((tmp_path / "speed_sparse_cpu_ci.json").read_text())
    assert len(result["rows"]) == 3 and all(r["pattern"] == "0.7" and r["batch"] == 1 for r in result["rows"])
    assert 1 <= len(result["attempts"]) <= 2 and "PASS" in result["attempts"][-1]


def test_bad_isa_is_one_error_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/speed_sparse_cpu.py", "--isa", "neon", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --isa neon")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_unknown_shape_or_pattern_is_one_error_line(tmp_path):
    for args, message in (
        (["--shapes", "9x9"], "error: unknown shape '9x9'"),
        (["--patterns", "0.5,abc"], "error: cannot read sparsity 'abc'"),
    ):
        proc = subprocess.run(
            [sys.executable, "benchmarks/speed_sparse_cpu.py", *args, "--out", str(tmp_path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and proc.stderr.strip().startswith(message), proc.stderr
    assert not list(tmp_path.iterdir())  # nothing half-written
