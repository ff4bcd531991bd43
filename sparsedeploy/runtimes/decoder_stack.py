"""Greedy generation over the two static decoder-stack graphs: the whole model in the form DeepSparse 1.8 compiles.

`sparsedeploy export --target deepsparse` writes three files beside the export:
- ``deepsparse_decoder_stack.onnx``: prefill, every decoder block over a prompt of up to `seq` tokens;
- ``deepsparse_decode_step.onnx``: one token per sequence through every block, attending to a KV cache of
  `context` slots given as inputs (slots not yet filled are masked out);
- ``deepsparse_head.npz``: the embedding matrix, lm_head and the rotary cos/sin of every position.
The embedding lookup, lm_head, masks and cache bookkeeping run here in NumPy; the graphs run in whatever
engine the caller passes (a DeepSparse engine in its venv, an ONNX Runtime session in the main one).

NumPy only: the DeepSparse worker imports this module inside its own virtualenv (numpy<2).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PREFILL_FILE = "deepsparse_decoder_stack.onnx"
STEP_FILE = "deepsparse_decode_step.onnx"
HEAD_FILE = "deepsparse_head.npz"

Graph = Callable[[list[np.ndarray]], list[np.ndarray]]  # inputs in graph order -> outputs in graph order
MASKED = np.finfo(np.float32).min


@dataclass
class StackHead:
    embed: np.ndarray  # [vocab, hidden]
    lm_head: np.ndarray  # [vocab, hidden]
    cos: np.ndarray  # [positions, head_dim]: rotary tables of positions 0..context
    sin: np.ndarray
    batch: int  # static shapes of the two graphs
    seq: int  # prefill tokens
    context: int  # KV-cache slots of the decode step
    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def load(cls, path: Path | str) -> StackHead:
        with np.load(str(path)) as z:
            arrays = {k: z[k] for k in z.files}
        lm_head = arrays.pop("lm_head", arrays["embed"])  # tied embeddings are stored once
        dims = {k: int(arrays[k]) for k in ("batch", "seq", "context", "layers", "kv_heads", "head_dim")}
        return cls(embed=arrays["embed"], lm_head=lm_head, cos=arrays["cos"], sin=arrays["sin"], **dims)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        return hidden @ self.lm_head.T


def greedy(
    head: StackHead,
    prefill: Graph,
    step: Graph,
    ids: np.ndarray,
    new_tokens: int,
    timings: dict[str, list[float]] | None = None,
) -> np.ndarray:
    """Greedy continuation of `ids` [batch, n] by `new_tokens` tokens -> [batch, new_tokens].

    Prefill pads the prompt on the right to the graph's `seq` tokens (the causal mask keeps the padding out
    of the real positions) and copies the prompt's keys/values into a cache of `context` slots; each decode
    step masks the slots not yet filled and writes its own keys/values into the next slot. With `timings`,
    the wall time of the prefill and of every step (NumPy work included) is appended under those names.
    """
    batch, n = ids.shape
    if batch != head.batch:
        raise ValueError(f"the graphs were exported for batch {head.batch}, got {batch} prompts")
    if not 1 <= n <= head.seq:
        raise ValueError(f"prompt of {n} tokens: the prefill graph takes 1..{head.seq}")
    if new_tokens < 1 or n + new_tokens - 1 > head.context:
        raise ValueError(
            f"{n} prompt + {new_tokens} new tokens do not fit the decode step's cache of {head.context} slots"
        )
    t0 = time.perf_counter()
    hidden = np.zeros((batch, head.seq, head.embed.shape[1]), np.float32)
    hidden[:, :n] = head.embed[ids]
    cos = np.broadcast_to(head.cos[None, : head.seq], (batch, head.seq, head.head_dim)).copy()
    sin = np.broadcast_to(head.sin[None, : head.seq], (batch, head.seq, head.head_dim)).copy()
    causal = np.triu(np.full((head.seq, head.seq), MASKED, np.float32), 1)
    mask = np.broadcast_to(causal, (batch, 1, head.seq, head.seq)).copy()
    out = prefill([hidden, cos, sin, mask])
    cache = [np.zeros((batch, head.kv_heads, head.context, head.head_dim), np.float32) for _ in range(2 * head.layers)]
    for slot, new in zip(cache, out[1:], strict=True):
        slot[:, :, :n] = new[:, :, :n]
    tokens = [head.logits(out[0][:, n - 1]).argmax(-1)]
    if timings is not None:
        timings.setdefault("prefill", []).append(time.perf_counter() - t0)
    for pos in range(n, n + new_tokens - 1):
        t0 = time.perf_counter()
        hidden = head.embed[tokens[-1]][:, None].astype(np.float32)
        cos = np.broadcast_to(head.cos[pos], (batch, 1, head.head_dim)).copy()
        sin = np.broadcast_to(head.sin[pos], (batch, 1, head.head_dim)).copy()
        mask = np.zeros((batch, 1, 1, head.context + 1), np.float32)
        mask[..., pos : head.context] = MASKED  # empty slots; the last column is the token itself
        out = step([hidden, cos, sin, mask, *cache])
        for slot, new in zip(cache, out[1:], strict=True):
            slot[:, :, pos] = new[:, :, 0]
        tokens.append(head.logits(out[0][:, 0]).argmax(-1))
        if timings is not None:
            timings.setdefault("step", []).append(time.perf_counter() - t0)
    return np.stack(tokens, axis=1)


def random_prompt(head: StackHead, tokens: int, seed: int = 0) -> np.ndarray:
    """[batch, tokens] random token ids (speed does not depend on them), as the ORT bench draws them."""
    vocab = head.embed.shape[0]
    return np.random.default_rng(seed).integers(min(10, vocab - 1), vocab, size=(head.batch, tokens), dtype=np.int64)


def generation_phases(
    head: StackHead, prefill: Graph, step: Graph, ids: np.ndarray, decode_steps: int
) -> dict[str, float]:
    """One timed generation: prefill of `ids`, then `decode_steps` decode steps -> seconds per phase (as the
    ORT bench reports them: prefill, decode, total)."""
    timings: dict[str, list[float]] = {}
    greedy(head, prefill, step, ids, decode_steps + 1, timings)
    pre, dec = timings["prefill"][0], sum(timings.get("step", []))
    return {"prefill": pre, "decode": dec, "total": pre + dec}


def session_graph(session) -> Graph:
    """A Graph from an onnxruntime.InferenceSession (inputs in graph order, as greedy passes them)."""
    names = [i.name for i in session.get_inputs()]
    return lambda arrays: session.run(None, dict(zip(names, arrays, strict=True)))
