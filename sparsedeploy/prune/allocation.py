"""Layer-wise (per decoder block) sparsity allocation: uniform, OWL and ATP.

Every allocation keeps the *parameter-weighted* mean sparsity of all pruned linears equal to the
target: sum_i params_i * s_i / sum_i params_i == target (to float precision; the allocated mean is
reported). The measured sparsity then differs from the target only by the per-row integer
rounding every method already has (k = floor(in_features * s) weights pruned per row).

- uniform: s_i = target.
- OWL (Yin et al., 2023, "Outlier Weighed Layerwise sparsity"): per block, the outlier ratio D_i is
  the fraction of Wanda scores |W_jk| * sqrt(E[x_k^2]) (over all linears of the block) larger than
  M x their mean, measured in one statistics pass of the shared engine over the dense model. The
  ratios are min-max normalised to [-lambda, +lambda], blocks with MORE outliers get LOWER sparsity,
  the deviations are re-centred on the parameter-weighted mean, and shrunk if needed so that
  |s_i - target| <= lambda always holds (the paper's re-centring can overshoot lambda on one side
  when the outlier ratios are skewed; this keeps the documented bound).
- ATP ("Determining Layer-wise Sparsity for LLMs Through a Theoretical Perspective"): an arithmetic
  progression s_i = s_0 + i * d increasing with depth, s_0 fixed by the mean constraint, with the
  common difference d picked by a small search: each candidate is pruned with the real method on a
  subset of the calibration windows and scored by perplexity on held-out windows of the calibration
  source; cost = len(candidates) x (reduced prune + small eval), see `AllocationConfig`.

All ratios are kept in [0, max_sparsity]: when a spread would leave that range it is shrunk towards
the target, which preserves the mean exactly. N:M sparsity is uniform by construction: a
non-uniform allocation with N:M is refused.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sparsedeploy.common.errors import UserError
from sparsedeploy.common.models import find_blocks, find_linears
from sparsedeploy.common.sparsity import SparsitySpec
from sparsedeploy.prune.calibration import EngineConfig, InputStats, walk_blocks
from sparsedeploy.prune.choices import ALLOCATIONS

log = logging.getLogger(__name__)

BlockHook = Callable[[int, nn.Module], None]


@dataclass
class AllocationConfig:
    kind: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    # ATP candidates, as the total spread s_last - s_first; d = spread / (blocks - 1).
    atp_spreads: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)
    atp_search_nsamples: int = 8  # calibration windows used to prune each candidate
    atp_search_windows: int = 4  # held-out calibration-source windows scored per candidate
    max_sparsity: float = 0.99


# ----------------------------------------------------------------------------- pure math


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must have a positive sum")
    return sum(float(v) * float(w) for v, w in zip(values, weights)) / total


def fit_around_target(
    deviations: Sequence[float], weights: Sequence[float], target: float, max_sparsity: float = 0.99
) -> list[float]:
    """target + c * (dev - weighted mean(dev)), with the largest c <= 1 keeping every ratio in [0, max_sparsity].

    The result's weighted mean equals `target` (to float precision) whatever c is.
    """
    if not 0.0 <= target <= max_sparsity:
        raise UserError(
            f"target sparsity {target} is outside [0, {max_sparsity}]: a non-uniform allocation needs room around it"
        )
    centre = weighted_mean(deviations, weights)
    dev = [float(d) - centre for d in deviations]
    scale = 1.0
    for d in dev:
        if d > 0:
            scale = min(scale, (max_sparsity - target) / d)
        elif d < 0:
            scale = min(scale, target / -d)
    ratios = [target + scale * d for d in dev]
    fix = target - weighted_mean(ratios, weights)  # remove the last float residue of the mean
    return [min(max(r + fix, 0.0), max_sparsity) for r in ratios]


def owl_ratios(
    outlier_ratios: Sequence[float], weights: Sequence[float], target: float, lam: float, max_sparsity: float = 0.99
) -> list[float]:
    """OWL: more outliers -> lower sparsity; |s_i - target| <= lam; weighted mean == target."""
    if lam < 0:
        raise UserError(f"--owl-lambda {lam} must be >= 0")
    lo, hi = min(outlier_ratios), max(outlier_ratios)
    if hi - lo <= 0 or lam == 0:
        return [float(target)] * len(outlier_ratios)
    dev = [-(2.0 * lam * (d - lo) / (hi - lo) - lam) for d in outlier_ratios]
    centre = weighted_mean(dev, weights)
    dev = [d - centre for d in dev]
    worst = max(abs(d) for d in dev)
    if worst > lam:
        dev = [d * lam / worst for d in dev]
    return fit_around_target(dev, weights, target, max_sparsity)


def atp_max_difference(n_blocks: int, weights: Sequence[float], target: float, max_sparsity: float = 0.99) -> float:
    """Largest common difference d keeping s_0 >= 0 and s_last <= max_sparsity."""
    if n_blocks < 2:
        return 0.0
    centre = weighted_mean(range(n_blocks), weights)
    limits = [
        target / centre if centre > 0 else math.inf,
        (max_sparsity - target) / (n_blocks - 1 - centre) if n_blocks - 1 > centre else math.inf,
    ]
    return max(0.0, min(limits))


def atp_ratios(
    n_blocks: int, weights: Sequence[float], target: float, d: float, max_sparsity: float = 0.99
) -> list[float]:
    """ATP: s_i = s_0 + i * d with weighted mean == target (d clipped to the feasible maximum)."""
    d = min(max(d, 0.0), atp_max_difference(n_blocks, weights, target, max_sparsity))
    centre = weighted_mean(range(n_blocks), weights)
    ratios = [target + d * (i - centre) for i in range(n_blocks)]
    fix = target - weighted_mean(ratios, weights)
    return [min(max(r + fix, 0.0), max_sparsity) for r in ratios]


def atp_candidates(
    n_blocks: int, weights: Sequence[float], target: float, spreads: Sequence[float], max_sparsity: float = 0.99
) -> list[float]:
    """Common differences to try: spread / (blocks - 1), clipped to the feasible maximum, deduplicated."""
    dmax = atp_max_difference(n_blocks, weights, target, max_sparsity)
    out: list[float] = []
    for spread in spreads:
        d = min(float(spread) / max(n_blocks - 1, 1), dmax)
        if d > 0 and all(abs(d - e) > 1e-12 for e in out):
            out.append(d)
    return out


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """Fraction of all entries of `scores` (taken together) larger than m x their mean."""
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.sum(dtype=torch.float64)) for s in scores) / max(total, 1)
    above = sum(int((s > m * mean).sum()) for s in scores)
    return above / max(total, 1)


# ----------------------------------------------------------------------------- model side


def block_param_counts(model: nn.Module) -> list[int]:
    """Weights of the pruned linears in each decoder block (the weights of the mean constraint)."""
    return [sum(lin.weight.numel() for lin in find_linears(block).values()) for block in find_blocks(model)]


@torch.no_grad()
def owl_outlier_ratios(
    model: nn.Module,
    samples: torch.Tensor,
    device: torch.device,
    m: float = 5.0,
    show_progress: bool = True,
    load_block: BlockHook | None = None,
    release_block: BlockHook | None = None,
) -> list[float]:
    """One pass of the shared engine over the dense model: each block's OWL outlier ratio (nothing is modified)."""
    ratios: list[float] = []

    def score_block(
        index: int, block: nn.Module, linears: dict[str, nn.Linear], stats: dict[str, InputStats], _forward
    ) -> None:
        scores = [
            lin.weight.detach().float().abs() * stats[name].sq_mean.sqrt().unsqueeze(0) for name, lin in linears.items()
        ]
        ratios.append(outlier_ratio(scores, m))

    config = EngineConfig(device=device, show_progress=show_progress, description="OWL outlier statistics")
    walk_blocks(model, samples, config, score_block, load_block=load_block, release_block=release_block)
    return ratios


