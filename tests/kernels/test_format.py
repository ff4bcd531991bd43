"""The bitmask16 format: lossless round trip, stored arrays, validation of what is loaded back."""

import numpy as np
import pytest

from sparsedeploy.kernels.format import (
    GROUP,
    LAYOUT,
    PAD,
    ROWS,
    PackedLinear,
    byte_bound_ceiling,
    four_of_eight,
    pack,
    unpack,
)


def pruned(n: int, k: int, sparsity: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[rng.random((n, k)) < sparsity] = 0.0
    return w


def nm(n: int, k: int, keep: int, m: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    groups = w.reshape(n, k // m, m)
    order = np.argsort(np.abs(groups), axis=2)
    np.put_along_axis(groups, order[:, :, : m - keep], 0.0, axis=2)
    return groups.reshape(n, k)


@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (37, 53), (16, 32), (5, 1000)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99, 1.0])
def test_round_trip_is_bit_identical(shape, sparsity):
    w = pruned(*shape, sparsity)
    p = pack(w)
    back = unpack(p)
    assert back.dtype == np.float32 and back.shape == w.shape
    assert np.array_equal(back.view(np.uint32), w.view(np.uint32))
    assert p.nnz == int(np.count_nonzero(w.view(np.uint32)))
    assert p.mask.shape == (-(-shape[0] // ROWS), -(-shape[1] // GROUP), ROWS) and p.values.shape == (p.nnz + PAD,)
    assert np.array_equal(p.stored(), w != 0)
    assert not p.values[p.nnz :].any()  # the padding is zeros


def test_negative_zero_and_specials_survive():
    w = np.array([[-0.0, 0.0, 1.0, np.inf], [-np.inf, 0.0, -0.0, 3.0e-45]], dtype=np.float32)  # 3e-45: a denormal
    p = pack(w)
    assert p.nnz == 4  # +-0.0 are not stored values; their signs ride in negzero
    assert np.unpackbits(p.negzero, count=4, bitorder="little").tolist() == [1, 0, 0, 1]
    assert np.array_equal(unpack(p).view(np.uint32), w.view(np.uint32))
    assert np.signbit(unpack(p)[0, 0]) and not np.signbit(unpack(p)[0, 1])
    q = PackedLinear.from_arrays(p.to_arrays())
    assert np.array_equal(unpack(q).view(np.uint32), w.view(np.uint32))


def test_mask_pruning_keeps_compression_and_the_zero_signs():
    """w * mask leaves -0.0 at pruned negative weights: they must not be stored as values."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 512)).astype(np.float32)
    w = w * (rng.random(w.shape) > 0.7).astype(np.float32)
    assert np.signbit(w[w == 0]).any()
    p = pack(w)
    assert p.nnz == np.count_nonzero(w) and p.negzero.nbytes == -(-(w.size - p.nnz) // 8)
    assert np.array_equal(unpack(p).view(np.uint32), w.view(np.uint32))
    assert p.nbytes == p.kernel_nbytes + p.negzero.nbytes and p.nbytes < 0.4 * w.nbytes
    assert pack(np.abs(w)).negzero.size == 0  # no -0.0: nothing stored for signs


def test_mask_bit_order_is_the_documented_layout():
    """Blocks of 4 rows; within a block group by group, rows 0-3 within a group; bits past N and K are 0."""
    w = np.zeros((5, 20), dtype=np.float32)
    w[0, [0, 9, 15, 16, 19]] = [1, 2, 3, 4, 5]
    w[2, [1, 17]] = [6, 7]
    w[4, [18]] = [8]  # the second block, whose rows 5-7 do not exist
    p = pack(w)
    assert p.mask.shape == (2, 2, 4)
    assert p.mask[0].tolist() == [[(1 << 0) | (1 << 9) | (1 << 15), 0, 1 << 1, 0], [(1 << 0) | (1 << 3), 0, 1 << 1, 0]]
    assert p.mask[1].tolist() == [[0, 0, 0, 0], [1 << 2, 0, 0, 0]]
    # block 0: group 0 (row 0: 1 2 3, row 2: 6), group 1 (row 0: 4 5, row 2: 7); block 1: group 1 (row 4: 8)
    assert p.values[:8].tolist() == [1, 2, 3, 6, 4, 5, 7, 8] and p.block_ptr.tolist() == [0, 7, 8]
    assert p.layout == LAYOUT == "bitmask16-v2"


@pytest.mark.parametrize("keep,m", [(2, 4), (4, 8)])
def test_nm_round_trip_and_density(keep, m):
    w = nm(24, 64, keep, m)
    p = pack(w)
    assert np.array_equal(unpack(p).view(np.uint32), w.view(np.uint32))
    assert p.sparsity == pytest.approx(1 - keep / m)


def test_arrays_round_trip_and_sizes():
    w = pruned(64, 2048, 0.7)
    p = pack(w)
    arrays = p.to_arrays()
    assert set(arrays) == {"mask", "values", "block_ptr", "negzero", "shape"}
    q = PackedLinear.from_arrays({k: v.copy() for k, v in arrays.items()})
    assert q.shape == p.shape and np.array_equal(unpack(q), w)
    assert p.nbytes == sum(a.nbytes for a in (p.mask, p.values, p.block_ptr, p.negzero))
    # 1 bit per weight + 4 bytes per stored weight: 4 / (1/8 + 0.3 * 4) ~= 3.02 at 70 % (the byte-bound figure)
    assert byte_bound_ceiling(p) == pytest.approx(4 / (1 / 8 + 4 * p.nnz / w.size), rel=0.01)
    assert 2.9 < byte_bound_ceiling(p) < 3.1
    assert not p.values.flags.writeable  # frozen: the kernels' view cannot change under them


def test_from_arrays_rejects_inconsistent_arrays():
    arrays = pack(pruned(8, 40, 0.5)).to_arrays()
    bad_ptr = dict(arrays, block_ptr=arrays["block_ptr"] + 1)
    with pytest.raises(ValueError, match="block_ptr"):
        PackedLinear.from_arrays(bad_ptr)
    with pytest.raises(ValueError, match="'values' must be float32"):
        PackedLinear.from_arrays(dict(arrays, values=arrays["values"].astype(np.float64)))
    with pytest.raises(ValueError, match="'values' must have shape"):
        PackedLinear.from_arrays(dict(arrays, values=arrays["values"][:-PAD]))
    with pytest.raises(ValueError, match="missing arrays"):
        PackedLinear.from_arrays({"mask": arrays["mask"]})
    beyond = arrays["mask"].copy()
    beyond[0, -1, 0] |= np.uint16(1 << 15)  # K = 40: bits 8..15 of the last group are past the end
    with pytest.raises(ValueError, match="beyond K"):
        PackedLinear.from_arrays(dict(arrays, mask=beyond))
    odd = pack(pruned(6, 40, 0.5)).to_arrays()  # N = 6: rows 2 and 3 of the second block do not exist
    past_n = odd["mask"].copy()
    past_n[1, 0, 3] = np.uint16(1)
    with pytest.raises(ValueError, match="beyond N"):
        PackedLinear.from_arrays(dict(odd, mask=past_n))


def test_an_older_layout_is_refused_with_the_fix():
    """An artifact exported before bitmask16-v2 carries `row_ptr` (v1); loading it names the re-export."""
    arrays = pack(pruned(8, 40, 0.5)).to_arrays()
    v1 = {k: v for k, v in arrays.items() if k != "block_ptr"} | {"row_ptr": np.zeros(9, np.int64)}
    with pytest.raises(ValueError, match=r"bitmask16-v1 layout.*export --target sparse-cpu"):
        PackedLinear.from_arrays(v1)


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.zeros((4, 4), np.float64), "must be float32"),
        (np.zeros(4, np.float32), "2-D"),
        (np.zeros((0, 4), np.float32), "non-empty"),
    ],
)
def test_pack_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        pack(bad)


def test_four_of_eight_is_every_mask_byte_holding_four():
    rng = np.random.default_rng(3)

    def keep(n, k, per, of):  # `per` of every `of` columns kept, at random places
        w = rng.standard_normal((n, k)).astype(np.float32)
        order = np.argsort(rng.random((n, k // of, of)), axis=2)
        np.put_along_axis(w.reshape(n, k // of, of), order[:, :, : of - per], 0.0, axis=2)
        return w

    assert four_of_eight(pack(keep(8, 64, 2, 4))) and four_of_eight(pack(keep(12, 48, 4, 8)))
    assert not four_of_eight(pack(keep(9, 64, 2, 4)))  # rows past N in the last block: empty masks
    assert not four_of_eight(pack(keep(8, 40, 2, 4)))  # K = 40: the last group's second half is past K
    assert not four_of_eight(pack(keep(8, 64, 1, 4)))  # 1:4
    w = keep(8, 64, 2, 4)
    w[3, 17] = 0.0 if w[3, 17] else 1.0  # one group of one row with 3 or 5 in a half
    assert not four_of_eight(pack(w))
