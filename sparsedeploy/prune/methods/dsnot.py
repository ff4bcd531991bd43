"""DSnoT (Zhang et al., ICLR 2024): training-free prune-and-grow refinement of a sparse mask.

Starting from an initial keep-mask (Wanda, SparseGPT or magnitude), each output row i repeatedly
swaps one pruned weight back in ("grow") for one kept weight ("prune"), steering the row's
*expected* reconstruction error

    e_i = sum_j (W0_ij - What_ij) * E[x_j]        (What = W0 * mask)

towards zero. Every row keeps exactly its number of kept weights (and for N:M every group of M keeps
exactly N: the weight pruned in exchange sits in the grown weight's group).

Three modes:
  paper         the procedure above as published (grow by W0_ij E[x_j] / Var[x_j]^p with the sign
                of e_i, prune the lowest Wanda score among weights whose removal moves e_i towards 0,
                stop a row when |e_i| <= update_threshold, after max_cycles, or when a swap would
                not reduce |e_i|; a stopped row stays stopped).
  verified      (default) the paper procedure, then the actual squared output error on the layer's
                calibration inputs, ||(W0 - What) X||^2 = sum_i d_i H d_i^T with H = X^T X, decides
                per linear (or per row) between the initial and the refined result.
  second-order  each swap is chosen by the exact change of d_i H d_i^T (H d_i maintained
                incrementally); the mean criterion and the exact single-grow gain pre-select the grow
                candidates. Also verified (it matters only when the initial weights were updated,
                e.g. by SparseGPT).

All rows of a layer advance together as tensor operations; the cycle loop is the only Python loop,
so the same code runs on CPU and CUDA.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from sparsedeploy.common.errors import UserError
from sparsedeploy.common.sparsity import SparsitySpec, check_nm_shape
from sparsedeploy.prune.calibration import InputStats
from sparsedeploy.prune.method_options import option
from sparsedeploy.prune.methods.base import PruneResult, PruningMethod

log = logging.getLogger(__name__)

MODES = option("mode").choices
TARGETS = option("targets").choices
INITS = option("init").choices
_ATTN_KEYS = ("attn", "attention")
_MLP_KEYS = ("mlp", "feed_forward", "ffn")


@dataclass
class DSnoTOptions:
    """The refinement's own settings (the DSnoT method passes its options through)."""

    mode: str = "verified"
    max_cycles: int = option("max_cycles").default
    update_threshold: float = option("update_threshold").default
    pow_of_var_regrowing: float = option("pow_of_var_regrowing").default
    no_sign_flip: bool = option("no_sign_flip").default
    candidates: int = option("candidates").default  # second-order: grow candidates examined per row and cycle


@dataclass
class LayerStats:
    """What refine needs about a linear's inputs: per-channel mean, variance, E[x^2], optional H."""

    mean: torch.Tensor
    var: torch.Tensor
    sq_mean: torch.Tensor
    hessian: torch.Tensor | None = None

    @classmethod
    def from_input_stats(cls, stats: InputStats) -> LayerStats:
        return cls(stats.mean, stats.var, stats.sq_mean, stats.hessian if stats.xtx is not None else None)


