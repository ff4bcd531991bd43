"""The one calibration engine: walk the decoder block by block over calibration samples.

For each block it hooks the block's linears, runs the calibration inputs through it while
accumulating per-input-channel statistics (`InputStats`), hands the block and its statistics to a
callback (pruning, scoring, ...), then re-runs the (now modified) block to produce the next
block's inputs. Only one block sits on the compute device at a time, so memory grows with
nsamples x seqlen x hidden, not with depth.

Every method uses this engine; none has its own capture loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsedeploy.common.models import find_blocks, find_linears
from sparsedeploy.prune import distributed

log = logging.getLogger(__name__)


class InputStats:
    """Running statistics of one linear's input over all calibration tokens (float32).

    count: tokens seen; sum, sumsq: per input channel; hessian: X^T X when requested.
    Linears that read the same tensor (q/k/v, gate/up) share one InputStats.
    """

    def __init__(self, features: int, device: torch.device, with_hessian: bool = False) -> None:
        self.owner = ""  # the first linear that saw this input; only it accumulates
        self.count = 0
        self.sum = torch.zeros(features, dtype=torch.float32, device=device)
        self.sumsq = torch.zeros(features, dtype=torch.float32, device=device)
        self.xtx = torch.zeros(features, features, dtype=torch.float32, device=device) if with_hessian else None

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.sumsq += (x * x).sum(0)
        if self.xtx is not None:
            self.xtx.addmm_(x.T, x)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def sq_mean(self) -> torch.Tensor:
        """E[x_j^2]: Wanda's ||x_j||^2 up to a constant factor."""
        return self.sumsq / max(self.count, 1)

    @property
    def var(self) -> torch.Tensor:
        return (self.sq_mean - self.mean**2).clamp_min(0.0)

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2/N * X^T X (the SparseGPT convention)."""
        if self.xtx is None:
            raise RuntimeError("hessian was not collected: the method must set needs_hessian = True")
        return self.xtx * (2.0 / max(self.count, 1))


class BlockFn(Protocol):
    """Called once per block with its linears' statistics; `forward()` runs the block (as it is at that
    moment) on this block's calibration inputs and returns its outputs, e.g. to compare alternatives."""

    def __call__(
        self,
        index: int,
        block: nn.Module,
        linears: dict[str, nn.Linear],
        stats: dict[str, InputStats],
        forward: Callable[[], list[torch.Tensor]],
    ) -> None: ...


@dataclass
class EngineConfig:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    need_hessian: bool = False
    offload_inputs: bool = False  # keep calibration activations in CPU RAM between blocks
    show_progress: bool = True
    description: str = "pruning"


class _StopForward(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a decoder block during capture: records the call, hands the model loop a block output.

    Model loops differ in what they expect back from a block: recent LLaMA-style loops take the hidden
    states tensor itself, others (Gemma2/3, OPT, GPT-NeoX, Falcon, and every family in older transformers)
    take a tuple and read `[0]`. So the first recorder runs its real block once, on the very call it
    received, and keeps that output as the template: every recorder then returns the same structure with
    its input hidden states in the first place. What a recorder returns only feeds the next recorder (the
    last one stops the forward), and only block 0's input is kept: later blocks' inputs are computed by
    running the real blocks (`run_block`), so the values passed between recorders never matter -- their
    type does.
    """

    def __init__(self, inner: nn.Module, index: int, sink: list, template: list, last: bool) -> None:
        super().__init__()
        self.inner = inner
        self.index = index
        self.sink = sink
        self.template = template  # shared by all recorders: [] until the first call has run the real block
        self.last = last

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        self.sink.append((hidden if self.index == 0 else None, rest, kwargs))
        if self.last:
            raise _StopForward
        if not self.template:
            self.template.append(_real_output(self.inner, hidden, rest, kwargs))
        return _like(self.template[0], hidden)


def _real_output(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict):
    """Run the real block once where the hidden states are (and put it back): the structure it returns."""
    params = list(block.parameters())
    if any(p.is_meta for p in params):
        raise RuntimeError(f"decoder block {type(block).__name__} has no weights during capture: load it first")
    home = params[0].device if params else hidden.device
    try:
        return block.to(hidden.device)(hidden, *args, **kwargs)
    finally:
        block.to(home)


def _like(template, hidden: torch.Tensor):
    """`template`'s structure (what the real block returned) with `hidden` as its hidden states."""
    if isinstance(template, torch.Tensor):
        return hidden
    if type(template) in (tuple, list):
        return type(template)((hidden, *template[1:]))
    raise RuntimeError(
        f"decoder block returned {type(template).__name__}: only a tensor or a tuple/list "
        "starting with the hidden states is supported"
    )


def _block_kwargs(kwargs: dict) -> dict:
    """A block's own call arguments minus any cache: calibration never carries a KV cache."""
    clean = {
        k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values", "layer_past", "hidden_states")
    }
    if "use_cache" in clean:
        clean["use_cache"] = False
    return clean


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, samples: torch.Tensor, device: torch.device
) -> tuple[list[torch.Tensor], list[tuple[tuple, dict]]]:
    """Inputs of block 0 for every sample, and every block's own (args, kwargs) from sample 0.

    The blocks are swapped for recorders (see `_Recorder`), so this costs the embeddings and one real
    run of block 0 (which must have its weights: under disk offload, load it first). Everything before
    the first block runs on `device`. Each sample is a fresh forward without a cache: nothing is carried
    from one sample to the next, and each block keeps the arguments the model loop gave it (e.g. its own
    sliding-window or full-attention mask).
    """
    blocks = find_blocks(model)
    originals = list(blocks)
    calls: list = []
    template: list = []
    for i, block in enumerate(originals):
        blocks[i] = _Recorder(block, i, calls, template, last=(i == len(originals) - 1))
    moved = _move_non_block_modules(model, blocks, device)
    inputs: list[torch.Tensor] = []
    per_block: list[tuple[tuple, dict]] = []
    try:
        for j in range(samples.shape[0]):
            calls.clear()
            try:
                model(samples[j : j + 1].to(device), use_cache=False)
            except _StopForward:
                pass
            if len(calls) != len(originals):
                raise RuntimeError(f"captured {len(calls)} block calls for {len(originals)} blocks")
            inputs.append(calls[0][0])
            if j == 0:
                per_block = [(args, _block_kwargs(kwargs)) for _h, args, kwargs in calls]
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
        for module in moved:
            module.to("cpu")
    return inputs, per_block


