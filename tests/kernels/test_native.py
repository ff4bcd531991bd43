"""The native sparse-cpu kernels against a float64 dense reference, on every dispatch path this CPU runs."""

import gc
import os
import platform
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from sparsedeploy.kernels import native as kernels
from sparsedeploy.kernels.format import COL_PAD, PAD, four_of_eight, pack
from sparsedeploy.kernels.native import available_isas, matmul

ISAS = available_isas()


def pruned(n, k, sparsity, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[rng.random((n, k)) < sparsity] = 0.0
    return w


def nm(n, k, keep, m, seed=0):
    w = pruned(n, k, 0.0, seed).reshape(n, k // m, m)
    np.put_along_axis(w, np.argsort(np.abs(w), axis=2)[:, :, : m - keep], 0.0, axis=2)
    return w.reshape(n, k)


def check(x, w, y):
    """y agrees with float64 x @ w.T to float32 rounding of the sums actually formed."""
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    scale = np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64)
    assert y.dtype == np.float32 and y.shape == ref.shape
    with np.errstate(invalid="ignore"):  # inf - inf where both are inf
        ok = (y == ref) | (np.abs(y - ref) <= 2e-6 * scale + 1e-30) | (np.isnan(y) & np.isnan(ref))  # stray NaN: off
    bad = ~ok
    assert not bad.any(), f"{bad.sum()} of {bad.size} outputs off; worst {np.abs(y - ref)[bad].max()}"


def test_every_isa_this_cpu_has_is_offered():
    """The forced-path tests below cover what the CPU can run: what /proc/cpuinfo says is there is listed."""
    assert ISAS[-1] == "portable"
    if platform.machine() in ("x86_64", "AMD64") and Path("/proc/cpuinfo").exists():
        flags = set(next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split())
        assert ("avx2" in ISAS) == ({"avx2", "fma"} <= flags)
        assert ("avx512" in ISAS) == ({"avx512f", "avx512vl", "avx2", "fma"} <= flags)


def weights():
    zero_rows_cols = pruned(40, 70, 0.5, 3)
    zero_rows_cols[[0, 5, 6, 7, 39]] = 0.0
    zero_rows_cols[:, [0, 16, 17, 69]] = 0.0
    return {
        "odd 37x53 50%": pruned(37, 53, 0.5),
        "K=1": pruned(9, 1, 0.3),
        "K=16 exact group": pruned(12, 16, 0.5),
        "dense 0%": pruned(33, 100, 0.0),
        "90% (AVX-512 expand, AVX2 broadcast at batch 5-8)": pruned(70, 200, 0.9),
        "99%": pruned(64, 300, 0.99),
        "all zero": np.zeros((6, 20), np.float32),
        "zero rows and cols": zero_rows_cols,
        "2:4": nm(20, 64, 2, 4),
        "4:8": nm(21, 72, 4, 8),
        "N=1": pruned(1, 45, 0.6),
    }


WEIGHTS = weights()


@pytest.fixture(params=list(kernels.CPU_PROFILES))
def profile(request):
    """Each CPU profile forced in turn (how the kernels prefetch, and the AVX-512 batch-1 GEMV: the compress form on
    "amd", the expand-load form on "intel"); both must be exact on any CPU. Restored afterwards."""
    before = kernels.cpu_profile()
    kernels.set_cpu_profile(request.param)
    yield request.param
    kernels.set_cpu_profile(before)


def test_cpu_profile_follows_the_vendor_and_can_be_forced():
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() in ("x86_64", "AMD64") and cpuinfo.exists():
        intel = "GenuineIntel" in cpuinfo.read_text()
        assert kernels.cpu_profile() == ("intel" if intel else "amd")
    with pytest.raises(ValueError, match="unknown CPU profile 'arm'"):
        kernels.set_cpu_profile("arm")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs for the two threads")
def test_core_round_trip_is_measured_between_two_cpus_and_refused_on_one():
    """Two CPUs: a round trip takes more than nothing and far less than a time slice (the threads spin on their own
    CPUs). Restricted to one CPU (a child process), each turn waits for the scheduler: no figure, None, fast."""
    ns = kernels.core_round_trip_ns(iters=2000, repeats=3)
    assert ns is not None and 5 < ns < 100_000
    # right after a 2-thread call (the pool's worker spinning for the next one) it still measures
    w = pack(np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32))
    matmul(np.ones((1, 2048), np.float32), w, threads=2)
    after_call = kernels.core_round_trip_ns(iters=2000, repeats=3)
    assert after_call is not None and 5 < after_call < 100_000
    with pytest.raises(ValueError, match="iters and repeats must be >= 1"):
        kernels.core_round_trip_ns(iters=0)
    one_cpu = (
        "import os, time; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "from sparsedeploy.kernels import native\n"
        "t = time.perf_counter(); ns = native.core_round_trip_ns(iters=2000)\n"
        "print(ns, time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", one_cpu], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "None" and float(out[1]) < 1.0  # one 100 ms deadline, not five


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 6, 7, 8, 130])  # each batch 2-8 is its own compiled form
@pytest.mark.parametrize("name", list(WEIGHTS))
def test_matches_dense_reference(name, batch, threads, isa, profile):
    w = WEIGHTS[name]
    x = np.random.default_rng(batch).standard_normal((batch, w.shape[1])).astype(np.float32)
    check(x, w, matmul(x, pack(w), threads=threads, isa=isa, form="bitmask"))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 2, 7, 8, 9, 16, 17, 24, 32, 40, 97])  # 8 / 16 lanes, 1-4 vectors, 2-4 calls
@pytest.mark.parametrize("name", list(WEIGHTS))
def test_row_form_matches_dense_reference(name, batch, threads, isa):
    w = WEIGHTS[name]
    x = np.random.default_rng(batch).standard_normal((batch, w.shape[1])).astype(np.float32)
    check(x, w, matmul(x, pack(w), threads=threads, isa=isa, form="rows"))


