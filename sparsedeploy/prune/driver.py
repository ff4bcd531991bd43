"""The prune command: load, allocate, prune block by block with checkpoints and offload, write the outputs."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from sparsedeploy.common.data import calibration_samples, window_bos
from sparsedeploy.common.errors import UserError
from sparsedeploy.common.evaluate import layer_sparsity, overall_sparsity
from sparsedeploy.common.files import atomic_dir, check_output_dir, write_json_atomic
from sparsedeploy.common.models import LoadedModel, default_seqlen, load_model, resolve_device, save_checkpoint
from sparsedeploy.common.provenance import peak_memory, versions
from sparsedeploy.common.sparsity import parse_sparsity
from sparsedeploy.prune import distributed
from sparsedeploy.prune.allocation import AllocationConfig, plan_allocation, remember_allocation, restore_allocation
from sparsedeploy.prune.blocks import blocks_prefix, prune_model
from sparsedeploy.prune.checkpoint import BlockCheckpoint, work_dir_for
from sparsedeploy.prune.choices import OFFLOAD_MODES
from sparsedeploy.prune.methods import build_method

log = logging.getLogger(__name__)


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


def open_checkpoint(config: PruneConfig, output: Path, overwrite: bool, resume: bool) -> BlockCheckpoint:
    """The per-block checkpoint of this run: refuse a stale one unless --resume or --overwrite."""
    fingerprint = {k: v for k, v in asdict(config).items() if k not in ("device", "cache_dir")}
    checkpoint = BlockCheckpoint(work_dir_for(output), fingerprint)
    if checkpoint.exists() and not resume:
        if not overwrite:
            raise UserError(
                f"an interrupted run left {checkpoint.work}: pass --resume to continue it, or --overwrite to start over"
            )
        checkpoint.clear()
    elif resume and not checkpoint.exists():
        log.warning("--resume: no interrupted run at %s, starting from the first block", checkpoint.work)
    return checkpoint


def run_prune(
    config: PruneConfig,
    output: Path,
    overwrite: bool = False,
    show_progress: bool = True,
    resume: bool = False,
    offload: str = "none",
) -> dict:
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
        from sparsedeploy.prune.offload import DiskBlocks

        lm, source, dtype = _load_for_disk(config)
        disk = DiskBlocks(source, blocks_prefix(lm.model), checkpoint.work, dtype)
    else:
        lm, disk = load_model(config.model, config.dtype, config.cache_dir), None
    seqlen = config.seqlen or default_seqlen(lm.model)
    bos = window_bos(lm.model, lm.tokenizer)  # Gemma: every window begins with BOS
    samples = calibration_samples(lm.tokenizer, config.calib, config.nsamples, seqlen, config.seed, bos)
    prefix = blocks_prefix(lm.model)
    allocation_config = AllocationConfig(config.allocation, config.owl_m, config.owl_lambda)
    work = checkpoint.work if main_rank else None
    allocation = restore_allocation(work, spec, allocation_config)
    if allocation is None:
        allocation = plan_allocation(
            lm.model,
            samples,
            method,
            spec,
            allocation_config,
            device,
            lambda n: calibration_samples(lm.tokenizer, config.calib, n, seqlen, config.seed + 1, bos),
            show_progress,
            load_block=disk.load if disk else None,
            release_block=disk.release if disk else None,
        )
        remember_allocation(work, spec, allocation_config, allocation)
    start_block, masks = (
        checkpoint.restore(lm.model, prefix, load_weights=disk is None) if checkpoint.exists() else (0, {})
    )
    if main_rank:
        checkpoint.start()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    check_samples = None
    if method.verify_model:  # other windows of the calibration source judge the whole model
        check_samples = calibration_samples(
            lm.tokenizer, config.calib, max(4, config.nsamples // 4), seqlen, config.seed + 1, bos
        )
    block_seconds: list[float] = []
    masks = prune_model(
        lm.model,
        samples,
        method,
        allocation.spec_for,
        device,
        show_progress,
        offload_inputs=offload in ("cpu", "disk"),
        start_block=start_block,
        masks=masks,
        on_block_done=checkpoint.save_block if main_rank else None,
        load_block=disk.load if disk else None,
        release_block=disk.release if disk else None,
        retain_masks=disk is None,
        model_check=disk is None and start_block == 0,
        check_samples=check_samples,
        block_seconds=block_seconds,
    )
    if method.verify_model and (disk is not None or start_block):
        log.warning(
            "%s: the whole-model check needs every block in memory from the first block on: skipped (%s)",
            method.name,
            "--offload disk" if disk is not None else "resumed run",
        )
    elapsed = time.perf_counter() - start
    report = {
        "method": config.method,
        "method_options": config.method_options,
        "sparsity_spec": str(spec),
        "model": config.model,
        "model_path": str(lm.path),
        "calibration": {
            "source": config.calib,
            "nsamples": config.nsamples,
            "seqlen": seqlen,
            "seed": config.seed,
            "bos_per_window": bos is not None,
        },
        "device": str(device),
        "dtype": config.dtype,
        "offload": offload,
        "allocation": allocation.report(),
        "prune_seconds": elapsed,
        "block_seconds": block_seconds,
        **peak_memory(device),
        "versions": versions(),
        **({"method_summary": method.summary} if method.summary else {}),
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
        from sparsedeploy.prune.offload import assemble_checkpoint

        with atomic_dir(output) as tmp:
            layers = assemble_checkpoint(lm.model, prefix, checkpoint.work, tmp)
            lm.tokenizer.save_pretrained(tmp)
            report.update(overall_sparsity=overall_sparsity(layers), layers=layers)
            write_json_atomic(tmp / "report.json", report)
    checkpoint.clear()
    log.info(
        "pruned %s with %s at %s: measured sparsity %.4f in %.1f s -> %s",
        config.model,
        config.method,
        spec,
        report["overall_sparsity"],
        elapsed,
        output,
    )
    return report


def _load_for_disk(config: PruneConfig):
    """A model whose decoder blocks are on the meta device, and the safetensors source of their weights."""
    from transformers import AutoTokenizer

    from sparsedeploy.common.models import resolve_dtype, resolve_model_path
    from sparsedeploy.prune.offload import load_skeleton

    path = resolve_model_path(config.model, config.cache_dir)
    if not Path(path).is_dir():
        raise UserError(
            f"--offload disk needs a local checkpoint directory, not the hub id {config.model!r}: download it first"
        )
    dtype = resolve_dtype(config.dtype)
    model, source, _prefix = load_skeleton(Path(path), dtype)
    return LoadedModel(model, AutoTokenizer.from_pretrained(path), path), source, dtype


def write_outputs(lm: LoadedModel, masks: dict[str, torch.Tensor], report: dict, output: Path) -> None:
    need = sum(p.numel() * p.element_size() for p in lm.model.parameters()) + sum(m.numel() for m in masks.values())
    with atomic_dir(output, need_bytes=need) as tmp:
        save_checkpoint(lm, tmp)
        save_file({k: v.contiguous() for k, v in masks.items()}, str(tmp / "masks.safetensors"))
        write_json_atomic(tmp / "report.json", report)