def row_errors(weight0: torch.Tensor, new_weight: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per output row, d H d^T with d = W0 - What: the row's squared output error over the inputs of H."""
    d = (weight0 - new_weight).float()
    return ((d @ H) * d).sum(1)


def _same_group(cols: int, chosen: torch.Tensor, m: int) -> torch.Tensor:
    """[rows, cols] bool: column j lies in the same M-group as chosen[r]."""
    group = torch.arange(cols, device=chosen.device) // m
    return group.unsqueeze(0) == (chosen // m).unsqueeze(1)


def _active_rows(active: torch.Tensor, max_cycles: int) -> Iterator[torch.Tensor]:
    """The indices of the rows still active at each cycle, at most `max_cycles` times; stops early when none is.

    The caller updates `active` (bool [rows]) in place after each cycle.
    """
    for _ in range(max_cycles):
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            return
        yield idx


def _paper_cycles(
    weight0: torch.Tensor, keep: torch.Tensor, st: LayerStats, spec: SparsitySpec, opt: DSnoTOptions
) -> tuple[torch.Tensor, torch.Tensor, int]:
    rows, cols = weight0.shape
    contrib = weight0 * st.mean.unsqueeze(0)  # expected contribution of each weight to its output
    grow_base = contrib / st.var.clamp_min(1e-12).pow(opt.pow_of_var_regrowing).unsqueeze(0)
    wanda = weight0.abs() * st.sq_mean.sqrt().unsqueeze(0)
    big = float(wanda.max()) * 2.0 + 1.0
    err = (contrib * ~keep).sum(1)
    swaps = torch.zeros(rows, dtype=torch.long, device=weight0.device)
    active = err.abs() > opt.update_threshold
    cycles = 0
    for idx in _active_rows(active, opt.max_cycles):
        cycles += 1
        k = keep[idx]
        c = contrib[idx]
        e = err[idx]
        sign = torch.sign(e).unsqueeze(1)
        gscore = (sign * grow_base[idx]).masked_fill(k, float("-inf"))
        g = gscore.argmax(1)
        ar = torch.arange(idx.numel(), device=idx.device)
        cg = c[ar, g]
        e1 = e - cg
        wrong_way = (c * torch.sign(e1).unsqueeze(1)) > 0  # removing it would push e further out
        allowed = k.clone()
        if spec.is_nm:
            allowed &= _same_group(cols, g, spec.m)
        pscore = (wanda[idx] + big * wrong_way).masked_fill(~allowed, float("inf"))
        p = pscore.argmin(1)
        e2 = e1 + c[ar, p]
        ok = torch.isfinite(gscore[ar, g]) & torch.isfinite(pscore[ar, p]) & (e2.abs() < e.abs())
        if opt.no_sign_flip:
            ok &= (torch.sign(e2) == torch.sign(e)) | (e2 == 0)
        r, gi, pi = idx[ok], g[ok], p[ok]
        keep[r, gi] = True
        keep[r, pi] = False
        err[r] = e2[ok]
        swaps[r] += 1
        active.zero_()
        active[r] = err[r].abs() > opt.update_threshold
    return keep, swaps, cycles


def _second_order_cycles(
    weight0: torch.Tensor, keep: torch.Tensor, st: LayerStats, spec: SparsitySpec, opt: DSnoTOptions
) -> tuple[torch.Tensor, torch.Tensor, int]:
    if st.hessian is None:
        raise ValueError("second-order DSnoT needs the Hessian X^T X of the layer inputs")
    H = st.hessian.float()
    rows, cols = weight0.shape
    diag = torch.diagonal(H)
    contrib = weight0 * st.mean.unsqueeze(0)
    grow_base = contrib / st.var.clamp_min(1e-12).pow(opt.pow_of_var_regrowing).unsqueeze(0)
    err = (contrib * ~keep).sum(1)
    delta = weight0 * ~keep
    HD = delta @ H  # row i: H d_i (H symmetric)
    self_term = weight0**2 * diag.unsqueeze(0)  # w_j^2 H_jj
    swaps = torch.zeros(rows, dtype=torch.long, device=weight0.device)
    active = torch.ones(rows, dtype=torch.bool, device=weight0.device)
    half = max(1, opt.candidates // 2)
    cycles = 0
    for idx in _active_rows(active, opt.max_cycles):
        cycles += 1
        n = idx.numel()
        ar = torch.arange(n, device=idx.device)
        k = keep[idx]
        w = weight0[idx]
        hd = HD[idx]
        # exact change of d H d^T from growing j alone: -2 w_j (H d)_j + w_j^2 H_jj
        grow_gain = (-2.0 * w * hd + self_term[idx]).masked_fill(k, float("inf"))
        mean_rank = (torch.sign(err[idx]).unsqueeze(1) * grow_base[idx]).masked_fill(k, float("-inf"))
        cand = torch.cat(
            [mean_rank.topk(min(half, cols), 1).indices, grow_gain.topk(min(half, cols), 1, largest=False).indices], 1
        )  # [n, K]
        wg = w.gather(1, cand)  # [n, K]
        dg = grow_gain.gather(1, cand)  # [n, K]; inf where the candidate is not pruned
        # then pruning p: +2 w_p (H d')_p + w_p^2 H_pp with H d' = H d - w_g H[g]; only kept p allowed
        base = (2.0 * w * hd + self_term[idx]).masked_fill(~k, float("inf"))  # [n, cols]
        total = H.index_select(0, cand.reshape(-1)).reshape(n, cand.shape[1], cols)  # H[g], [n, K, cols]
        total.mul_(w.unsqueeze(1)).mul_(-2.0 * wg.unsqueeze(2)).add_(base.unsqueeze(1)).add_(dg.unsqueeze(2))
        if spec.is_nm:
            group = torch.arange(cols, device=idx.device) // spec.m
            total.masked_fill_(group.view(1, 1, -1) != (cand // spec.m).unsqueeze(2), float("inf"))
        flat = total.reshape(n, -1).argmin(1)
        best = total.reshape(n, -1)[ar, flat]
        gi_local, pi = flat // cols, flat % cols
        gi = cand[ar, gi_local]
        ok = torch.isfinite(best) & (best < 0)
        if opt.no_sign_flip:
            e2 = err[idx] - contrib[idx, gi] + contrib[idx, pi]
            ok &= (torch.sign(e2) == torch.sign(err[idx])) | (e2 == 0)
        r, g_ok, p_ok = idx[ok], gi[ok], pi[ok]
        keep[r, g_ok] = True
        keep[r, p_ok] = False
        HD[r] += -weight0[r, g_ok].unsqueeze(1) * H[g_ok] + weight0[r, p_ok].unsqueeze(1) * H[p_ok]
        err[r] += -contrib[r, g_ok] + contrib[r, p_ok]
        swaps[r] += 1
        active.zero_()
        active[r] = True
    return keep, swaps, cycles


@torch.no_grad()
def refine(
    weight0: torch.Tensor,
    init_mask: torch.Tensor,
    stats: LayerStats | InputStats,
    spec: SparsitySpec,
    options: DSnoTOptions | None = None,
) -> tuple[torch.Tensor, dict]:
    """Refine `init_mask` (bool [out, in], True = kept) for dense weight `weight0`; return (mask, info).

    The mode's search only ("paper" for both paper and verified, "second-order"); choosing between the
    initial and refined result on the actual error is `choose_verified`. Per-row kept counts (and N:M
    group counts) of `init_mask` are preserved exactly.
    """
    opt = options or DSnoTOptions()
    if opt.mode not in MODES:
        raise ValueError(f"unknown DSnoT mode {opt.mode!r}")
    st = stats if isinstance(stats, LayerStats) else LayerStats.from_input_stats(stats)
    W0 = weight0.detach().float()
    keep = init_mask.detach().to(device=W0.device, dtype=torch.bool).clone()
    if spec.is_nm:
        check_nm_shape(W0.shape, spec)
    if opt.mode == "second-order":
        keep, swaps, cycles = _second_order_cycles(W0, keep, st, spec, opt)
    else:
        keep, swaps, cycles = _paper_cycles(W0, keep, st, spec, opt)
    info = {"swaps": int(swaps.sum()), "rows_changed": int((swaps > 0).sum()), "cycles": cycles}
    return keep, info


@torch.no_grad()
def choose_verified(
    weight0: torch.Tensor,
    H: torch.Tensor,
    init: tuple[torch.Tensor, torch.Tensor],
    refined: tuple[torch.Tensor, torch.Tensor],
    per_row: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Between init=(mask, weight) and refined=(mask, weight), keep what has the lower actual error.

    Error: ||(W0 - What) X||^2 = sum over rows of d H d^T. per_row chooses row by row (exact sparsity and
    N:M structure survive, since both candidates have the same count per row and group).
    """
    e_init = row_errors(weight0, init[1], H)
    e_new = row_errors(weight0, refined[1], H)
    if per_row:
        take = e_new < e_init
        mask = torch.where(take.unsqueeze(1), refined[0], init[0])
        weight = torch.where(take.unsqueeze(1), refined[1], init[1])
        kept = bool(take.any())
        chosen = torch.where(take, e_new, e_init).sum()
    else:
        kept = bool(e_new.sum() < e_init.sum())
        mask, weight = refined if kept else init
        chosen = e_new.sum() if kept else e_init.sum()
        take = None
    info = {
        "error_init": float(e_init.sum()),
        "error_refined": float(e_new.sum()),
        "error_chosen": float(chosen),
        "kept_refined": kept,
        "rows_refined": int(take.sum()) if take is not None else (weight0.shape[0] if kept else 0),
    }
    return mask, weight, info


def target_matches(targets: str, name: str) -> bool:
    lowered = name.lower()
    if targets == "all":
        return True
    keys = _ATTN_KEYS if targets == "attn" else _MLP_KEYS
    return any(key in lowered for key in keys)


@dataclass
class DSnoT(PruningMethod):
    """Initial method, then DSnoT refinement of the target linears (others keep the initial result)."""

    init: str = option("init").default
    targets: str = option("targets").default
    mode: str = option("mode").default  # second-order and verified are checked like "verified" (docs/dsnot.md)
    max_cycles: int = option("max_cycles").default
    update_threshold: float = option("update_threshold").default
    pow_of_var_regrowing: float = option("pow_of_var_regrowing").default
    no_sign_flip: bool = option("no_sign_flip").default
    verify_rows: bool = option("verify_rows").default
    verify_block: bool = option("verify_block").default  # verified modes only (dropped for mode paper)
    verify_model: bool = option("verify_model").default  # only with verify_block
    candidates: int = option("candidates").default
    blocksize: int = option("blocksize").default
    percdamp: float = option("percdamp").default
    name: str = "dsnot"
    needs_hessian: bool = field(init=False, default=False)
    uses_name: ClassVar[bool] = True
    refines: ClassVar[bool] = True
    initial_methods: ClassVar[tuple[str, ...]] = INITS
    summary: dict = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise UserError(f"unknown DSnoT --init {self.init!r}: choose one of {', '.join(INITS)}")
        if self.targets not in TARGETS:
            raise UserError(f"unknown --dsnot-targets {self.targets!r}: choose one of {', '.join(TARGETS)}")
        if self.mode not in MODES:
            raise UserError(f"unknown --dsnot-mode {self.mode!r}: choose one of {', '.join(MODES)}")
        self.check_option_values()
        if self.verify_rows and self.mode == "paper":
            raise UserError(
                "--verify-rows needs a verified mode, not --dsnot-mode paper: use --dsnot-mode second-order or verified"
            )
        if self.candidates < 1:
            raise UserError("DSnoT candidates must be at least 1")
        self.needs_hessian = self.init == "sparsegpt" or self.mode in ("verified", "second-order")
        self.verify_block = self.verify_block and self.mode != "paper"
        self.verify_model = self.verify_model and self.verify_block
        self.summary = {"linears": 0, "refined": 0, "kept_refined": 0, "swaps": 0}
        if self.verify_block:
            self.summary.update(blocks_checked=0, blocks_kept_refined=0)
        if self.verify_rows:
            self.summary.update(rows=0, rows_kept_refined=0)

    def _init_result(
        self, weight: torch.Tensor, stats: InputStats, spec: SparsitySpec
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.init == "wanda":
            from sparsedeploy.prune.methods.wanda import wanda_mask

            mask = wanda_mask(weight, stats.sq_mean, spec)
            return mask, weight * mask
        if self.init == "magnitude":
            from sparsedeploy.prune.methods.magnitude import magnitude_mask

            mask = magnitude_mask(weight, spec)
            return mask, weight * mask
        from sparsedeploy.prune.methods.sparsegpt import sparsegpt

        return sparsegpt(weight, stats.hessian, spec, self.blocksize, self.percdamp)

    def prune(self, weight: torch.Tensor, stats: InputStats, spec: SparsitySpec, name: str = "") -> PruneResult:
        mask0, w0 = self._init_result(weight, stats, spec)
        return self.refine_result(weight, stats, spec, mask0, w0, name)

    def refine_result(
        self,
        weight: torch.Tensor,
        stats: InputStats,
        spec: SparsitySpec,
        mask0: torch.Tensor,
        w0: torch.Tensor,
        name: str = "",
    ) -> PruneResult:
        """Refine a given initial result (mask0, w0) of the dense `weight` as this method's mode says."""
        self.summary["linears"] += 1
        if not target_matches(self.targets, name):
            return PruneResult(mask0, w0, {"dsnot": "not a target"})
        options = DSnoTOptions(
            mode=self.mode,
            max_cycles=self.max_cycles,
            update_threshold=self.update_threshold,
            pow_of_var_regrowing=self.pow_of_var_regrowing,
            no_sign_flip=self.no_sign_flip,
            candidates=self.candidates,
        )
        mask, info = refine(weight, mask0, stats, spec, options)
        self.summary["refined"] += 1
        self.summary["swaps"] += info["swaps"]
        if self.verify_rows:
            self.summary["rows"] += weight.shape[0]
        if info["swaps"] == 0:
            return PruneResult(mask0, w0, {**info, "kept_refined": False})
        if self.init == "sparsegpt":  # re-fit the weights for the new mask with the same OBS update
            from sparsedeploy.prune.methods.sparsegpt import sparsegpt

            _, new = sparsegpt(weight, stats.hessian, spec, self.blocksize, self.percdamp, mask=mask)
        else:
            new = weight * mask
        if self.mode == "paper":
            self.summary["kept_refined"] += 1
            return PruneResult(mask, new, {**info, "kept_refined": True})
        mask, new, verdict = choose_verified(weight, stats.hessian, (mask0, w0), (mask, new), self.verify_rows)
        self.summary["kept_refined"] += int(verdict["kept_refined"])
        if self.verify_rows:
            self.summary["rows_kept_refined"] += verdict["rows_refined"]
        log.debug("DSnoT %s: %s", name, verdict)
        if self.verify_block and verdict["kept_refined"]:  # the engine's block check may still fall back to this
            verdict["initial"] = (mask0, w0)
        return PruneResult(mask, new, {**info, **verdict})

    def initial_method(self):
        """The initialiser as a method of its own (the whole-model check compares against it)."""
        from sparsedeploy.prune.methods import build_method

        options = {"blocksize": self.blocksize, "percdamp": self.percdamp} if self.init == "sparsegpt" else {}
        return build_method(self.init, **options)

    def model_verdict(self, choice: str, calib_ppl: dict[str, float]) -> None:
        """The whole-model check's decision (prune_model, after the last block)."""
        self.summary.update(model_choice=choice, calib_ppl=dict(calib_ppl))

    def block_verdict(self, index: int, kept: bool, error_initial: float, error_refined: float) -> None:
        """The block-level check's decision (called by prune_model after comparing the block outputs)."""
        self.summary["blocks_checked"] += 1
        self.summary["blocks_kept_refined"] += int(kept)
        log.debug(
            "DSnoT block %d: output error initial %.4g, refined %.4g -> %s",
            index,
            error_initial,
            error_refined,
            "refined" if kept else "initial",
        )