@pytest.mark.parametrize("isa", ISAS)
def test_batch_1_row_form_with_every_row_length_on_each_cpu_profile(isa, profile):
    """Row r of a 2048-column weight stores r elements (0-47): batch 1's loops by 16 and by 8 and the single tail,
    on each CPU profile (AVX2 on the AMD profile has its own loop, rows_gemv_avx2), columns spread over all of K."""
    rng = np.random.default_rng(5)
    w = np.zeros((48, 2048), dtype=np.float32)
    for r in range(48):
        w[r, rng.choice(2048, size=r, replace=False)] = rng.standard_normal(r)
    x = rng.standard_normal((1, 2048)).astype(np.float32)
    check(x, w, matmul(x, pack(w), threads=1, isa=isa, form="rows"))


def csr_reference(w):
    """The row form by definition: each row's stored elements (not +-0.0) in column order."""
    stored = (w.view(np.uint32) & np.uint32(0x7FFFFFFF)) != 0
    rows, cols = np.nonzero(stored)
    row_ptr = np.concatenate([[0], np.cumsum(stored.sum(axis=1))])
    return row_ptr, cols, w[rows, cols]


@pytest.mark.parametrize("name", list(WEIGHTS) + ["nan, denormal, -0.0"])
def test_row_form_is_the_stored_elements_row_by_row(name):
    if name in WEIGHTS:
        w = WEIGHTS[name]
    else:
        w = pruned(9, 37, 0.5, 5)
        w[0, 3], w[1, 4], w[2, 5] = np.float32(np.nan), np.float32(1e-42), np.float32(-0.0)
        w.view(np.uint32)[3, 6] = 0x7FC00123  # a NaN payload
    rf = kernels.row_form(pack(w))
    row_ptr, cols, values = csr_reference(w)
    assert rf.shape == w.shape and rf.nnz == len(cols)
    assert rf.row_ptr.dtype == np.int64 and np.array_equal(rf.row_ptr, row_ptr)
    assert rf.cols.dtype == np.uint16 and np.array_equal(rf.cols[: rf.nnz], cols)
    assert len(rf.cols) == rf.nnz + COL_PAD and not rf.cols[rf.nnz :].any()
    assert np.array_equal(rf.values[: rf.nnz].view(np.uint32), values.view(np.uint32))  # bit for bit
    assert len(rf.values) == rf.nnz + PAD and not rf.values[rf.nnz :].any()
    assert not rf.values.flags.writeable
    assert rf.kernel_nbytes == 8 * (w.shape[0] + 1) + 6 * rf.nnz + 2 * COL_PAD + 4 * PAD


@pytest.mark.parametrize("form,batch", [("rows", 16), ("tiles", 64)])
def test_a_derived_form_is_built_at_its_first_call_once_and_dropped_with_its_weight(form, batch):
    w = pruned(30, 40, 0.8)
    p = pack(w)
    x = np.random.default_rng(batch).standard_normal((batch, 40)).astype(np.float32)
    check(x[:1], w, matmul(x[:1], p, threads=1, form="bitmask"))
    assert kernels.derived_nbytes(p) == 0  # the bitmask form builds nothing
    check(x, w, matmul(x, p, threads=1, form=form))
    built = kernels.derived_nbytes(p)
    assert built == (kernels.row_form(p) if form == "rows" else kernels.tile_form(p)).kernel_nbytes
    bound = kernels.BoundMatmul(p, threads=2, form=form)  # another binding of the same weight shares it
    check(x, w, bound(x))
    assert kernels.derived_nbytes(p) == built
    key = id(p)
    del p, bound
    gc.collect()
    assert key not in kernels._LINEARS


def _huge_page_advised_mappings() -> set[tuple[int, int]]:
    """(start, end) of this process's mappings advised for transparent huge pages (`hg` among their VmFlags)."""
    found, span = set(), None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
            start, end = (int(a, 16) for a in head.split("-"))
            span = (start, end)
        elif line.startswith("VmFlags:") and "hg" in line.split()[1:]:
            found.add(span)
    return found


@pytest.mark.skipif(
    not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists(),
    reason="this kernel has no transparent huge pages (the library's advice is refused; nothing to check)",
)
@pytest.mark.parametrize("form,batch", [("rows", 16), ("tiles", 8)])
def test_a_derived_forms_large_arrays_are_advised_for_huge_pages(form, batch):
    """The derived forms' value arrays (2 MB and more) are madvise(MADV_HUGEPAGE)d: the matmuls stream them, and
    4 KB pages cost a TLB miss every 4 KB (docs/sparse_cpu.md)."""
    w = pruned(1024, 2048, 0.5, 9)  # ~1M stored elements: 4 MB of values
    p = pack(w)
    x = np.random.default_rng(0).standard_normal((batch, 2048)).astype(np.float32)
    before = _huge_page_advised_mappings()
    y = matmul(x, p, threads=1, form=form)  # builds the form (numpy's own arrays of 4 MB and more are advised too:
    after = _huge_page_advised_mappings()  # none is made between the two looks)
    values_bytes = 4 * p.nnz
    new = [(s, e) for s, e in after - before if e - s >= values_bytes]
    assert new, f"no new huge-page-advised mapping of {values_bytes} bytes or more after building the {form} form"
    check(x, w, y)


OUT_OF_MEMORY_CHILD = """
import resource, sys
import numpy as np
from sparsedeploy.kernels import native
from sparsedeploy.kernels.format import pack

def advised_sizes():
    sizes, size = [], 0
    for line in open("/proc/self/smaps"):
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            start, end = (int(a, 16) for a in head.split("-"))
            size = end - start
        elif line.startswith("VmFlags:") and "hg" in line.split()[1:]:
            sizes.append(size)
    return sizes

def vm_kb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:"))

rng = np.random.default_rng(0)
w = rng.standard_normal((2048, 8192)).astype(np.float32)
w[rng.random(w.shape) < 0.5] = 0.0
p = pack(w)
x = rng.standard_normal((8, 8192)).astype(np.float32)
ref = x.astype(np.float64) @ w.T.astype(np.float64)
del w
bound = native.BoundMatmul(p, threads=1, form="tiles")
cols_len = -(-(p.nnz + 8) // 4096) * 4096  # the tile form's columns (uint8, COL_PAD after), in whole pages
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, ((vm_kb() + 24 * 1024) * 1024, hard))  # the columns fit, the values do not
try:
    bound(x)
except MemoryError as e:
    failed = str(e)
else:
    failed = ""
resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
left = advised_sizes().count(cols_len)
y = bound(x)
nbytes_ok = native.derived_nbytes(p) == native.tile_form(p).kernel_nbytes
print(repr(failed), left, advised_sizes().count(cols_len), nbytes_ok, bool(np.allclose(y, ref, rtol=1e-4, atol=1e-3)))
"""