@dataclass
class Allocation:
    """Per-block sparsity specs; `spec_for(block, linear_name)` plugs into prune_model."""

    kind: str
    target: SparsitySpec
    ratios: list[float]
    weights: list[int]
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.target.is_nm:
            self.specs = [self.target] * len(self.ratios)
        else:
            self.specs = [SparsitySpec(ratio=float(r)) for r in self.ratios]

    def spec_for(self, block: int, _name: str = "") -> SparsitySpec:
        return self.specs[block]

    @property
    def allocated_mean(self) -> float:
        return weighted_mean(self.ratios, self.weights)

    def report(self) -> dict:
        return {
            "kind": self.kind,
            "target": str(self.target),
            "allocated_mean": self.allocated_mean,
            "min": min(self.ratios),
            "max": max(self.ratios),
            "per_block": self.ratios,
            **self.details,
        }


def uniform(model: nn.Module, spec: SparsitySpec) -> Allocation:
    weights = block_param_counts(model)
    return Allocation("uniform", spec, [spec.ratio] * len(weights), weights)


def plan_allocation(
    model: nn.Module,
    samples: torch.Tensor,
    method,
    spec: SparsitySpec,
    config: AllocationConfig,
    device: torch.device,
    eval_samples: Callable[[int], torch.Tensor] | None = None,
    show_progress: bool = True,
    load_block: BlockHook | None = None,
    release_block: BlockHook | None = None,
) -> Allocation:
    """Decide each block's sparsity on the DENSE model (call before pruning or restoring blocks).

    `eval_samples(n)` returns n held-out calibration-source windows [n, seqlen] for the ATP search.
    `load_block`/`release_block`: the disk-offload hooks of the engine (OWL's statistics pass only).
    """
    kind = config.kind
    if kind not in ALLOCATIONS:
        raise UserError(f"unknown allocation {kind!r}: choose one of {', '.join(ALLOCATIONS)}")
    if kind == "uniform":
        return uniform(model, spec)
    if spec.is_nm:
        raise UserError(
            f"--allocation {kind} needs an unstructured sparsity ratio: N:M {spec} is the same pattern in every "
            "layer by definition; use --allocation uniform, or a ratio such as 0.5"
        )
    weights = block_param_counts(model)
    target = spec.ratio
    start = time.perf_counter()
    if kind == "owl":
        if config.owl_m <= 0:
            raise UserError(f"--owl-m {config.owl_m} must be > 0 (the paper uses 5)")
        outliers = owl_outlier_ratios(model, samples, device, config.owl_m, show_progress, load_block, release_block)
        ratios = owl_ratios(outliers, weights, target, config.owl_lambda, config.max_sparsity)
        details = {"owl_m": config.owl_m, "owl_lambda": config.owl_lambda, "outlier_ratios": outliers}
    else:
        if load_block is not None:
            raise UserError(
                "--allocation atp prunes trial copies in memory and cannot run with --offload disk: "
                "use --offload none or cpu, or --allocation owl"
            )
        if eval_samples is None:
            raise ValueError("ATP needs eval_samples for its search")
        d, trials = atp_search(
            model,
            samples,
            method,
            target,
            weights,
            config,
            device,
            eval_samples(config.atp_search_windows),
            show_progress,
        )
        ratios = atp_ratios(len(weights), weights, target, d, config.max_sparsity)
        details = {
            "atp_difference": d,
            "atp_search": trials,
            "atp_search_setting": {
                "nsamples": min(config.atp_search_nsamples, samples.shape[0]),
                "eval_windows": config.atp_search_windows,
                "spreads": list(config.atp_spreads),
            },
        }
    details["allocation_seconds"] = time.perf_counter() - start
    allocation = Allocation(kind, spec, ratios, weights, details)
    log.info(
        "%s allocation: sparsity %.4f..%.4f over %d blocks, parameter-weighted mean %.6f (target %s)",
        kind,
        allocation.report()["min"],
        allocation.report()["max"],
        len(ratios),
        allocation.allocated_mean,
        spec,
    )
    return allocation


