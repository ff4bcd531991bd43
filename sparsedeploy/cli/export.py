"""`sparsedeploy export`, `inspect` and `generate`: ONNX files written, examined and run."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from sparsedeploy.cli.options import check_numbers, choice_option, emit, number_option, output_option, parse_batch_list
from sparsedeploy.common.errors import UserError
from sparsedeploy.export.config import (
    BENCH_FORM_OPTIONS,
    DTYPES,
    EXPORTERS,
    OPTIMIZE_LEVELS,
    STORAGES,
    TARGETS,
    TASKS,
)
from sparsedeploy.runtimes import GENERATE_ENGINES

log = logging.getLogger("sparsedeploy")


def bench_form_options(fn):
    """--bench-batch, --bench-prompt-len, --bench-gen-len, declared in export.config.BENCH_FORM_OPTIONS."""
    for field_name, (flag, default, text) in reversed(BENCH_FORM_OPTIONS.items()):
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        kind = str if isinstance(default, tuple) else int
        fn = click.option(flag, field_name, default=shown, show_default=True, type=kind, help=text)(fn)
    return fn


@click.command("export")
@click.option("--model", required=True, help="pruned checkpoint directory (as written by `sparsedeploy prune`)")
@output_option("output directory for model.onnx + export_report.json", required=True)
@choice_option("--task", TASKS, "text-generation-with-past")
@choice_option("--dtype", DTYPES, "float32")
@click.option("--opset", default=None, type=int, help="ONNX opset [default: the target's]")
@choice_option("--target", TARGETS, "ort", "runtime the graph is shaped for")
@choice_option("--storage", STORAGES, "dense", "sparse: bitmap+values side file (smaller; needs sparsedeploy to load)")
@choice_option(
    "--optimize",
    OPTIMIZE_LEVELS,
    "none",
    "ONNX Runtime graph optimisation saved into the file (refused when it breaks zeros or the target)",
)
@choice_option("--exporter", EXPORTERS, "auto")
@click.option("--no-verify", is_flag=True, help="skip the sparsity and parity verification")
@number_option("--greedy-tokens", 32, "greedy tokens compared PyTorch vs ONNX Runtime")
@number_option("--decode-steps", 4, "KV-cache decode steps whose logits are compared")
@number_option("--deepsparse-batch", 1, "--target deepsparse: batch of the static decoder-stack graph")
@number_option("--deepsparse-seq", 128, "--target deepsparse: prompt tokens of the static prefill graph")
@number_option(
    "--deepsparse-context",
    256,
    "--target deepsparse: KV-cache slots of the static decode-step graph (prompt + new tokens - 1)",
)
@bench_form_options
@click.option("--cache-dir", default=None, help="where converted checkpoints are cached")
@click.option("--overwrite", is_flag=True, help="replace an existing output directory that sparsedeploy wrote")
@click.option("--json", "as_json", is_flag=True, help="print the summary as one JSON object")
def export_cmd(
    model,
    output,
    task,
    dtype,
    opset,
    target,
    storage,
    optimize,
    exporter,
    no_verify,
    greedy_tokens,
    decode_steps,
    deepsparse_batch,
    deepsparse_seq,
    deepsparse_context,
    bench_batch,
    bench_prompt_len,
    bench_gen_len,
    cache_dir,
    overwrite,
    as_json,
):
    """Export a pruned checkpoint to ONNX (KV cache) and prove zeros, N:M layout and logit parity."""
    from sparsedeploy.export.report import summary
    from sparsedeploy.export.run import ExportConfig, export_checkpoint

    check_numbers(
        greedy_tokens=(greedy_tokens, 0),
        decode_steps=(decode_steps, 0),
        deepsparse_batch=(deepsparse_batch, 1),
        deepsparse_seq=(deepsparse_seq, 1),
        deepsparse_context=(deepsparse_context, 1),
        bench_prompt_len=(bench_prompt_len, 1),
        bench_gen_len=(bench_gen_len, 0),
    )
    config = ExportConfig(
        model=model,
        task=task,
        dtype=dtype,
        opset=opset,
        target=target,
        storage=storage,
        optimize=optimize,
        exporter=exporter,
        verify=not no_verify,
        greedy_tokens=greedy_tokens,
        decode_steps=decode_steps,
        cache_dir=cache_dir,
        deepsparse_batch=deepsparse_batch,
        deepsparse_seq=deepsparse_seq,
        deepsparse_context=deepsparse_context,
        bench_batch=tuple(parse_batch_list(bench_batch, "--bench-batch")),
        bench_prompt_len=bench_prompt_len,
        bench_gen_len=bench_gen_len,
    )
    report = export_checkpoint(config, output, overwrite=overwrite)
    data, text = summary(report, output)
    emit(data, as_json, text)


@click.command("inspect")
@click.argument("onnx_model", type=click.Path(path_type=Path))
@click.option("--nm", default="2:4", show_default=True, help="N:M pattern checked along K")
@click.option("--all-weights", is_flag=True, help="list every initializer, not only MatMul/Gemm weights")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def inspect_cmd(onnx_model, nm, all_weights, as_json):
    """Per-weight shape, sparsity and N:M compliance of an ONNX model (polygraphy compared when installed)."""
    from sparsedeploy.common.sparsity import parse_sparsity
    from sparsedeploy.onnx.inspect import format_inspect, inspect_onnx

    spec = parse_sparsity(nm)
    if not spec.is_nm:
        raise UserError(f"--nm {nm} is not an N:M pattern: give e.g. 2:4")
    data = inspect_onnx(onnx_model, (spec.n, spec.m))
    emit(data, as_json, format_inspect(data, all_weights))


@click.command("generate")
@click.option(
    "--onnx", "onnx_dir", required=True, type=click.Path(path_type=Path), help="export directory (or model.onnx)"
)
@click.option("--prompt", required=True, help="text to continue")
@number_option("--max-new-tokens", 32)
@click.option("--threads", default=None, type=int, help="intra-op threads [ORT: its default; DeepSparse: 1]")
@choice_option(
    "--engine",
    GENERATE_ENGINES,
    "ort",
    "ort: ONNX Runtime (a sparse-cpu export's SparseLinear nodes in sparsedeploy's kernels); sparse-cpu: "
    "the same, refusing an export without SparseLinear nodes; deepsparse: the decoder-stack graphs of an "
    "export made with --target deepsparse, in DeepSparse's engine",
)
@click.option(
    "--ort-op-library",
    default=None,
    type=click.Path(path_type=Path),
    help="ort / sparse-cpu engines: run a sparse-cpu export whole in ONNX Runtime with sparsedeploy's custom-op "
    "library (this .so; `bash scripts/build_ort_op.sh` builds it) instead of segmented",
)
@click.option("--deepsparse-venv", default=None, help="DeepSparse virtualenv [default: CACHE/engines/deepsparse-1.8.0]")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def generate_cmd(onnx_dir, prompt, max_new_tokens, threads, engine, ort_op_library, deepsparse_venv, as_json):
    """Greedy text generation with the KV cache: ONNX Runtime, or DeepSparse on a --target deepsparse export."""
    check_numbers(max_new_tokens=(max_new_tokens, 1), threads=(threads, 1))
    if ort_op_library is not None and engine == "deepsparse":
        raise UserError("--ort-op-library is for --engine ort / sparse-cpu (ONNX Runtime), not deepsparse: drop it")
    if engine == "deepsparse":
        from sparsedeploy.runtimes.deepsparse_env import generate_text as deepsparse_generate

        out = deepsparse_generate(onnx_dir, prompt, max_new_tokens, threads or 1, deepsparse_venv)
        rate = out["decode_tokens_per_s"]
        emit(
            out,
            as_json,
            f"{prompt}{out['completion']}\n[DeepSparse, {out['threads']} thread(s): prefill "
            f"{out['prefill_seconds'] * 1e3:.0f} ms, "
            f"decode {f'{rate:.1f} tok/s' if rate else 'n/a'}; {out['licence']}]",
        )
        return
    from sparsedeploy.onnx.decoder import generate_text

    out = generate_text(onnx_dir, prompt, max_new_tokens, threads, engine, ort_op_library)
    rate = out["new_tokens"] / out["seconds"] if out["seconds"] else float("nan")
    emit(
        out,
        as_json,
        f"{prompt}{out['completion']}\n[{out['engine']}{' (whole in ONNX Runtime)' if ort_op_library else ''}: "
        f"{out['new_tokens']} tokens in {out['seconds']:.2f} s, "
        f"{rate:.1f} tok/s, "
        f"KV cache {'on' if out['kv_cache'] else 'off'}]",
    )