@pytest.mark.skipif(
    not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists(),
    reason="needs Linux with transparent huge pages (the advised mappings are how the test finds the form's arrays)",
)
def test_a_form_that_ran_out_of_memory_is_built_again_at_the_next_call_leaving_nothing():
    """An address-space limit (RLIMIT_AS) that lets the tile form's columns be mapped but not its values: the call
    raises MemoryError naming the form and the weight, the columns it did map stay until the next call, which builds
    the whole form again (freeing what the failed build left: one columns mapping, not two) and is right."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    out = subprocess.run(
        [sys.executable, "-c", OUT_OF_MEMORY_CHILD], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    failed, left, after, nbytes_ok, right = out.stdout.strip().rsplit("\n", 1)[-1].rsplit(" ", 4)
    assert "out of memory building the tiles form of weight 2048x8192" in failed, out.stdout
    assert (left, after) == ("1", "1"), f"columns mappings after the failed call / after the retry: {left} / {after}"
    assert nbytes_ok == "True" and right == "True", out.stdout


TILE_WEIGHTS = {
    "3 tiles x 3 K blocks, partial last of each, 70%": pruned(70, 300, 0.7, 4),
    "full 128-column blocks (count 128)": pruned(40, 256, 0.0, 5),
    "one row, K=129": pruned(1, 129, 0.5, 6),
    "17 tiles: a group of 16 walked together, then one, 3 K blocks": pruned(16 * 32 + 21, 300, 0.8, 8),
}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 7, 8, 9, 33, 64, 65, 97, 130])  # 8 lanes to 8, padded lanes, a short last call
@pytest.mark.parametrize("name", list(WEIGHTS) + list(TILE_WEIGHTS))
def test_tile_form_matches_dense_reference(name, batch, threads, isa):
    w = WEIGHTS.get(name, TILE_WEIGHTS.get(name))
    x = np.random.default_rng(batch).standard_normal((batch, w.shape[1])).astype(np.float32)
    check(x, w, matmul(x, pack(w), threads=threads, isa=isa, form="tiles"))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("batch", [2, 5, 8])
@pytest.mark.parametrize("form", ["rows", "tiles"])
def test_8_lane_row_tails_weigh_nothing_past_each_rows_count(form, batch, isa):
    """The 8-lane loops read a row's last 1-7 elements as a group of 8: what they read past them (the next rows' NaN
    and inf weights, columns past K in a partial last K block, the forms' trailing columns) must add nothing, even
    after a call that left NaN in the kernels' scratch copy of x."""
    big = pruned(8, 4096, 0.5, 7)
    assert np.isnan(matmul(np.full((8, 4096), np.nan, np.float32), pack(big), isa=isa, form=form)).all()
    rng = np.random.default_rng(batch)
    n, k = 45, 200  # two tiles, two K blocks (the last 72 columns)
    w = np.zeros((n, k), np.float32)
    for r in range(n):
        for c0, c1 in ((0, 128), (128, k)):
            cols = rng.choice(np.arange(c0, c1), size=r % 10, replace=False)  # every tail length, and whole groups
            w[r, cols] = rng.standard_normal(len(cols)).astype(np.float32)
    bad_rows = [10, 21, 44]
    w[10, 5], w[21, 130], w[44, 199] = np.float32(np.nan), np.float32(np.inf), np.float32(np.nan)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    y = matmul(x, pack(w), isa=isa, form=form)
    assert not np.isfinite(y[:, bad_rows]).any()
    keep = np.setdiff1d(np.arange(n), bad_rows)
    check(x, w[keep], np.ascontiguousarray(y[:, keep]))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("density", [0.3, 0.5, 1.0])
def test_batch_1_rows_weigh_nothing_past_their_own_values(density, isa, profile):
    """The batch-1 GEMVs read each row's values straight from the packed stream, where the next row's follow (the AMD
    profile's compress GEMV loads 16 floats masked to the row's count): a row next to NaN and inf weights, in its own
    4-row block and in the next, stays exact, and the rows holding them are not finite."""
    rng = np.random.default_rng(int(density * 10))
    n, k = 13, 100  # 4 blocks, the last partial; the last group holds 4 columns
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[rng.random((n, k)) >= density] = 0.0
    bad_rows = [1, 4, 12]
    for r in bad_rows:
        w[r, rng.choice(k, 3, replace=False)] = [np.nan, np.inf, -np.inf]
    x = rng.standard_normal((1, k)).astype(np.float32)
    y = matmul(x, pack(w), isa=isa, form="bitmask")
    assert not np.isfinite(y[:, bad_rows]).any()
    keep = np.setdiff1d(np.arange(n), bad_rows)
    check(x, w[keep], np.ascontiguousarray(y[:, keep]))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("count", range(9))
def test_batch_1_gemv_with_every_byte_holding_the_same_count(count, isa, profile):
    """The batch-1 bitmask GEMV takes each 8-column byte of a row mask as it is (the AMD profile's 256-bit GEMV: one
    table row per byte, x's lanes gathered to the stored places): every byte with exactly `count` stored elements, for
    each count 0-8, agrees with the float64 reference. N = 22 leaves two empty rows in the last 4-row block, so at 4
    too the general GEMV runs, not the 4-of-8 one."""
    rng = np.random.default_rng(count)
    n, k = 22, 8 * 37 + 5  # a partial last byte and block
    w = rng.standard_normal((n, k)).astype(np.float32)
    keep = np.zeros((n, k), bool)
    for r in range(n):
        for c0 in range(0, k, 8):
            width = min(8, k - c0)
            keep[r, c0 + rng.choice(width, min(count, width), replace=False)] = True
    w[~keep] = 0.0
    p = pack(w)
    assert not four_of_eight(p)
    x = rng.standard_normal((1, k)).astype(np.float32)
    check(x, w, matmul(x, p, isa=isa, form="bitmask"))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", ["2:4", "4:8", "4:8 with NaN, inf and denormals", "4:8 but one -0.0"])
