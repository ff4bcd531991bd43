"""Data-parallel calibration over several processes/GPUs through torch.distributed.

Launch with the standard launcher, e.g. `torchrun --nproc-per-node 4 -m sparsedeploy prune ...`.
Each rank runs the calibration engine on its share of the samples (samples[rank::world]); the
statistics every method uses are sums (count, Σx, Σx², XᵀX), so an all-reduce gives every rank the
statistics of all samples. Masks are then computed identically on every rank, and rank 0's pruned
weights are broadcast so the ranks cannot drift apart. Only rank 0 writes output.
Blocks stay sequential (block i+1 needs the pruned block i's outputs): the speed-up is over samples.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group that torchrun describes in the environment; return this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return device
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    log.info("rank %d of %d on %s (%s)", dist.get_rank(), dist.get_world_size(), device, backend)
    return device


def shard(samples: torch.Tensor) -> torch.Tensor:
    if not active():
        return samples
    return samples[dist.get_rank() :: dist.get_world_size()]


def all_reduce_stats(stats: dict) -> None:
    """Sum each distinct InputStats over the ranks (linears that share one are reduced once)."""
    if not active():
        return
    for st in {id(s): s for s in stats.values()}.values():
        count = torch.tensor([float(st.count)], device=st.sum.device)
        for t in (count, st.sum, st.sumsq) + ((st.xtx,) if st.xtx is not None else ()):
            dist.all_reduce(t)
        st.count = int(count.item())


def broadcast_block(block: nn.Module) -> None:
    if not active():
        return
    for tensor in block.state_dict().values():
        dist.broadcast(tensor, src=0)


def all_reduce_sum(value: float) -> float:
    """A float summed over the ranks (the value itself in a single process)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())
