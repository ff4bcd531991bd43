"""Disk offload: prune a model that does not fit in RAM, one decoder block in memory at a time.

The model skeleton is built with its parameters on the `meta` device (no memory); only the
modules outside the decoder blocks (embeddings, final norm, lm_head) are loaded. Each block is
read from the checkpoint's safetensors when its turn comes, pruned, written to the per-block
checkpoint directory (the same files `--resume` uses) and freed again. The output checkpoint is
assembled from those files as a sharded safetensors checkpoint (one shard per block).

Peak memory ~ one block + embeddings/lm_head + calibration activations (nsamples x seqlen x hidden x 2).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sparsedeploy.common.errors import UserError
from sparsedeploy.common.models import find_blocks

log = logging.getLogger(__name__)


class SafetensorsSource:
    """Read single tensors by name from a (possibly sharded) safetensors checkpoint directory."""

    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / shard for name, shard in weight_map.items()}
        elif (folder / "model.safetensors").is_file():
            with safe_open(str(folder / "model.safetensors"), "pt") as fh:
                self.files = dict.fromkeys(fh.keys(), folder / "model.safetensors")
        else:
            raise UserError(
                f"--offload disk needs a safetensors checkpoint, and {folder} has none: convert it first (e.g. load "
                "and save_pretrained)"
            )

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise KeyError(name)
        with safe_open(str(self.files[name]), "pt") as fh:
            return fh.get_tensor(name)


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Replace (meta) parameters/buffers of `module` with real tensors, by relative name."""
    for name, value in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        value = value.to(dtype) if value.is_floating_point() else value
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[leaf] = value


def load_skeleton(path: Path, dtype: torch.dtype) -> tuple[nn.Module, SafetensorsSource, str]:
    """A model whose decoder blocks are on `meta`; everything else loaded. Returns (model, source, blocks prefix)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):  # buffers (rotary tables) stay real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.config.use_cache = False
    source = SafetensorsSource(path)
    blocks = find_blocks(model)
    prefix = next(name for name, m in model.named_modules() if m is blocks)
    rest = {
        name: source.get(name)
        for name, p in model.named_parameters(remove_duplicate=True)
        if not name.startswith(prefix + ".") and name in source.files
    }
    _assign(model, rest, dtype)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix + ".")]
    if missing:
        raise UserError(f"checkpoint {path} lacks {missing[:3]}: cannot offload an incomplete checkpoint")
    return model, source, prefix


class DiskBlocks:
    """load/release callbacks for the engine: blocks come from the checkpoint or the per-block files."""

    def __init__(self, source: SafetensorsSource, prefix: str, work: Path, dtype: torch.dtype) -> None:
        self.source, self.prefix, self.work, self.dtype = source, prefix, Path(work), dtype

    def block_file(self, index: int) -> Path:
        return self.work / f"block-{index:04d}.safetensors"

    def load(self, index: int, block: nn.Module) -> None:
        saved = self.block_file(index)
        if saved.is_file():  # already pruned (resume): take the pruned weights
            tensors = {k: v for k, v in load_file(str(saved)).items() if not k.startswith("mask:")}
        else:
            head = f"{self.prefix}.{index}."
            tensors = {name[len(head) :]: self.source.get(name) for name in self.source.files if name.startswith(head)}
        _assign(block, tensors, self.dtype)

    def release(self, index: int, block: nn.Module) -> None:
        block.to("meta")


def assemble_checkpoint(model: nn.Module, prefix: str, work: Path, out: Path) -> list[dict]:
    """Write a sharded safetensors checkpoint from the skeleton's non-block weights and the block files.

    Masks are written per block too (`masks-block-NNNN.safetensors` + `masks.safetensors.index.json`),
    so no step holds more than one block in memory. Returns the per-linear sparsity rows.
    """
    out = Path(out)
    weight_map: dict[str, str] = {}
    rest = {
        n: p.detach().contiguous()
        for n, p in model.state_dict().items()
        if not n.startswith(prefix + ".") and not p.is_meta
    }
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied:
        rest = {n: t for n, t in rest.items() if "lm_head" not in n}
    save_file(rest, str(out / "model-rest.safetensors"), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, "model-rest.safetensors"))
    mask_map: dict[str, str] = {}
    rows: list[dict] = []
    total = 0
    for index in range(len(find_blocks(model))):
        tensors = load_file(str(work / f"block-{index:04d}.safetensors"))
        weights = {f"{prefix}.{index}.{k}": v for k, v in tensors.items() if not k.startswith("mask:")}
        shard = f"model-block-{index:04d}.safetensors"
        save_file(weights, str(out / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(weights, shard))
        total += sum(v.numel() * v.element_size() for v in weights.values())
        masks = {f"{prefix}.{index}.{k[len('mask:') :]}": v for k, v in tensors.items() if k.startswith("mask:")}
        mask_shard = f"masks-block-{index:04d}.safetensors"
        save_file(masks, str(out / mask_shard))
        mask_map.update(dict.fromkeys(masks, mask_shard))
        for key in tensors:
            if key.startswith("mask:"):
                name = key[len("mask:") :]
                w = tensors[f"{name}.weight"]
                rows.append(
                    {
                        "block": index,
                        "name": name,
                        "shape": list(w.shape),
                        "zeros": int((w == 0).sum()),
                        "numel": w.numel(),
                        "sparsity": float((w == 0).sum()) / w.numel(),
                    }
                )
    total += sum(v.numel() * v.element_size() for v in rest.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    (out / "masks.safetensors.index.json").write_text(json.dumps({"weight_map": mask_map}, indent=1))
    model.config.use_cache = True
    model.config.save_pretrained(out)
    model.config.use_cache = False
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    return rows