def test_four_of_eight_gemv_matches_dense_reference(name, threads, isa):
    """Batch 1 of a weight with 4 of every 8 columns stored runs the 4-of-8 GEMV (x gathered to the values' places)."""
    w = nm(64, 4096, 2, 4, 8) if name == "2:4" else nm(36, 208, 4, 8, 9)
    if "NaN" in name:  # special values in stored places
        for r, v in ((5, np.nan), (6, np.inf), (7, 1e-42)):
            w[r, np.flatnonzero(w[r])[3]] = np.float32(v)
    if "-0.0" in name:  # a signed zero is not stored: that row's group holds 3 in one half, so the general GEMV runs
        w[8, np.flatnonzero(w[8])[0]] = np.float32(-0.0)
    p = pack(w)
    assert four_of_eight(p) == ("-0.0" not in name)
    x = np.random.default_rng(threads).standard_normal((1, w.shape[1])).astype(np.float32)
    check(x, w, matmul(x, p, threads=threads, isa=isa))
    if four_of_eight(p):  # the library's 4-of-8 entry point itself
        y = np.empty((1, w.shape[0]), np.float32)
        args = (x.ctypes.data, 1, w.shape[1], p.mask.ctypes.data, p.values.ctypes.data, p.block_ptr.ctypes.data)
        assert kernels._lib().sdk_matmul_4of8(*args, w.shape[0], y.ctypes.data, threads, kernels._isa_code(isa)) == 0
        check(x, w, y)


def test_the_librarys_four_of_eight_check_is_formats():
    """The bound weight's check (which picks the 4-of-8 GEMV for batch 1) against format.four_of_eight."""
    minus_zero = nm(8, 64, 2, 4)
    minus_zero[3, np.flatnonzero(minus_zero[3])[0]] = np.float32(-0.0)
    weights = [nm(8, 64, 2, 4), nm(12, 48, 4, 8), nm(9, 64, 2, 4), nm(8, 40, 2, 4), nm(8, 64, 1, 4), minus_zero]
    packed = [pack(w) for w in weights]  # alive while their bound weights are asked
    got = [kernels._lib().sdk_linear_four_of_eight(kernels._linear(p).handle) for p in packed]
    assert got == [int(four_of_eight(p)) for p in packed] == [1, 1, 0, 0, 0, 0]


def test_four_of_eight_gemv_takes_batch_1_only():
    p = pack(nm(8, 64, 2, 4))
    x, y = np.zeros((2, 64), np.float32), np.zeros((2, 8), np.float32)
    args = (p.mask.ctypes.data, p.values.ctypes.data, p.block_ptr.ctypes.data, 8, y.ctypes.data, 1, 0)
    assert kernels._lib().sdk_matmul_4of8(x.ctypes.data, 2, 64, *args) == -1


