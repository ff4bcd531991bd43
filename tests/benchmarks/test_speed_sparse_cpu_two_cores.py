"""The two-core kernel benchmark: it times what it built (both forms correct), and refuses bad input in one line."""

import json
import subprocess
import sys

from conftest import REPO

SCRIPT = "benchmarks/speed_sparse_cpu_two_cores.py"


def test_a_small_run_writes_every_case(tmp_path):
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--shapes", "576x192", "--patterns", "0.7,0.95", "--batches", "1,8,16"]
        + ["--rounds", "1", "--idle", "0", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "speed_sparse_cpu_two_cores.json").read_text())
    rows = result["rows"]
    assert [(r["pattern"], r["batch"]) for r in rows] == [(p, b) for p in ("0.7", "0.95") for b in (1, 8, 16)]
    assert all(r["max_rel_err"] < 1e-4 for r in rows)  # every timed kernel also computed the right thing
    forms = {(r["pattern"], r["batch"]): r["form"] for r in rows}
    assert forms[("0.7", 1)] == "bitmask" and forms[("0.95", 8)] == "rows" and forms[("0.7", 16)] == "rows"
    assert all(r[f"speedup_{t}t"] > 0 and r[f"dense_ms_{t}t"] > 0 for r in rows for t in (1, 2))
    assert "| 576x192 | 0.95 | 8 | rows |" in (tmp_path / "speed_sparse_cpu_two_cores.md").read_text()


def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path):
    for args in (["--patterns", "0.5,bogus"], ["--shapes", "9x9"]):
        proc = subprocess.run(
            [sys.executable, SCRIPT, "--out", str(tmp_path / "out"), *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and proc.stderr.strip().startswith("error: ") and "\n" not in proc.stderr.strip()
        assert not (tmp_path / "out").exists()
