"""scaled-int8: the lossless int8-times-scale store for dense weights (a GGUF Q8_0 embedding / tied lm_head), and
its native matmul on every dispatch path this CPU runs, against a float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

from sparsedeploy.kernels import scaled_int8
from sparsedeploy.kernels.native import CPU_PROFILES, BoundInt8Matmul, available_isas, cpu_profile, set_cpu_profile


def q8_0_like(rng, n: int, k: int) -> np.ndarray:
    """What a GGUF Q8_0 tensor dequantizes to: per 32 elements an fp16 scale times int8 codes in [-127, 127]
    (the largest |code| of a block is 127, as Q8_0's quantizer makes it), plus an all-zero block."""
    d = (1e-3 + rng.random((n, k // 32)) * 0.05).astype(np.float16).astype(np.float32)
    q = rng.integers(-127, 128, (n, k)).astype(np.int8)
    q[:, ::32] = rng.choice(np.array([-127, 127], np.int8), (n, k // 32))
    w = (q.reshape(n, k // 32, 32).astype(np.float32) * d[..., None]).reshape(n, k)
    w[0, :32] = 0.0
    return w


@pytest.mark.parametrize("n,k", [(1, 32), (5, 64), (37, 96), (200, 576)])
def test_pack_is_lossless_and_rows_are_the_dense_rows(n, k):
    rng = np.random.default_rng(n)
    w = q8_0_like(rng, n, k)
    p = scaled_int8.pack(w)
    assert p is not None and p.shape == (n, k)
    assert p.q.shape == (-(-n // 4), k // 32, 4, 32) and p.scales.shape == (-(-n // 4), k // 32, 4)
    assert np.array_equal(scaled_int8.unpack(p).view(np.uint32), w.view(np.uint32))
    ids = rng.integers(-n, n, (3, 4))
    assert np.array_equal(p.rows(ids).view(np.uint32), w[ids].view(np.uint32))
    rows = -(-n // 4) * 4
    assert p.nbytes == rows * k + rows * (k // 32) * 4  # 1.125 bytes a weight (rows padded to 4)
    again = scaled_int8.ScaledInt8Linear.from_arrays(p.to_arrays())
    assert np.array_equal(scaled_int8.unpack(again), scaled_int8.unpack(p))


def _nudged(w):
    w = w.copy()
    w[1, 3] = np.nextafter(w[1, 3], np.float32(1))
    return w


def _negative_zero(w):
    w = w.copy()
    w[0, 5] = -0.0  # in the all-zero block: a scale of 0 times a code gives +0.0
    return w


@pytest.mark.parametrize(
    "change",
    [
        _nudged,
        _negative_zero,
        lambda w: w[:, :40],  # K not a multiple of 32
        lambda w: w.astype(np.float64),
        lambda w: np.where(np.arange(w.shape[1]) == 7, np.float32(np.nan), w).astype(np.float32),
        lambda w: np.random.default_rng(0).standard_normal(w.shape).astype(np.float32),  # plain float32 weights
    ],
    ids=["one-ulp-off", "negative-zero", "k-not-32", "float64", "nan", "random-float32"],
)
def test_pack_refuses_what_it_cannot_store_exactly(change):
    w = q8_0_like(np.random.default_rng(1), 8, 64)
    assert scaled_int8.pack(w) is not None
    assert scaled_int8.pack(change(w)) is None


@pytest.mark.parametrize(
    "arrays,problem",
    [
        (lambda a: {k: v for k, v in a.items() if k != "scales"}, "missing arrays ['scales']"),
        (lambda a: {**a, "q": a["q"].astype(np.int16)}, "'q' must be int8"),
        (lambda a: {**a, "scales": a["scales"][:1]}, "'scales' must be float32"),
        (lambda a: {**a, "shape": np.array([5, 40])}, "K a multiple of 32"),
    ],
)
def test_from_arrays_names_the_problem(arrays, problem):
    p = scaled_int8.pack(q8_0_like(np.random.default_rng(2), 5, 64))
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        scaled_int8.ScaledInt8Linear.from_arrays(arrays(p.to_arrays()))


def test_rows_refuses_out_of_range_indices():
    p = scaled_int8.pack(q8_0_like(np.random.default_rng(3), 5, 32))
    with pytest.raises(ValueError, match="indices must be in"):
        p.rows(np.array([5]))


@pytest.mark.parametrize("profile", list(CPU_PROFILES))
@pytest.mark.parametrize("isa", available_isas())
@pytest.mark.parametrize("n,k", [(1, 32), (7, 64), (37, 96), (301, 576)])
@pytest.mark.parametrize("batch", [1, 2, 5, 8, 9, 13, 64])
def test_int8_matmul_matches_float64_on_every_path(isa, n, k, batch, profile):
    """Batches up to 8 take the per-row GEMV form, larger ones the rebuild + tiles form (6 rows a tile, so 9 and 13
    leave partial tiles); N from 1 to past one 32-row unit; each CPU profile (its prefetch differs)."""
    before = cpu_profile()
    set_cpu_profile(profile)
    try:
        _check_int8_matmul(isa, n, k, batch)
    finally:
        set_cpu_profile(before)


def _check_int8_matmul(isa, n, k, batch):
    rng = np.random.default_rng(n * 1000 + batch)
    w = q8_0_like(rng, n, k)
    p = scaled_int8.pack(w)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    scale = np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64)
    for threads in (1, 2, 3):
        y = BoundInt8Matmul(p, threads, isa)(x)
        assert y.shape == (batch, n) and y.dtype == np.float32
        assert (np.abs(y - ref) <= 2e-6 * scale + 1e-30).all(), (isa, threads)


def test_int8_matmul_refuses_bad_input():
    p = scaled_int8.pack(q8_0_like(np.random.default_rng(4), 4, 64))
    with pytest.raises(ValueError, match=r"x must be C-contiguous float32 \[B, 64\]"):
        BoundInt8Matmul(p, 1)(np.zeros((1, 32), np.float32))
    with pytest.raises(ValueError, match="unknown isa"):
        BoundInt8Matmul(p, 1, "sse9")
    with pytest.raises(TypeError, match="ScaledInt8Linear"):
        BoundInt8Matmul(np.zeros((4, 64), np.float32), 1)
