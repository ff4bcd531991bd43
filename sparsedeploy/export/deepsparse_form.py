"""The static forms beside an export: --target deepsparse's decoder-stack graphs DeepSparse 1.8 compiles with its
own kernels (prefill, decode step, embedding/lm_head tables; their greedy tokens PyTorch's), and every static form
bench times for deepsparse and tensorrt, listed in export_report.json's `static_forms`; zeros of each verified."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sparsedeploy.common.errors import UserError
from sparsedeploy.export.config import ExportConfig, bench_forms_engine
from sparsedeploy.runtimes import stack_forms as sf
from sparsedeploy.runtimes.stack_graphs import load_eager_float32, write_form, write_stack_files


class ZeroCheck:
    """Zeros of a written graph against the checkpoint's (the reference loaded once, on first use)."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir, self.reference = model_dir, None

    def __call__(self, path: Path, what: str) -> dict:
        from sparsedeploy.onnx.storage import load_model_proto
        from sparsedeploy.onnx.verify import checkpoint_reference, verify_sparsity

        if self.reference is None:
            self.reference = checkpoint_reference(self.model_dir, np.float32)
        sparsity = verify_sparsity(load_model_proto(path), *self.reference)
        if not sparsity.ok:
            raise UserError(f"the {what} graph lost zeros ({sparsity.problems[0]}): nothing written")
        found = sparsity.to_dict()
        return {k: found[k] for k in ("zeros_onnx", "zeros_torch")}


def write_static_forms(model_dir: Path, out_dir: Path, config: ExportConfig) -> dict:
    """Every static form the target needs, written beside the export: {"deepsparse_form": ..., "static_forms": ...}.

    --target deepsparse: the decoder stack `generate --engine deepsparse` runs (write_deepsparse_stack). For the
    bench engine of bench_forms_engine(config): per batch of bench_batch, the stack over bench_prompt_len tokens and
    a decode step over a cache of that length; for deepsparse with bench_gen_len > 0 also the generation bundle
    (decode step over prompt + gen_len slots, head). `static_forms` lists each file once (runtimes.stack_forms).
    """
    engine = bench_forms_engine(config)
    if config.target != "deepsparse" and engine is None:
        return {}
    model = load_eager_float32(model_dir)
    zeros = ZeroCheck(model_dir)
    out: dict = {}
    listed: dict[sf.FormSpec, Path] = {}
    if config.target == "deepsparse":
        out["deepsparse_form"] = write_deepsparse_stack(model_dir, out_dir, config, model=model, zeros=zeros)
        files = out["deepsparse_form"]["files"]
        bundle = sf.generation_specs(config.deepsparse_batch, config.deepsparse_seq, config.deepsparse_context)
        listed.update(
            {spec: out_dir / files["decode_step" if kind == "step" else kind] for kind, spec in bundle.items()}
        )
    gen_len = config.bench_gen_len if engine == "deepsparse" else 0
    specs = sf.bench_specs(config.bench_batch, config.bench_prompt_len, gen_len) if engine else []
    checked = {}
    for spec in specs:
        if spec in listed:
            continue
        listed[spec] = write_form(model_dir, out_dir / spec.file_name(), spec, model)
        if spec.phase != sf.HEAD and config.verify:
            checked[spec.file_name()] = zeros(listed[spec], f"{spec.phase} (batch {spec.batch})")
    out["static_forms"] = {
        "engine": engine,
        "batches": list(config.bench_batch) if engine else [],
        "prompt_len": config.bench_prompt_len if engine else None,
        "gen_len": gen_len,
        "files": [sf.entry(spec, path) for spec, path in listed.items()],
        "zeros": checked,
    }
    return out


def write_deepsparse_stack(
    model_dir: Path, out_dir: Path, config: ExportConfig, model=None, zeros: ZeroCheck | None = None
) -> dict:
    """For --target deepsparse: also write the whole model in the form DeepSparse 1.8's own engine compiles.

    The full decoder with KV cache aborts its engine (graph.cpp:925, with static shapes) and with dynamic
    shapes only reaches its bundled ONNX Runtime. What it compiles: the decoder stack (every block with its
    pruned weights, static shapes) for prefill, the same stack for one decode step over a KV cache of
    `deepsparse_context` slots, and the embedding/lm_head/rotary tables that sparsedeploy.runtimes.decoder_stack
    runs around them. Zeros of both graphs are verified like the main export's; with verification on,
    greedy generation through the three files (in ONNX Runtime) must give PyTorch's tokens.
    """
    from sparsedeploy.runtimes.decoder_stack import HEAD_FILE, PREFILL_FILE, STEP_FILE

    model = model if model is not None else load_eager_float32(model_dir)
    zeros = zeros or ZeroCheck(model_dir)
    batch, seq, context = config.deepsparse_batch, config.deepsparse_seq, config.deepsparse_context
    files = write_stack_files(model_dir, out_dir, batch, seq, context, model=model)
    counts = {name: zeros(files[name], f"DeepSparse {name}") for name in ("prefill", "step")}
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
