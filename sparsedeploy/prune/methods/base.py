"""What every pruning method is: statistics it needs, and (weight, stats, spec) -> (mask, weight)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from sparsedeploy.prune.calibration import InputStats
from sparsedeploy.common.sparsity import SparsitySpec


@dataclass
class PruneResult:
    """mask: bool, True = kept. weight: the new weight (zeros where pruned), float32."""

    mask: torch.Tensor
    weight: torch.Tensor
    info: dict | None = None  # per-linear extras a method wants in the report (e.g. DSnoT swaps)


class PruningMethod(Protocol):
    name: str
    needs_hessian: bool

    def prune(self, weight: torch.Tensor, stats: InputStats, spec: SparsitySpec) -> PruneResult:
        """weight: float32 [out, in] on the compute device. Must not modify `weight` in place."""
        ...
