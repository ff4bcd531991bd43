"""Pruning a whole model: the calibration engine driven with a method, and the prune command's outputs."""

from __future__ import annotations

import logging
import platform
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn

import sparsedeploy
from sparsedeploy import distributed
from sparsedeploy.allocation import AllocationConfig, plan_or_restore_allocation
from sparsedeploy.checkpoint import BlockCheckpoint, work_dir_for
from sparsedeploy.data import calibration_samples
from sparsedeploy.engine import EngineConfig, InputStats, walk_blocks
from sparsedeploy.errors import UserError
from sparsedeploy.evaluate import layer_sparsity, overall_sparsity
from sparsedeploy.fsutil import atomic_dir, check_output_dir, write_json_atomic
from sparsedeploy.methods import PruneResult, PruningMethod, build_method
from sparsedeploy.models import LoadedModel, default_seqlen, find_blocks, load_model, resolve_device, save_checkpoint
from sparsedeploy.sparsity import SparsitySpec, check_nm_shape, parse_sparsity

log = logging.getLogger(__name__)

SpecFor = Callable[[int, str], SparsitySpec]  # (block index, linear name) -> spec


@dataclass
class PruneConfig:
    model: str
    method: str = "wanda"
    sparsity: str = "0.5"
    calib: str = "gensim-wiki"
    nsamples: int = 128
    seqlen: int | None = None  # None: min(2048, model max)
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    cache_dir: str | None = None
    method_options: dict = field(default_factory=dict)
    allocation: str = "uniform"  # uniform | owl | atp (per-block sparsity, see allocation.py)
    owl_m: float = 5.0
    owl_lambda: float = 0.08


def blocks_prefix(model: nn.Module) -> str:
    blocks = find_blocks(model)
    for name, module in model.named_modules():
        if module is blocks:
            return name
    return "layers"


