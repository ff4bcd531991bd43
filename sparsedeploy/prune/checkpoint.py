"""Per-block pruning checkpoints, so an interrupted run resumes where it stopped.

The state lives in a work directory beside the output (`.NAME.partial`): `state.json` (what run it
belongs to, which blocks are done) and one safetensors file per finished block holding that
block's pruned weights and masks. Resuming loads them into the model and restarts the engine at
the first unfinished block; the engine re-derives that block's inputs by running the calibration
data through the already-pruned blocks, which is the same computation an uninterrupted run does.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sparsedeploy.common.errors import UserError
from sparsedeploy.common.files import KEPT_FOR_RESUME, deferred_signals, write_json_atomic, writing
from sparsedeploy.common.models import find_blocks

log = logging.getLogger(__name__)

_MASK = "mask:"


def work_dir_for(output: Path) -> Path:
    output = Path(output)
    return output.parent / f".{output.name}.partial"


class BlockCheckpoint:
    def __init__(self, work: Path, fingerprint: dict) -> None:
        self.work = Path(work)
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.done: list[int] = []

    @property
    def state_file(self) -> Path:
        return self.work / "state.json"

    def exists(self) -> bool:
        return self.state_file.is_file()

    def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self._write_state()

    def _write_state(self) -> None:
        write_json_atomic(self.state_file, {"fingerprint": self.fingerprint, "done": self.done})

    def restore(self, model: nn.Module, prefix: str, load_weights: bool = True) -> tuple[int, dict[str, torch.Tensor]]:
        """Load finished blocks into `model`; return (first block to prune, masks of finished blocks).

        With `load_weights=False` (disk offload) the blocks are read from their files when their turn comes.
        """
        state = json.loads(self.state_file.read_text())
        if state["fingerprint"] != self.fingerprint:
            changed = sorted(
                k
                for k in set(state["fingerprint"]) | set(self.fingerprint)
                if state["fingerprint"].get(k) != self.fingerprint.get(k)
            )
            raise UserError(
                f"cannot resume from {self.work}: it was started with different settings ({', '.join(changed)}); "
                "rerun with the same settings, or pass --overwrite to start over"
            )
        blocks = find_blocks(model)
        masks: dict[str, torch.Tensor] = {}
        done = sorted(state["done"])
        if done != list(range(len(done))):
            raise UserError(
                f"checkpoint in {self.work} is inconsistent (blocks {done}): pass --overwrite to start over"
            )
        for i in done:
            tensors = load_file(str(self.work / f"block-{i:04d}.safetensors"))
            if not load_weights:
                continue
            weights = {k: v for k, v in tensors.items() if not k.startswith(_MASK)}
            blocks[i].load_state_dict(weights, strict=True)
            masks.update({f"{prefix}.{i}.{k[len(_MASK) :]}": v for k, v in tensors.items() if k.startswith(_MASK)})
        self.done = done
        log.info("resuming: blocks 0-%d restored from %s", len(done) - 1, self.work) if done else None
        return len(done), masks

    def save_block(self, index: int, block: nn.Module, block_masks: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
        tensors.update({_MASK + k: v.contiguous() for k, v in block_masks.items()})
        path = self.work / f"block-{index:04d}.safetensors"
        tmp = path.with_suffix(".tmp")
        need = sum(t.numel() * t.element_size() for t in tensors.values())
        try:
            with writing(path, need):  # a full disk (safetensors raises SafetensorError): one line, no partial file
                save_file(tensors, str(tmp))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        with deferred_signals():  # Ctrl-C lands before the block is in place or after it is recorded, not between
            os.replace(tmp, path)
            self.done.append(index)
            self._write_state()
            KEPT_FOR_RESUME[str(self.work)] = f"{len(self.done)} finished block(s)"

    def clear(self) -> None:
        KEPT_FOR_RESUME.pop(str(self.work), None)
        shutil.rmtree(self.work, ignore_errors=True)


def load_masks(folder: Path) -> dict[str, torch.Tensor]:
    """Keep-masks of a pruned checkpoint: `masks.safetensors`, or the per-block shards of --offload disk."""
    folder = Path(folder)
    if (folder / "masks.safetensors").is_file():
        return load_file(str(folder / "masks.safetensors"))
    index = folder / "masks.safetensors.index.json"
    if not index.is_file():
        raise UserError(f"{folder} has no masks (masks.safetensors): is it a sparsedeploy prune output?")
    masks: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        masks.update(load_file(str(folder / shard)))
    return masks
