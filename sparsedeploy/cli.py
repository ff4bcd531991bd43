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
@click.option("--method", default="wanda", show_default=True, help="magnitude, wanda, ...")
@click.option("--sparsity", default="0.5", show_default=True, help="fraction of zeros (0.5, 50%) or N:M (2:4, 4:8)")
@click.option("--calib", default="gensim-wiki", show_default=True, help="calibration text: gensim-wiki, wikitext2[:PATH], c4, text:PATH, jsonl:PATH")
@click.option("--nsamples", default=128, show_default=True, type=int, help="calibration windows")
@click.option("--seqlen", default=None, type=int, help="tokens per window [default: min(2048, model max)]")
@click.option("--seed", default=0, show_default=True, type=int)
@with_options(common_model)
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="output checkpoint directory")
@click.option("--overwrite", is_flag=True, help="replace an existing output directory")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object")
@click.pass_context
def prune(ctx, model, method, sparsity, calib, nsamples, seqlen, seed, device, dtype, cache_dir, output, overwrite, as_json):
    """Prune MODEL layer by layer over calibration data and write a sparse checkpoint."""
    from sparsedeploy.prune import PruneConfig, run_prune

    config = PruneConfig(model=model, method=method, sparsity=sparsity, calib=calib, nsamples=nsamples,
                         seqlen=seqlen, seed=seed, device=device, dtype=dtype, cache_dir=cache_dir)
    report = run_prune(config, output, overwrite=overwrite, show_progress=not ctx.obj["quiet"])
    summary = {k: report[k] for k in ("method", "sparsity_spec", "overall_sparsity", "prune_seconds", "peak_rss_mib")}
    summary["output"] = str(output)
    emit(summary, as_json, f"pruned {model} with {method} at {report['sparsity_spec']}: sparsity {report['overall_sparsity']:.4f}, "
                           f"{report['prune_seconds']:.1f} s -> {output}")


@cli.command("eval")
@click.option("--model", required=True, help="HF id or directory, a .gguf file, or smollm2-135m")
@click.option("--data", default=None, help="evaluation text: wikitext2:PATH, wikitext2, c4, text:PATH, jsonl:PATH [default: the offline WikiText-2 test file when found]")
@click.option("--seqlen", default=None, type=int, help="window length [default: min(2048, model max)]")
@click.option("--max-windows", default=None, type=int, help="score only the first K windows (bounds CPU cost)")
@with_options(common_model)
@click.option("--output", "-o", default=None, type=click.Path(path_type=Path), help="also write the result as JSON here")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.pass_context
def eval_cmd(ctx, model, data, seqlen, max_windows, device, dtype, cache_dir, output, as_json):
    """Perplexity of MODEL (Wanda/SparseGPT protocol) and its measured sparsity."""
    from sparsedeploy.data import default_wikitext_test, eval_tokens
    from sparsedeploy.evaluate import layer_sparsity, overall_sparsity, perplexity
    from sparsedeploy.fsutil import write_json_atomic
    from sparsedeploy.models import default_seqlen, load_model, resolve_device

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
    if output:
        write_json_atomic(output, {**out, "layers": layers})
    emit(out, as_json, f"perplexity {result.ppl:.3f} on {data} ({result.windows} windows x {seqlen}, {result.tokens} tokens); sparsity {out['sparsity']:.4f}")


from sparsedeploy.cli_bench import bench, engines  # noqa: E402  (bench/engines commands, issue 5)

cli.add_command(bench)
cli.add_command(engines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("SPARSEDEPLOY_DEBUG") == "1"
    try:
        cli.main(args=argv, prog_name="sparsedeploy", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except UserError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted: no output was written", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line unless --debug
        if debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        click.echo(f"error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)