def peak_memory(device: torch.device) -> dict:
    peak = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device.type == "cuda":
        peak["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


@torch.no_grad()
def prune_model(model: nn.Module, samples: torch.Tensor, method: PruningMethod, spec_for: SpecFor,
                device: torch.device, show_progress: bool = True, offload_inputs: bool = False,
                start_block: int = 0, masks: dict[str, torch.Tensor] | None = None,
                on_block_done: Callable[[int, nn.Module, dict[str, torch.Tensor]], None] | None = None,
                load_block: Callable[[int, nn.Module], None] | None = None,
                release_block: Callable[[int, nn.Module], None] | None = None,
                retain_masks: bool = True, model_check: bool = True,
                check_samples: torch.Tensor | None = None,
                block_seconds: list[float] | None = None) -> dict[str, torch.Tensor]:
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
    check_model = model_check and getattr(method, "verify_model", False) and start_block == 0
    check_samples = samples if check_samples is None else check_samples
    plain = plain_initial(model, samples, method.initial_method(), spec_for, device, offload_inputs, check_samples,
                          show_progress) if check_model else None
    masks = dict(masks or {})

    def apply(linear: nn.Linear, full: str, mask: torch.Tensor, weight: torch.Tensor) -> None:
        linear.weight.data.copy_(weight.masked_fill(~mask, 0.0).to(linear.weight.dtype))
        masks[full] = mask.to("cpu")

    def prune_block(index: int, block: nn.Module, linears: dict[str, nn.Linear], stats: dict[str, InputStats],
                    forward: Callable[[], list[torch.Tensor]]) -> None:
        # A method that refines an initial result (DSnoT) may ask for the block-level check: its refinement
        # is kept only if the block's output moves closer to the dense block's output on the same inputs.
        check = getattr(method, "verify_block", False)
        dense_out = forward() if check else None
        results: dict[str, PruneResult] = {}
        for name, linear in linears.items():
            spec = spec_for(index, name)
            full = f"{prefix}.{index}.{name}"
            check_nm_shape(linear.weight.shape, spec, full)
            weight = linear.weight.data.float()
            extra = {"name": name} if getattr(method, "uses_name", False) else {}  # e.g. DSnoT's targets
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
            on_block_done(index, block, {k[len(head):]: v for k, v in masks.items() if k.startswith(head)})
        if not retain_masks:
            for key in [k for k in masks if k.startswith(head)]:
                del masks[key]

    config = EngineConfig(device=device, need_hessian=method.needs_hessian, offload_inputs=offload_inputs,
                          show_progress=show_progress, description=f"{method.name}")
    walk_blocks(model, samples, config, prune_block, start_block=start_block, on_block_done=block_done,
                load_block=load_block, release_block=release_block)
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
    from sparsedeploy.evaluate import perplexity

    return perplexity(model, samples.reshape(-1), samples.shape[1], device, show_progress=False).ppl


def plain_initial(model: nn.Module, samples: torch.Tensor, initial_method: PruningMethod, spec_for: SpecFor, device: torch.device,
                  offload_inputs: bool, check_samples: torch.Tensor, show_progress: bool) -> PlainInitial:
    """Run the initial method alone on a copy of the (dense) model; keep only what the comparison needs."""
    import copy

    twin = copy.deepcopy(model)
    masks = prune_model(twin, samples, initial_method, spec_for, device, show_progress, offload_inputs, model_check=False)
    ppl = calibration_ppl(twin, check_samples, device)
    weights = {name: twin.get_submodule(name).weight.data.clone() for name in masks}
    del twin
    log.info("%s alone: perplexity %.3f on the check windows", initial_method.name, ppl)
    return PlainInitial(weights, masks, ppl)


def check_whole_model(model: nn.Module, check_samples: torch.Tensor, device: torch.device, method: PruningMethod,
                      masks: dict[str, torch.Tensor], plain: PlainInitial) -> None:
    """Keep the refined model only if its perplexity on the check windows is below the plain initial model's."""
    scores = {"refined": calibration_ppl(model, check_samples, device), "plain initial": plain.calib_ppl}
    choice = "refined" if scores["refined"] < scores["plain initial"] else "plain initial"
    if choice == "plain initial":
        for full, weight in plain.weights.items():
            model.get_submodule(full).weight.data.copy_(weight)
        masks.update(plain.masks)
    method.model_verdict(choice, scores)
    log.info("%s whole-model check, perplexity on %d held-out windows: refined %.3f, %s alone %.3f -> keeping the %s model",
             method.name, check_samples.shape[0], scores["refined"], method.initial_method().name, scores["plain initial"], choice)


def output_error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Sum of squared differences between a block's outputs and reference outputs (float64 accumulation)."""
    local = float(sum(((o.double() - r.double()) ** 2).sum() for o, r in zip(outputs, reference)))
    return distributed.all_reduce_sum(local)  # torchrun: every rank sees the same total, so all decide alike


def versions() -> dict:
    import transformers

    return {"sparsedeploy": sparsedeploy.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "torch_threads": torch.get_num_threads()}


def open_checkpoint(config: PruneConfig, output: Path, overwrite: bool, resume: bool) -> BlockCheckpoint:
    """The per-block checkpoint of this run: refuse a stale one unless --resume or --overwrite."""
    fingerprint = {k: v for k, v in asdict(config).items() if k not in ("device", "cache_dir")}
    checkpoint = BlockCheckpoint(work_dir_for(output), fingerprint)
    if checkpoint.exists() and not resume:
        if not overwrite:
            raise UserError(f"an interrupted run left {checkpoint.work}: pass --resume to continue it, or --overwrite to start over")
        checkpoint.clear()
    elif resume and not checkpoint.exists():
        log.warning("--resume: no interrupted run at %s, starting from the first block", checkpoint.work)
    return checkpoint


OFFLOAD_MODES = ("none", "cpu", "disk")


def run_prune(config: PruneConfig, output: Path, overwrite: bool = False, show_progress: bool = True,
              resume: bool = False, offload: str = "none") -> dict:
    """Load, calibrate, prune, and write checkpoint + masks + report.json into `output` atomically.

    After each decoder block the pruned block is checkpointed beside the output; `resume=True`
    continues an interrupted run from its last finished block with an identical result.
    `offload`: "none" (model in RAM, one block at a time on the device), "cpu" (calibration
    activations kept in RAM too, for a small accelerator), "disk" (weights stay on disk; one block
    in memory at a time; see offload.py).
    """
    output = Path(output)
    if offload not in OFFLOAD_MODES:
        raise UserError(f"unknown --offload {offload!r}: use none, cpu or disk")
    check_output_dir(output, overwrite)
    spec = parse_sparsity(config.sparsity)
    method = build_method(config.method, **config.method_options)
    device = distributed.init_from_env(resolve_device(config.device))  # torchrun: data-parallel calibration
    main_rank = distributed.is_main()
    checkpoint = open_checkpoint(config, output, overwrite or not main_rank, resume or not main_rank)
    if offload == "disk":
        from sparsedeploy.offload import DiskBlocks

        lm, source, dtype = _load_for_disk(config)
        disk = DiskBlocks(source, blocks_prefix(lm.model), checkpoint.work, dtype)
    else:
        lm, disk = load_model(config.model, config.dtype, config.cache_dir), None
    seqlen = config.seqlen or default_seqlen(lm.model)
    samples = calibration_samples(lm.tokenizer, config.calib, config.nsamples, seqlen, config.seed)
    prefix = blocks_prefix(lm.model)
    allocation = plan_or_restore_allocation(
        lm.model, samples, method, spec, AllocationConfig(config.allocation, config.owl_m, config.owl_lambda), device,
        lambda n: calibration_samples(lm.tokenizer, config.calib, n, seqlen, config.seed + 1), checkpoint.work if main_rank else None,
        show_progress, load_block=disk.load if disk else None, release_block=disk.release if disk else None)
    start_block, masks = checkpoint.restore(lm.model, prefix, load_weights=disk is None) if checkpoint.exists() else (0, {})
    if main_rank:
        checkpoint.start()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    check_samples = None
    if getattr(method, "verify_model", False):  # other windows of the calibration source judge the whole model
        check_samples = calibration_samples(lm.tokenizer, config.calib, max(4, config.nsamples // 4), seqlen, config.seed + 1)
    block_seconds: list[float] = []
    masks = prune_model(lm.model, samples, method, allocation.spec_for, device, show_progress,
                        offload_inputs=offload in ("cpu", "disk"), start_block=start_block, masks=masks,
                        on_block_done=checkpoint.save_block if main_rank else None, load_block=disk.load if disk else None,
                        release_block=disk.release if disk else None, retain_masks=disk is None,
                        model_check=disk is None and start_block == 0, check_samples=check_samples,
                        block_seconds=block_seconds)
    if getattr(method, "verify_model", False) and (disk is not None or start_block):
        log.warning("%s: the whole-model check needs every block in memory from the first block on: skipped (%s)",
                    method.name, "--offload disk" if disk is not None else "resumed run")
    elapsed = time.perf_counter() - start
    report = {
        "method": config.method, "method_options": config.method_options, "sparsity_spec": str(spec),
        "model": config.model, "model_path": str(lm.path),
        "calibration": {"source": config.calib, "nsamples": config.nsamples, "seqlen": seqlen, "seed": config.seed},
        "device": str(device), "dtype": config.dtype, "offload": offload, "allocation": allocation.report(),
        "prune_seconds": elapsed, "block_seconds": block_seconds, **peak_memory(device), "versions": versions(),
        **({"method_summary": method.summary} if getattr(method, "summary", None) else {}),
        "config": asdict(config),
    }
    if start_block:
        report["resumed_from_block"] = start_block
    if distributed.active():
        report["world_size"] = torch.distributed.get_world_size()
    if not main_rank:
        return report
    if disk is None:
        layers = layer_sparsity(lm.model)
        report.update(overall_sparsity=overall_sparsity(layers), layers=layers)
        write_outputs(lm, masks, report, output)
    else:
        from sparsedeploy.offload import assemble_checkpoint

        with atomic_dir(output) as tmp:
            layers = assemble_checkpoint(lm.model, prefix, checkpoint.work, tmp)
            lm.tokenizer.save_pretrained(tmp)
            report.update(overall_sparsity=overall_sparsity(layers), layers=layers)
            write_json_atomic(tmp / "report.json", report)
    checkpoint.clear()
    log.info("pruned %s with %s at %s: measured sparsity %.4f in %.1f s -> %s",
             config.model, config.method, spec, report["overall_sparsity"], elapsed, output)
    return report


def _load_for_disk(config: PruneConfig):
    """A model whose decoder blocks are on the meta device, and the safetensors source of their weights."""
    from transformers import AutoTokenizer

    from sparsedeploy.models import resolve_dtype, resolve_model_path
    from sparsedeploy.offload import load_skeleton

    path = resolve_model_path(config.model, config.cache_dir)
    if not Path(path).is_dir():
        raise UserError(f"--offload disk needs a local checkpoint directory, not the hub id {config.model!r}: download it first")
    dtype = resolve_dtype(config.dtype)
    model, source, _prefix = load_skeleton(Path(path), dtype)
    return LoadedModel(model, AutoTokenizer.from_pretrained(path), path), source, dtype


def write_outputs(lm: LoadedModel, masks: dict[str, torch.Tensor], report: dict, output: Path) -> None:
    need = sum(p.numel() * p.element_size() for p in lm.model.parameters()) + sum(m.numel() for m in masks.values())
    with atomic_dir(output, need_bytes=need) as tmp:
        save_checkpoint(lm, tmp)
        save_file({k: v.contiguous() for k, v in masks.items()}, str(tmp / "masks.safetensors"))
        write_json_atomic(tmp / "report.json", report)
