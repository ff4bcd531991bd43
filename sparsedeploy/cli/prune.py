"""`sparsedeploy prune` and `sparsedeploy recover`: the commands that write a pruned checkpoint."""

from __future__ import annotations

import logging

import click

from sparsedeploy.cli.options import (
    check_numbers,
    choice_option,
    common_model,
    emit,
    method_option_flags,
    method_options_from_flags,
    number_option,
    output_option,
    text_source_option,
    with_options,
)
from sparsedeploy.prune.choices import ALLOCATIONS, OFFLOAD_MODES
from sparsedeploy.prune.method_options import METHOD_NAMES

log = logging.getLogger("sparsedeploy")


@click.command()
@click.option("--model", required=True, help="HF id or directory, a .gguf file, or smollm2-135m")
@click.option("--method", default="wanda", show_default=True, help=", ".join(METHOD_NAMES))
@click.option("--sparsity", default="0.5", show_default=True, help="fraction of zeros (0.5, 50%) or N:M (2:4, 4:8)")
@text_source_option("--calib", "calibration text")
@number_option("--nsamples", 128, "calibration windows")
@click.option("--seqlen", default=None, type=int, help="tokens per window [default: min(2048, model max)]")
@number_option("--seed", 0)
@choice_option(
    "--allocation",
    ALLOCATIONS,
    "uniform",
    "per-layer sparsity: uniform, owl (outlier-weighted) or atp (increasing with depth); "
    "the overall mean stays the target",
)
@number_option("--owl-m", 5.0, "OWL: a score is an outlier above M x the block mean")
@number_option("--owl-lambda", 0.08, "OWL: largest deviation of a block's sparsity from the target")
@with_options(common_model)
@output_option("output checkpoint directory", required=True)
@click.option(
    "--overwrite",
    is_flag=True,
    help="replace an existing output directory that sparsedeploy wrote (and discard an interrupted run)",
)
@click.option("--resume", is_flag=True, help="continue an interrupted run from its last finished block")
@choice_option(
    "--offload",
    OFFLOAD_MODES,
    "none",
    "cpu: calibration activations stay in RAM; disk: weights stay on disk, one block in memory",
)
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object")
@with_options(method_option_flags)
@click.pass_context
def prune(
    ctx,
    model,
    method,
    sparsity,
    calib,
    nsamples,
    seqlen,
    seed,
    allocation,
    owl_m,
    owl_lambda,
    device,
    dtype,
    cache_dir,
    output,
    overwrite,
    resume,
    offload,
    as_json,
    **method_flags,
):
    """Prune MODEL layer by layer over calibration data and write a sparse checkpoint."""
    from sparsedeploy.prune.driver import PruneConfig, run_prune

    check_numbers(nsamples=(nsamples, 1), seqlen=(seqlen, 2), owl_m=(owl_m, 0), owl_lambda=(owl_lambda, 0))
    config = PruneConfig(
        model=model,
        method=method,
        sparsity=sparsity,
        calib=calib,
        nsamples=nsamples,
        seqlen=seqlen,
        seed=seed,
        device=device,
        dtype=dtype,
        cache_dir=cache_dir,
        method_options=method_options_from_flags(method, method_flags),
        allocation=allocation,
        owl_m=owl_m,
        owl_lambda=owl_lambda,
    )
    report = run_prune(
        config, output, overwrite=overwrite, show_progress=not ctx.obj["quiet"], resume=resume, offload=offload
    )
    if "overall_sparsity" not in report:  # a non-zero rank of a torchrun job: rank 0 reports
        return
    summary = {k: report[k] for k in ("method", "sparsity_spec", "overall_sparsity", "prune_seconds", "peak_rss_mib")}
    summary["output"] = str(output)
    emit(
        summary,
        as_json,
        f"pruned {model} with {method} at {report['sparsity_spec']}: sparsity {report['overall_sparsity']:.4f}, "
        f"{report['prune_seconds']:.1f} s -> {output}",
    )


@click.command()
@click.option(
    "--model",
    required=True,
    help="a pruned checkpoint directory (from `prune`; its masks.safetensors is used when present)",
)
@text_source_option("--data", "training text")
@number_option("--steps", 100, "optimizer steps")
@number_option("--rank", 8, "adapter rank r")
@click.option("--alpha", default=None, type=float, help="adapter scale alpha/r [default: alpha = r]")
@number_option("--lr", 1e-3, "AdamW learning rate (warm-up, then cosine to 10%)")
@number_option("--seqlen", 256, "tokens per training window")
@number_option("--batch", 1, "windows per step")
@number_option("--seed", 0)
@click.option(
    "--teacher",
    default=None,
    help="dense model to distil from (KL on logits) instead of the LM loss, e.g. smollm2-135m",
)
@click.option(
    "--eval", "eval_data", default=None, help="also report perplexity before/after on this text (e.g. wikitext2:PATH)"
)
@number_option("--eval-windows", 16, "windows scored by --eval")
@with_options(common_model)
@output_option("output checkpoint directory", required=True)
@click.option("--overwrite", is_flag=True, help="replace an existing output directory that sparsedeploy wrote")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object")
@click.pass_context
def recover(
    ctx,
    model,
    data,
    steps,
    rank,
    alpha,
    lr,
    seqlen,
    batch,
    seed,
    teacher,
    eval_data,
    eval_windows,
    device,
    dtype,
    cache_dir,
    output,
    overwrite,
    as_json,
):
    """Train masked low-rank adapters on a pruned MODEL and merge them: perplexity down, every zero kept."""
    from sparsedeploy.prune.recover import RecoverConfig, RecoverRun, run_recover

    check_numbers(
        steps=(steps, 1), rank=(rank, 1), seqlen=(seqlen, 2), batch=(batch, 1), eval_windows=(eval_windows, 1)
    )
    run = RecoverRun(
        model=model,
        data=data,
        output=str(output),
        teacher=teacher,
        eval_data=eval_data,
        eval_windows=eval_windows,
        device=device,
        dtype=dtype,
        cache_dir=cache_dir,
    )
    config = RecoverConfig(steps=steps, rank=rank, alpha=alpha, lr=lr, seqlen=seqlen, batch=batch, seed=seed)
    report = run_recover(run, config, output, overwrite=overwrite, show_progress=not ctx.obj["quiet"])
    rec = report["recovery"]
    summary = {
        "steps": rec["steps"],
        "tokens": rec["tokens"],
        "seconds": rec["seconds"],
        "loss_first": rec["loss_first"],
        "loss_last": rec["loss_last"],
        "sparsity": report["sparsity_after"],
        "zeros_identical": report["zeros_identical"],
        "output": str(output),
    }
    text = (
        f"recovered {model}: {rec['steps']} steps, {rec['tokens']} tokens, {rec['seconds']:.1f} s, loss "
        f"{rec['loss_first']:.3f} -> "
        f"{rec['loss_last']:.3f}; sparsity {report['sparsity_after']:.4f} (zeros identical)"
    )
    if "ppl_after" in report:
        summary.update(ppl_before=report["ppl_before"], ppl_after=report["ppl_after"])
        text += f"; perplexity {report['ppl_before']:.3f} -> {report['ppl_after']:.3f}"
    emit(summary, as_json, text + f" -> {output}")
