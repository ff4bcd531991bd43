"""Wanda (Sun et al., 2023): score |W_ij| * ||x_j||, prune the lowest per output row (or per N:M group)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsedeploy.common.sparsity import SparsitySpec, mask_lowest_per_row
from sparsedeploy.prune.calibration import InputStats
from sparsedeploy.prune.methods.base import PruneResult, PruningMethod


def wanda_scores(weight: torch.Tensor, sq_mean: torch.Tensor) -> torch.Tensor:
    """|W_ij| * sqrt(E[x_j^2]): the input-norm factor only rescales, so rankings match ||x_j||_2."""
    return weight.abs() * sq_mean.sqrt().unsqueeze(0)


def wanda_mask(weight: torch.Tensor, sq_mean: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    return mask_lowest_per_row(wanda_scores(weight, sq_mean), spec)


@dataclass
class Wanda(PruningMethod):
    name: str = "wanda"
    needs_hessian: bool = False

    def prune(self, weight: torch.Tensor, stats: InputStats, spec: SparsitySpec) -> PruneResult:
        mask = wanda_mask(weight, stats.sq_mean, spec)
        return PruneResult(mask, weight * mask)
