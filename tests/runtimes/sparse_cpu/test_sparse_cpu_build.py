"""The native kernels build from source in a non-editable install too (the wheel carries the library and the C source)."""

import os
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO


@pytest.mark.slow
def test_wheel_builds_and_runs_outside_the_checkout(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("sparsedeploy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("sparsedeploy/runtimes/sparse_cpu/_native") and n.endswith(".so") for n in names)
    assert "sparsedeploy/runtimes/sparse_cpu/csrc/sparse_cpu.c" in names
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = ("import numpy as np, sparsedeploy.runtimes.sparse_cpu as s, sparsedeploy.runtimes.sparse_cpu.kernels as k;"
            "w = np.random.default_rng(0).standard_normal((30, 70)).astype(np.float32); w[:, ::3] = 0;"
            "x = np.ones((2, 70), np.float32);"
            "assert np.allclose(s.matmul(x, s.pack(w)), x @ w.T, atol=1e-4);"
            "print(k.library_path())")
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("SPARSEDEPLOY_SPARSE_CPU_LIB", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip().startswith(str(target))  # the wheel's own build, not the checkout's
