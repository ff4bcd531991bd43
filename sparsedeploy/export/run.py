"""Export a pruned checkpoint to an ONNX decoder with KV cache that keeps every zero, and prove it.

The exporter is optimum-onnx (its I/O conventions: ``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.{i}.key/value`` -> ``logits``, ``present.{i}.key/value``; the
result loads in ``optimum.onnxruntime.ORTModelForCausalLM``). Architectures optimum does not know
fall back to ``torch.onnx.export`` of a small wrapper with the same names.

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
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from sparsedeploy.common.errors import UserError
from sparsedeploy.common.files import atomic_dir, check_output_dir, write_json_atomic
from sparsedeploy.export.config import DTYPES, TARGETS, ExportConfig, TargetProfile, validate
from sparsedeploy.onnx.sparse_linear import MIN_SPARSITY as SPARSE_LINEAR_MIN
from sparsedeploy.onnx.sparse_linear import pack_linears
from sparsedeploy.runtimes.stack_graphs import head_dim_of, load_eager_float32, write_stack_files

log = logging.getLogger(__name__)

Rewrite = Callable[["object"], "object"]  # onnx.ModelProto -> onnx.ModelProto

_REWRITES: dict[str, list[Rewrite]] = {}


def register_rewrite(target: str, fn: Rewrite) -> None:
    """Register a graph rewrite (ModelProto -> ModelProto) applied for `target` before verification.

    This is the hook for runtime-specific graph surgery (e.g. a DeepSparse-friendly form); the
    verification runs on the rewritten graph, so a rewrite that loses zeros fails the export.
    """
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    _REWRITES.setdefault(target, []).append(fn)


# ---------------------------------------------------------------- exporters


def optimum_supports(model_dir: Path, task: str) -> bool:
    import optimum.exporters.onnx.model_configs  # noqa: F401 - registers the ONNX configs with the TasksManager
    from optimum.exporters.tasks import TasksManager
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(str(model_dir)).model_type
    if model_type not in TasksManager._SUPPORTED_MODEL_TYPE:
        return False
    return task in TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")


def export_with_optimum(model_dir: Path, out_dir: Path, task: str, dtype: str, opset: int) -> None:
    from optimum.exporters.onnx import main_export

    main_export(
        str(model_dir),
        str(out_dir),
        task=task,
        opset=opset,
        device="cpu",
        dtype=DTYPES[dtype],
        do_validation=False,
        local_files_only=True,
        library_name="transformers",
    )


def export_with_torch(model_dir: Path, out_dir: Path, task: str, dtype: str, opset: int) -> None:
    """torch.onnx.export of a wrapper with optimum's input/output names (for architectures optimum lacks)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = torch.float16 if dtype == "float16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype, attn_implementation="eager").eval()
    config = model.config
    layers = int(config.num_hidden_layers)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = head_dim_of(config)
    with_past = task.endswith("-with-past")
    wrapper = _DecoderWrapper(model, layers, with_past)
    batch, seq, past_len = 2, 3, 4 if with_past else 0
    ids = torch.randint(0, int(config.vocab_size), (batch, seq))
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    positions = torch.arange(past_len, past_len + seq).expand(batch, seq)
    past = (
        [torch.randn(batch, kv_heads, past_len, head_dim, dtype=torch_dtype) for _ in range(2 * layers)]
        if with_past
        else []
    )
    names_in = ["input_ids", "attention_mask", "position_ids"]
    names_out = ["logits"]
    axes = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    for i in range(layers if with_past else 0):
        for kind in ("key", "value"):
            names_in.append(f"past_key_values.{i}.{kind}")
            names_out.append(f"present.{i}.{kind}")
            axes[f"past_key_values.{i}.{kind}"] = {0: "batch_size", 2: "past_sequence_length"}
            axes[f"present.{i}.{kind}"] = {0: "batch_size", 2: "past_sequence_length + sequence_length"}
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (ids, mask, positions, *past),
            str(out_dir / "model.onnx"),
            input_names=names_in,
            output_names=names_out,
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    model.config.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)


