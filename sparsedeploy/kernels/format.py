"""The bitmask16 compressed weight format of the sparse-cpu runtime (byte layout: docs/sparse_cpu.md).

A float32 nn.Linear weight W [N, K] (y = x @ W.T) is stored as
  mask     uint16 [N, G], G = ceil(K / 16): bit j of mask[n, g] set <=> W[n, 16 g + j] is stored
  values   float32 [nnz + 16]: the stored elements, row-major, then 16 zero floats of padding
  row_ptr  int64 [N + 1]: row n's elements are values[row_ptr[n]:row_ptr[n + 1]]
  negzero  uint8 [ceil(Z / 8)] or [0]: over the Z zero elements (+0.0 or -0.0) in row-major order, bit i
           (little-endian bit order) set <=> the i-th zero is -0.0; empty when the weight has no -0.0
An element is stored when it is not +-0.0 (NaN payloads and denormals are kept). Pruning by `w * mask` leaves
-0.0 wherever a negative weight was pruned, so the sign of zeros rides in `negzero` (read by unpack only,
never by the kernels, since +-0.0 add the same to a sum): the round trip is bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LAYOUT = "bitmask16-v1"
GROUP = 16
PAD = 16  # trailing floats after the stored values, so a 16-lane vector load may start at any element


@dataclass(frozen=True)
class PackedLinear:
    """One linear layer's weight in the bitmask16 format (immutable; arrays are read-only)."""

    mask: np.ndarray  # uint16 [N, G]
    values: np.ndarray  # float32 [nnz + PAD]
    row_ptr: np.ndarray  # int64 [N + 1]
    shape: tuple[int, int]  # (N, K)
    negzero: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint8))  # uint8 sign bits of zeros
    layout: str = LAYOUT

    @property
    def nnz(self) -> int:
        return int(self.row_ptr[-1])

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
        """Bytes a matmul reads (mask + values incl. padding + row pointers; not `negzero`)."""
        return int(self.mask.nbytes + self.values.nbytes + self.row_ptr.nbytes)

    @property
    def dense_nbytes(self) -> int:
        n, k = self.shape
        return 4 * n * k

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays to store (e.g. as ONNX initializers); `shape` and `layout` are recoverable from them."""
        n, k = self.shape
        return {
            "mask": self.mask,
            "values": self.values,
            "row_ptr": self.row_ptr,
            "negzero": self.negzero,
            "shape": np.array([n, k], dtype=np.int64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> PackedLinear:
        """Rebuild from `to_arrays()` output, validating every array (raises ValueError naming the problem)."""
        missing = {"mask", "values", "row_ptr", "shape"} - set(arrays)
        if missing:
            raise ValueError(
                f"packed weight is missing arrays {sorted(missing)}: "
                "expected mask, values, row_ptr, shape (and optionally negzero)"
            )
        shape = np.asarray(arrays["shape"])
        if shape.shape != (2,) or shape.dtype.kind not in "iu" or (shape < 1).any():
            raise ValueError(f"packed weight 'shape' must be two positive ints [N, K], got {shape!r}")
        n, k = int(shape[0]), int(shape[1])
        mask = _as(arrays["mask"], np.uint16, (n, -(-k // GROUP)), "mask")
        row_ptr = _as(arrays["row_ptr"], np.int64, (n + 1,), "row_ptr")
        if k % GROUP and (mask[:, -1] >> np.uint16(k % GROUP)).any():
            raise ValueError(f"packed weight 'mask' has bits set beyond K={k}")
        counts = _popcount(mask).sum(axis=1)
        if row_ptr[0] != 0 or not np.array_equal(np.diff(row_ptr), counts):
            raise ValueError("packed weight 'row_ptr' does not match the popcount of 'mask' rows")
        values = _as(arrays["values"], np.float32, (int(row_ptr[-1]) + PAD,), "values")
        negzero = np.asarray(arrays.get("negzero", np.zeros(0, np.uint8)))
        zeros = n * k - int(row_ptr[-1])
        if negzero.size:
            negzero = _as(negzero, np.uint8, (-(-zeros // 8),), "negzero")
        else:
            negzero = _as(negzero.astype(np.uint8), np.uint8, (0,), "negzero")
        return cls(mask=mask, values=values, row_ptr=row_ptr, shape=(n, k), negzero=negzero)


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


def pack(weight: np.ndarray) -> PackedLinear:
    """Pack a float32 [N, K] weight (nn.Linear layout). Lossless: unpack(pack(w)) is bit-identical to w."""
    w = np.asarray(weight)
    if w.dtype != np.float32:
        raise ValueError(f"pack: weight must be float32, got {w.dtype} (cast with .astype(np.float32))")
    if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
        raise ValueError(f"pack: weight must be a non-empty 2-D [N, K] array, got shape {w.shape}")
    n, k = w.shape
    g = -(-k // GROUP)
    bits = np.ascontiguousarray(w).view(np.uint32)
    stored = (bits & np.uint32(0x7FFFFFFF)) != 0
    neg = bits == np.uint32(0x80000000)
    negzero = np.packbits(neg[~stored], bitorder="little") if neg.any() else np.zeros(0, dtype=np.uint8)
    padded = np.zeros((n, g * GROUP), dtype=bool)
    padded[:, :k] = stored
    mask = np.packbits(padded, axis=1, bitorder="little").view("<u2").astype(np.uint16)  # byte 0 = bits 0-7
    values = np.zeros(int(stored.sum()) + PAD, dtype=np.float32)
    values[:-PAD] = w[stored]  # boolean indexing is row-major: each row's elements in column order
    row_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(stored.sum(axis=1), out=row_ptr[1:])
    for a in (mask, values, row_ptr, negzero):
        a.flags.writeable = False
    return PackedLinear(mask=mask, values=values, row_ptr=row_ptr, shape=(n, k), negzero=negzero)


def unpack(p: PackedLinear) -> np.ndarray:
    """The dense float32 [N, K] weight, bit-identical to what was packed."""
    n, k = p.shape
    g = p.mask.shape[1]
    bits = (p.mask[:, :, None] >> np.arange(GROUP, dtype=np.uint16)) & np.uint16(1)
    stored = bits.reshape(n, g * GROUP)[:, :k].astype(bool)
    out = np.zeros((n, k), dtype=np.float32)
    out.view(np.uint32)[stored] = p.values[: p.nnz].view(np.uint32)
    if p.negzero.size:
        zeros = ~stored
        sign = np.unpackbits(p.negzero, count=int(zeros.sum()), bitorder="little").astype(bool)
        out.view(np.uint32)[zeros] = np.where(sign, np.uint32(0x80000000), np.uint32(0))
    return out


def byte_bound_ceiling(p: PackedLinear) -> float:
    """Bytes of the dense fp32 weight over the bytes a matmul reads of this packed weight: the batch-1 speedup
    a purely memory-bound kernel could reach over a memory-bound dense GEMV."""
    return p.dense_nbytes / p.kernel_nbytes
