"""`sparsedeploy run`: a recipe end to end, with command-line overrides of its keys."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from sparsedeploy.bench.config import ENGINES
from sparsedeploy.cli.options import check_numbers, emit, output_option, parse_batch_list
from sparsedeploy.common.errors import UserError
from sparsedeploy.export.config import DTYPES, STORAGES, TARGETS
from sparsedeploy.prune.choices import ALLOCATIONS, OFFLOAD_MODES

log = logging.getLogger("sparsedeploy")


@click.command()
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
@click.option("--allocation", default=None, help=f"override recipe: prune.allocation ({', '.join(ALLOCATIONS)})")
@click.option("--offload", default=None, help=f"override recipe: offload ({', '.join(OFFLOAD_MODES)})")
@click.option("--export-target", default=None, help=f"override recipe: export.target ({', '.join(TARGETS)})")
@click.option("--export-dtype", default=None, help=f"override recipe: export.dtype ({', '.join(DTYPES)})")
@click.option("--storage", default=None, help=f"override recipe: export.storage ({', '.join(STORAGES)})")
@click.option("--bench-engine", default=None, help=f"override recipe: bench.engine ({', '.join(ENGINES)})")
@click.option("--batch", default=None, help="override recipe: bench.batch, comma-separated (e.g. 1,8)")
@output_option("output directory [default: recipe output]")
@click.option(
    "--overwrite",
    is_flag=True,
    help="replace an existing output directory that sparsedeploy wrote (and discard an interrupted run)",
)
@click.option(
    "--resume",
    is_flag=True,
    help="continue an interrupted run: finished stages are kept, pruning resumes at its last block",
)
@click.option("--json", "as_json", is_flag=True, help="print the summary as one JSON object")
@click.pass_context
def run(
    ctx,
    recipe_file,
    model,
    method,
    sparsity,
    calib,
    nsamples,
    seqlen,
    eval_data,
    max_windows,
    max_ppl_ratio,
    max_ppl,
    export_,
    bench,
    device,
    allocation,
    offload,
    export_target,
    export_dtype,
    storage,
    bench_engine,
    batch,
    output,
    overwrite,
    resume,
    as_json,
):
    """Run a recipe end to end: prune -> evaluate -> quality gate -> export -> bench -> REPORT.md.

    Exits 3 when the quality gate fails (the report is still written), 2 on bad input.
    """
    from sparsedeploy.pipeline.recipe import load_recipe, parse_recipe
    from sparsedeploy.pipeline.stages import GateFailed, Pipeline

    check_numbers(nsamples=(nsamples, 1), seqlen=(seqlen, 2), max_windows=(max_windows, 1))
    data = {}
    if recipe_file is not None:
        recipe = load_recipe(recipe_file)
    else:
        recipe = parse_recipe(data)
    overrides = {
        ("model",): model,
        ("prune", "method"): method,
        ("prune", "sparsity"): sparsity,
        ("calibration", "source"): calib,
        ("calibration", "nsamples"): nsamples,
        ("calibration", "seqlen"): seqlen,
        ("eval", "seqlen"): seqlen,
        ("eval", "data"): eval_data,
        ("eval", "max_windows"): max_windows,
        ("gate", "max_ppl_ratio"): max_ppl_ratio,
        ("gate", "max_ppl"): max_ppl,
        ("export", "enabled"): export_,
        ("bench", "enabled"): bench,
        ("device",): device,
        ("prune", "allocation"): allocation,
        ("offload",): offload,
        ("export", "target"): export_target,
        ("export", "dtype"): export_dtype,
        ("export", "storage"): storage,
        ("bench", "engine"): bench_engine,
        ("bench", "batch"): parse_batch_list(batch) if batch is not None else None,
    }
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
    from sparsedeploy.common.files import check_writable

    check_writable(out)
    try:
        report = Pipeline(recipe, out, overwrite=overwrite, resume=resume, show_progress=not ctx.obj["quiet"]).run()
    except GateFailed as exc:
        click.echo(f"quality gate FAILED: {exc}", err=True)
        sys.exit(3)
    dense = report["dense"]["ppl"] if report["dense"] else None
    summary = {
        "output": str(out),
        "gate": report["gate"],
        "dense_ppl": dense,
        "pruned_ppl": report["pruned"]["ppl"],
        "sparsity": report["pruned"]["sparsity"],
    }
    text = (
        f"quality gate passed: perplexity {report['pruned']['ppl']:.3f}"
        + (f" (dense {dense:.3f})" if dense else "")
        + f", sparsity {report['pruned']['sparsity']:.4f}; report: {out / 'REPORT.md'}"
    )
    emit(summary, as_json, text)
