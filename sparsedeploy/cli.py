"""The `sparsedeploy` command line: parsing and printing only; the work lives in the library."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from sparsedeploy.errors import UserError

log = logging.getLogger("sparsedeploy")


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


def emit(data: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, default=str) if as_json else text)


common_model = [
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N"),
    click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16", "bfloat16"])),
    click.option("--cache-dir", default=None, help="where converted checkpoints are cached [default: $SPARSEDEPLOY_CACHE or ~/.cache/sparsedeploy]"),
]


def with_options(options):
    def wrap(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return wrap


# Method-specific prune options: (click option, keyword of the method class, methods it applies to).
_METHOD_FLAGS = {
    "init": ("init", ("dsnot",)),
    "dsnot_targets": ("targets", ("dsnot",)),
    "dsnot_mode": ("mode", ("dsnot",)),
    "max_cycles": ("max_cycles", ("dsnot",)),
    "update_threshold": ("update_threshold", ("dsnot",)),
    "pow_of_var_regrowing": ("pow_of_var_regrowing", ("dsnot",)),
    "no_sign_flip": ("no_sign_flip", ("dsnot",)),
    "verify_rows": ("verify_rows", ("dsnot",)),
    "blocksize": ("blocksize", ("sparsegpt", "dsnot")),
    "percdamp": ("percdamp", ("sparsegpt", "dsnot")),
}
method_option_flags = [
    click.option("--init", default=None, type=click.Choice(["wanda", "sparsegpt", "magnitude"]), help="dsnot: initial method [default: wanda]"),
    click.option("--dsnot-targets", default=None, type=click.Choice(["all", "attn", "mlp"]), help="dsnot: linears to refine [default: all]"),
    click.option("--dsnot-mode", default=None, type=click.Choice(["verified", "paper", "second-order"]), help="dsnot: second-order (swaps chosen by the exact error change) or verified (the paper's mean criterion), both kept only where they lower the actual error; paper (as published) [default: second-order]"),
    click.option("--max-cycles", default=None, type=int, help="dsnot: prune-and-grow cycles per layer [default: 50]"),
    click.option("--update-threshold", default=None, type=float, help="dsnot: stop a row once its expected error is this small [default: 0.1]"),
    click.option("--pow-of-var-regrowing", default=None, type=float, help="dsnot: exponent p of Var[x]^p in the grow score [default: 1]"),
    click.option("--no-sign-flip", is_flag=True, default=None, help="dsnot: reject swaps that flip the sign of a row's expected error"),
    click.option("--verify-rows", is_flag=True, default=None,
                 help="dsnot: keep the refinement row by row where it lowers that row's actual error [default: per linear]; "
                      "matters for --dsnot-mode verified and --init sparsegpt (second-order swaps already lower each row's error)"),
    click.option("--blocksize", default=None, type=int, help="sparsegpt (or dsnot --init sparsegpt): OBS column block [default: 128]"),
    click.option("--percdamp", default=None, type=float, help="sparsegpt (or dsnot --init sparsegpt): dampening, fraction of mean diag(H) [default: 0.01]"),
]


def method_options_from_flags(method: str, flags: dict) -> dict:
    """Keyword options for the method from the given flags; a flag the method does not use is an error."""
    options = {}
    for flag, value in flags.items():
        if value is None or value is False:
            continue
        keyword, methods = _METHOD_FLAGS[flag]
        cli_name = "--" + flag.replace("_", "-")
        if method not in methods or (flag in ("blocksize", "percdamp") and method == "dsnot" and flags.get("init") != "sparsegpt"):
            needs = "--method sparsegpt or --method dsnot --init sparsegpt" if flag in ("blocksize", "percdamp") else "--method dsnot"
            raise UserError(f"{cli_name} does not apply to --method {method}{' without --init sparsegpt' if method == 'dsnot' else ''}: drop it or use {needs}")
        options[keyword] = value
    if "blocksize" in options and options["blocksize"] < 1:
        raise UserError(f"--blocksize {options['blocksize']} must be at least 1")
    if "percdamp" in options and not options["percdamp"] >= 0:
        raise UserError(f"--percdamp {options['percdamp']} must be 0 or more")
    return options


def check_numbers(**limits: tuple[float | None, float]) -> None:
    """Numeric options checked before any work: name=(value, least allowed); None means "not given"."""
    for name, (value, least) in limits.items():
        if value is not None and not value >= least:
            raise UserError(f"--{name.replace('_', '-')} {value} must be at least {least:g}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="show tracebacks")
@click.option("-q", "--quiet", is_flag=True, help="only warnings and results")
@click.version_option(package_name="sparsedeploy")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """Prune a causal LLM without retraining, check its quality, export and benchmark it."""
    ctx.ensure_object(dict)
    ctx.obj["quiet"] = quiet
    setup_logging(quiet)


@cli.command()
@click.option("--model", required=True, help="HF id or directory, a .gguf file, or smollm2-135m")
@click.option("--method", default="wanda", show_default=True, help="magnitude, wanda, sparsegpt, dsnot")
@click.option("--sparsity", default="0.5", show_default=True, help="fraction of zeros (0.5, 50%) or N:M (2:4, 4:8)")
@click.option("--calib", default="gensim-wiki", show_default=True, help="calibration text: gensim-wiki, wikitext2[:PATH], c4, text:PATH, jsonl:PATH")
@click.option("--nsamples", default=128, show_default=True, type=int, help="calibration windows")
@click.option("--seqlen", default=None, type=int, help="tokens per window [default: min(2048, model max)]")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--allocation", default="uniform", show_default=True, type=click.Choice(["uniform", "owl", "atp"]),
              help="per-layer sparsity: uniform, owl (outlier-weighted) or atp (increasing with depth); the overall mean stays the target")
@click.option("--owl-m", default=5.0, show_default=True, type=float, help="OWL: a score is an outlier above M x the block mean")
@click.option("--owl-lambda", default=0.08, show_default=True, type=float, help="OWL: largest deviation of a block's sparsity from the target")
@with_options(common_model)
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="output checkpoint directory")
@click.option("--overwrite", is_flag=True,
              help="replace an existing output directory that sparsedeploy wrote (and discard an interrupted run)")
@click.option("--resume", is_flag=True, help="continue an interrupted run from its last finished block")
@click.option("--offload", default="none", show_default=True, type=click.Choice(["none", "cpu", "disk"]),
              help="cpu: calibration activations stay in RAM; disk: weights stay on disk, one block in memory")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object")
@with_options(method_option_flags)
@click.pass_context
def prune(ctx, model, method, sparsity, calib, nsamples, seqlen, seed, allocation, owl_m, owl_lambda, device, dtype, cache_dir, output,
          overwrite, resume, offload, as_json, **method_flags):
    """Prune MODEL layer by layer over calibration data and write a sparse checkpoint."""
    from sparsedeploy.prune import PruneConfig, run_prune

    check_numbers(nsamples=(nsamples, 1), seqlen=(seqlen, 2), owl_m=(owl_m, 0), owl_lambda=(owl_lambda, 0))
    config = PruneConfig(model=model, method=method, sparsity=sparsity, calib=calib, nsamples=nsamples,
                         seqlen=seqlen, seed=seed, device=device, dtype=dtype, cache_dir=cache_dir,
                         method_options=method_options_from_flags(method, method_flags),
                         allocation=allocation, owl_m=owl_m, owl_lambda=owl_lambda)
    report = run_prune(config, output, overwrite=overwrite, show_progress=not ctx.obj["quiet"], resume=resume, offload=offload)
    if "overall_sparsity" not in report:  # a non-zero rank of a torchrun job: rank 0 reports
        return
    summary = {k: report[k] for k in ("method", "sparsity_spec", "overall_sparsity", "prune_seconds", "peak_rss_mib")}
    summary["output"] = str(output)
    emit(summary, as_json, f"pruned {model} with {method} at {report['sparsity_spec']}: sparsity {report['overall_sparsity']:.4f}, "
                           f"{report['prune_seconds']:.1f} s -> {output}")


@cli.command("eval")
@click.option("--model", required=True, help="HF id or directory, a .gguf file, or smollm2-135m")
@click.option("--data", default=None, help="evaluation text: wikitext2:PATH, wikitext2, c4, text:PATH, jsonl:PATH [default: the offline WikiText-2 test file when found]")
@click.option("--seqlen", default=None, type=int, help="window length [default: min(2048, model max)]")
@click.option("--max-windows", default=None, type=int, help="score only the first K windows (bounds CPU cost)")
@click.option("--baseline", default=None, help="also evaluate this (dense) model on the same windows and report the ratio")
@with_options(common_model)
@click.option("--output", "-o", default=None, type=click.Path(path_type=Path), help="also write the result as JSON here")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.pass_context
def eval_cmd(ctx, model, data, seqlen, max_windows, baseline, device, dtype, cache_dir, output, as_json):
    """Perplexity of MODEL (Wanda/SparseGPT protocol) and its measured sparsity."""
    from sparsedeploy.data import default_wikitext_test, eval_tokens
    from sparsedeploy.evaluate import layer_sparsity, overall_sparsity, perplexity
    from sparsedeploy.fsutil import write_json_atomic
    from sparsedeploy.models import default_seqlen, load_model, resolve_device

    check_numbers(seqlen=(seqlen, 2), max_windows=(max_windows, 1))
    if output:
        from sparsedeploy.fsutil import check_writable

        if Path(output).is_dir():
            raise UserError(f"--output {output} is a directory: give a file name such as {Path(output) / 'eval.json'}")
        check_writable(output, "--output")  # before the evaluation, not after it
    if data is None:
        found = default_wikitext_test()
        if found is None:
            raise UserError("no --data given and no offline WikiText-2 test file found: pass --data wikitext2:PATH/wiki.test.raw")
        data = f"wikitext2:{found}"
    dev = resolve_device(device)
    lm = load_model(model, dtype, cache_dir)
    seqlen = seqlen or default_seqlen(lm.model)
    tokens = eval_tokens(lm.tokenizer, data)
    result = perplexity(lm.model, tokens, seqlen, dev, max_windows, show_progress=not ctx.obj["quiet"])
    layers = layer_sparsity(lm.model)
    out = {**result.to_dict(), "model": model, "data": data, "sparsity": overall_sparsity(layers), "device": str(dev), "dtype": dtype}
    text = f"perplexity {result.ppl:.3f} on {data} ({result.windows} windows x {seqlen}, {result.tokens} tokens); sparsity {out['sparsity']:.4f}"
    if baseline:
        base_lm = load_model(baseline, dtype, cache_dir)
        base = perplexity(base_lm.model, tokens, seqlen, dev, max_windows, show_progress=not ctx.obj["quiet"])
        out["baseline"] = {"model": baseline, "ppl": base.ppl, "sparsity": overall_sparsity(layer_sparsity(base_lm.model))}
        out["ppl_ratio"] = result.ppl / base.ppl
        text += f"\nbaseline {baseline}: perplexity {base.ppl:.3f}; ratio {out['ppl_ratio']:.3f}"
    if output:
        write_json_atomic(output, {**out, "layers": layers})
    emit(out, as_json, text)


@cli.command()
@click.argument("recipe_file", required=False, type=click.Path(path_type=Path))
@click.option("--model", default=None, help="override recipe: model")
@click.option("--method", default=None, help="override recipe: prune.method")
@click.option("--sparsity", default=None, help="override recipe: prune.sparsity")
@click.option("--calib", default=None, help="override recipe: calibration.source")
@click.option("--nsamples", default=None, type=int, help="override recipe: calibration.nsamples")
@click.option("--seqlen", default=None, type=int, help="override recipe: calibration.seqlen and eval.seqlen")
@click.option("--eval-data", default=None, help="override recipe: eval.data")
@click.option("--max-windows", default=None, type=int, help="override recipe: eval.max_windows")
@click.option("--max-ppl-ratio", default=None, type=float, help="override recipe: gate.max_ppl_ratio")
@click.option("--max-ppl", default=None, type=float, help="override recipe: gate.max_ppl")
@click.option("--export/--no-export", "export_", default=None, help="override recipe: export.enabled")
@click.option("--bench/--no-bench", "bench", default=None, help="override recipe: bench.enabled")
@click.option("--device", default=None, help="override recipe: device")
@click.option("--allocation", default=None, help="override recipe: prune.allocation (uniform, owl, atp)")
@click.option("--offload", default=None, help="override recipe: offload (none, cpu, disk)")
@click.option("--export-target", default=None, help="override recipe: export.target (ort, deepsparse, tensorrt)")
@click.option("--export-dtype", default=None, help="override recipe: export.dtype (float32, float16)")
@click.option("--storage", default=None, help="override recipe: export.storage (dense, sparse)")
@click.option("--bench-engine", default=None, help="override recipe: bench.engine (ort, deepsparse, torch, tensorrt)")
@click.option("--batch", default=None, help="override recipe: bench.batch, comma-separated (e.g. 1,8)")
@click.option("--output", "-o", default=None, type=click.Path(path_type=Path), help="output directory [default: recipe output]")
@click.option("--overwrite", is_flag=True,
              help="replace an existing output directory that sparsedeploy wrote (and discard an interrupted run)")
@click.option("--resume", is_flag=True, help="continue an interrupted run: finished stages are kept, pruning resumes at its last block")
@click.option("--json", "as_json", is_flag=True, help="print the summary as one JSON object")
@click.pass_context
def run(ctx, recipe_file, model, method, sparsity, calib, nsamples, seqlen, eval_data, max_windows, max_ppl_ratio, max_ppl,
        export_, bench, device, allocation, offload, export_target, export_dtype, storage, bench_engine, batch, output, overwrite,
        resume, as_json):
    """Run a recipe end to end: prune -> evaluate -> quality gate -> export -> bench -> REPORT.md.

    Exits 3 when the quality gate fails (the report is still written), 2 on bad input.
    """
    from sparsedeploy.pipeline import GateFailed, Pipeline
    from sparsedeploy.recipe import load_recipe, parse_recipe

    check_numbers(nsamples=(nsamples, 1), seqlen=(seqlen, 2), max_windows=(max_windows, 1))
    data = {}
    if recipe_file is not None:
        recipe = load_recipe(recipe_file)
    else:
        recipe = parse_recipe(data)
    overrides = {("model",): model, ("prune", "method"): method, ("prune", "sparsity"): sparsity, ("calibration", "source"): calib,
                 ("calibration", "nsamples"): nsamples, ("calibration", "seqlen"): seqlen, ("eval", "seqlen"): seqlen,
                 ("eval", "data"): eval_data, ("eval", "max_windows"): max_windows, ("gate", "max_ppl_ratio"): max_ppl_ratio,
                 ("gate", "max_ppl"): max_ppl, ("export", "enabled"): export_, ("bench", "enabled"): bench, ("device",): device,
                 ("prune", "allocation"): allocation, ("offload",): offload, ("export", "target"): export_target,
                 ("export", "dtype"): export_dtype, ("export", "storage"): storage, ("bench", "engine"): bench_engine,
                 ("bench", "batch"): _batch_list(batch) if batch is not None else None}
    from dataclasses import asdict

    merged = asdict(recipe)
    for path, value in overrides.items():
        if value is not None:
            target = merged
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
    recipe = parse_recipe(merged)
    out = output or (Path(recipe.output) if recipe.output else None)
    if out is None:
        raise UserError("no output directory: pass --output DIR or set `output:` in the recipe")
    from sparsedeploy.fsutil import check_writable

    check_writable(out)
    try:
        report = Pipeline(recipe, out, overwrite=overwrite, resume=resume, show_progress=not ctx.obj["quiet"]).run()
    except GateFailed as exc:
        click.echo(f"quality gate FAILED: {exc}", err=True)
        sys.exit(3)
    dense = report["dense"]["ppl"] if report["dense"] else None
    summary = {"output": str(out), "gate": report["gate"], "dense_ppl": dense, "pruned_ppl": report["pruned"]["ppl"],
               "sparsity": report["pruned"]["sparsity"]}
    text = f"quality gate passed: perplexity {report['pruned']['ppl']:.3f}" + (f" (dense {dense:.3f})" if dense else "") + \
           f", sparsity {report['pruned']['sparsity']:.4f}; report: {out / 'REPORT.md'}"
    emit(summary, as_json, text)


def _batch_list(text: str) -> list[int]:
    try:
        values = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--batch {text!r} is not a comma-separated list of integers (e.g. 1,8)") from None
    if not values:
        raise UserError("--batch is empty: give batch sizes such as 1,8")
    return values


@cli.command("export")
@click.option("--model", required=True, help="pruned checkpoint directory (as written by `sparsedeploy prune`)")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="output directory for model.onnx + export_report.json")
@click.option("--task", default="text-generation-with-past", show_default=True, type=click.Choice(["text-generation-with-past", "text-generation"]))
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16"]))
@click.option("--opset", default=None, type=int, help="ONNX opset [default: the target's]")
@click.option("--target", default="ort", show_default=True, type=click.Choice(["ort", "deepsparse", "tensorrt"]), help="runtime the graph is shaped for")
@click.option("--storage", default="dense", show_default=True, type=click.Choice(["dense", "sparse"]), help="sparse: bitmap+values side file (smaller; needs sparsedeploy to load)")
@click.option("--optimize", default="none", show_default=True, type=click.Choice(["none", "basic", "extended", "all"]), help="ONNX Runtime graph optimisation saved into the file (refused when it breaks zeros or the target)")
@click.option("--exporter", default="auto", show_default=True, type=click.Choice(["auto", "optimum", "torch"]))
@click.option("--no-verify", is_flag=True, help="skip the sparsity and parity verification")
@click.option("--greedy-tokens", default=32, show_default=True, type=int, help="greedy tokens compared PyTorch vs ONNX Runtime")
@click.option("--decode-steps", default=4, show_default=True, type=int, help="KV-cache decode steps whose logits are compared")
@click.option("--deepsparse-batch", default=1, show_default=True, type=int, help="--target deepsparse: batch of the static decoder-stack graph")
@click.option("--deepsparse-seq", default=128, show_default=True, type=int, help="--target deepsparse: prompt tokens of the static prefill graph")
@click.option("--deepsparse-context", default=256, show_default=True, type=int,
              help="--target deepsparse: KV-cache slots of the static decode-step graph (prompt + new tokens - 1)")
@click.option("--cache-dir", default=None, help="where converted checkpoints are cached")
@click.option("--overwrite", is_flag=True, help="replace an existing output directory that sparsedeploy wrote")
@click.option("--json", "as_json", is_flag=True, help="print the summary as one JSON object")
def export_cmd(model, output, task, dtype, opset, target, storage, optimize, exporter, no_verify, greedy_tokens, decode_steps,
               deepsparse_batch, deepsparse_seq, deepsparse_context, cache_dir, overwrite, as_json):
    """Export a pruned checkpoint to ONNX (KV cache) and prove zeros, N:M layout and logit parity."""
    from sparsedeploy.export import ExportConfig, export_checkpoint, summary

    check_numbers(greedy_tokens=(greedy_tokens, 0), decode_steps=(decode_steps, 0),
                  deepsparse_batch=(deepsparse_batch, 1), deepsparse_seq=(deepsparse_seq, 1),
                  deepsparse_context=(deepsparse_context, 1))
    config = ExportConfig(model=model, task=task, dtype=dtype, opset=opset, target=target, storage=storage, optimize=optimize,
                          exporter=exporter, verify=not no_verify, greedy_tokens=greedy_tokens, decode_steps=decode_steps, cache_dir=cache_dir,
                          deepsparse_batch=deepsparse_batch, deepsparse_seq=deepsparse_seq,
                          deepsparse_context=deepsparse_context)
    report = export_checkpoint(config, output, overwrite=overwrite)
    data, text = summary(report, output)
    emit(data, as_json, text)


@cli.command("inspect")
@click.argument("onnx_model", type=click.Path(path_type=Path))
@click.option("--nm", default="2:4", show_default=True, help="N:M pattern checked along K")
@click.option("--all-weights", is_flag=True, help="list every initializer, not only MatMul/Gemm weights")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def inspect_cmd(onnx_model, nm, all_weights, as_json):
    """Per-weight shape, sparsity and N:M compliance of an ONNX model (polygraphy compared when installed)."""
    from sparsedeploy.onnx_verify import format_inspect, inspect_onnx
    from sparsedeploy.sparsity import parse_sparsity

    spec = parse_sparsity(nm)
    if not spec.is_nm:
        raise UserError(f"--nm {nm} is not an N:M pattern: give e.g. 2:4")
    data = inspect_onnx(onnx_model, (spec.n, spec.m))
    emit(data, as_json, format_inspect(data, all_weights))


@cli.command("generate")
@click.option("--onnx", "onnx_dir", required=True, type=click.Path(path_type=Path), help="export directory (or model.onnx)")
@click.option("--prompt", required=True, help="text to continue")
@click.option("--max-new-tokens", default=32, show_default=True, type=int)
@click.option("--threads", default=None, type=int, help="intra-op threads [ORT: its default; DeepSparse: 1]")
@click.option("--engine", default="ort", show_default=True, type=click.Choice(["ort", "deepsparse"]),
              help="deepsparse: the decoder-stack graphs of an export made with --target deepsparse, in DeepSparse's engine")
@click.option("--deepsparse-venv", default=None, help="DeepSparse virtualenv [default: CACHE/engines/deepsparse-1.8.0]")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def generate_cmd(onnx_dir, prompt, max_new_tokens, threads, engine, deepsparse_venv, as_json):
    """Greedy text generation with the KV cache: ONNX Runtime, or DeepSparse on a --target deepsparse export."""
    check_numbers(max_new_tokens=(max_new_tokens, 1), threads=(threads, 1))
    if engine == "deepsparse":
        from sparsedeploy.engines.deepsparse_env import generate_text as deepsparse_generate

        out = deepsparse_generate(onnx_dir, prompt, max_new_tokens, threads or 1, deepsparse_venv)
        rate = out["decode_tokens_per_s"]
        emit(out, as_json, f"{prompt}{out['completion']}\n[DeepSparse, {out['threads']} thread(s): prefill {out['prefill_seconds'] * 1e3:.0f} ms, "
                           f"decode {f'{rate:.1f} tok/s' if rate else 'n/a'}; {out['licence']}]")
        return
    from sparsedeploy.onnx_runtime import generate_text

    out = generate_text(onnx_dir, prompt, max_new_tokens, threads)
    rate = out["new_tokens"] / out["seconds"] if out["seconds"] else float("nan")
    emit(out, as_json, f"{prompt}{out['completion']}\n[{out['new_tokens']} tokens in {out['seconds']:.2f} s, {rate:.1f} tok/s, "
                       f"KV cache {'on' if out['kv_cache'] else 'off'}]")


@cli.command()
@click.option("--model", required=True, help="a pruned checkpoint directory (from `prune`; its masks.safetensors is used when present)")
@click.option("--data", default="gensim-wiki", show_default=True, help="training text: gensim-wiki, wikitext2[:PATH], c4, text:PATH, jsonl:PATH")
@click.option("--steps", default=100, show_default=True, type=int, help="optimizer steps")
@click.option("--rank", default=8, show_default=True, type=int, help="adapter rank r")
@click.option("--alpha", default=None, type=float, help="adapter scale alpha/r [default: alpha = r]")
@click.option("--lr", default=1e-3, show_default=True, type=float, help="AdamW learning rate (warm-up, then cosine to 10%)")
@click.option("--seqlen", default=256, show_default=True, type=int, help="tokens per training window")
@click.option("--batch", default=1, show_default=True, type=int, help="windows per step")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--teacher", default=None, help="dense model to distil from (KL on logits) instead of the LM loss, e.g. smollm2-135m")
@click.option("--eval", "eval_data", default=None, help="also report perplexity before/after on this text (e.g. wikitext2:PATH)")
@click.option("--eval-windows", default=16, show_default=True, type=int, help="windows scored by --eval")
@with_options(common_model)
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="output checkpoint directory")
@click.option("--overwrite", is_flag=True, help="replace an existing output directory that sparsedeploy wrote")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object")
@click.pass_context
def recover(ctx, model, data, steps, rank, alpha, lr, seqlen, batch, seed, teacher, eval_data, eval_windows, device, dtype, cache_dir,
            output, overwrite, as_json):
    """Train masked low-rank adapters on a pruned MODEL and merge them: perplexity down, every zero kept."""
    from sparsedeploy.recover import RecoverConfig, RecoverRun, run_recover

    check_numbers(steps=(steps, 1), rank=(rank, 1), seqlen=(seqlen, 2), batch=(batch, 1),
                  eval_windows=(eval_windows, 1))
    run = RecoverRun(model=model, data=data, output=str(output), teacher=teacher, eval_data=eval_data, eval_windows=eval_windows,
                     device=device, dtype=dtype, cache_dir=cache_dir)
    config = RecoverConfig(steps=steps, rank=rank, alpha=alpha, lr=lr, seqlen=seqlen, batch=batch, seed=seed)
    report = run_recover(run, config, output, overwrite=overwrite, show_progress=not ctx.obj["quiet"])
    rec = report["recovery"]
    summary = {"steps": rec["steps"], "tokens": rec["tokens"], "seconds": rec["seconds"], "loss_first": rec["loss_first"],
               "loss_last": rec["loss_last"], "sparsity": report["sparsity_after"], "zeros_identical": report["zeros_identical"],
               "output": str(output)}
    text = (f"recovered {model}: {rec['steps']} steps, {rec['tokens']} tokens, {rec['seconds']:.1f} s, loss {rec['loss_first']:.3f} -> "
            f"{rec['loss_last']:.3f}; sparsity {report['sparsity_after']:.4f} (zeros identical)")
    if "ppl_after" in report:
        summary.update(ppl_before=report["ppl_before"], ppl_after=report["ppl_after"])
        text += f"; perplexity {report['ppl_before']:.3f} -> {report['ppl_after']:.3f}"
    emit(summary, as_json, text + f" -> {output}")


from sparsedeploy.cli_bench import bench, engines  # noqa: E402  (bench/engines commands, issue 5)

cli.add_command(bench)
cli.add_command(engines)


_OOM_REMEDY = {
    "prune": "use --offload cpu or --offload disk, or fewer --nsamples / a shorter --seqlen",
    "run": "set offload: cpu or disk in the recipe (or --offload), or fewer calibration.nsamples / a shorter seqlen",
    "eval": "use a shorter --seqlen or --device cpu",
    "recover": "use a smaller --batch, a shorter --seqlen or a lower --rank",
    "export": "export on a machine with more memory, or with --dtype float16",
    "bench": "use smaller --batch sizes or a shorter --prompt-len",
}


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every `finally`/cleanup runs as for Ctrl-C (a BaseException,
    like KeyboardInterrupt, so that no `except Exception` turns it into another error)."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _interrupted(what: str, code: int) -> None:
    from sparsedeploy.fsutil import KEPT_FOR_RESUME

    kept = "; ".join(f"{done} kept in {where}" for where, done in KEPT_FOR_RESUME.items() if Path(where).exists())
    if kept:
        click.echo(f"{what}: no final output was written; {kept}: rerun the same command with --resume to continue",
                   err=True)
    else:
        click.echo(f"{what}: no output was written", err=True)
    sys.exit(code)


def _command(argv: list[str]) -> str:
    return next((a for a in argv if not a.startswith("-")), "")


def main(argv: list[str] | None = None) -> None:
    import signal

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("SPARSEDEPLOY_DEBUG") == "1"
    from sparsedeploy.fsutil import KEPT_FOR_RESUME, RUN_STAGE

    KEPT_FOR_RESUME.clear()
    RUN_STAGE.clear()
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (embedded use): leave the handler alone
        previous = None
    try:
        _main(argv, debug)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str], debug: bool) -> None:
    try:
        cli.main(args=argv, prog_name="sparsedeploy", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:  # click turns Ctrl-C into Abort
        _interrupted("interrupted", 130)
    except Terminated:
        _interrupted("terminated (SIGTERM)", 143)
    except UserError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted("interrupted", 130)
    except (MemoryError, RuntimeError) as exc:
        text = str(exc).lower()
        oom = isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text or \
            "can't allocate memory" in text or "cannot allocate memory" in text or "bad_alloc" in text
        if debug or not oom:
            if debug:
                raise
            first = str(exc).splitlines()[0] if str(exc) else ""
            click.echo(f"error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)", err=True)
            sys.exit(1)
        from sparsedeploy.fsutil import RUN_STAGE

        command = _command(argv)
        stage = RUN_STAGE.get("name") or command
        where = "GPU" if type(exc).__name__ == "OutOfMemoryError" or "CUDA" in str(exc) else "memory"
        remedy = _OOM_REMEDY.get(command, "free memory or use a smaller model")
        click.echo(f"error: out of {where} in stage {stage}: {remedy}", err=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line unless --debug
        if debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        click.echo(f"error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)
