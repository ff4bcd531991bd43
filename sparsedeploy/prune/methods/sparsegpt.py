"""SparseGPT (Frantar & Alistarh, 2023): one-shot OBS pruning with error compensation.

For a linear with weight W [out, in] and Hessian H = 2/N X^T X of its inputs, columns are processed
left to right in blocks. Inside a block the mask is chosen by the OBS saliency w^2 / [H^-1]_jj^2
(per N:M group for N:M, chosen when the group's first column is reached), every pruned weight's error
is spread over the not-yet-processed columns of its row through the upper Cholesky factor of H^-1,
and the columns right of the block receive the accumulated update once per block (lazy update).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sparsedeploy.common.sparsity import SparsitySpec, check_nm_shape, mask_lowest_global
from sparsedeploy.prune.calibration import InputStats
from sparsedeploy.prune.method_options import option
from sparsedeploy.prune.methods.base import PruneResult, PruningMethod

log = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 6


def inverse_hessian_cholesky(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp I)^-1 (U^T U = H^-1). H must have no all-zero diagonal.

    damp starts at percdamp * mean(diag H); on failure it grows tenfold (from 1e-3 * mean diag when it
    was 0; logged) up to MAX_DAMP_RETRIES times; then a clear error is raised rather than returning garbage.
    """
    n = H.shape[0]
    mean_diag = float(torch.diagonal(H).mean())
    if not mean_diag > 0 or not torch.isfinite(H).all():
        raise ValueError("Hessian is zero or not finite: the layer saw no usable calibration input")
    damp = percdamp * mean_diag
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    for attempt in range(MAX_DAMP_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U, damp
        if attempt == MAX_DAMP_RETRIES:
            break
        log.warning(
            "SparseGPT: Cholesky failed with dampening %.3g (%.3g x mean diag); retrying with 10x more",
            damp,
            damp / mean_diag,
        )
        damp = damp * 10.0 if damp > 0 else 1e-3 * mean_diag
    raise ValueError(
        f"SparseGPT: Hessian not positive definite even with dampening {damp:.3g}: "
        "use more calibration samples or a larger --percdamp"
    )


@torch.no_grad()
def sparsegpt(
    weight: torch.Tensor,
    H: torch.Tensor,
    spec: SparsitySpec,
    blocksize: int = 128,
    percdamp: float = 0.01,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune `weight` [out, in] with the OBS update; return (keep-mask, new weight), both [out, in].

    H: [in, in] Hessian (any positive scale). With `mask` given, the mask is not chosen but imposed,
    and only the weights are reconstructed (used to re-fit weights after DSnoT changed the mask).
    Unstructured: exactly round(ratio * cols_in_block * rows) weights are pruned per column block.
    """
    if blocksize < 1:
        raise ValueError("blocksize must be at least 1")
    rows, cols = weight.shape
    if spec.is_nm:
        check_nm_shape(weight.shape, spec)
        if blocksize % spec.m:
            blocksize = max(spec.m, blocksize - blocksize % spec.m)
    W = weight.detach().clone().float()
    H = H.detach().clone().float()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0  # an input that never fires: its weights do nothing, prune them first
    U, _damp = inverse_hessian_cholesky(H, percdamp)
    del H
    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        if mask is not None:
            pruned1 = ~mask[:, i1:i2].to(W.device)
        elif not spec.is_nm:
            saliency = W1**2 / d.unsqueeze(0) ** 2
            pruned1 = ~mask_lowest_global(saliency, spec)
        else:
            pruned1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            if mask is None and spec.is_nm and i % spec.m == 0:
                saliency = W1[:, i : i + spec.m] ** 2 / d[i : i + spec.m].unsqueeze(0) ** 2
                low = torch.topk(saliency, spec.m - spec.n, dim=1, largest=False).indices
                pruned1[:, i : i + spec.m].scatter_(1, low, True)
            q = w.masked_fill(pruned1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = ~pruned1
        if i2 < cols:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    W.masked_fill_(~keep, 0.0)
    return keep, W.to(weight.dtype)


@dataclass
class SparseGPT(PruningMethod):
    """SparseGPT as a method of the shared engine (q/k/v and gate/up share one Hessian)."""

    blocksize: int = option("blocksize").default
    percdamp: float = option("percdamp").default
    name: str = "sparsegpt"
    needs_hessian: bool = True

    def __post_init__(self) -> None:
        self.check_option_values()

    def prune(self, weight: torch.Tensor, stats: InputStats, spec: SparsitySpec) -> PruneResult:
        mask, new = sparsegpt(weight, stats.hessian, spec, self.blocksize, self.percdamp)
        return PruneResult(mask, new)
