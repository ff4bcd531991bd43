"""CLI commands `sparsedeploy bench` and `sparsedeploy engines ...` (parsing and printing only)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from sparsedeploy.bench.config import ENGINES
from sparsedeploy.cli.options import TORCH_DTYPES, choice_option, number_option, output_option, parse_batch_list
from sparsedeploy.common.errors import UserError

log = logging.getLogger("sparsedeploy")


def _log_rows(rows: list[dict]) -> None:
    """One log line per timed row, as the bench runs."""
    for r in rows:
        speedup = f" speedup {r['speedup']:.2f}x" if "speedup" in r else ""
        log.info(
            "%s %s b%d %s %s: %.1f ms%s",
            r["engine"],
            r["variant"],
            r["batch"],
            r["phase"],
            r["form"].split(" (")[0],
            r["median_s"] * 1e3,
            speedup,
        )


@click.command()
@click.option(
    "--model",
    required=True,
    help="sparse model: ONNX export directory (ort, sparse-cpu, deepsparse) or HF checkpoint directory (torch)",
)
@click.option(
    "--baseline", default=None, help="dense model of the same kind, timed alternately with --model for the speedup"
)
@choice_option(
    "--engine",
    ENGINES,
    "ort",
    "ort/deepsparse: ONNX on CPU; sparse-cpu: a --target sparse-cpu export in sparsedeploy's kernels vs the "
    "dense export in ONNX Runtime; torch: checkpoints (2:4 kernels with --device cuda); tensorrt: ONNX on a GPU",
)
@click.option("--batch", "batch", default="1,8", show_default=True, help="comma-separated batch sizes")
@number_option("--prompt-len", 128)
@number_option("--gen-len", 64, "decode steps (KV cache)")
@number_option("--threads", 1, "CPU threads (1 gives stable figures on a shared box)")
@number_option("--rounds", 3, "timed rounds after warm-up; dense/sparse alternate every round")
@click.option("--device", default="cpu", show_default=True, help="torch/tensorrt engines: cpu or cuda[:N]")
@choice_option(
    "--dtype", TORCH_DTYPES, "float16", "torch/tensorrt engines on GPU (tensorrt: float32 builds without FP16)"
)
@click.option(
    "--cuda-graphs",
    is_flag=True,
    help="torch engine on a GPU: replay prefill and each decode step as CUDA graphs over a static KV cache "
    "(GPU time, as a deployment runtime would run; default: eager, host-side setup included)",
)
@click.option(
    "--all-logits",
    is_flag=True,
    help="ort / sparse-cpu engines: compute every prompt position's logits at prefill (the export's whole output); "
    "default: the last position's only, what generation reads, in both models alike",
)
@click.option(
    "--ort-op-library",
    default=None,
    help="sparse-cpu engine: also time the sparse export run whole in ONNX Runtime with sparsedeploy's custom-op "
    "library (this .so; `bash scripts/build_ort_op.sh` builds it), as variant sparse-ort-op",
)
@click.option("--deepsparse-venv", default=None, help="DeepSparse virtualenv [default: CACHE/engines/deepsparse-1.8.0]")
@click.option(
    "--cache-dir", default=None, help="sparsedeploy cache [default: $SPARSEDEPLOY_CACHE or ~/.cache/sparsedeploy]"
)
@output_option("write bench.json, bench.md and bench.png into this directory")
@click.option("--overwrite", is_flag=True, help="replace an existing --output directory (only one sparsedeploy wrote)")
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON object")
def bench(
    model,
    baseline,
    engine,
    batch,
    prompt_len,
    gen_len,
    threads,
    rounds,
    device,
    dtype,
    cuda_graphs,
    all_logits,
    ort_op_library,
    deepsparse_venv,
    cache_dir,
    output,
    overwrite,
    as_json,
):
    """Time a sparse model against its dense baseline: prefill, decode tokens/s, end-to-end."""
    from sparsedeploy.bench.config import BenchConfig
    from sparsedeploy.bench.report import markdown, plot
    from sparsedeploy.bench.run import run_bench
    from sparsedeploy.common.files import atomic_dir, check_output_dir, write_json_atomic

    for name, value, least in (
        ("--prompt-len", prompt_len, 1),
        ("--gen-len", gen_len, 0),
        ("--threads", threads, 1),
        ("--rounds", rounds, 1),
    ):
        if value < least:
            raise UserError(f"{name} {value} must be at least {least}")
    if output:
        check_output_dir(Path(output), overwrite)
    cfg = BenchConfig(
        model=model,
        baseline=baseline,
        engine=engine,
        batches=parse_batch_list(batch),
        prompt_len=prompt_len,
        gen_len=gen_len,
        threads=threads,
        rounds=rounds,
        device=device,
        dtype=dtype,
        deepsparse_venv=deepsparse_venv,
        cache_dir=cache_dir,
        cuda_graphs=cuda_graphs,
        all_logits=all_logits,
        ort_op_library=ort_op_library,
    )
    result = run_bench(cfg, progress=_log_rows)
    if "skipped" in result:  # a requested measurement that did not happen is not a success
        if as_json:
            click.echo(json.dumps(result))
        raise UserError(f"no measurement: {result['skipped']}")
    md = markdown(result)
    if output:
        with atomic_dir(Path(output)) as tmp:
            write_json_atomic(tmp / "bench.json", result)
            (tmp / "bench.md").write_text(md)
            plot(result, tmp / "bench.png")
    click.echo(json.dumps(result, default=str) if as_json else md)


@click.group()
def engines():
    """Optional inference engines that live in their own environment."""


@engines.command("install")
@click.argument("name", type=click.Choice(["deepsparse"]))
@click.option(
    "--python", "python", default=None, help="interpreter for the venv (DeepSparse 1.8 needs Python 3.8-3.11)"
)
@click.option("--venv", default=None, help="where to create it [default: CACHE/engines/deepsparse-1.8.0]")
@click.option("--cache-dir", default=None)
@click.option("--force", is_flag=True, help="rebuild even if already installed")
def engines_install(name, python, venv, cache_dir, force):
    """Create the engine's own virtualenv (DeepSparse 1.8.0, onnx 1.14, numpy<2) and check it works."""
    from sparsedeploy.runtimes.deepsparse_env import LICENCE_NOTE, install

    env = install(venv=venv, cache=cache_dir, python=python, force=force)
    click.echo(f"DeepSparse ready in {env.path}")
    click.echo(LICENCE_NOTE)


@engines.command("status")
@click.option("--venv", default=None)
@click.option("--cache-dir", default=None)
def engines_status(venv, cache_dir):
    """Say whether DeepSparse can run here and where it is installed."""
    from sparsedeploy.runtimes.deepsparse_env import default_venv_dir, find_env, platform_problem

    problem = platform_problem()
    env = find_env(venv, cache_dir)
    if problem:
        click.echo(f"deepsparse: cannot run here: {problem}")
    elif env is None:
        click.echo(
            f"deepsparse: not installed (expected at {Path(venv) if venv else default_venv_dir(cache_dir)}): run "
            "`sparsedeploy engines install deepsparse`"
        )
    else:
        click.echo(f"deepsparse: installed at {env.path}")