def tile_reference(w):
    """The tile form by definition: per tile of 32 rows, per K block of 128 columns, its rows in ascending count of
    stored elements (not +-0.0; ties in row order; rows past N hold none), each row's elements in column order, each
    column counted from its block's first."""
    n, k = w.shape
    stored = (w.view(np.uint32) & np.uint32(0x7FFFFFFF)) != 0
    tiles, nkb = -(-n // 32), -(-k // 128)
    tile_ptr, counts, rows, cols, values = (
        [0],
        np.zeros((tiles, nkb, 32), np.uint8),
        np.zeros((tiles, nkb, 32), np.uint8),
        [],
        [],
    )
    for t in range(tiles):
        for kb in range(nkb):
            found = [
                np.nonzero(stored[32 * t + i, 128 * kb : 128 * (kb + 1)])[0] if 32 * t + i < n else np.array([], int)
                for i in range(32)
            ]
            order = sorted(range(32), key=lambda i: len(found[i]))  # sorted() is stable
            for v, i in enumerate(order):
                rows[t, kb, v], counts[t, kb, v] = i, len(found[i])
                cols += list(found[i])
                values += list(w[32 * t + i, 128 * kb + found[i]]) if len(found[i]) else []
        tile_ptr.append(len(cols))
    return np.array(tile_ptr), counts, rows, np.array(cols, np.uint8), np.array(values, np.float32)


@pytest.mark.parametrize("name", list(WEIGHTS) + list(TILE_WEIGHTS) + ["nan, denormal, -0.0"])
def test_tile_form_is_the_stored_elements_tile_by_tile(name):
    if name == "nan, denormal, -0.0":
        w = pruned(41, 150, 0.5, 5)
        w[0, 3], w[1, 140], w[33, 5] = np.float32(np.nan), np.float32(1e-42), np.float32(-0.0)
        w.view(np.uint32)[40, 130] = 0x7FC00123  # a NaN payload
    else:
        w = WEIGHTS.get(name, TILE_WEIGHTS.get(name))
    tf = kernels.tile_form(pack(w))
    tile_ptr, counts, rows, cols, values = tile_reference(w)
    assert tf.shape == w.shape and tf.nnz == len(cols)
    assert tf.tile_ptr.dtype == np.int64 and np.array_equal(tf.tile_ptr, tile_ptr)
    assert tf.counts.dtype == np.uint8 and np.array_equal(tf.counts, counts)
    assert tf.rows.dtype == np.uint8 and np.array_equal(tf.rows, rows)
    assert (np.diff(tf.counts.astype(int), axis=2) >= 0).all()  # each block's rows by ascending count
    assert tf.cols.dtype == np.uint8 and np.array_equal(tf.cols[: tf.nnz], cols)
    assert len(tf.cols) == tf.nnz + COL_PAD and not tf.cols[tf.nnz :].any()
    assert np.array_equal(tf.values[: tf.nnz].view(np.uint32), values.view(np.uint32))  # bit for bit
    assert len(tf.values) == tf.nnz + PAD and not tf.values[tf.nnz :].any()
    assert not any(a.flags.writeable for a in (tf.tile_ptr, tf.counts, tf.rows, tf.cols, tf.values))
    assert tf.kernel_nbytes == 8 * (counts.shape[0] + 1) + 2 * counts.size + 5 * tf.nnz + COL_PAD + 4 * PAD


def test_tile_form_kernel_refuses_what_it_cannot_hold():
    tf = kernels.tile_form(pack(pruned(4, 30, 0.5)))
    y = np.zeros((kernels.TILE_FORM_BATCH + 1, 4), np.float32)
    x = np.zeros((kernels.TILE_FORM_BATCH + 1, 30), np.float32)
    for b in (kernels.TILE_FORM_BATCH + 1, 0):
        rc = kernels._lib().sdk_tiles_matmul(
            x.ctypes.data,
            b,
            30,
            tf.tile_ptr.ctypes.data,
            tf.counts.ctypes.data,
            tf.rows.ctypes.data,
            tf.cols.ctypes.data,
            tf.values.ctypes.data,
            4,
            y.ctypes.data,
            1,
            0,
        )
        assert rc == -1


@pytest.mark.parametrize("isa", ISAS)
def test_the_form_is_picked_per_batch(isa, profile):
    for sparsity in (0.5, 0.7, 0.85, 0.95):
        w = pruned(40, 64, sparsity, 7)
        p = pack(w)
        bound = kernels.BoundMatmul(p, threads=1, isa=isa)
        density = p.nnz / w.size
        picked = {b: bound.form_for(b) for b in range(1, 70)}
        assert picked == {b: kernels.pick_form(b, density, 64, isa, profile) for b in picked}
        assert picked[16] == "rows"
        # batches 5-8 of a weight over 12 % stored: the 8-lane tile form on the "amd" profile only
        assert (picked[8] == "tiles") == (profile == "amd" and isa != "portable" and density > 0.12)
        # prefill: the row form up to 15 % stored; on the "amd" profile 8 % on AVX2, 4 % on AVX-512
        limit = {("avx2", "amd"): 0.08, ("avx512", "amd"): 0.04}.get((isa, profile), 0.15)
        assert picked[64] == ("rows" if density <= limit else "tiles")
        for b in (1, 2, 8, 16, 64, 97):  # 97: two tile-form calls and a last one of 33 rows
            x = np.random.default_rng(b).standard_normal((b, 64)).astype(np.float32)
            check(x, w, bound(x))


def takes_rows(b, density, isa, profile="intel", k=64):
    return kernels.pick_form(b, density, k, isa, profile) == "rows"


def test_the_row_form_is_picked_more_with_sparsity_and_batch():
    for isa in ("avx512", "avx2"):
        for profile in kernels.CPU_PROFILES:
            # the smallest batch that takes the row form, at rising density: it never falls
            densities = (0.04, 0.1, 0.2, 0.4, 1.0)
            first = [min([b for b in range(1, 9) if takes_rows(b, d, isa, profile)] or [99]) for d in densities]
            assert first == sorted(first) and first[-1] == 99 and first[0] <= 2
    # the batch-1 GEMV the "intel" profile runs on AVX-512 (expand-load) holds out longer than the 256-bit one
    assert not takes_rows(1, 0.15, "avx512", "intel") and takes_rows(1, 0.15, "avx512", "amd")
    assert takes_rows(1, 0.15, "avx2", "intel") == takes_rows(1, 0.15, "avx512", "amd")
    # AVX2 on the "amd" profile: the row form's insertps loop takes batch 1 from 75 % (the gather GEMV up to 70 %)
    assert takes_rows(1, 0.25, "avx2", "amd") and not takes_rows(1, 0.3, "avx2", "amd")
    assert not takes_rows(1, 0.25, "avx2", "intel") and not takes_rows(1, 0.25, "avx512", "amd")
    # prefill on the "amd" profile: the tile form up to 92 % on AVX2, 96 % on AVX-512 (the row form past it); 85 %
    # on the "intel" profile
    assert not takes_rows(128, 0.1, "avx2", "amd") and takes_rows(128, 0.05, "avx2", "amd")
    assert not takes_rows(128, 0.05, "avx512", "amd") and takes_rows(128, 0.04, "avx512", "amd")
    assert takes_rows(128, 0.1, "avx512", "intel") and takes_rows(128, 0.1, "avx2", "intel")
    # batch 8 on the "intel" profile's AVX-512 path: the row form up to 32 % stored (its 8-lane loop measured ahead
    # of the expand form at 70 % on Emerald Rapids); batch 7 keeps b / 32
    assert takes_rows(8, 0.3, "avx512", "intel") and not takes_rows(8, 0.35, "avx512", "intel")
    assert not takes_rows(7, 0.3, "avx512", "intel") and not takes_rows(8, 0.3, "avx512", "amd")
    # batches 2-8 have one rule on both profiles, but the "amd" profile runs 5-8 over 12 % stored in the tile form
    for isa in ("avx512", "avx2"):
        for b in range(2, 9):
            for d in (0.05, 0.1, 0.2, 0.3, 0.5):
                intel = kernels.pick_form(b, d, 64, isa, "intel")
                assert kernels.pick_form(b, d, 64, isa, "amd") == ("tiles" if b >= 5 and d > 0.12 else intel)
    # the portable path's bit loops lose at any density up to batch 32; past 32 (prefill) only sparse weights
    for profile in kernels.CPU_PROFILES:
        assert all(takes_rows(b, 1.0, "portable", profile) for b in range(1, 33))
    for isa in ("avx512", "avx2", "portable"):
        assert takes_rows(128, 0.1, isa) and kernels.pick_form(128, 0.2, 64, isa, "intel") == "tiles"
    # K past the row form's uint16 columns: never the row form
    assert kernels.pick_form(16, 0.3, 65537, "avx2", "intel") == "bitmask"
    assert kernels.pick_form(128, 0.1, 65537, "avx2", "intel") == "tiles"
    with pytest.raises(ValueError, match="isa must be one of"):
        kernels.pick_form(1, 0.3, 64, "sse9", "amd")
    assert kernels._lib().sdk_pick_form(1, 0.3, 64, 0, 0) == -1  # the library wants a resolved ISA


def test_the_amd_profile_takes_the_8_lane_tile_form_at_batches_5_to_8_over_12_percent_stored():
    def tiles(b, d, isa, profile):
        return kernels.pick_form(b, d, 2048, isa, profile) == "tiles"

    densities = (0.15, 0.2, 0.3, 1.0)
    assert all(tiles(b, d, isa, "amd") for b in range(5, 9) for isa in ("avx512", "avx2") for d in densities)
    assert not any(tiles(b, 0.3, "avx512", "amd") for b in (1, 4, 9, 32))
    assert not tiles(8, 0.12, "avx512", "amd") and not tiles(8, 0.1, "avx2", "amd")  # 90 %: the row form's
    assert not tiles(8, 0.3, "portable", "amd")
    assert not tiles(8, 0.5, "avx512", "intel")  # not measured on Intel: its forms stay


def test_row_form_limits():
    k = kernels.ROW_FORM_MAX_K + 1
    w = pruned(2, k, 0.99)
    p = pack(w)
    with pytest.raises(ValueError, match="uint16 columns"):
        kernels.row_form(p)
    with pytest.raises(ValueError, match="row form holds K up to 65536"):
        kernels.BoundMatmul(p, form="rows")
    bound = kernels.BoundMatmul(p, threads=1)
    # too wide for uint16 columns: the bitmask form serves batches up to 32, the tile form (no K limit) prefill
    assert bound.form_for(8) == "bitmask" and bound.form_for(33) == "tiles"
    x = np.random.default_rng(0).standard_normal((33, k)).astype(np.float32)
    check(x[:8], w, bound(x[:8]))
    check(x, w, bound(x))
    with pytest.raises(ValueError, match="unknown form 'csr'"):
        kernels.BoundMatmul(p, form="csr")
    small = kernels.row_form(pack(pruned(4, 30, 0.5)))
    y = np.zeros((33, 4), np.float32)
    for b, kk in ((33, 30), (0, 30), (2, k)):  # the library refuses what the row form cannot hold
        rc = kernels._lib().sdk_rows_matmul(
            np.zeros((33, k), np.float32).ctypes.data,
            b,
            kk,
            small.row_ptr.ctypes.data,
            small.cols.ctypes.data,
            small.values.ctypes.data,
            4,
            y.ctypes.data,
            1,
            0,
        )
        assert rc == -1


@pytest.mark.parametrize("isa", ISAS)
def test_threads_split_skewed_rows(isa):
    """Rows of very different density (the split is by stored elements) and more threads than the CPU has."""
    w = pruned(1003, 333, 0.9)
    w[:100] = pruned(100, 333, 0.0, 1)  # a dense block at the top: one thread's range is short
    x = np.random.default_rng(0).standard_normal((5, 333)).astype(np.float32)
    p = pack(w)
    for threads in (1, 2, 3, 7):
        for form in kernels.FORMS:
            check(x[:1], w, matmul(x[:1], p, threads=threads, isa=isa, form=form))
            check(x, w, matmul(x, p, threads=threads, isa=isa, form=form))


def test_large_batch_is_chunked_and_1d_input_squeezes():
    w = pruned(50, 90, 0.7)
    p = pack(w)
    x = np.random.default_rng(1).standard_normal((kernels.MAX_BATCH_CHUNK + 37, 90)).astype(np.float32)
    check(x, w, matmul(x, p, threads=2))
    y1 = matmul(x[0], p)
    assert y1.shape == (50,)
    check(x[:1], w, y1[None])
    out = np.full((3, 50), np.nan, np.float32)
    assert matmul(x[:3], p, out=out) is out
    check(x[:3], w, out)


def test_paths_agree_and_are_deterministic():
    w = pruned(300, 1000, 0.7)
    x = np.random.default_rng(2).standard_normal((4, 1000)).astype(np.float32)
    p = pack(w)
    for isa in ISAS:
        for form in kernels.FORMS:
            a = matmul(x, p, threads=2, isa=isa, form=form)
            assert np.array_equal(a, matmul(x, p, threads=2, isa=isa, form=form))  # same split and order: same bits


def test_concurrent_callers_get_their_own_results():
    w1, w2 = pruned(200, 300, 0.5, 1), pruned(150, 300, 0.8, 2)
    p1, p2 = pack(w1), pack(w2)
    x = np.random.default_rng(3).standard_normal((8, 300)).astype(np.float32)
    errors = []

    def worker(p, w):
        try:
            for _ in range(30):
                check(x, w, matmul(x, p, threads=2))
                check(x[:1], w, matmul(x[:1], p, threads=2))
        except AssertionError as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=a) for a in [(p1, w1), (p2, w2), (p1, w1)]]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[0]


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda p: matmul(np.zeros((2, 30), np.float64), p), "x must be float32"),
        (lambda p: matmul(np.zeros((2, 31), np.float32), p), r"x must be \[B, 30\]"),
        (lambda p: matmul(np.zeros((2, 3, 30), np.float32), p), r"x must be \[B, 30\]"),
        (lambda p: matmul(np.zeros((0, 30), np.float32), p), r"x must be \[B, 30\]"),
        (lambda p: matmul(np.zeros((2, 30), np.float32), p, threads=0), "threads must be a positive int"),
        (lambda p: matmul(np.zeros((2, 30), np.float32), p, isa="sse9"), "unknown isa"),
        (lambda p: matmul(np.zeros((2, 30), np.float32), p, out=np.zeros((2, 7), np.float32)), "out must be"),
        (lambda p: matmul(np.zeros((2, 30), np.float32), np.zeros((4, 30), np.float32)), "PackedLinear"),
    ],
)
def test_bad_input_raises_a_clear_error(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(pack(pruned(4, 30, 0.5)))


@pytest.mark.parametrize("isa", ISAS)
def test_bound_matmul_is_matmul_with_the_checks_done_once(isa):
    w = pruned(37, 45, 0.7, seed=3)
    bound = kernels.BoundMatmul(pack(w), threads=2, isa=isa)
    for batch in (1, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 45)).astype(np.float32)
        y = bound(x)
        check(x, w, y)
        assert np.array_equal(y, matmul(x, pack(w), threads=2, isa=isa))
    with pytest.raises(ValueError, match=r"C-contiguous float32 \[B, 45\]"):
        bound(np.zeros((45, 3), np.float32).T)
    with pytest.raises(ValueError, match=r"C-contiguous float32 \[B, 45\]"):
        bound(np.zeros((3, 45), np.float64))
    with pytest.raises(ValueError, match="threads must be a positive int"):
        kernels.BoundMatmul(pack(w), threads=0)


