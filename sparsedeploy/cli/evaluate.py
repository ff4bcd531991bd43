"""`sparsedeploy eval`: perplexity of a model, optionally against a dense baseline."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from sparsedeploy.cli.options import check_numbers, common_model, emit, with_options
from sparsedeploy.common.errors import UserError

log = logging.getLogger("sparsedeploy")


@click.command("eval")
@click.option("--model", required=True, help="HF id or directory, a .gguf file, or smollm2-135m")
@click.option(
    "--data",
    default=None,
    help=(
        "evaluation text: wikitext2:PATH, wikitext2, c4, text:PATH, jsonl:PATH "
        "[default: the offline WikiText-2 test file when found]"
    ),
)
@click.option("--seqlen", default=None, type=int, help="window length [default: min(2048, model max)]")
@click.option("--max-windows", default=None, type=int, help="score only the first K windows (bounds CPU cost)")
@click.option(
    "--baseline", default=None, help="also evaluate this (dense) model on the same windows and report the ratio"
)
@with_options(common_model)
@click.option(
    "--output", "-o", default=None, type=click.Path(path_type=Path), help="also write the result as JSON here"
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.pass_context
def eval_cmd(ctx, model, data, seqlen, max_windows, baseline, device, dtype, cache_dir, output, as_json):
    """Perplexity of MODEL (Wanda/SparseGPT protocol) and its measured sparsity."""
    from sparsedeploy.common.data import default_wikitext_test, eval_tokens, window_bos
    from sparsedeploy.common.evaluate import layer_sparsity, overall_sparsity, perplexity
    from sparsedeploy.common.files import check_writable, write_json_atomic
    from sparsedeploy.common.models import default_seqlen, load_model, resolve_device

    check_numbers(seqlen=(seqlen, 2), max_windows=(max_windows, 1))
    if output:
        if Path(output).is_dir():
            raise UserError(f"--output {output} is a directory: give a file name such as {Path(output) / 'eval.json'}")
        check_writable(output, "--output")  # before the evaluation, not after it
    if data is None:
        found = default_wikitext_test()
        if found is None:
            raise UserError(
                "no --data given and no offline WikiText-2 test file found: pass --data wikitext2:PATH/wiki.test.raw"
            )
        data = f"wikitext2:{found}"
    dev = resolve_device(device)
    lm = load_model(model, dtype, cache_dir)
    seqlen = seqlen or default_seqlen(lm.model)
    tokens = eval_tokens(lm.tokenizer, data)
    bos = window_bos(lm.model, lm.tokenizer)
    result = perplexity(lm.model, tokens, seqlen, dev, max_windows, show_progress=not ctx.obj["quiet"], bos=bos)
    layers = layer_sparsity(lm.model)
    out = {
        **result.to_dict(),
        "model": model,
        "data": data,
        "sparsity": overall_sparsity(layers),
        "device": str(dev),
        "dtype": dtype,
    }
    text = (
        f"perplexity {result.ppl:.3f} on {data} ({result.windows} windows x {seqlen}"
        f"{', each BOS + text' if result.bos_per_window else ''}, {result.tokens} tokens); "
        f"sparsity {out['sparsity']:.4f}"
    )
    if baseline:
        base_lm = load_model(baseline, dtype, cache_dir)
        base_bos = window_bos(base_lm.model, base_lm.tokenizer)
        base = perplexity(
            base_lm.model, tokens, seqlen, dev, max_windows, show_progress=not ctx.obj["quiet"], bos=base_bos
        )
        out["baseline"] = {
            "model": baseline,
            "ppl": base.ppl,
            "sparsity": overall_sparsity(layer_sparsity(base_lm.model)),
        }
        out["ppl_ratio"] = result.ppl / base.ppl
        text += f"\nbaseline {baseline}: perplexity {base.ppl:.3f}; ratio {out['ppl_ratio']:.3f}"
    if output:
        write_json_atomic(output, {**out, "layers": layers})
    emit(out, as_json, text)
