"""Magnitude pruning, as Wanda's baseline: one threshold on |W| over the whole layer (per group for N:M)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsedeploy.common.sparsity import SparsitySpec, mask_lowest_global
from sparsedeploy.prune.calibration import InputStats
from sparsedeploy.prune.methods.base import PruneResult, PruningMethod


def magnitude_mask(weight: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    return mask_lowest_global(weight.abs(), spec)


def magnitude_prune_linears(model: torch.nn.Module, spec: SparsitySpec) -> None:
    """Every decoder linear of ``model`` pruned in place by magnitude, with no calibration data: for speed-only
    models and test pairs, whose speed depends on the pattern and not on which weights are kept."""
    from sparsedeploy.common.models import find_blocks, find_linears

    with torch.no_grad():
        for block in find_blocks(model):
            for linear in find_linears(block).values():
                linear.weight.mul_(magnitude_mask(linear.weight.float(), spec))


@dataclass
class Magnitude(PruningMethod):
    name: str = "magnitude"
    needs_hessian: bool = False

    def prune(self, weight: torch.Tensor, stats: InputStats | None, spec: SparsitySpec) -> PruneResult:
        mask = magnitude_mask(weight, spec)
        return PruneResult(mask, weight * mask)
