"""Native build: a non-editable install compiles the kernels (wheel carries them and the C source); portable-only."""

import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import REPO

from tests.kernels.test_native import attention_reference


@pytest.mark.slow
def test_wheel_builds_and_runs_outside_the_checkout(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = wheels.glob("sparsedeploy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("sparsedeploy/kernels/_native") and n.endswith(".so") for n in names)
    assert "sparsedeploy/kernels/csrc/sparse_cpu.c" in names
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    code = (
        "import numpy as np, sparsedeploy.kernels as s, sparsedeploy.kernels.native as k;"
        "w = np.random.default_rng(0).standard_normal((30, 70)).astype(np.float32); w[:, ::3] = 0;"
        "x = np.ones((2, 70), np.float32);"
        "assert np.allclose(s.matmul(x, s.pack(w)), x @ w.T, atol=1e-4);"
        "print(k.library_path())"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("SPARSEDEPLOY_SPARSE_CPU_LIB", None)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip().startswith(str(target))  # the wheel's own build, not the checkout's


def test_portable_only_build_is_correct(tmp_path):
    """What a non-x86 CPU (ARM) gets: the library built without the x86 paths, checked against NumPy."""
    lib = tmp_path / "libsparse_cpu_portable.so"
    src = REPO / "sparsedeploy" / "kernels" / "csrc" / "sparse_cpu.c"
    cc = os.environ.get("CC", "cc")
    subprocess.run(
        [
            cc,
            "-O2",
            "-std=c11",
            "-fPIC",
            "-shared",
            "-pthread",
            "-Wall",
            "-Werror",
            "-DSDK_PORTABLE_ONLY",
            str(src),
            "-o",
            str(lib),
            "-lm",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    code = (
        "import numpy as np, sparsedeploy.kernels as s;"
        "assert s.available_isas() == ['portable'], s.available_isas();"
        "rng = np.random.default_rng(0);"
        "w = rng.standard_normal((37, 53)).astype(np.float32); w[rng.random(w.shape) < 0.6] = 0;"
        "p = s.pack(w);"
        "[np.testing.assert_allclose(s.matmul(x, p, threads=2, form=f), x.astype(np.float64) @ w.T, rtol=1e-4,"
        " atol=1e-4) for f in ('bitmask', 'rows') for x in (rng.standard_normal((b, 53)).astype(np.float32)"
        " for b in (1, 3, 20, 130))];"
        "gu = rng.standard_normal((3, 10)).astype(np.float32); g, u = gu[:, :5], gu[:, 5:];"
        "np.testing.assert_allclose(s.native.silu_mul(gu), g / (1 + np.exp(-g)) * u, rtol=1e-5);"
        "t, o = s.native.add_rmsnorm(g, u, np.ones(5, np.float32), 1e-5);"
        "np.testing.assert_allclose(o, t / np.sqrt((t * t).mean(-1, keepdims=True) + 1e-5), rtol=1e-5);"
        "from sparsedeploy.kernels import scaled_int8 as si; from sparsedeploy.kernels.native import BoundInt8Matmul;"
        "d = rng.random((37, 2)).astype(np.float16).astype(np.float32) + 0.01;"
        "qq = rng.integers(-127, 128, (37, 64)); qq[:, ::32] = 127;"
        "w8 = (qq.reshape(37, 2, 32).astype(np.float32) * d[..., None]).reshape(37, 64); p8 = si.pack(w8);"
        "[np.testing.assert_allclose(BoundInt8Matmul(p8, 2)(x), x.astype(np.float64) @ w8.T, rtol=1e-4, atol=1e-4)"
        " for x in (rng.standard_normal((b, 64)).astype(np.float32) for b in (1, 7))]"
    )
    # the attention step (d 64: the width the x86 build runs in AVX2) against the float64 reference
    rng = np.random.default_rng(1)
    inputs = {
        "qkv": rng.standard_normal((2, 3, 5 * 64)).astype(np.float32),
        "cos": rng.standard_normal((1, 3, 64)).astype(np.float32),
        "sin": rng.standard_normal((2, 3, 64)).astype(np.float32),
        "pk": rng.standard_normal((2, 1, 4, 64)).astype(np.float32),
        "pv": rng.standard_normal((2, 1, 4, 64)).astype(np.float32),
        "mask": rng.random((2, 3, 7)) < 0.7,
    }
    args = (inputs["qkv"], (3, 1), inputs["cos"], inputs["sin"], (inputs["pk"], inputs["pv"]), inputs["mask"])
    expected = attention_reference(*args, (0.3, 0.4))
    np.savez(tmp_path / "attention.npz", **inputs, out=expected[0], keys=expected[1], values=expected[2])
    code += (
        f";a = np.load({str(tmp_path / 'attention.npz')!r});"
        "got = s.native.attention(a['qkv'], (3, 1), a['cos'], a['sin'], (a['pk'], a['pv']), a['mask'], (0.3, 0.4));"
        "[np.testing.assert_allclose(g, a[n], rtol=2e-5, atol=2e-6) for g, n in zip(got, ('out', 'keys', 'values'))]"
    )
    env = {**os.environ, "SPARSEDEPLOY_SPARSE_CPU_LIB": str(lib)}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, capture_output=True, timeout=120)