def test_isa_the_cpu_lacks_is_refused(monkeypatch):
    p = pack(pruned(4, 30, 0.5))
    x = np.zeros((1, 30), np.float32)
    assert (
        kernels._lib().sdk_matmul(
            x.ctypes.data,
            1,
            30,
            p.mask.ctypes.data,
            p.values.ctypes.data,
            p.block_ptr.ctypes.data,
            4,
            np.zeros(4, np.float32).ctypes.data,
            1,
            9,
        )
        == -2
    )
    monkeypatch.setattr(kernels, "available_isas", lambda: ["portable"])
    with pytest.raises(ValueError, match="does not run on this CPU"):
        matmul(x, p, isa="avx2")


def test_missing_library_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: None)
    monkeypatch.delenv("SPARSEDEPLOY_SPARSE_CPU_LIB", raising=False)
    with pytest.raises(kernels.NativeLibraryMissing, match="pip install -e ."):
        kernels.library_path()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("batch,k", [(130, 1000), (2, 4000), (3, 4000), (4, 4000), (5, 4000), (8, 4000)])
def test_k_blocked_batches(isa, batch, k):
    """Batches walk x in K blocks (48-192 KB of transposed x; 16 KB of x in the batch 2-8 expand form, whose partial
    sums wait between K blocks): several blocks, a partial last one, value cursors, the tiles' last rows."""
    w = pruned(45, k, 0.6)
    w[3] = 0.0
    x = np.random.default_rng(4).standard_normal((batch, k)).astype(np.float32)
    check(x, w, matmul(x, pack(w), threads=2, isa=isa))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", [(1, 7), (3, 576), (2, 5, 33)])
