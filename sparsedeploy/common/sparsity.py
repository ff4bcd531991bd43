"""Sparsity specifications and the mask selection that every method shares.

Convention used everywhere in sparsedeploy: a *mask* is a bool tensor shaped like the weight,
True where the weight is KEPT and False where it is pruned (set to zero).

Weights follow ``nn.Linear``: shape ``[out_features, in_features]``. N:M groups run along the
input (reduction, K) dimension, which is the layout 2:4 GPU kernels and TensorRT need.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from sparsedeploy.common.errors import UserError


@dataclass(frozen=True)
class SparsitySpec:
    """Either an unstructured ratio of zeros in [0, 1), or N:M (N kept in every M along K)."""

    ratio: float
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.ratio:g}"

    @classmethod
    def unstructured(cls, ratio: float) -> SparsitySpec:
        if not 0.0 <= ratio < 1.0:
            raise UserError(
                f"sparsity {ratio} is outside [0, 1): give a fraction of zeros such as 0.5, or N:M such as 2:4"
            )
        return cls(ratio=float(ratio))

    @classmethod
    def nm(cls, n: int, m: int) -> SparsitySpec:
        if not (0 < n < m):
            raise UserError(
                f"N:M sparsity {n}:{m} is malformed: need 0 < N < M (N weights kept in every group of M), e.g. 2:4"
            )
        return cls(ratio=1.0 - n / m, n=n, m=m)


_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_sparsity(text: str | float) -> SparsitySpec:
    """Parse '0.5', '50%', or '2:4' into a SparsitySpec, with a one-line error otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return SparsitySpec.unstructured(float(text))
    s = str(text).strip()
    match = _NM.match(s)
    if match:
        return SparsitySpec.nm(int(match.group(1)), int(match.group(2)))
    try:
        value = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
    except ValueError:
        raise UserError(
            f"cannot read sparsity {text!r}: give a fraction of zeros such as 0.5, a percentage such as 50%, or N:M "
            "such as 2:4"
        ) from None
    return SparsitySpec.unstructured(value)


def check_nm_shape(weight_shape: torch.Size | tuple[int, ...], spec: SparsitySpec, name: str = "weight") -> None:
    if spec.is_nm and weight_shape[-1] % spec.m:
        raise UserError(
            f"{name} has {weight_shape[-1]} input features, not a multiple of M={spec.m}: N:M {spec} cannot apply; "
            "use an unstructured ratio or another M"
        )


def pruned_count(numel: int, ratio: float) -> int:
    """How many of `numel` weights a ratio prunes: the nearest whole number, so a layer's sparsity is exact."""
    return int(math.floor(numel * ratio + 0.5))


def mask_lowest_per_row(scores: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    """Keep-mask that prunes the lowest scores of each output row, or per N:M group.

    Unstructured: the layer prunes exactly round(ratio x numel) weights, spread over the rows as evenly as
    possible: every row prunes floor(ratio x in) or one more; the rows that prune one more are those whose
    next-lowest score is lowest, so the extra weights are the least important ones.
    Ties are broken stably: among equal scores the one with the lower input index is pruned first.
    """
    rows, cols = scores.shape
    if spec.is_nm:
        check_nm_shape(scores.shape, spec)
        groups = scores.reshape(rows, cols // spec.m, spec.m)
        order = torch.sort(groups, dim=-1, stable=True).indices
        mask = torch.ones_like(groups, dtype=torch.bool)
        mask.scatter_(-1, order[..., : spec.m - spec.n], False)
        return mask.reshape(rows, cols)
    base, extra = divmod(pruned_count(rows * cols, spec.ratio), rows)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if base == 0 and extra == 0:
        return mask
    ordered, order = torch.sort(scores, dim=-1, stable=True)
    counts = torch.full((rows,), base, dtype=torch.long, device=scores.device)
    if extra:
        nxt = ordered[:, base]  # the score each row would prune next
        counts[torch.sort(nxt, stable=True).indices[:extra]] += 1
    pruned_in_order = torch.arange(cols, device=scores.device)[None, :] < counts[:, None]
    mask.scatter_(-1, order, ~pruned_in_order)
    return mask


def mask_lowest_global(scores: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    """Keep-mask pruning the lowest round(ratio x numel) scores over the whole matrix, or per N:M group."""
    if spec.is_nm:
        return mask_lowest_per_row(scores, spec)
    k = pruned_count(scores.numel(), spec.ratio)
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        order = torch.sort(scores.flatten(), stable=True).indices
        mask[order[:k]] = False
    return mask.reshape(scores.shape)


def nm_violations(values, n: int, m: int, axis: int = 0) -> tuple[bool, str]:
    """Does `values` (a NumPy array or torch tensor) keep at most n non-zeros in every group of m along `axis`?
    (ok, reason). ONNX weights are checked as [K, N] along axis 0 (K), nn.Linear weights [out, in] along -1 (K)."""
    nonzero = values != 0
    if isinstance(nonzero, torch.Tensor):
        nonzero = nonzero.cpu().numpy()
    nonzero = np.moveaxis(np.asarray(nonzero), axis, 0)
    k = nonzero.shape[0]
    if k % m:
        return False, f"K={k} is not a multiple of M={m}"
    groups = nonzero.reshape(k // m, m, -1).sum(axis=1)
    bad = int((groups > n).sum())
    if bad:
        return False, f"{bad} of {groups.size} groups of {m} along K have more than {n} non-zeros"
    return True, f"every group of {m} along K has at most {n} non-zeros"


def satisfies_nm(tensor: torch.Tensor, n: int, m: int, dim: int = -1) -> bool:
    """True when every group of m consecutive entries along `dim` has at most n non-zeros."""
    return nm_violations(tensor, n, m, axis=dim)[0]


def sparsity_of(tensor: torch.Tensor) -> float:
    """Fraction of exact zeros, measured from the values."""
    return float((tensor == 0).sum()) / max(tensor.numel(), 1)
