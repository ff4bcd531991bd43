"""--target deepsparse's second form: the decoder-stack graphs DeepSparse 1.8 compiles with its own kernels
(prefill, decode step, embedding/lm_head tables), their zeros verified and their greedy tokens PyTorch's."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sparsedeploy.common.errors import UserError
from sparsedeploy.export.config import ExportConfig
from sparsedeploy.runtimes.stack_graphs import load_eager_float32, write_stack_files


def write_deepsparse_stack(model_dir: Path, out_dir: Path, config: ExportConfig) -> dict:
    """For --target deepsparse: also write the whole model in the form DeepSparse 1.8's own engine compiles.

    The full decoder with KV cache aborts its engine (graph.cpp:925, with static shapes) and with dynamic
    shapes only reaches its bundled ONNX Runtime. What it compiles: the decoder stack (every block with its
    pruned weights, static shapes) for prefill, the same stack for one decode step over a KV cache of
    `deepsparse_context` slots, and the embedding/lm_head/rotary tables that sparsedeploy.runtimes.decoder_stack
    runs around them. Zeros of both graphs are verified like the main export's; with verification on,
    greedy generation through the three files (in ONNX Runtime) must give PyTorch's tokens.
    """
    from sparsedeploy.onnx.storage import load_model_proto
    from sparsedeploy.onnx.verify import checkpoint_reference, verify_sparsity
    from sparsedeploy.runtimes.decoder_stack import HEAD_FILE, PREFILL_FILE, STEP_FILE

    model = load_eager_float32(model_dir)
    batch, seq, context = config.deepsparse_batch, config.deepsparse_seq, config.deepsparse_context
    files = write_stack_files(model_dir, out_dir, batch, seq, context, model=model)
    reference, masks, nm = checkpoint_reference(model_dir, np.float32)
    counts = {}
    for name in ("prefill", "step"):
        sparsity = verify_sparsity(load_model_proto(files[name]), reference, masks, nm)
        if not sparsity.ok:
            raise UserError(f"the DeepSparse {name} graph lost zeros ({sparsity.problems[0]}): nothing written")
        found = sparsity.to_dict()
        counts[name] = {k: found[k] for k in ("zeros_onnx", "zeros_torch")}
    form = {
        "files": {"prefill": PREFILL_FILE, "decode_step": STEP_FILE, "head": HEAD_FILE},
        "batch": batch,
        "seq": seq,
        "context": context,
        "zeros": counts,
        "note": "all decoder blocks (attention, norms, MLP) with static shapes, for prefill and for a decode step over "
        "a KV cache: the form DeepSparse 1.8 compiles with its own kernels; sparsedeploy.runtimes.decoder_stack runs "
        "the embedding lookup and lm_head (deepsparse_head.npz) around them (see docs/export.md)",
    }
    if config.verify:
        form["generation"] = verify_stack_generation(model, model_dir, out_dir, config)
        bad = next((r for r in form["generation"]["prompts"] if not r["identical"]), None)
        if bad is not None:
            raise UserError(
                f"greedy generation through the DeepSparse graphs differs from PyTorch for {bad['prompt']!r} "
                f"from token {bad['first_divergence']} on: nothing written"
            )
    return form


def verify_stack_generation(model, model_dir: Path, out_dir: Path, config: ExportConfig) -> dict:
    """Greedy tokens through the decoder-stack files (run in ONNX Runtime) against the PyTorch model's own."""
    import torch

    from sparsedeploy.onnx.decoder import load_tokenizer
    from sparsedeploy.onnx.storage import session_from_path
    from sparsedeploy.onnx.verify import DEFAULT_PROMPTS, _prompt_ids
    from sparsedeploy.runtimes.decoder_stack import HEAD_FILE, PREFILL_FILE, STEP_FILE, StackHead, greedy, session_graph

    head = StackHead.load(out_dir / HEAD_FILE)
    graphs = {
        name: session_graph(session_from_path(out_dir / file))
        for name, file in (("prefill", PREFILL_FILE), ("step", STEP_FILE))
    }
    tokenizer = load_tokenizer(model_dir)
    prompts = config.prompts or DEFAULT_PROMPTS
    results = []
    for text, prompt_ids in zip(prompts, _prompt_ids(tokenizer, prompts, model.config.vocab_size)):
        ids = prompt_ids[:, : head.seq].repeat(head.batch, axis=0)
        new = min(config.greedy_tokens, head.context - ids.shape[1] + 1)
        got = greedy(head, graphs["prefill"], graphs["step"], ids, new)
        expected, past, x = [], None, torch.from_numpy(ids)
        with torch.no_grad():
            for _ in range(new):
                out = model(input_ids=x, past_key_values=past, use_cache=True)
                past, x = out.past_key_values, out.logits[:, -1].argmax(-1)[:, None]
                expected.append(x.numpy())
        expected = np.concatenate(expected, axis=1)
        differ = np.flatnonzero((got != expected).any(axis=0))
        results.append(
            {
                "prompt": text,
                "new_tokens": new,
                "identical": differ.size == 0,
                "first_divergence": int(differ[0]) if differ.size else None,
                "tokens": got[0].tolist(),
            }
        )
        if tokenizer is not None:
            results[-1]["text"] = tokenizer.decode(got[0].tolist(), skip_special_tokens=True)
    return {"identical": all(r["identical"] for r in results), "prompts": results}