def _memory_key(spec: SparsitySpec, config: AllocationConfig) -> dict:
    """The settings a remembered allocation was planned with: a resumed run reuses it only when they match."""
    return {
        "kind": config.kind,
        "target": str(spec),
        "owl_m": config.owl_m,
        "owl_lambda": config.owl_lambda,
        "atp_spreads": list(config.atp_spreads),
        "atp_search_nsamples": config.atp_search_nsamples,
        "atp_search_windows": config.atp_search_windows,
        "max_sparsity": config.max_sparsity,
    }


def restore_allocation(work: Path | None, spec: SparsitySpec, config: AllocationConfig) -> Allocation | None:
    """The allocation `remember_allocation` kept in the run's work directory for these settings, else None.

    A resumed run must not re-plan: its model already holds pruned blocks (OWL wants the dense
    activations) and the ATP search would cost again. The file is keyed by the settings it used.
    """
    if work is None:
        return None
    path = Path(work) / "allocation.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("key") != _memory_key(spec, config):
        return None
    log.info("resuming with the %s allocation planned before the interruption (%s)", config.kind, path)
    return Allocation(saved["kind"], spec, saved["ratios"], saved["weights"], {**saved["details"], "restored": True})


def remember_allocation(
    work: Path | None, spec: SparsitySpec, config: AllocationConfig, allocation: Allocation
) -> None:
    """Keep a planned non-uniform allocation in the run's work directory (none: nothing kept) for --resume."""
    if work is None or config.kind == "uniform":
        return
    from sparsedeploy.common.files import write_json_atomic

    write_json_atomic(
        Path(work) / "allocation.json",
        {
            "key": _memory_key(spec, config),
            "kind": allocation.kind,
            "ratios": allocation.ratios,
            "weights": allocation.weights,
            "details": allocation.details,
        },
    )


