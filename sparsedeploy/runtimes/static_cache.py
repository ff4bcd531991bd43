"""Greedy generation with a static KV cache, each phase replayable as one CUDA graph.

Eager PyTorch pays host-side work for every linear it calls; for 2:4 semi-structured weights that is
0.5-1 ms of cuSPARSELt setup per call in torch 2.11 (docs/bench.md), so an eager decode step of a
30-layer model costs far more on the CPU side than on the GPU and the sparse model looks ~10x slower
than the dense one. A deployment runtime does that host-side work once: here the prefill and the
decode step are captured once in a CUDA graph each and replayed, so what is timed is GPU work.

To be capturable everything has a fixed shape and a fixed address: a transformers ``StaticCache``
of ``prompt_len + gen_len`` slots, the prompt buffer, the current token and its cache position. The
prefill writes the first generated token and sets the position; each decode step reads the token at
that position, writes the next one and advances the position, all on the device. Without graphs
(``graphs=False``, and on CPU) the same functions run eagerly, which is what the tests compare
against the model's own generation with a DynamicCache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GenerationShape:
    batch: int
    prompt_len: int
    gen_len: int


class StaticGenerator:
    """Greedy generation of ``shape.gen_len`` tokens after a prompt, with every buffer allocated once."""

    def __init__(self, model, shape: GenerationShape, device: torch.device, graphs: bool, warmup: int = 2) -> None:
        from transformers import StaticCache

        if graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.model, self.shape, self.device = model, shape, device
        # one slot at least after the prompt: the decode step is captured (and warmed up) even for gen_len 0
        self.cache = StaticCache(config=model.config, max_cache_len=shape.prompt_len + max(shape.gen_len, 1))
        self.prompt = torch.zeros((shape.batch, shape.prompt_len), dtype=torch.long, device=device)
        self.prompt_positions = torch.arange(shape.prompt_len, device=device)
        self.token = torch.zeros((shape.batch, 1), dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs = None
        if graphs:
            with torch.inference_mode():
                self.graphs = (
                    capture(self._prefill, device, warmup),
                    capture(self._decode, device, warmup, before=self.rewind),
                )

    def _greedy_step(self, input_ids: torch.Tensor, positions: torch.Tensor) -> None:
        """One forward through the static cache at `positions`; its greedy next token into ``self.token``."""
        out = self.model(
            input_ids=input_ids,
            cache_position=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.token.copy_(out.logits[:, -1].argmax(-1, keepdim=True))

    def _prefill(self) -> None:
        self._greedy_step(self.prompt, self.prompt_positions)
        self.rewind()

    def rewind(self) -> None:
        """To the first decode position: where the prefill leaves it, and where each decode warm-up starts again
        (so warm-up steps stay inside the cache)."""
        self.position.fill_(self.shape.prompt_len)

    def _decode(self) -> None:
        self._greedy_step(self.token, self.position)
        self.position.add_(1)

    def prefill(self, prompt: torch.Tensor) -> None:
        """Run the prompt; afterwards ``self.token`` holds the first generated token."""
        self.prompt.copy_(prompt)
        with torch.inference_mode():
            self.graphs[0].replay() if self.graphs else self._prefill()

    def decode(self) -> None:
        """One decode step: ``self.token`` is replaced by the next one."""
        with torch.inference_mode():
            self.graphs[1].replay() if self.graphs else self._decode()

    def generate(self, prompt: torch.Tensor) -> torch.Tensor:
        """The ``gen_len + 1`` greedy tokens after the prompt (the prefill's token, then one per decode step)."""
        self.prefill(prompt)
        tokens = [self.token.clone()]
        for _ in range(self.shape.gen_len):
            self.decode()
            tokens.append(self.token.clone())
        return torch.cat(tokens, dim=1)


def warm_up(fn, runs: int, before=None) -> None:
    """``runs`` eager calls of ``fn`` (lazy allocations, library setup), each after ``before`` when given."""
    for _ in range(runs):
        if before is not None:
            before()
        fn()


def capture(fn, device: torch.device, warmup: int = 2, before=None) -> torch.cuda.CUDAGraph:
    """``fn`` recorded as a CUDA graph, after ``warmup`` eager runs on a side stream (see warm_up)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        warm_up(fn, warmup, before)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize(device)
    return graph
