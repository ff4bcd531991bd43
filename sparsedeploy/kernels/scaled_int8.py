"""scaled-int8: a lossless store for a dense float32 matrix whose values are int8 codes times one scale per 32.

A weight W [N, K] (K a multiple of BLOCK = 32) is stored in groups of ROWS = 4 rows (NG = ceil(N / 4), the rows
past N zero), each group's rows interleaved by block of 32 columns, so that a group is one sequential stream:
  q       int8 [NG, K / 32, 4, 32]:   code(n, k) = q[n // 4, k // 32, n % 4, k % 32]
  scales  float32 [NG, K / 32, 4]:    scale(n, b) = scales[n // 4, b, n % 4], one per run of 32 elements of a row
  shape   int64 [2]:                  [N, K]
with W[n, k] == scale(n, k // 32) * code(n, k) for every element, bit for bit (the product of a float32 and an int8
is exact in float32 when the scale has at most 16 significant bits, and `pack` checks every element anyway). It
applies only where a checkpoint's weights already have that form, e.g. a GGUF tensor in Q8_0 (fp16 scale times
int8 per 32), as smollm2-135m's tied embedding / lm_head is: then the weight takes 1.125 bytes instead of 4 and a
batch-1 matmul streams 3.6x fewer bytes. `pack` returns None for any other weight (it stays float32), so nothing
is ever rounded. Codes are found as q = rint(x / s) with s = max|x| / 127 per run (Q8_0's own rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LAYOUT = "scaled-int8-32"
BLOCK = 32
ROWS = 4
QMAX = 127


@dataclass(frozen=True)
class ScaledInt8Linear:
    """A float32 [N, K] weight (nn.Linear / embedding layout) as int8 codes and float32 scales per 32."""

    q: np.ndarray  # int8 [NG, K // BLOCK, ROWS, BLOCK]
    scales: np.ndarray  # float32 [NG, K // BLOCK, ROWS]
    shape: tuple[int, int]  # (N, K)

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes + self.scales.nbytes)

    @property
    def dense_nbytes(self) -> int:
        n, k = self.shape
        return 4 * n * k

    def rows(self, index: np.ndarray) -> np.ndarray:
        """W[index] (an embedding lookup): float32 [*index.shape, K], bit-identical to the dense rows."""
        n, k = self.shape
        index = np.asarray(index)
        if index.dtype.kind not in "iu":
            raise ValueError(f"scaled-int8 rows: indices must be integers, got {index.dtype}")
        flat = index.reshape(-1).astype(np.int64)
        if flat.size and (flat.min() < -n or flat.max() >= n):
            raise ValueError(f"scaled-int8 rows: indices must be in [-{n}, {n}), got {flat.min()}..{flat.max()}")
        flat = flat % n
        codes = self.q[flat // ROWS, :, flat % ROWS, :]  # [M, K // BLOCK, BLOCK]
        scales = self.scales[flat // ROWS, :, flat % ROWS]  # [M, K // BLOCK]
        return (codes.astype(np.float32) * scales[:, :, None]).reshape(*index.shape, k)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"q": self.q, "scales": self.scales, "shape": np.array(self.shape, dtype=np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ScaledInt8Linear:
        """Rebuild from `to_arrays()` output, validating it (raises ValueError naming the problem)."""
        missing = {"q", "scales", "shape"} - set(arrays)
        if missing:
            raise ValueError(f"scaled-int8 weight is missing arrays {sorted(missing)}: expected q, scales, shape")
        shape = np.asarray(arrays["shape"])
        if shape.shape != (2,) or shape.dtype.kind not in "iu" or (shape < 1).any() or shape[1] % BLOCK:
            raise ValueError(f"scaled-int8 weight 'shape' must be [N, K] with K a multiple of {BLOCK}, got {shape!r}")
        n, k = int(shape[0]), int(shape[1])
        want = {
            "q": (np.int8, (-(-n // ROWS), k // BLOCK, ROWS, BLOCK)),
            "scales": (np.float32, (-(-n // ROWS), k // BLOCK, ROWS)),
        }
        out = {}
        for name, (dtype, dims) in want.items():
            a = np.asarray(arrays[name])
            if a.dtype != dtype or a.shape != dims:
                raise ValueError(
                    f"scaled-int8 weight '{name}' must be {np.dtype(dtype).name} {dims}, got {a.dtype} {a.shape}"
                )
            a = np.ascontiguousarray(a).view()
            a.flags.writeable = False
            out[name] = a
        return cls(q=out["q"], scales=out["scales"], shape=(n, k))


def pack(weight: np.ndarray) -> ScaledInt8Linear | None:
    """The scaled-int8 form of a float32 [N, K] weight if it reproduces every element bit for bit, else None."""
    w = np.asarray(weight)
    if w.dtype != np.float32 or w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < BLOCK or w.shape[1] % BLOCK:
        return None
    n, k = w.shape
    blocks = np.ascontiguousarray(w).reshape(n, k // BLOCK, BLOCK)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        scales = (np.abs(blocks).max(axis=-1) / np.float32(QMAX)).astype(np.float32)
        codes = np.rint(blocks / np.where(scales == 0, np.float32(1), scales)[..., None])
        if not np.isfinite(codes).all() or np.abs(codes).max() > QMAX:
            return None
        q = codes.astype(np.int8)
        rebuilt = q.astype(np.float32) * scales[..., None]
    if not np.array_equal(rebuilt.view(np.uint32), blocks.view(np.uint32)):
        return None
    ng = -(-n // ROWS)
    q_groups = np.zeros((ng * ROWS, k // BLOCK, BLOCK), dtype=np.int8)
    q_groups[:n] = q
    s_groups = np.zeros((ng * ROWS, k // BLOCK), dtype=np.float32)
    s_groups[:n] = scales
    q_out = np.ascontiguousarray(q_groups.reshape(ng, ROWS, k // BLOCK, BLOCK).transpose(0, 2, 1, 3))
    s_out = np.ascontiguousarray(s_groups.reshape(ng, ROWS, k // BLOCK).transpose(0, 2, 1))
    q_out.flags.writeable = s_out.flags.writeable = False
    return ScaledInt8Linear(q=q_out, scales=s_out, shape=(n, k))


def unpack(p: ScaledInt8Linear) -> np.ndarray:
    """The dense float32 [N, K] weight, bit-identical to what was packed."""
    return p.rows(np.arange(p.shape[0]))