class _DecoderWrapper:
    """nn.Module built lazily (torch imported only when exporting) -- see export_with_torch."""

    def __new__(cls, model, layers: int, with_past: bool):
        import torch
        from transformers import DynamicCache

        class DecoderWrapper(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, position_ids, *past):
                cache = None
                if with_past:
                    cache = DynamicCache()
                    for i in range(layers):
                        cache.update(past[2 * i], past[2 * i + 1], i)
                # A ready 4-D additive mask: transformers' own mask builder uses vmap, which tracing cannot follow.
                query = torch.cumsum(torch.ones_like(input_ids[0]), 0) - 1  # 0..q-1, traced shape
                keys = torch.cumsum(torch.ones_like(attention_mask[0]), 0) - 1  # 0..kv-1
                offset = attention_mask.shape[1] - input_ids.shape[1]
                causal = keys[None, :] <= (query[:, None] + offset)
                allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
                dtype = self.model.dtype
                mask4d = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
                out = self.model(
                    input_ids=input_ids,
                    attention_mask=mask4d,
                    position_ids=position_ids,
                    past_key_values=cache,
                    use_cache=with_past,
                )
                if not with_past:
                    return out.logits
                flat = []
                for i in range(layers):
                    layer = out.past_key_values.layers[i]
                    flat += [layer.keys, layer.values]
                return (out.logits, *flat)

        return DecoderWrapper()


# ---------------------------------------------------------------- graph post-processing


def ort_optimize(model_file: Path, level: str, out_file: Path) -> None:
    """Run ONNX Runtime's offline graph optimisation at `level` and save the optimised graph."""
    import onnxruntime as ort

    from sparsedeploy.onnx.storage import external_data_path

    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[level]
    options.optimized_model_filepath = str(out_file)
    options.log_severity_level = 3
    if external_data_path(model_file).exists():
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", external_data_path(out_file).name
        )
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(model_file), sess_options=options, providers=["CPUExecutionProvider"])


def refuse_if_weights_changed(model, model_dir: Path, config: ExportConfig) -> None:
    """After an ORT optimisation: every pruned weight must still be found intact (zeros and N:M), else refuse the
    level."""
    from sparsedeploy.onnx.verify import checkpoint_reference, verify_sparsity

    reference, masks, nm = checkpoint_reference(model_dir, np.float16 if config.dtype == "float16" else np.float32)
    result = verify_sparsity(model, reference, masks, nm)
    if not result.ok:
        raise UserError(
            f"refusing --optimize {config.optimize}: ONNX Runtime's optimisation at this level folded, fused or "
            f"transposed weights so that the pruned zeros or N:M groups are no longer intact ({len(result.problems)} "
            f"weight(s), e.g. {result.problems[0]}); use --optimize none or basic"
        )


def check_domains(model, target: TargetProfile) -> None:
    used = sorted({node.domain for node in model.graph.node} - target.domains)
    if used:
        ops = sorted({node.op_type for node in model.graph.node if node.domain in used})
        raise UserError(
            f"the exported graph uses operator domain(s) {', '.join(used)} ({', '.join(ops[:6])}) that "
            f"--target {target.name} does not run: export without --optimize or for --target ort"
        )


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


def measure_load(file: Path, repeats: int = 3) -> float:
    """Median seconds for ONNX Runtime to create a session (either storage)."""
    from sparsedeploy.onnx.storage import session_from_path

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session_from_path(file)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def dir_bytes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(Path(path).iterdir()) if p.is_file()}


# ---------------------------------------------------------------- the whole export


def warn_if_no_zeros(model_dir: Path) -> int:
    """Warn when the checkpoint's 2-D weights hold no zero at all (not pruned?); return the zero count."""
    from safetensors import safe_open

    from sparsedeploy.common.models import corrupt_safetensors

    zeros = 0
    try:
        for file in sorted(Path(model_dir).glob("*.safetensors")):
            if file.name.startswith("masks"):
                continue
            with safe_open(str(file), "pt") as handle:
                for key in handle.keys():
                    if key.endswith(".weight") and len(handle.get_slice(key).get_shape()) == 2 and "embed" not in key:
                        zeros += int((handle.get_tensor(key) == 0).sum())
    except Exception:  # noqa: BLE001 - name the unreadable file
        corrupt_safetensors(model_dir)
        raise
    if zeros == 0:
        log.warning(
            "%s has no zero weights at all: it does not look pruned (export a `sparsedeploy prune` output to "
            "get a sparse model)",
            model_dir,
        )
    return zeros


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
        for fn in [*_REWRITES.get(target.name, []), *([rewrite] if rewrite else [])]:
            model = fn(model)
        if target.name == "sparse-cpu":
            report["sparse_cpu"] = pack_linears(model)
            if not report["sparse_cpu"]["linears"]:
                raise UserError(
                    f"--target sparse-cpu: no decoder linear of {model_dir} has {SPARSE_LINEAR_MIN:.0%} zeros or "
                    "more, so nothing would run sparse; prune it first (sparsedeploy prune) or use --target ort"
                )
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
        if target.name == "deepsparse":
            report["deepsparse_form"] = write_deepsparse_stack(model_dir, tmp, config)
        write_json_atomic(tmp / "export_report.json", report)
    log.info("exported %s -> %s in %.1f s", config.model, output, time.perf_counter() - start)
    return report


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


