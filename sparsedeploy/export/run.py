"""Export a pruned checkpoint to an ONNX decoder with KV cache that keeps every zero, and prove it.

The orchestration of the export stage: the exporter (:mod:`.exporters`: optimum-onnx, whose I/O conventions are
``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/value`` -> ``logits``,
``present.{i}.key/value``, so the result loads in ``optimum.onnxruntime.ORTModelForCausalLM``; architectures
optimum does not know fall back to ``torch.onnx.export``), the graph's post-processing (:mod:`.graph`), the
storage, verification (:mod:`.verification`), a target's further forms (:mod:`.deepsparse_form`) and the report
(:mod:`.report`).

Every export is written to a temporary directory beside the output, verified (sparsity equality,
N:M along K, logit parity with PyTorch; :mod:`sparsedeploy.onnx.verify`) and only then renamed
into place, together with ``export_report.json``.

Library entry point for other tools (e.g. the benchmark): :func:`export_checkpoint`.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from sparsedeploy.common.errors import UserError
from sparsedeploy.common.files import atomic_dir, check_output_dir, write_json_atomic
from sparsedeploy.export.config import ExportConfig, validate
from sparsedeploy.export.deepsparse_form import write_static_forms
from sparsedeploy.export.exporters import export_with_optimum, export_with_torch, optimum_supports
from sparsedeploy.export.graph import (
    Rewrite,
    check_domains,
    ort_optimize,
    refuse_if_weights_changed,
    register_rewrite,
    target_rewrites,
)
from sparsedeploy.export.report import dir_bytes, measure_load, summary
from sparsedeploy.export.verification import verify_export, warn_if_no_zeros
from sparsedeploy.onnx.int8_nodes import pack_scaled_int8
from sparsedeploy.onnx.sparse_linear import MIN_SPARSITY as SPARSE_LINEAR_MIN
from sparsedeploy.onnx.sparse_linear import pack_linears

log = logging.getLogger(__name__)

# Names of the library API before the export stage was split into modules; import them from here for one release.
__all__ = ["ExportConfig", "Rewrite", "export_checkpoint", "register_rewrite", "summary"]


def _copy_side_files(sources: list[Path], dest: Path) -> list[str]:
    names = (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "added_tokens.json",
    )
    copied = []
    for name in names:
        for source in sources:
            if (source / name).is_file() and not (dest / name).exists():
                shutil.copy2(source / name, dest / name)
                copied.append(name)
                break
    return copied


def export_checkpoint(
    config: ExportConfig, output: Path | str, overwrite: bool = False, rewrite: Rewrite | None = None
) -> dict:
    """Export `config.model` to `output` (atomically), verify it unless config.verify is False, return the report.

    `rewrite` (ModelProto -> ModelProto) runs after any registered target rewrites and before
    verification. A failed verification raises UserError and leaves no output directory; the full
    report is then written beside it as ``.<name>.export_report.failed.json``.
    """
    from sparsedeploy.common.models import resolve_model_path
    from sparsedeploy.common.provenance import versions
    from sparsedeploy.onnx.storage import load_model_proto, pack_sparse, save_model_proto

    target = validate(config)
    output = Path(output)
    check_output_dir(output, overwrite)
    model_dir = Path(resolve_model_path(config.model, config.cache_dir))
    if not model_dir.is_dir() or not (model_dir / "config.json").is_file():
        raise UserError(
            f"--model {config.model} is not a checkpoint directory with config.json: export a directory written by "
            "`sparsedeploy prune`"
        )
    warn_if_no_zeros(model_dir)
    opset = config.opset or target.opset
    exporter = config.exporter
    if exporter == "auto":
        exporter = "optimum" if optimum_supports(model_dir, config.task) else "torch"
    # The source checkpoint, absolute and relative to the export (a pipeline's run directory moves as a whole):
    # bench reads it to build the forms it times from the same weights.
    relative = os.path.relpath(model_dir.resolve(), output.resolve())
    report: dict = {
        "model": config.model,
        "model_path": str(model_dir),
        "model_path_relative": relative,
        "config": asdict(config),
        "target": asdict(target),
        "exporter": exporter,
        "opset": opset,
        "versions": versions(),
    }
    report["target"]["domains"] = sorted(target.domains)
    start = time.perf_counter()
    with atomic_dir(output) as tmp:
        raw = tmp / ".raw"
        log.info(
            "exporting %s with %s (task %s, %s, opset %d, target %s)",
            model_dir,
            exporter,
            config.task,
            config.dtype,
            opset,
            target.name,
        )
        if exporter == "optimum":
            export_with_optimum(model_dir, raw, config.task, config.dtype, opset)
        else:
            export_with_torch(model_dir, raw, config.task, config.dtype, opset)
        source = raw / "model.onnx"
        if config.optimize != "none":
            optimized = raw / "optimized.onnx"
            ort_optimize(source, config.optimize, optimized)
            source = optimized
        model = load_model_proto(source)
        if config.optimize != "none":
            refuse_if_weights_changed(model, model_dir, config)
        for fn in [*target_rewrites(target.name), *([rewrite] if rewrite else [])]:
            model = fn(model)
        if target.name == "sparse-cpu":
            report["sparse_cpu"] = pack_linears(model)
            if not report["sparse_cpu"]["linears"]:
                raise UserError(
                    f"--target sparse-cpu: no decoder linear of {model_dir} has {SPARSE_LINEAR_MIN:.0%} zeros or "
                    "more, so nothing would run sparse; prune it first (sparsedeploy prune) or use --target ort"
                )
            # dense weights that are exactly int8 x a scale per 32 (e.g. a GGUF Q8_0 embedding / tied lm_head)
            report["sparse_cpu"]["scaled_int8"] = pack_scaled_int8(model)
        check_domains(model, target)
        storage: dict = {"kind": config.storage}
        if config.storage == "sparse":
            storage.update(pack_sparse(model, tmp))
        save_model_proto(model, tmp / "model.onnx", config.external_data)
        del model
        report["side_files"] = _copy_side_files([raw, model_dir], tmp)
        if (model_dir / "report.json").is_file():
            shutil.copy2(model_dir / "report.json", tmp / "prune_report.json")
        shutil.rmtree(raw)
        report["export_seconds"] = time.perf_counter() - start
        storage["files"] = dir_bytes(tmp)
        storage["model_bytes"] = sum(
            v for k, v in storage["files"].items() if k.startswith("model.onnx") or k.startswith("sparse_weights")
        )
        storage["ort_load_seconds"] = measure_load(tmp / "model.onnx")
        storage["note"] = (
            "sparse-cpu: the packed linears run in sparsedeploy's kernels"
            if target.name == "sparse-cpu"
            else "ONNX Runtime does not compute faster from zeros: sparse storage only saves disk space"
        )
        report["storage"] = storage
        if config.verify:
            report["verification"] = verify_export(config, model_dir, tmp / "model.onnx", opset)
            if not report["verification"]["ok"]:
                failed = output.with_name(f".{output.name}.export_report.failed.json")
                write_json_atomic(failed, report)
                problems = report["verification"]["problems"]
                raise UserError(
                    f"export verification failed ({len(problems)} problem(s)), nothing written: {problems[0]} "
                    f"[full report: {failed}]"
                )
        else:
            report["verification"] = None
        report.update(write_static_forms(model_dir, tmp, config))  # the target's further forms, bench's too
        write_json_atomic(tmp / "export_report.json", report)
    log.info("exported %s -> %s in %.1f s", config.model, output, time.perf_counter() - start)
    return report
