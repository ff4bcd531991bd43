"""The static decoder-stack graphs (prefill over `seq` tokens, one decode step over a KV cache given as inputs)
and the NumPy head beside them: the whole model in the form DeepSparse 1.8 compiles, run by runtimes.decoder_stack."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from sparsedeploy.common.errors import UserError


def head_dim_of(config) -> int:
    """Per-head size of a transformers config (`head_dim` when set, else hidden / heads)."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


class _InputCache:
    """The smallest cache a LLaMA attention accepts: layer i's past K/V are graph inputs, `update` appends the
    step's own K/V to them (what the attention attends over) and keeps those new rows as graph outputs."""

    def __init__(self, layers: int, past: list[tuple]) -> None:
        self.past, self.new = past, [None] * layers

    def update(self, key, value, layer_idx: int, cache_kwargs=None):
        import torch

        self.new[layer_idx] = (key, value)
        if not self.past:
            return key, value
        past_key, past_value = self.past[layer_idx]
        return torch.cat([past_key, key], dim=2), torch.cat([past_value, value], dim=2)


def decoder_stack_names(layers: int, past: int) -> tuple[list[str], list[str]]:
    """Input and output names of the decoder-stack form (see export_decoder_stack)."""
    cache = [f"{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    inputs = ["hidden", "cos", "sin", "mask"] + ([f"past_{n}" for n in cache] if past else [])
    return inputs, ["out"] + [f"new_{n}" for n in cache]


def load_eager_float32(checkpoint: Path):
    """A LLaMA-style checkpoint in float32 with eager attention (what the decoder-stack forms are traced from)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(checkpoint), attn_implementation="eager", dtype=torch.float32
    ).eval()
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("layers", "norm", "rotary_emb", "embed_tokens")):
        raise UserError(
            f"{checkpoint}: not a LLaMA-style model (model.layers/norm/rotary_emb): the decoder-stack form cannot be "
            "built"
        )
    return model


def export_decoder_stack(
    checkpoint: Path, out: Path, batch: int, seq: int, opset: int = 14, past: int = 0, model=None
) -> Path:
    """All decoder blocks of a LLaMA-style checkpoint as one static-shape ONNX graph (the form DeepSparse 1.8 compiles).

    Inputs: hidden [batch, seq, h], the rotary cos/sin [batch, seq, d] of the tokens' positions and an additive
    mask [batch, 1, seq, past + seq]; with `past` > 0 (a decode step) also each layer's cached keys and values
    `past_key_i`/`past_value_i` [batch, kv_heads, past, d]. Outputs: the final-norm hidden states `out` and
    each layer's keys/values of these `seq` tokens (`new_key_i`/`new_value_i`), which a runtime appends to its
    cache. Eager attention: DeepSparse aborts (graph.cpp:925) on the full optimum export; this form leaves the
    embedding lookup, lm_head, mask construction and cache bookkeeping to the caller
    (sparsedeploy.runtimes.decoder_stack).
    `model`: the checkpoint already loaded by load_eager_float32.
    """
    import torch

    from sparsedeploy.onnx.storage import load_model_proto, save_model_proto

    model = model if model is not None else load_eager_float32(checkpoint)
    inner = model.model
    layers = len(inner.layers)

    class Stack(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers, self.norm = inner.layers, inner.norm

        def forward(self, hidden, cos, sin, mask, *cache):
            kv = _InputCache(layers, [(cache[2 * i], cache[2 * i + 1]) for i in range(len(cache) // 2)])
            for layer in self.layers:
                o = layer(
                    hidden, attention_mask=mask, position_embeddings=(cos, sin), past_key_values=kv, use_cache=True
                )
                hidden = o[0] if isinstance(o, tuple) else o
            return (self.norm(hidden), *[t for pair in kv.new for t in pair])

    cfg = model.config
    head_dim = head_dim_of(cfg)
    hidden = torch.zeros(batch, seq, cfg.hidden_size)
    cos, sin = inner.rotary_emb(hidden, torch.arange(past, past + seq)[None].expand(batch, seq))
    mask = torch.zeros(batch, 1, seq, past + seq)
    mask[..., past:] = torch.full((seq, seq), torch.finfo(torch.float32).min).triu(1)
    cache = [torch.zeros(batch, cfg.num_key_value_heads, past, head_dim) for _ in range(2 * layers if past else 0)]
    input_names, output_names = decoder_stack_names(layers, past)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".stack-", dir=out.parent) as tmp, torch.no_grad():
        # Through a scratch directory: past 2 GB (a 1B model in fp32) torch writes one external file per
        # tensor; save_model_proto rewrites it as out + out.onnx_data, one file that travels with it.
        torch.onnx.export(
            Stack(),
            (hidden, cos, sin, mask, *cache),
            str(Path(tmp) / "stack.onnx"),
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            dynamo=False,
        )
        save_model_proto(load_model_proto(Path(tmp) / "stack.onnx"), out)
    return out


def write_stack_files(
    model_dir: Path, out_dir: Path, batch: int, seq: int, context: int, opset: int = 14, model=None
) -> dict[str, Path]:
    """The three files sparsedeploy.runtimes.decoder_stack runs: prefill graph (`seq` tokens), decode-step graph
    (KV cache of `context` slots) and the embedding/lm_head/rotary tables, for a static `batch`."""
    from sparsedeploy.runtimes.decoder_stack import HEAD_FILE, PREFILL_FILE, STEP_FILE

    model = model if model is not None else load_eager_float32(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "prefill": export_decoder_stack(model_dir, out_dir / PREFILL_FILE, batch, seq, opset, model=model),
        "step": export_decoder_stack(model_dir, out_dir / STEP_FILE, batch, 1, opset, past=context, model=model),
        "head": out_dir / HEAD_FILE,
    }
    write_head(model, files["head"], batch, seq, context)
    return files


def write_head(model, path: Path, batch: int, seq: int, context: int) -> Path:
    """The embedding matrix, lm_head (when not tied) and rotary tables of a loaded model, with the static shapes of
    the graphs they go with (runtimes.decoder_stack.StackHead)."""
    import torch

    inner, cfg = model.model, model.config
    with torch.no_grad():
        cos, sin = inner.rotary_emb(torch.zeros(1, 1, cfg.hidden_size), torch.arange(max(seq, context))[None])
        arrays = {
            "embed": inner.embed_tokens.weight.float().numpy(),
            "cos": cos[0].numpy(),
            "sin": sin[0].numpy(),
            "batch": batch,
            "seq": seq,
            "context": context,
            "layers": len(inner.layers),
            "kv_heads": cfg.num_key_value_heads,
            "head_dim": head_dim_of(cfg),
        }
        if model.lm_head.weight.data_ptr() != inner.embed_tokens.weight.data_ptr():
            arrays["lm_head"] = model.lm_head.weight.float().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def write_form(checkpoint: Path, out: Path, spec, model, opset: int = 14) -> Path:
    """One runtimes.stack_forms.FormSpec written to `out` from a loaded model (load_eager_float32)."""
    from sparsedeploy.runtimes.stack_forms import HEAD, PREFILL

    if spec.phase == HEAD:
        return write_head(model, out, spec.batch, spec.seq, spec.past)
    if spec.phase == PREFILL:
        return export_decoder_stack(checkpoint, out, spec.batch, spec.seq, opset, model=model)
    return export_decoder_stack(checkpoint, out, spec.batch, 1, opset, past=spec.past, model=model)