def test_silu_mul_matches_float64(isa, shape):
    rng = np.random.default_rng(len(shape))
    gate_up = (8 * rng.standard_normal(shape[:-1] + (2 * shape[-1],))).astype(np.float32)
    gate_up.reshape(-1)[:4] = [100.0, -100.0, 0.0, -0.0]  # exp clamps both ways; sigmoid(0) = 0.5
    g, u = np.split(gate_up.astype(np.float64), 2, axis=-1)
    ref = g / (1 + np.exp(-g)) * u
    got = kernels.silu_mul(gate_up, isa=isa)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("shape", [(1, 7), (3, 576), (2, 5, 33)])
def test_add_rmsnorm_matches_float64(shape):
    rng = np.random.default_rng(len(shape))
    a, b = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    weight = rng.standard_normal(shape[-1]).astype(np.float32)
    total, normed = kernels.add_rmsnorm(a, b, weight, 1e-5)
    assert np.array_equal(total, a + b)
    s = total.astype(np.float64)
    ref = weight * (s / np.sqrt((s * s).mean(-1, keepdims=True) + np.float64(np.float32(1e-5))))
    np.testing.assert_allclose(normed, ref, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: kernels.silu_mul(np.zeros((2, 7), np.float32)), "two equal halves"),
        (lambda: kernels.silu_mul(np.zeros((2, 8))), r"float32 array \[\.\.\., 8\]"),
        (lambda: kernels.silu_mul(np.zeros((2, 8), np.float32), isa="sse9"), "silu_mul: unknown isa"),
        (
            lambda: kernels.add_rmsnorm(*[np.zeros((2, 4), np.float32)] * 2, np.ones(5, np.float32), 1e-5),
            r"\[\.\.\., 5\]",
        ),
        (
            lambda: kernels.add_rmsnorm(
                np.zeros((2, 4), np.float32), np.zeros((1, 4), np.float32), np.ones(4, np.float32), 1e-5
            ),
            "one shape",
        ),
    ],
)
def test_elementwise_bad_input_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def attention_reference(qkv, heads, cos, sin, past, mask, scales):
    """The attention step in float64 NumPy, as the exporter's graph writes it (rotate-half rotary, GQA by
    repeat-interleave of kv heads, (q cq)(k ck)^T scores, masked keys -inf, all-masked rows zero)."""
    hq, hkv = heads
    b, s, width = qkv.shape
    d = width // (hq + 2 * hkv)
    x = qkv.astype(np.float64)

    def split_heads(part, h):
        return part.reshape(b, s, h, d).transpose(0, 2, 1, 3)

    q = split_heads(x[..., : hq * d], hq)
    k = split_heads(x[..., hq * d : (hq + hkv) * d], hkv)
    v = split_heads(x[..., (hq + hkv) * d :], hkv)
    c, sn = cos[:, None].astype(np.float64), sin[:, None].astype(np.float64)

    def turn(t):
        return t * c + np.concatenate([-t[..., d // 2 :], t[..., : d // 2]], -1) * sn

    keys = np.concatenate([past[0], turn(k)], 2)
    values = np.concatenate([past[1], v], 2)
    kr, vr = (np.repeat(t, hq // hkv, 1) for t in (keys, values))
    scores = (turn(q) * scales[0]) @ (kr * scales[1]).transpose(0, 1, 3, 2)
    allowed = np.broadcast_to(mask[:, None, :, : keys.shape[2]], scores.shape)
    scores = np.where(allowed, scores, -np.inf)
    top = np.where(allowed.any(-1, keepdims=True), scores.max(-1, keepdims=True), 0.0)
    e = np.where(allowed, np.exp(scores - top), 0.0)
    probs = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
    out = (probs @ vr).transpose(0, 2, 1, 3).reshape(b, s, hq * d)
    return out, keys, values


ATTENTION_CASES = {  # (batch, new tokens, past, q heads, kv heads, head width)
    "decode step, smollm2 heads": (1, 1, 70, 9, 3, 64),
    "prefill, smollm2 heads": (1, 23, 0, 9, 3, 64),
    "batch 2, chunk after a cache, d 96": (2, 5, 9, 4, 2, 96),
    "one kv head, d 6 (portable loop on every ISA)": (3, 2, 7, 6, 1, 6),
    "one token, no cache, d 2": (1, 1, 0, 2, 2, 2),
    "d 32, 12 keys (8-lane exp plus a tail)": (1, 3, 9, 2, 1, 32),
}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_matches_float64(isa, case):
    b, s, p, hq, hkv, d = ATTENTION_CASES[case]
    rng = np.random.default_rng(len(case))
    qkv = rng.standard_normal((b, s, (hq + 2 * hkv) * d)).astype(np.float32)
    cos, sin = rng.standard_normal((1, s, d)).astype(np.float32), rng.standard_normal((b, s, d)).astype(np.float32)
    past = tuple(rng.standard_normal((b, hkv, p, d)).astype(np.float32) for _ in range(2))
    mask = rng.random((b, s, p + s + 3)) < 0.6  # wider than the keys: only the first p + s columns count
    mask[0, 0, : p + s] = False  # a query that may attend no key gets zeros
    got = kernels.attention(qkv, (hq, hkv), cos, sin, past, mask, (0.42, 0.37), isa=isa)
    ref = attention_reference(qkv, (hq, hkv), cos, sin, past, mask, (0.42, 0.37))
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == np.float32 and g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-6)
    assert not got[0][0, 0, :].any()
    assert np.array_equal(got[1][:, :, :p], past[0]) and np.array_equal(
        got[2][:, :, p:], qkv[..., (hq + hkv) * d :].reshape(b, s, hkv, d).transpose(0, 2, 1, 3)
    )


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("s", "p", "d"), [(64, 0, 64), (13, 5, 32), (9, 0, 96)])
def test_attention_causal_prefill_matches_float64(isa, s, p, d):
    """A prefill's causal mask (query t may attend keys up to p + t): the transposed-keys path reads keys only up to
    the last allowed one; a key block of 8 partly past it and past the cache's end must not leak in."""
    rng = np.random.default_rng(s + p)
    hq, hkv = 6, 2
    qkv = rng.standard_normal((2, s, (hq + 2 * hkv) * d)).astype(np.float32)
    cos, sin = rng.standard_normal((1, s, d)).astype(np.float32), rng.standard_normal((1, s, d)).astype(np.float32)
    past = tuple(rng.standard_normal((2, hkv, p, d)).astype(np.float32) for _ in range(2))
    mask = np.tril(np.ones((s, p + s), bool), p)[None].repeat(2, 0)
    mask[1, :, :2] = False  # left padding in the second row
    got = kernels.attention(qkv, (hq, hkv), cos, sin, past, mask, (0.3, 0.5), isa=isa)
    ref = attention_reference(qkv, (hq, hkv), cos, sin, past, mask, (0.3, 0.5))
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-6)


def test_attention_mask_broadcasts_over_queries_and_batch():
    """A [1, 1, L] mask (one row for every query of every batch row) gives what the full mask gives."""
    rng = np.random.default_rng(9)
    qkv = rng.standard_normal((2, 3, 4 * 8)).astype(np.float32)
    cos, sin = (rng.standard_normal((1, 3, 8)).astype(np.float32) for _ in range(2))
    past = tuple(rng.standard_normal((2, 1, 4, 8)).astype(np.float32) for _ in range(2))
    row = rng.random((1, 1, 7)) < 0.5
    row[0, 0, 0] = True
    one = kernels.attention(qkv, (2, 1), cos, sin, past, row, (1.0, 0.5))
    full = kernels.attention(qkv, (2, 1), cos, sin, past, np.broadcast_to(row, (2, 3, 7)).copy(), (1.0, 0.5))
    for a, b in zip(one, full, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"qkv": np.zeros((1, 1, 10), np.float32)}, "does not hold q, k, v"),
        ({"past": (np.zeros((1, 1, 2, 2), np.float32),) * 2}, r"past \(1, 1, 2, 2\)"),
        ({"cos": np.zeros((1, 2, 2), np.float32)}, r"cos \(1, 2, 2\)"),
        ({"mask": np.ones((1, 1, 3), np.float32)}, "mask must be bool"),
        ({"mask": np.ones((1, 1, 2), bool)}, "mask covers 2 keys, the step has 3"),
    ],
)
def test_attention_bad_input_is_refused(change, match):
    args = {
        "qkv": np.zeros((1, 1, 12), np.float32),
        "cos": np.zeros((1, 1, 2), np.float32),
        "sin": np.zeros((1, 1, 2), np.float32),
        "past": (np.zeros((1, 2, 2, 2), np.float32),) * 2,
        "mask": np.ones((1, 1, 3), bool),
    }
    args.update(change)
    with pytest.raises(ValueError, match=match):
        kernels.attention(args["qkv"], (2, 2), args["cos"], args["sin"], args["past"], args["mask"], (1.0, 1.0))


