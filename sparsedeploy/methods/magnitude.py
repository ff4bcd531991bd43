"""Magnitude pruning, as Wanda's baseline: one threshold on |W| over the whole layer (per group for N:M)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsedeploy.engine import InputStats
from sparsedeploy.methods.base import PruneResult
from sparsedeploy.sparsity import SparsitySpec, mask_lowest_global


def magnitude_mask(weight: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    return mask_lowest_global(weight.abs(), spec)


@dataclass
class Magnitude:
    name: str = "magnitude"
    needs_hessian: bool = False

    def prune(self, weight: torch.Tensor, stats: InputStats | None, spec: SparsitySpec) -> PruneResult:
        mask = magnitude_mask(weight, spec)
        return PruneResult(mask, weight * mask)
