"""The DeepSparse worker sees only what it needs: its own copies of two modules, a minimal environment."""

import subprocess
import sys
from pathlib import Path

import pytest

from sparsedeploy.runtimes import deepsparse_env as ds


def test_worker_imports_only_its_copies_and_gets_a_minimal_environment(tmp_path, monkeypatch):
    venv = tmp_path / "venv"  # a bare venv, as the DeepSparse one is: no sparsedeploy, no NumPy
    proc = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot create a venv here: {proc.stderr.strip()[:200]}")
    (venv / ds.MARKER).write_text("{}")
    monkeypatch.setenv("PYTHONPATH", str(Path(ds.__file__).resolve().parents[2]))
    monkeypatch.setenv("HF_TOKEN", "hf_secret_canary")
    reply = ds.call_worker(ds.DeepSparseEnv(venv), {"action": "environment", "threads": 2})
    main_parent = str(Path(ds.__file__).resolve().parents[2])
    site = str(Path(ds.__file__).resolve().parents[1].parent)
    assert reply["isolated"] is True
    assert main_parent not in reply["sys_path"] and site not in reply["sys_path"]
    assert set(reply["environ"]) <= {
        "PATH",
        "HOME",
        "LANG",
        "LC_ALL",
        "TMPDIR",
        "TZ",
        "NM_DISABLE_ANALYTICS",
        "SPARSEDEPLOY_WORKER_LIB",
        "OMP_NUM_THREADS",
        "LC_CTYPE",
    }
    assert "HF_TOKEN" not in reply["environ"] and "PYTHONPATH" not in reply["environ"]
    modules = reply["modules"]
    assert set(modules) == {"sparsedeploy", "sparsedeploy.common", "sparsedeploy.common.timing"}
    assert all(not f.startswith(main_parent) for f in modules.values() if f), modules
    assert modules["sparsedeploy.common.timing"].startswith(
        reply["sys_path"][0]
    )  # the temporary copy, first on the path
