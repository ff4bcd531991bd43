"""Sparsity-preserving recovery: masked low-rank adapters trained briefly, then merged into the sparse weights.

Each pruned decoder linear W (out x in) gets a LoRA pair B (out x r, starts at 0) and A (r x in); the
layer computes x (W + s * M ⊙ (B A))^T + b, where M is the layer's keep-mask (True = kept, restricted
to weights that are actually non-zero) and s = alpha / r. Only A and B train, on the LM loss or on
distillation against a dense teacher's logits (KL at temperature T). Merging writes
W + s * M ⊙ (B A) into the weight: every pruned position receives exactly 0, so the zero pattern,
and the N:M structure, are unchanged. A kept weight whose merged value would land on exactly 0.0
keeps its old value, so no new zero appears either: the set of zeros is identical, bit for bit.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparsedeploy.common.errors import UserError
from sparsedeploy.common.models import find_blocks, find_linears

log = logging.getLogger(__name__)


@dataclass
class RecoverConfig:
    steps: int = 100
    rank: int = 8
    alpha: float | None = None  # adapter scale = alpha / rank; None: alpha = rank (scale 1)
    lr: float = 1e-3
    seqlen: int = 256
    batch: int = 1
    seed: int = 0
    grad_clip: float = 1.0
    temperature: float = 1.0  # distillation temperature (with a teacher)

    def validate(self) -> None:
        if self.steps < 1:
            raise UserError(f"--steps {self.steps} must be at least 1")
        if self.rank < 1:
            raise UserError(f"--rank {self.rank} must be at least 1")
        if not self.lr > 0:
            raise UserError(f"--lr {self.lr} must be > 0")
        if self.batch < 1 or self.seqlen < 2:
            raise UserError(f"--batch {self.batch} and --seqlen {self.seqlen} must be >= 1 and >= 2")


class MaskedLoRA(nn.Module):
    """A frozen linear plus a low-rank update restricted to the kept positions of its weight."""

    def __init__(
        self, base: nn.Linear, mask: torch.Tensor, rank: int, scale: float, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.base = base
        self.scale = scale
        self.register_buffer("mask", mask.to(base.weight.device, torch.bool), persistent=False)
        out_f, in_f = base.weight.shape
        a = torch.empty(rank, in_f).uniform_(-1.0, 1.0, generator=generator) / math.sqrt(in_f)
        self.lora_a = nn.Parameter(a.to(base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(out_f, rank, device=base.weight.device))

    def delta(self) -> torch.Tensor:
        return (self.lora_b @ self.lora_a) * self.mask * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base.weight + self.delta().to(self.base.weight.dtype)
        return F.linear(x, weight, self.base.bias)

    @torch.no_grad()
    def merged(self) -> torch.Tensor:
        """W + mask ⊙ delta with the zero set of W preserved exactly (see the module docstring)."""
        w = self.base.weight.float()
        new = w + self.delta().float()
        new = torch.where(self.mask & (new.to(self.base.weight.dtype) != 0), new, w)
        return new.to(self.base.weight.dtype)


def _set_child(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def zero_pattern(model: nn.Module) -> dict[str, torch.Tensor]:
    """Bool map of exact zeros of every decoder linear, by block-relative name."""
    return {
        f"{i}.{name}": (lin.weight.data == 0).cpu()
        for i, block in enumerate(find_blocks(model))
        for name, lin in find_linears(block).items()
    }


def same_zeros(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def attach_adapters(
    model: nn.Module, masks: dict[str, torch.Tensor] | None, rank: int, scale: float, seed: int = 0
) -> list[tuple[nn.Module, str, MaskedLoRA]]:
    """Wrap every decoder linear; `masks` (full name -> keep-mask) further restricts the non-zero pattern."""
    from sparsedeploy.prune.blocks import blocks_prefix

    prefix = blocks_prefix(model)
    gen = torch.Generator().manual_seed(seed)
    wrapped = []
    for i, block in enumerate(find_blocks(model)):
        for name, linear in find_linears(block).items():
            mask = linear.weight.data != 0
            stored = (masks or {}).get(f"{prefix}.{i}.{name}")
            if stored is not None:
                if stored.shape != mask.shape:
                    raise UserError(
                        f"mask for {prefix}.{i}.{name} has shape {tuple(stored.shape)}, weight {tuple(mask.shape)}: "
                        "masks.safetensors does not belong to this checkpoint"
                    )
                mask &= stored.to(mask.device, torch.bool)
            adapter = MaskedLoRA(linear, mask, rank, scale, gen)
            _set_child(block, name, adapter)
            wrapped.append((block, name, adapter))
    return wrapped


def merge_adapters(wrapped: list[tuple[nn.Module, str, MaskedLoRA]]) -> None:
    for block, name, adapter in wrapped:
        adapter.base.weight.data.copy_(adapter.merged())
        _set_child(block, name, adapter.base)


def _loss(model: nn.Module, ids: torch.Tensor, teacher: nn.Module | None, temperature: float) -> torch.Tensor:
    logits = model(ids, use_cache=False).logits[:, :-1].float()
    if teacher is None:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    with torch.no_grad():
        target = teacher(ids, use_cache=False).logits[:, :-1].float()
    t = temperature
    log_p = F.log_softmax(target / t, dim=-1)
    log_q = F.log_softmax(logits / t, dim=-1)
    return (
        F.kl_div(
            log_q.reshape(-1, log_q.shape[-1]),
            log_p.reshape(-1, log_p.shape[-1]),
            log_target=True,
            reduction="batchmean",
        )
        * t
        * t
    )


def recover_model(
    model: nn.Module,
    masks: dict[str, torch.Tensor] | None,
    samples: torch.Tensor,
    config: RecoverConfig,
    device: torch.device,
    teacher: nn.Module | None = None,
    show_progress: bool = True,
) -> dict:
    """Train masked adapters on `samples` [steps * batch, seqlen], merge them in place; return figures."""
    config.validate()
    need = config.steps * config.batch
    if samples.shape[0] < need:
        raise UserError(f"recovery needs {need} training windows (steps x batch), got {samples.shape[0]}")
    home = next(model.parameters()).device
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    model.requires_grad_(False)
    scale = (config.alpha if config.alpha is not None else config.rank) / config.rank
    wrapped = attach_adapters(model, masks, config.rank, scale, config.seed)
    params = [p for _b, _n, a in wrapped for p in (a.lora_a, a.lora_b)]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    warmup = max(1, config.steps // 10)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine down to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    losses: list[float] = []
    start = time.perf_counter()
    try:
        with torch.enable_grad():
            bar = tqdm(range(config.steps), desc="recovery", unit="step", disable=not show_progress)
            for step in bar:
                ids = samples[step * config.batch : (step + 1) * config.batch].to(device)
                loss = _loss(model, ids, teacher, config.temperature)
                if not torch.isfinite(loss.detach()):
                    raise UserError(f"recovery loss became {float(loss.detach())} at step {step}: lower --lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                schedule.step()
                losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        merge_adapters(wrapped)  # also on failure: the adapters never leave the model half-wrapped
        model.to(home)
        if teacher is not None:
            teacher.to("cpu")
    seconds = time.perf_counter() - start
    k = max(1, min(10, len(losses) // 2))
    return {
        "steps": config.steps,
        "tokens": need * config.seqlen,
        "seconds": seconds,
        "loss": "kl" if teacher is not None else "lm",
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
        "losses": losses,
        "adapter_params": sum(p.numel() for p in params),
        "config": asdict(config),
    }


@dataclass
class RecoverRun:
    model: str
    data: str = "gensim-wiki"
    output: str = ""
    teacher: str | None = None
    eval_data: str | None = None
    eval_windows: int = 16
    eval_seqlen: int | None = None  # None: the training seqlen
    device: str = "auto"
    dtype: str = "float32"
    cache_dir: str | None = None


def run_recover(
    run: RecoverRun, config: RecoverConfig, output: Path, overwrite: bool = False, show_progress: bool = True
) -> dict:
    """Load a pruned checkpoint, recover, check the zeros, and write checkpoint + masks + recover_report.json
    atomically."""
    from safetensors.torch import load_file

    from sparsedeploy.common.data import calibration_samples, eval_tokens, window_bos
    from sparsedeploy.common.evaluate import layer_sparsity, overall_sparsity, perplexity
    from sparsedeploy.common.files import atomic_dir, check_output_dir, write_json_atomic
    from sparsedeploy.common.models import load_model, resolve_device, save_checkpoint
    from sparsedeploy.common.provenance import peak_memory, versions

    config.validate()
    output = Path(output)
    check_output_dir(output, overwrite)
    device = resolve_device(run.device)
    lm = load_model(run.model, run.dtype, run.cache_dir)
    source = Path(run.model)
    masks_file = source / "masks.safetensors" if source.is_dir() else None
    masks = load_file(str(masks_file)) if masks_file and masks_file.is_file() else None
    if masks is None:
        log.warning("no masks.safetensors beside %s: the adapters are restricted to the non-zero weights", run.model)
    before_layers = layer_sparsity(lm.model)
    zeros_before = zero_pattern(lm.model)
    bos = window_bos(lm.model, lm.tokenizer)
    train = calibration_samples(lm.tokenizer, run.data, config.steps * config.batch, config.seqlen, config.seed, bos)
    teacher = load_model(run.teacher, run.dtype, run.cache_dir).model if run.teacher else None
    report: dict = {
        "model": run.model,
        "data": run.data,
        "teacher": run.teacher,
        "device": str(device),
        "dtype": run.dtype,
    }
    tokens = eval_tokens(lm.tokenizer, run.eval_data) if run.eval_data else None
    eval_seqlen = run.eval_seqlen or config.seqlen
    if tokens is not None:
        report["ppl_before"] = perplexity(
            lm.model, tokens, eval_seqlen, device, run.eval_windows, show_progress, bos
        ).ppl
    report["recovery"] = recover_model(lm.model, masks, train, config, device, teacher, show_progress)
    zeros_after = zero_pattern(lm.model)
    if not same_zeros(zeros_before, zeros_after):  # cannot happen by construction; never write such a model
        raise RuntimeError("recovery changed the zero pattern: refusing to write the checkpoint")
    if tokens is not None:
        report["ppl_after"] = perplexity(
            lm.model, tokens, eval_seqlen, device, run.eval_windows, show_progress, bos
        ).ppl
        report["eval"] = {
            "data": run.eval_data,
            "windows": run.eval_windows,
            "seqlen": eval_seqlen,
            "bos_per_window": bos is not None,
        }
    after_layers = layer_sparsity(lm.model)
    report.update(
        sparsity_before=overall_sparsity(before_layers),
        sparsity_after=overall_sparsity(after_layers),
        zeros_identical=True,
        **peak_memory(device),
        versions=versions(),
    )
    with atomic_dir(output) as tmp:
        save_checkpoint(lm, tmp)
        for name in ("masks.safetensors", "report.json"):
            if source.is_dir() and (source / name).is_file():
                shutil.copy2(source / name, tmp / name)  # the pruning masks and report carry over unchanged
        write_json_atomic(tmp / "recover_report.json", report)
    log.info(
        "recovered %s: %d steps, %d tokens in %.1f s; sparsity %.4f (zeros identical) -> %s",
        run.model,
        config.steps,
        report["recovery"]["tokens"],
        report["recovery"]["seconds"],
        report["sparsity_after"],
        output,
    )
    return report