FORK_CHILD = """
import os, sys, threading, time
import numpy as np
from sparsedeploy.kernels import native
from sparsedeploy.kernels.format import pack
rng = np.random.default_rng(0)
w = rng.standard_normal((2048, 1024)).astype(np.float32)
w[rng.random(w.shape) < 0.5] = 0
p, x = pack(w), rng.standard_normal((64, 1024)).astype(np.float32)
ref = x.astype(np.float64) @ w.T.astype(np.float64)
stop, busy_threads = False, int(sys.argv[1])
def busy():  # another thread's calls, one in flight at almost any moment
    while not stop:
        native.matmul(x, p, threads=busy_threads)
busy_thread = threading.Thread(target=busy)
busy_thread.start()
time.sleep(0.2)
codes = []
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        y = native.matmul(x, p, threads=2)
        ok = np.allclose(y, ref, rtol=1e-4, atol=1e-3) and len(os.listdir("/proc/self/task")) >= 2
        os._exit(0 if ok else 3)
    deadline = time.time() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            codes.append(os.waitstatus_to_exitcode(status))
            break
        if time.time() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            codes.append("hung")
            break
        time.sleep(0.05)
stop = True
busy_thread.join()
print(codes)
"""


@pytest.mark.skipif(not hasattr(os, "fork") or not Path("/proc/self/task").is_dir(), reason="needs fork and /proc")
@pytest.mark.parametrize("busy_threads", [1, 2])
def test_a_forked_child_runs_its_calls_on_its_own_threads(busy_threads):
    """A pre-forking server loads the model, then forks: the child inherits none of the kernel threads, and a lock held
    at the fork by another thread's call would stay held in it. Forked while another thread's calls run (on
    busy_threads threads), each child's own 2-thread call must finish, be right and start the child's own worker.
    Before the pool's fork handlers every child hung (3 of 3 with 2 busy threads), and one forked with no call in
    flight ran on one thread alone. With 1 busy thread the parent never starts a worker, yet each call holds the lock:
    with the handlers registered at the first worker instead of at load, children hung (4 of 5 in a probe, 2 of 3
    here)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}  # 3.12+: fork with threads running
    out = subprocess.run(
        [sys.executable, "-c", FORK_CHILD, str(busy_threads)], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "[0, 0, 0]", out.stdout + out.stderr[-2000:]
