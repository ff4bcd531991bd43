"""Perplexity with the Wanda/SparseGPT protocol, and sparsity measured from the weights.

Protocol: the evaluation text is joined and tokenized once; it is cut into non-overlapping windows
of `seqlen` tokens (the tail that does not fill a window is dropped); every window is scored
independently (no cache carried between windows); ppl = exp(total NLL / predicted tokens).
For the families that need a BOS before every window (`data.window_bos`, Gemma 1-3) each window is that BOS
and `seqlen - 1` text tokens, so windows stay `seqlen` long and `seqlen - 1` tokens are predicted in each.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparsedeploy.common.data import strip_bos
from sparsedeploy.common.errors import UserError
from sparsedeploy.common.models import find_blocks, find_linears
from sparsedeploy.common.sparsity import sparsity_of

log = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    seqlen: int
    windows: int
    tokens: int  # predicted tokens scored
    bos_per_window: bool = False  # every window began with BOS (data.window_bos)

    def to_dict(self) -> dict:
        return asdict(self)


def eval_windows(
    tokens: torch.Tensor, seqlen: int, max_windows: int | None = None, bos: int | None = None
) -> torch.Tensor:
    """Non-overlapping windows [n, seqlen] from a 1-D token tensor (tail dropped).

    With `bos`, the stream's own leading BOS is dropped and each window is `bos` + `seqlen - 1` text tokens.
    """
    if bos is not None:
        if seqlen < 2:
            raise UserError(f"--seqlen {seqlen} must be at least 2")
        windows = eval_windows(strip_bos(tokens, bos), seqlen - 1, max_windows)
        return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)
    n = tokens.numel() // seqlen
    if max_windows is not None:
        if max_windows < 1:
            raise UserError(f"--max-windows {max_windows} must be at least 1")
        n = min(n, max_windows)
    if n == 0:
        raise UserError(
            f"evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}: give more text or a "
            "smaller --seqlen"
        )
    return tokens[: n * seqlen].reshape(n, seqlen)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seqlen: int,
    device: torch.device,
    max_windows: int | None = None,
    show_progress: bool = True,
    bos: int | None = None,
) -> PerplexityResult:
    """Perplexity over the evaluation windows of `tokens` (`bos` from `data.window_bos`)."""
    result = window_perplexity(model, eval_windows(tokens, seqlen, max_windows, bos), device, show_progress)
    result.bos_per_window = bos is not None
    return result


@torch.no_grad()
def window_perplexity(
    model: nn.Module, windows: torch.Tensor, device: torch.device, show_progress: bool = True
) -> PerplexityResult:
    """Perplexity over ready-made windows [n, seqlen] (e.g. calibration samples), each scored on its own."""
    seqlen = windows.shape[1]
    home = next(model.parameters()).device
    model.to(device)
    total_nll = 0.0
    count = 0
    try:
        for row in tqdm(windows, desc="perplexity", unit="window", disable=not show_progress):
            ids = row.unsqueeze(0).to(device)
            logits = model(ids, use_cache=False).logits[0, :-1].float()
            total_nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += seqlen - 1
    finally:
        model.to(home)
    nll = total_nll / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, seqlen=seqlen, windows=windows.shape[0], tokens=count)


def layer_sparsity(model: nn.Module) -> list[dict]:
    """Per pruned-linear sparsity measured from the weight values (decoder blocks only)."""
    rows = []
    for i, block in enumerate(find_blocks(model)):
        for name, linear in find_linears(block).items():
            w = linear.weight.data
            rows.append(
                {
                    "block": i,
                    "name": name,
                    "shape": list(w.shape),
                    "zeros": int((w == 0).sum()),
                    "numel": w.numel(),
                    "sparsity": sparsity_of(w),
                }
            )
    return rows


def overall_sparsity(rows: list[dict]) -> float:
    return sum(r["zeros"] for r in rows) / max(sum(r["numel"] for r in rows), 1)
