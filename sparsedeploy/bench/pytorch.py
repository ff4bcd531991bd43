"""`bench --engine torch`: checkpoints in PyTorch; on CUDA the sparse model's 2:4 linears run semi-structured,
eager or replayed as CUDA graphs over a static KV cache."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sparsedeploy.bench.config import BenchConfig
from sparsedeploy.bench.report import phase_rows
from sparsedeploy.common.errors import UserError
from sparsedeploy.common.timing import run_interleaved

log = logging.getLogger(__name__)


def to_semi_structured(model, min_dim: int = 64) -> int:
    """Replace every 2:4-sparse nn.Linear weight by a torch semi-structured sparse tensor; returns how many."""
    import torch
    from torch.sparse import to_sparse_semi_structured

    from sparsedeploy.common.sparsity import satisfies_nm

    count = 0
    for name, mod in model.named_modules():
        if (
            isinstance(mod, torch.nn.Linear)
            and "lm_head" not in name
            and min(mod.weight.shape) >= min_dim
            and satisfies_nm(mod.weight.detach(), 2, 4)
        ):
            mod.weight = torch.nn.Parameter(to_sparse_semi_structured(mod.weight.detach()), requires_grad=False)
            count += 1
    return count


class TorchCausalLM:
    """A checkpoint in PyTorch, timed over greedy generation: eager with a DynamicCache, or (``graphs``) each
    phase replayed as a CUDA graph over a static KV cache (sparsedeploy.runtimes.static_cache)."""

    def __init__(self, path: Path, device, dtype, semi_structured: bool, graphs: bool = False) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.device, self.graphs = device, graphs
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
        self.converted = to_semi_structured(self.model) if semi_structured else 0
        self.torch = torch
        self.static = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def _prompt(self, batch: int, prompt_len: int):
        gen = self.torch.Generator().manual_seed(0)
        vocab = int(self.model.config.vocab_size)
        return self.torch.randint(min(10, vocab - 1), vocab, (batch, prompt_len), generator=gen).to(self.device)

    def prepare(self, batch: int, prompt_len: int, gen_len: int) -> None:
        """With graphs: allocate the static cache and capture both phases for this shape (once per shape, before
        the timed part of the first generate)."""
        from sparsedeploy.runtimes.static_cache import GenerationShape, StaticGenerator

        if not self.graphs:
            return
        shape = GenerationShape(batch, prompt_len, gen_len)
        if self.static is None or self.static.shape != shape:
            self.static = None  # free the previous shape's cache and graphs first
            try:
                self.static = StaticGenerator(self.model, shape, self.device, graphs=True)
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UserError(
                    f"CUDA graph capture failed for this model ({first}): run the bench without --cuda-graphs"
                ) from exc

    def generate(self, batch: int, prompt_len: int, gen_len: int) -> dict[str, float]:
        if self.graphs:
            return self._generate_graphed(batch, prompt_len, gen_len)
        torch = self.torch
        ids = self._prompt(batch, prompt_len)
        with torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            out = self.model(input_ids=ids, use_cache=True)
            self._sync()
            t1 = time.perf_counter()
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(gen_len):
                out = self.model(input_ids=nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            self._sync()
            t2 = time.perf_counter()
        return {"prefill": t1 - t0, "decode": t2 - t1, "total": t2 - t0}

    def _generate_graphed(self, batch: int, prompt_len: int, gen_len: int) -> dict[str, float]:
        self.prepare(batch, prompt_len, gen_len)
        ids = self._prompt(batch, prompt_len)
        self._sync()
        t0 = time.perf_counter()
        self.static.prefill(ids)
        self._sync()
        t1 = time.perf_counter()
        for _ in range(gen_len):
            self.static.decode()
        self._sync()
        t2 = time.perf_counter()
        return {"prefill": t1 - t0, "decode": t2 - t1, "total": t2 - t0}


def bench_torch(cfg: BenchConfig, variants: dict[str, Path], progress=None) -> tuple[list[dict], dict]:
    import torch

    from sparsedeploy.common.models import resolve_device, resolve_dtype

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype)
    semi = device.type == "cuda"
    if semi and dtype not in (torch.float16, torch.bfloat16):
        raise UserError("2:4 semi-structured kernels need --dtype float16 or bfloat16")
    torch.set_num_threads(cfg.threads)
    models = {
        name: TorchCausalLM(path, device, dtype, semi and name != "dense", graphs=cfg.cuda_graphs)
        for name, path in variants.items()
    }
    notes = {
        "device": str(device),
        "dtype": cfg.dtype,
        "semi_structured_linears": {n: m.converted for n, m in models.items()},
        "cuda_graphs": cfg.cuda_graphs,
        "tensorrt": (
            "not measured: the tensorrt package is not importable here"
            if not _importable("tensorrt")
            else "not measured in this run: `sparsedeploy bench --engine tensorrt --device cuda` builds dense and "
            "2:4-sparse TensorRT engines from the exports"
        ),
    }
    form = "full model, torch " + (
        "2:4 semi-structured sparse linears" if semi else "dense kernels on zeroed weights (CPU: no 2:4 kernels)"
    )
    form += (
        ", each phase replayed as a CUDA graph over a static KV cache"
        if cfg.cuda_graphs
        else ", eager (host-side dispatch and kernel setup included)"
    )
    rows = []
    for batch in cfg.batches:
        runners = {name: (lambda m=m: m.generate(batch, cfg.prompt_len, cfg.gen_len)) for name, m in models.items()}
        res = run_interleaved(
            runners, rounds=cfg.rounds, per_round=cfg.per_round, warmup=cfg.warmup, max_seconds=cfg.max_seconds
        )
        new = phase_rows(res, list(variants), batch, cfg.prompt_len, cfg.gen_len, form, "torch")
        rows.extend(new)
        if progress:
            progress(new)
    return rows, notes


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
