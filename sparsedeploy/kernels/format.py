"""The bitmask16 compressed weight format of the sparse-cpu runtime (byte layout: docs/sparse_cpu.md).

A float32 nn.Linear weight W [N, K] (y = x @ W.T) is stored in blocks of ROWS = 4 consecutive rows
(NB = ceil(N / 4) blocks; the rows past N of the last block are empty), G = ceil(K / 16) column groups:
  mask      uint16 [NB, G, 4]: bit j of mask[b, g, i] set <=> W[4 b + i, 16 g + j] is stored
  values    float32 [nnz + 16]: the stored elements block by block; within a block group by group, and
            within a group row 0, 1, 2, 3, each row's elements in column order; then 16 zero floats of
            padding (a 16-lane vector load may start at any element)
  block_ptr int64 [NB + 1]: block b's elements are values[block_ptr[b]:block_ptr[b + 1]]
  negzero   uint8 [ceil(Z / 8)] or [0]: over the Z zero elements (+0.0 or -0.0) of W in row-major order, bit i
            (little-endian bit order) set <=> the i-th zero is -0.0; empty when the weight has no -0.0
So a batch-1 matmul reads each block as two sequential streams (its masks and its values) instead of two
per row. An element is stored when it is not +-0.0 (NaN payloads and denormals are kept). Pruning by
`w * mask` leaves -0.0 wherever a negative weight was pruned, so the sign of zeros rides in `negzero` (read by
unpack only, never by the kernels, since +-0.0 add the same to a sum): the round trip is bit-exact.

Two forms are derived from it in memory, never stored, each where it pays (the native library picks per call:
csrc/sparse_cpu.c pick_form; native.pick_form, native.BoundMatmul.form_for):
  the row form (`RowForm`, native.row_form): the stored elements row by row (CSR) with uint16 columns, for batches
    1-32;
  the tile form (`TileForm`, native.tile_form): tiles of TILE_ROWS rows, each in K blocks of TILE_COLS columns,
    uint8 columns within the block, for prefill (batches above 32) and, on the "amd" CPU profile, batches 5-8 of weights
    with more than 12 % stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LAYOUT = "bitmask16-v2"
OLD_LAYOUTS = {"row_ptr": "bitmask16-v1"}  # an array only an older layout has -> that layout's name
GROUP = 16
ROWS = 4  # rows per block
PAD = 16  # trailing floats after the stored values, so a 16-lane vector load may start at any element
COL_PAD = 8  # trailing zero columns of the row and tile forms: the 8-lane loops read a row's last 1-7 elements as 8


@dataclass(frozen=True)
class PackedLinear:
    """One linear layer's weight in the bitmask16 format (immutable; arrays are read-only)."""

    mask: np.ndarray  # uint16 [NB, G, ROWS]
    values: np.ndarray  # float32 [nnz + PAD]
    block_ptr: np.ndarray  # int64 [NB + 1]
    shape: tuple[int, int]  # (N, K)
    negzero: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint8))  # uint8 sign bits of zeros
    layout: str = LAYOUT

    @property
    def nnz(self) -> int:
        return int(self.block_ptr[-1])

    @property
    def sparsity(self) -> float:
        """Fraction of elements not stored (exact zeros)."""
        n, k = self.shape
        return 1.0 - self.nnz / (n * k)

    @property
    def nbytes(self) -> int:
        """Bytes the format occupies when stored (all arrays)."""
        return int(self.kernel_nbytes + self.negzero.nbytes)

    @property
    def kernel_nbytes(self) -> int:
        """Bytes a matmul reads (mask + values incl. padding + block pointers; not `negzero`)."""
        return int(self.mask.nbytes + self.values.nbytes + self.block_ptr.nbytes)

    @property
    def dense_nbytes(self) -> int:
        n, k = self.shape
        return 4 * n * k

    def stored(self) -> np.ndarray:
        """bool [N, K]: which elements are stored (the mask in the weight's own row-major layout)."""
        n, k = self.shape
        nb, g, _ = self.mask.shape
        bits = (self.mask[..., None] >> np.arange(GROUP, dtype=np.uint16)) & np.uint16(1)  # [NB, G, ROWS, 16]
        return bits.astype(bool).transpose(0, 2, 1, 3).reshape(nb * ROWS, g * GROUP)[:n, :k]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays to store (e.g. as ONNX initializers); `shape` and `layout` are recoverable from them."""
        n, k = self.shape
        return {
            "mask": self.mask,
            "values": self.values,
            "block_ptr": self.block_ptr,
            "negzero": self.negzero,
            "shape": np.array([n, k], dtype=np.int64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> PackedLinear:
        """Rebuild from `to_arrays()` output, validating every array (raises ValueError naming the problem)."""
        old = [layout for name, layout in OLD_LAYOUTS.items() if name in arrays and "block_ptr" not in arrays]
        if old:
            raise ValueError(
                f"packed weight is in the older {old[0]} layout, which this version no longer reads: "
                f"export it again (`sparsedeploy export --target sparse-cpu`) to get {LAYOUT}"
            )
        missing = {"mask", "values", "block_ptr", "shape"} - set(arrays)
        if missing:
            raise ValueError(
                f"packed weight is missing arrays {sorted(missing)}: "
                "expected mask, values, block_ptr, shape (and optionally negzero)"
            )
        shape = np.asarray(arrays["shape"])
        if shape.shape != (2,) or shape.dtype.kind not in "iu" or (shape < 1).any():
            raise ValueError(f"packed weight 'shape' must be two positive ints [N, K], got {shape!r}")
        n, k = int(shape[0]), int(shape[1])
        nb, g = -(-n // ROWS), -(-k // GROUP)
        mask = _as(arrays["mask"], np.uint16, (nb, g, ROWS), "mask")
        block_ptr = _as(arrays["block_ptr"], np.int64, (nb + 1,), "block_ptr")
        if k % GROUP and (mask[:, -1, :] >> np.uint16(k % GROUP)).any():
            raise ValueError(f"packed weight 'mask' has bits set beyond K={k}")
        if n % ROWS and mask[-1, :, n % ROWS :].any():
            raise ValueError(f"packed weight 'mask' has bits set in rows beyond N={n}")
        counts = _popcount(mask).sum(axis=(1, 2))
        if block_ptr[0] != 0 or not np.array_equal(np.diff(block_ptr), counts):
            raise ValueError("packed weight 'block_ptr' does not match the popcount of the 'mask' blocks")
        values = _as(arrays["values"], np.float32, (int(block_ptr[-1]) + PAD,), "values")
        negzero = np.asarray(arrays.get("negzero", np.zeros(0, np.uint8)))
        zeros = n * k - int(block_ptr[-1])
        if negzero.size:
            negzero = _as(negzero, np.uint8, (-(-zeros // 8),), "negzero")
        else:
            negzero = _as(negzero.astype(np.uint8), np.uint8, (0,), "negzero")
        return cls(mask=mask, values=values, block_ptr=block_ptr, shape=(n, k), negzero=negzero)


ROW_FORM_MAX_K = 65536  # uint16 columns


@dataclass(frozen=True)
class RowForm:
    """A weight's stored elements row by row (CSR with uint16 columns), derived from a PackedLinear in memory
    (native.row_form; +6 bytes a stored element on top of the packed weight).

    Row r's elements are ``values[row_ptr[r]:row_ptr[r + 1]]`` at columns ``cols[row_ptr[r]:row_ptr[r + 1]]``
    (ascending); ``values`` ends with PAD zero floats like the bitmask form's, ``cols`` with COL_PAD zeros.
    """

    row_ptr: np.ndarray  # int64 [N + 1]
    cols: np.ndarray  # uint16 [nnz + COL_PAD]
    values: np.ndarray  # float32 [nnz + PAD]
    shape: tuple[int, int]  # (N, K)

    @property
    def nnz(self) -> int:
        return int(self.row_ptr[-1])

    @property
    def kernel_nbytes(self) -> int:
        """Bytes a matmul reads (row pointers + columns + values)."""
        return int(self.row_ptr.nbytes + self.cols.nbytes + self.values.nbytes)


TILE_ROWS = 32  # the tile form's rows a tile (sparse_cpu.c SDK_TILE_ROWS)
TILE_COLS = 128  # its columns a K block (SDK_TILE_COLS; uint8 columns within the block)


@dataclass(frozen=True)
class TileForm:
    """A weight's stored elements tile by tile, derived from a PackedLinear in memory (native.tile_form; +5 bytes a
    stored element and two bytes per 128 weights on top of the packed weight).

    Tile t (rows ``TILE_ROWS t`` ..) holds ``values[tile_ptr[t]:tile_ptr[t + 1]]``, K block by K block (columns
    ``TILE_COLS kb`` ..), within a block row by row in ascending count (ties in row order), each row's elements in
    column order: the i-th row visited is tile row ``rows[t, kb, i]``, with ``counts[t, kb, i]`` elements, each at
    column ``TILE_COLS kb + cols[e]``. ``values`` ends with PAD zero floats like the bitmask form's, ``cols`` with
    COL_PAD zeros.
    """

    tile_ptr: np.ndarray  # int64 [tiles + 1]
    counts: np.ndarray  # uint8 [tiles, K blocks, TILE_ROWS]: the i-th visited row's elements in the block
    rows: np.ndarray  # uint8 [tiles, K blocks, TILE_ROWS]: which tile row is visited i-th
    cols: np.ndarray  # uint8 [nnz + COL_PAD]
    values: np.ndarray  # float32 [nnz + PAD]
    shape: tuple[int, int]  # (N, K)

    @property
    def nnz(self) -> int:
        return int(self.tile_ptr[-1])

    @property
    def kernel_nbytes(self) -> int:
        """Bytes a matmul reads (tile pointers + counts + row order + columns + values)."""
        return int(self.tile_ptr.nbytes + self.counts.nbytes + self.rows.nbytes + self.cols.nbytes + self.values.nbytes)


def _as(a: np.ndarray, dtype: type, shape: tuple[int, ...], name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != dtype:
        raise ValueError(f"packed weight '{name}' must be {np.dtype(dtype).name}, got {a.dtype}")
    want = tuple(s if s >= 0 else a.shape[i] if i < a.ndim else -1 for i, s in enumerate(shape))
    if a.shape != want:
        raise ValueError(f"packed weight '{name}' must have shape {want}, got {a.shape}")
    a = np.ascontiguousarray(a).view()  # a view: the caller's array keeps its own flags
    a.flags.writeable = False
    return a


_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def _popcount(mask: np.ndarray) -> np.ndarray:
    return _POP8[mask & 0xFF] + _POP8[mask >> 8]


def _blocked(a: np.ndarray, n: int, k: int) -> np.ndarray:
    """[N, K] -> [NB, G, ROWS, 16] (zero-padded): the order the format stores elements in."""
    nb, g = -(-n // ROWS), -(-k // GROUP)
    padded = np.zeros((nb * ROWS, g * GROUP), dtype=a.dtype)
    padded[:n, :k] = a
    return padded.reshape(nb, ROWS, g, GROUP).transpose(0, 2, 1, 3)


def pack(weight: np.ndarray) -> PackedLinear:
    """Pack a float32 [N, K] weight (nn.Linear layout). Lossless: unpack(pack(w)) is bit-identical to w."""
    w = np.asarray(weight)
    if w.dtype != np.float32:
        raise ValueError(f"pack: weight must be float32, got {w.dtype} (cast with .astype(np.float32))")
    if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
        raise ValueError(f"pack: weight must be a non-empty 2-D [N, K] array, got shape {w.shape}")
    n, k = w.shape
    bits = np.ascontiguousarray(w).view(np.uint32)
    stored = (bits & np.uint32(0x7FFFFFFF)) != 0
    neg = bits == np.uint32(0x80000000)
    negzero = np.packbits(neg[~stored], bitorder="little") if neg.any() else np.zeros(0, dtype=np.uint8)
    stored_b = _blocked(stored, n, k)  # [NB, G, ROWS, 16]
    mask = np.packbits(stored_b, axis=-1, bitorder="little").view("<u2")[..., 0].astype(np.uint16)
    values = np.zeros(int(stored.sum()) + PAD, dtype=np.float32)
    values[:-PAD] = _blocked(w, n, k)[stored_b]  # boolean indexing walks the blocked order
    block_ptr = np.zeros(mask.shape[0] + 1, dtype=np.int64)
    np.cumsum(stored_b.sum(axis=(1, 2, 3)), out=block_ptr[1:])
    for a in (mask, values, block_ptr, negzero):
        a.flags.writeable = False
    return PackedLinear(mask=mask, values=values, block_ptr=block_ptr, shape=(n, k), negzero=negzero)


def unpack(p: PackedLinear) -> np.ndarray:
    """The dense float32 [N, K] weight, bit-identical to what was packed."""
    n, k = p.shape
    nb, g, _ = p.mask.shape
    bits = (p.mask[..., None] >> np.arange(GROUP, dtype=np.uint16)) & np.uint16(1)
    blocked = np.zeros((nb, g, ROWS, GROUP), dtype=np.uint32)
    blocked[bits.astype(bool)] = p.values[: p.nnz].view(np.uint32)
    out = np.ascontiguousarray(blocked.transpose(0, 2, 1, 3).reshape(nb * ROWS, g * GROUP)[:n, :k])
    if p.negzero.size:
        zeros = ~p.stored()
        sign = np.unpackbits(p.negzero, count=int(zeros.sum()), bitorder="little").astype(bool)
        out[zeros] = np.where(sign, np.uint32(0x80000000), np.uint32(0))
    return out.view(np.float32)


def four_of_eight(p: PackedLinear) -> bool:
    """Whether every 8 columns of every row (and every row of every 4-row block) hold exactly 4 stored elements, as
    2:4 and 4:8 weights with N a multiple of 4 and K of 16 do: then each row's 16-column group has 8 values at fixed
    offsets, which the batch-1 kernel can multiply without expanding them (native: the 4-of-8 GEMV)."""
    return bool(p.mask.size) and bool((_POP8[p.mask.view(np.uint8)] == 4).all())


def byte_bound_ceiling(p: PackedLinear) -> float:
    """Bytes of the dense fp32 weight over the bytes a matmul reads of this packed weight: the batch-1 speedup
    a purely memory-bound kernel could reach over a memory-bound dense GEMV."""
    return p.dense_nbytes / p.kernel_nbytes