def atp_search(
    model: nn.Module,
    samples: torch.Tensor,
    method,
    target: float,
    weights: list[int],
    config: AllocationConfig,
    device: torch.device,
    held_out: torch.Tensor,
    show_progress: bool = True,
) -> tuple[float, list[dict]]:
    """Prune with each candidate difference (reduced calibration), score held-out perplexity, restore; best d.

    A method that refines an initial one (DSnoT) is searched with its initial method: the allocation is a
    property of the initial pruning, and refining every candidate would multiply the search cost.
    """
    from sparsedeploy.common.evaluate import window_perplexity
    from sparsedeploy.prune.blocks import prune_model

    method = method.initial_method() or method

    candidates = atp_candidates(len(weights), weights, target, config.atp_spreads, config.max_sparsity)
    if not candidates:
        return 0.0, []
    linears = [lin for block in find_blocks(model) for lin in find_linears(block).values()]
    saved = [lin.weight.detach().to("cpu", copy=True) for lin in linears]
    subset = samples[: max(1, min(config.atp_search_nsamples, samples.shape[0]))]
    trials = []
    try:
        for d in candidates:
            alloc = Allocation(
                "atp",
                SparsitySpec(ratio=target),
                atp_ratios(len(weights), weights, target, d, config.max_sparsity),
                weights,
            )
            t0 = time.perf_counter()
            prune_model(model, subset, method, alloc.spec_for, device, show_progress=False, model_check=False)
            ppl = window_perplexity(model, held_out, device, show_progress=False).ppl
            trials.append(
                {"difference": d, "spread": d * (len(weights) - 1), "ppl": ppl, "seconds": time.perf_counter() - t0}
            )
            log.info("ATP search: d=%.5f (spread %.3f) -> held-out perplexity %.3f", d, d * (len(weights) - 1), ppl)
            for lin, w in zip(linears, saved):
                lin.weight.data.copy_(w)
    finally:
        for lin, w in zip(linears, saved):
            lin.weight.data.copy_(w)
    finite = [t for t in trials if math.isfinite(t["ppl"])]
    best = min(finite or trials, key=lambda t: t["ppl"])
    return best["difference"], trials
