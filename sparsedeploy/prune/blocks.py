"""Pruning a loaded model in memory, block by block: the calibration walk driven with a method, and the
checks of a method that refines another (per block and for the whole model)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sparsedeploy.common.models import find_blocks
from sparsedeploy.common.sparsity import SparsitySpec, check_nm_shape
from sparsedeploy.prune import distributed
from sparsedeploy.prune.calibration import EngineConfig, InputStats, walk_blocks
from sparsedeploy.prune.methods import PruneResult, PruningMethod

log = logging.getLogger(__name__)

SpecFor = Callable[[int, str], SparsitySpec]  # (block index, linear name) -> spec


def blocks_prefix(model: nn.Module) -> str:
    blocks = find_blocks(model)
    for name, module in model.named_modules():
        if module is blocks:
            return name
    return "layers"


@torch.no_grad()
def prune_model(
    model: nn.Module,
    samples: torch.Tensor,
    method: PruningMethod,
    spec_for: SpecFor,
    device: torch.device,
    show_progress: bool = True,
    offload_inputs: bool = False,
    start_block: int = 0,
    masks: dict[str, torch.Tensor] | None = None,
    on_block_done: Callable[[int, nn.Module, dict[str, torch.Tensor]], None] | None = None,
    load_block: Callable[[int, nn.Module], None] | None = None,
    release_block: Callable[[int, nn.Module], None] | None = None,
    retain_masks: bool = True,
    model_check: bool = True,
    check_samples: torch.Tensor | None = None,
    block_seconds: list[float] | None = None,
) -> dict[str, torch.Tensor]:
    """Prune every decoder linear in place through the shared engine; return keep-masks by full name.

    `start_block`/`masks`: resume after blocks already pruned (their masks). `on_block_done(i, block,
    block_masks)` is called after each pruned block, e.g. to checkpoint it. `load_block`/`release_block`:
    see `walk_blocks` (disk offload); with `retain_masks=False` a block's masks are dropped once
    `on_block_done` has stored them.

    Methods that refine an initial result (DSnoT in its verified modes) are checked at two levels: per
    block (`verify_block`: the refinement stays only if the block's output gets closer to the dense
    block's output) and, with `model_check`, for the whole model (`verify_model`: the initial method is
    also run on its own, on a copy, and the refined model is kept only if its perplexity on
    `check_samples` -- held-out windows; the calibration windows when None -- is lower than that plain
    initial model's; so the result is never worse than the initial method on those windows).

    `block_seconds`, when given, receives the wall time of each pruned block (statistics, method,
    checks and propagation; the first also holds the capture of block 0's inputs).
    """
    prefix = blocks_prefix(model)
    check_model = model_check and method.verify_model and start_block == 0
    check_samples = samples if check_samples is None else check_samples
    plain = (
        plain_initial(
            model, samples, method.initial_method(), spec_for, device, offload_inputs, check_samples, show_progress
        )
        if check_model
        else None
    )
    masks = dict(masks or {})

    def apply(linear: nn.Linear, full: str, mask: torch.Tensor, weight: torch.Tensor) -> None:
        linear.weight.data.copy_(weight.masked_fill(~mask, 0.0).to(linear.weight.dtype))
        masks[full] = mask.to("cpu")

    def prune_block(
        index: int,
        block: nn.Module,
        linears: dict[str, nn.Linear],
        stats: dict[str, InputStats],
        forward: Callable[[], list[torch.Tensor]],
    ) -> None:
        # A method that refines an initial result (DSnoT) may ask for the block-level check: its refinement
        # is kept only if the block's output moves closer to the dense block's output on the same inputs.
        check = method.verify_block
        dense_out = forward() if check else None
        results: dict[str, PruneResult] = {}
        for name, linear in linears.items():
            spec = spec_for(index, name)
            full = f"{prefix}.{index}.{name}"
            check_nm_shape(linear.weight.shape, spec, full)
            weight = linear.weight.data.float()
            extra = {"name": name} if method.uses_name else {}  # e.g. DSnoT's targets
            results[name] = method.prune(weight, stats[name], spec, **extra)
            apply(linear, full, results[name].mask, results[name].weight)
        initial = {n: r.info["initial"] for n, r in results.items() if r.info and "initial" in r.info}
        if check and initial:
            err_refined = output_error(forward(), dense_out)
            for n, (mask, weight) in initial.items():
                apply(linears[n], f"{prefix}.{index}.{n}", mask, weight)
            err_initial = output_error(forward(), dense_out)
            keep = err_refined < err_initial
            if keep:
                for n in initial:
                    apply(linears[n], f"{prefix}.{index}.{n}", results[n].mask, results[n].weight)
            method.block_verdict(index, keep, err_initial, err_refined)

    mark = [time.perf_counter()]

    def block_done(index: int, block: nn.Module) -> None:
        if block_seconds is not None:  # the block is back on its home device, so device work is finished
            now = time.perf_counter()
            block_seconds.append(now - mark[0])
            mark[0] = now
        head = f"{prefix}.{index}."
        if on_block_done is not None:
            on_block_done(index, block, {k[len(head) :]: v for k, v in masks.items() if k.startswith(head)})
        if not retain_masks:
            for key in [k for k in masks if k.startswith(head)]:
                del masks[key]

    config = EngineConfig(
        device=device,
        need_hessian=method.needs_hessian,
        offload_inputs=offload_inputs,
        show_progress=show_progress,
        description=f"{method.name}",
    )
    walk_blocks(
        model,
        samples,
        config,
        prune_block,
        start_block=start_block,
        on_block_done=block_done,
        load_block=load_block,
        release_block=release_block,
    )
    if plain is not None:
        check_whole_model(model, check_samples, device, method, masks, plain)
    return masks


@dataclass
class PlainInitial:
    """The initial method's own result: its pruned linears' weights and masks, and its calibration perplexity."""

    weights: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    calib_ppl: float


def calibration_ppl(model: nn.Module, samples: torch.Tensor, device: torch.device) -> float:
    from sparsedeploy.common.evaluate import window_perplexity

    return window_perplexity(model, samples, device, show_progress=False).ppl


def plain_initial(
    model: nn.Module,
    samples: torch.Tensor,
    initial_method: PruningMethod,
    spec_for: SpecFor,
    device: torch.device,
    offload_inputs: bool,
    check_samples: torch.Tensor,
    show_progress: bool,
) -> PlainInitial:
    """Run the initial method alone on a copy of the (dense) model; keep only what the comparison needs."""
    import copy

    twin = copy.deepcopy(model)
    masks = prune_model(
        twin, samples, initial_method, spec_for, device, show_progress, offload_inputs, model_check=False
    )
    ppl = calibration_ppl(twin, check_samples, device)
    weights = {name: twin.get_submodule(name).weight.data.clone() for name in masks}
    del twin
    log.info("%s alone: perplexity %.3f on the check windows", initial_method.name, ppl)
    return PlainInitial(weights, masks, ppl)


def check_whole_model(
    model: nn.Module,
    check_samples: torch.Tensor,
    device: torch.device,
    method: PruningMethod,
    masks: dict[str, torch.Tensor],
    plain: PlainInitial,
) -> None:
    """Keep the refined model only if its perplexity on the check windows is below the plain initial model's."""
    scores = {"refined": calibration_ppl(model, check_samples, device), "plain initial": plain.calib_ppl}
    choice = "refined" if scores["refined"] < scores["plain initial"] else "plain initial"
    if choice == "plain initial":
        for full, weight in plain.weights.items():
            model.get_submodule(full).weight.data.copy_(weight)
        masks.update(plain.masks)
    method.model_verdict(choice, scores)
    log.info(
        "%s whole-model check, perplexity on %d held-out windows: refined %.3f, %s alone %.3f -> keeping the %s model",
        method.name,
        check_samples.shape[0],
        scores["refined"],
        method.initial_method().name,
        scores["plain initial"],
        choice,
    )


def output_error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Sum of squared differences between a block's outputs and reference outputs (float64 accumulation)."""
    local = float(sum(((o.double() - r.double()) ** 2).sum() for o, r in zip(outputs, reference)))
    return distributed.all_reduce_sum(local)  # torchrun: every rank sees the same total, so all decide alike