def verify_export(config: ExportConfig, model_dir: Path, onnx_path: Path, opset: int | None = None) -> dict:
    """Sparsity equality (+ N:M along K) and PyTorch/ORT parity of an export; `ok` and `problems` summarise."""
    from sparsedeploy.onnx.storage import load_model_proto
    from sparsedeploy.onnx.verify import DEFAULT_PROMPTS, checkpoint_reference, verify_parity, verify_sparsity

    np_dtype = np.float16 if config.dtype == "float16" else np.float32
    reference, masks, nm = checkpoint_reference(model_dir, np_dtype)
    model = load_model_proto(onnx_path)
    sparsity = verify_sparsity(model, reference, masks, nm)
    del model
    parity = verify_parity(
        model_dir, onnx_path, config.prompts or DEFAULT_PROMPTS, config.decode_steps, config.greedy_tokens, config.atol
    )
    problems = list(sparsity.problems)
    if parity.max_abs_diff > parity.atol:
        problems.append(
            f"logits differ from PyTorch by up to {parity.max_abs_diff:.3g} (> {parity.atol:g} for {parity.dtype})"
        )
    if not parity.greedy_identical:
        message = f"greedy continuations of {parity.greedy_tokens} tokens differ between PyTorch and ONNX Runtime"
        if parity.dtype == "float32":
            problems.append(message)
        else:
            log.warning("%s (float16: reported, not a failure)", message)
    return {
        "ok": sparsity.ok and parity.ok,
        "problems": problems,
        "sparsity": sparsity.to_dict(),
        "parity": parity.to_dict(),
    }


def summary(report: dict, output: Path | str) -> tuple[dict, str]:
    """The one-line CLI summary of an export report (and its JSON form)."""
    verification = report.get("verification")
    data = {
        "output": str(output),
        "exporter": report["exporter"],
        "opset": report["opset"],
        "target": report["target"]["name"],
        "storage": report["storage"]["kind"],
        "model_bytes": report["storage"]["model_bytes"],
        "ort_load_seconds": report["storage"]["ort_load_seconds"],
        "verified": verification is not None,
    }
    text = (
        f"exported {report['model']} -> {output} ({report['exporter']}, opset {report['opset']}, target "
        f"{data['target']}, "
        f"{data['storage']} storage {data['model_bytes'] / 2**20:.1f} MiB)"
    )
    if verification:
        sp, par = verification["sparsity"], verification["parity"]
        data.update(
            {
                "zeros_torch": sp["zeros_torch"],
                "zeros_onnx": sp["zeros_onnx"],
                "linears": sp["linears"],
                "nm_pattern": sp["nm_pattern"],
                "nm_qualifying": sp["nm_qualifying"],
                "max_abs_logit_diff": par["max_abs_diff"],
                "greedy_identical": par["greedy_identical"],
            }
        )
        text += (
            f"; verified: {sp['linears']} linears, zeros {sp['zeros_onnx']} == {sp['zeros_torch']}"
            + (
                f", {sp['nm_qualifying']}/{sp['linears']} satisfy {sp['nm_pattern']} along K"
                if sp["nm_pattern"]
                else ""
            )
            + f", max |delta logits| {par['max_abs_diff']:.2e} ({par['dtype']}), greedy {par['greedy_tokens']} tokens "
            + ("identical" if par["greedy_identical"] else "DIFFER")
        )
    else:
        text += "; not verified (--no-verify)"
    generation = (report.get("deepsparse_form") or {}).get("generation")
    if generation:
        data["deepsparse_greedy_identical"] = generation["identical"]
        tokens = min(r["new_tokens"] for r in generation["prompts"])
        text += f"; DeepSparse graphs (prefill + decode step): greedy {tokens} tokens identical to PyTorch"
    return data, text