def _move_non_block_modules(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> list[nn.Module]:
    """Move embeddings, rotary tables and other small pre-block modules to the device (not lm_head)."""
    if device.type == "cpu":
        return []
    block_ids = {id(b) for b in blocks}
    moved = []
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    for _name, child in base.named_children():
        if id(child) in block_ids or child is blocks:
            continue
        child.to(device)
        moved.append(child)
    return moved


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _to_device(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def collect_stats(
    block: nn.Module,
    linears: dict[str, nn.Linear],
    inputs: list[torch.Tensor],
    call: tuple[tuple, dict],
    device: torch.device,
    need_hessian: bool,
) -> dict[str, InputStats]:
    """Run the inputs through `block` and return each linear's input statistics (shared per input)."""
    stats: dict[str, InputStats] = {}
    live: list[torch.Tensor] = []  # holds this sample's inputs alive so data_ptr identifies a tensor
    seen: dict[tuple[int, tuple[int, ...]], InputStats] = {}
    first = [True]

    def make_hook(name: str, linear: nn.Linear):
        def hook(_module, args):
            x = args[0]
            if first[0]:
                key = (x.data_ptr(), tuple(x.shape))
                if key in seen:
                    stats[name] = seen[key]  # same tensor as an earlier linear: share, count once
                    return
                stats[name] = seen[key] = InputStats(linear.in_features, device, need_hessian)
                stats[name].owner = name
                live.append(x)
            if stats[name].owner == name:
                stats[name].update(x)

        return hook

    handles = [lin.register_forward_pre_hook(make_hook(n, lin)) for n, lin in linears.items()]
    args, kwargs = _to_device(call, device)
    try:
        for x in inputs:
            block(x.to(device), *args, **kwargs)
            if first[0]:
                first[0] = False
                live.clear()
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
def run_block(
    block: nn.Module, inputs: list[torch.Tensor], call: tuple[tuple, dict], device: torch.device, keep_on: torch.device
) -> list[torch.Tensor]:
    args, kwargs = _to_device(call, device)
    return [_block_output(block(x.to(device), *args, **kwargs)).to(keep_on) for x in inputs]


@torch.no_grad()
def walk_blocks(
    model: nn.Module,
    samples: torch.Tensor,
    config: EngineConfig,
    block_fn: BlockFn | None,
    start_block: int = 0,
    on_block_done: Callable[[int, nn.Module], None] | None = None,
    load_block: Callable[[int, nn.Module], None] | None = None,
    release_block: Callable[[int, nn.Module], None] | None = None,
) -> None:
    """The engine. For block i >= start_block: collect stats, call block_fn, then propagate.

    Blocks before `start_block` are only propagated (used by --resume: they are already pruned).
    Each block is moved to `config.device` while it is processed and moved back afterwards.
    `load_block`/`release_block` materialise and free a block's weights around its turn (disk offload).
    """
    device = config.device
    keep_on = torch.device("cpu") if config.offload_inputs else device
    blocks = find_blocks(model)
    home = model.get_input_embeddings().weight.device  # where blocks live between turns (never "meta")
    if load_block is not None:
        load_block(0, blocks[0])  # the capture runs block 0 once (see _Recorder)
    inputs, calls = capture_block_inputs(model, distributed.shard(samples), device)
    inputs = [x.to(keep_on) for x in inputs]
    bar = tqdm(range(len(blocks)), desc=config.description, unit="block", disable=not config.show_progress)
    for i in bar:
        if load_block is not None and i > 0:
            load_block(i, blocks[i])
        block = blocks[i].to(device)
        if i >= start_block and block_fn is not None:
            linears = find_linears(block)
            stats = collect_stats(block, linears, inputs, calls[i], device, config.need_hessian)
            distributed.all_reduce_stats(stats)  # no-op in a single process
            block_fn(i, block, linears, stats, lambda: run_block(block, inputs, calls[i], device, keep_on))
            distributed.broadcast_block(block)
            del stats
        if i < len(blocks) - 1:
            inputs = run_block(block, inputs, calls[i], device, keep_on)
        blocks[i] = block.to(home)
        if i >= start_block and on_block_done is not None:
            on_block_done(i, blocks[i])
        if release_block is not None:
            release_block(i, blocks[i])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
