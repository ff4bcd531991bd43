"""The end-to-end pipeline: prune -> evaluate -> quality gate -> export -> bench -> REPORT.md.

All artefacts land in one output directory. The run works in a staging directory beside it
(`.NAME.staging`) and renames it into place at the end, so an interrupted run leaves no
half-written output; `resume=True` picks the staging directory up again, skipping finished stages
and resuming pruning from its last finished block.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sparsedeploy.common.errors import UserError
from sparsedeploy.common.files import (
    KEPT_FOR_RESUME,
    RUN_STAGE,
    check_output_dir,
    refuse_unmarked,
    write_json_atomic,
    write_marker,
)
from sparsedeploy.pipeline.recipe import Recipe

log = logging.getLogger(__name__)


class GateFailed(Exception):
    """The quality gate rejected the pruned model (the CLI exits with status 3)."""


@dataclass
class StageResult:
    name: str
    seconds: float
    data: dict


def staging_dir_for(output: Path) -> Path:
    return output.parent / f".{output.name}.staging"


def _eval_data(recipe: Recipe) -> str:
    from sparsedeploy.common.data import default_wikitext_test

    if recipe.eval.data:
        return recipe.eval.data
    found = default_wikitext_test()
    if found is None:
        raise UserError(
            "recipe key eval.data is not set and no offline WikiText-2 test file was found: set eval.data (e.g. "
            "wikitext2:PATH) or SPARSEDEPLOY_WIKITEXT2=PATH/wiki.test.raw"
        )
    return f"wikitext2:{found}"


def _evaluate(model_ref: str, recipe: Recipe, data: str, show_progress: bool) -> dict:
    from sparsedeploy.common.data import eval_tokens, window_bos
    from sparsedeploy.common.evaluate import layer_sparsity, overall_sparsity, perplexity
    from sparsedeploy.common.models import default_seqlen, load_model, resolve_device

    lm = load_model(model_ref, recipe.dtype)
    seqlen = recipe.eval.seqlen or default_seqlen(lm.model)
    result = perplexity(
        lm.model,
        eval_tokens(lm.tokenizer, data),
        seqlen,
        resolve_device(recipe.device),
        recipe.eval.max_windows,
        show_progress,
        bos=window_bos(lm.model, lm.tokenizer),
    )
    return {**result.to_dict(), "data": data, "sparsity": overall_sparsity(layer_sparsity(lm.model))}


def check_gate(recipe: Recipe, dense_ppl: float | None, pruned_ppl: float) -> dict:
    gate = {"max_ppl_ratio": recipe.gate.max_ppl_ratio, "max_ppl": recipe.gate.max_ppl, "passed": True, "reasons": []}
    if recipe.gate.max_ppl_ratio is not None and dense_ppl is not None:
        gate["ppl_ratio"] = pruned_ppl / dense_ppl
        if gate["ppl_ratio"] > recipe.gate.max_ppl_ratio:
            gate["passed"] = False
            gate["reasons"].append(
                f"perplexity ratio {gate['ppl_ratio']:.3f} > max_ppl_ratio {recipe.gate.max_ppl_ratio}"
            )
    if recipe.gate.max_ppl is not None and pruned_ppl > recipe.gate.max_ppl:
        gate["passed"] = False
        gate["reasons"].append(f"perplexity {pruned_ppl:.3f} > max_ppl {recipe.gate.max_ppl}")
    return gate


def refuse_unrunnable_bench(recipe: Recipe) -> None:
    """A requested measurement that cannot happen on this machine is refused before any work (exit 2)."""
    section = recipe.bench
    if not section.enabled:
        return
    reason = None
    if section.engine == "tensorrt":
        from sparsedeploy.runtimes.tensorrt_runner import unavailable_reason

        reason = unavailable_reason()
    elif section.engine == "torch" and recipe.device.startswith("cuda"):
        import torch

        reason = None if torch.cuda.is_available() else "CUDA is not available on this machine"
    if reason:
        raise UserError(
            f"bench.engine {section.engine} cannot run here ({reason}): set bench.enabled: false, or use "
            "bench.engine sparse-cpu or ort"
        )


class Pipeline:
    def __init__(
        self, recipe: Recipe, output: Path, overwrite: bool = False, resume: bool = False, show_progress: bool = True
    ) -> None:
        self.recipe = recipe
        self.output = Path(output)
        self.overwrite = overwrite
        self.resume = resume
        self.show_progress = show_progress
        self.staging = staging_dir_for(self.output)
        self.stages: list[StageResult] = []

    def _stage_file(self, name: str) -> Path:
        return self.staging / "stages" / f"{name}.json"

    def _stage(self, name: str, fn) -> dict:
        """Run a stage once; on --resume a finished stage's recorded result is reused."""
        done = self._stage_file(name)
        if self.resume and done.is_file():
            data = json.loads(done.read_text())
            log.info("stage %s already done (resumed)", name)
            self.stages.append(StageResult(name, data.pop("_seconds", 0.0), data))
            return data
        log.info("stage %s", name)
        RUN_STAGE["name"] = name
        start = time.perf_counter()
        data = fn()
        seconds = time.perf_counter() - start
        write_json_atomic(done, {**data, "_seconds": seconds})
        self.stages.append(StageResult(name, seconds, data))
        return data

    def prepare(self) -> None:
        check_output_dir(self.output, self.overwrite)
        refuse_unrunnable_bench(self.recipe)
        if self.staging.exists() and not self.resume:
            if not self.overwrite:
                raise UserError(
                    f"an interrupted run left {self.staging}: pass --resume to continue it, or --overwrite to start "
                    "over"
                )
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True, exist_ok=True)
        write_marker(self.staging)  # the finished output carries it: a later --overwrite may replace it
        KEPT_FOR_RESUME[str(self.staging)] = "finished stages"
        recipe_file = self.staging / "recipe.json"
        current = asdict(self.recipe)
        current.pop("output", None)
        if (
            self.resume
            and recipe_file.is_file()
            and json.loads(recipe_file.read_text()) != json.loads(json.dumps(current))
        ):
            raise UserError(
                f"cannot resume {self.staging}: the recipe changed since it started; rerun with the same recipe or "
                "pass --overwrite"
            )
        write_json_atomic(recipe_file, current)

    def run(self) -> dict:
        from sparsedeploy.prune.driver import PruneConfig, run_prune

        self.prepare()
        r = self.recipe
        data = _eval_data(r)
        model_dir = self.staging / "model"
        dense = None
        if r.eval.dense:
            dense = self._stage("eval_dense", lambda: _evaluate(r.model, r, data, self.show_progress))
        config = PruneConfig(
            model=r.model,
            method=r.prune.method,
            sparsity=r.prune.sparsity,
            calib=r.calibration.source,
            nsamples=r.calibration.nsamples,
            seqlen=r.calibration.seqlen,
            seed=r.calibration.seed,
            device=r.device,
            dtype=r.dtype,
            method_options=dict(r.prune.options),
            allocation=r.prune.allocation,
        )
        self._stage(
            "prune",
            lambda: _summary(
                run_prune(
                    config,
                    model_dir,
                    overwrite=True,
                    show_progress=self.show_progress,
                    resume=self.resume,
                    offload=r.offload,
                )
            ),
        )
        pruned = self._stage("eval_pruned", lambda: _evaluate(str(model_dir), r, data, self.show_progress))
        gate = check_gate(r, dense["ppl"] if dense else None, pruned["ppl"])
        self.stages.append(StageResult("gate", 0.0, gate))
        if gate["passed"]:
            if r.export.enabled:
                self._stage("export", lambda: run_export_stage(r, model_dir, self.staging / "onnx"))
            if r.bench.enabled:
                self._stage(
                    "bench", lambda: run_bench_stage(r, model_dir, self.staging / "onnx", self.staging / "bench")
                )
        report = self.finish(dense, pruned, gate)
        if not gate["passed"]:
            raise GateFailed("; ".join(gate["reasons"]) + f" (report in {self.output})")
        return report

    def finish(self, dense: dict | None, pruned: dict, gate: dict) -> dict:
        from sparsedeploy.pipeline.report import write_report

        report = {
            "recipe": asdict(self.recipe),
            "output": str(self.output),
            "dense": dense,
            "pruned": pruned,
            "gate": gate,
            "stages": [{"name": s.name, "seconds": s.seconds} for s in self.stages],
            "stage_results": {s.name: s.data for s in self.stages},
        }
        prune_report = json.loads((self.staging / "model" / "report.json").read_text())
        write_report(self.staging, report, prune_report)
        shutil.rmtree(self.staging / "stages", ignore_errors=True)
        refuse_unmarked(self.output)  # checked again: the directory may have appeared during the run
        KEPT_FOR_RESUME.pop(str(self.staging), None)
        if self.output.exists():
            old = self.output.with_name(f".{self.output.name}.old-{os.getpid()}")
            os.replace(self.output, old)
            os.replace(self.staging, self.output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.staging, self.output)
        return report


def _summary(prune_report: dict) -> dict:
    keys = (
        "method",
        "sparsity_spec",
        "overall_sparsity",
        "prune_seconds",
        "peak_rss_mib",
        "calibration",
        "resumed_from_block",
    )
    return {k: prune_report[k] for k in keys if k in prune_report}


def run_export_stage(recipe: Recipe, model_dir: Path, onnx_dir: Path) -> dict:
    try:
        import sparsedeploy.export.run  # noqa: F401 - fails without the export extra
    except ImportError:
        raise UserError(
            "recipe key export.enabled: this installation has no ONNX exporter: pip install 'sparsedeploy[export]'"
        ) from None
    return export_stage(recipe, model_dir, onnx_dir)


def run_bench_stage(recipe: Recipe, model_dir: Path, onnx_dir: Path, out_dir: Path) -> dict:
    try:
        import sparsedeploy.bench.run  # noqa: F401 - fails without the bench extra
    except ImportError:
        raise UserError(
            "recipe key bench.enabled: this installation has no benchmark harness: pip install 'sparsedeploy[bench]'"
        ) from None
    return bench_stage(recipe, model_dir, onnx_dir, out_dir)


def bench_form_fields(recipe) -> dict:
    """ExportConfig fields for the static forms the recipe's bench times: its engine's, at its batch sizes, prompt
    and generation lengths (the pruned and the dense export both); none when the bench needs none."""
    from sparsedeploy.export.config import BENCH_FORM_ENGINES

    bench = recipe.bench
    if not (bench.enabled and bench.engine in BENCH_FORM_ENGINES):
        return {"bench_forms": "none"}
    return {
        "bench_forms": bench.engine,
        "bench_batch": tuple(bench.batch),
        "bench_prompt_len": bench.prompt_len,
        "bench_gen_len": bench.gen_len,
    }


def export_stage(recipe, model_dir: Path, onnx_dir: Path) -> dict:
    """The pipeline's export stage (`export:` section of a recipe): export + verify the pruned model, return the
    summary."""
    from sparsedeploy.export.report import size_text, summary
    from sparsedeploy.export.run import ExportConfig, export_checkpoint

    section = recipe.export
    config = ExportConfig(
        model=str(model_dir),
        dtype=section.dtype,
        opset=section.opset,
        target=section.target,
        storage=section.storage,
        verify=section.verify,
        **bench_form_fields(recipe),
    )
    report = export_checkpoint(config, onnx_dir, overwrite=True)
    data, text = summary(report, onnx_dir)
    log.info("%s", text)
    rows = [
        ("ONNX", f"`{onnx_dir.name}/model.onnx` ({data['exporter']}, opset {data['opset']}, target {data['target']})"),
        (
            "size",
            f"{size_text(data)}; ONNX Runtime load {data['ort_load_seconds']:.2f} s",
        ),
    ]
    if data["verified"]:
        rows += [
            (
                "zeros",
                f"{data['zeros_onnx']} in ONNX == {data['zeros_torch']} in PyTorch over {data['linears']} linears",
            ),
            (
                "parity",
                f"max abs logit difference {data['max_abs_logit_diff']:.2e}; greedy continuation "
                + ("identical" if data["greedy_identical"] else "differs"),
            ),
        ]
        if data["nm_pattern"]:
            rows.append(
                ("N:M along K", f"{data['nm_qualifying']}/{data['linears']} weights satisfy {data['nm_pattern']}")
            )
    else:
        rows.append(("verification", "skipped (export.verify: false)"))
    data["markdown"] = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    return data


def bench_stage(recipe, model_dir: Path, onnx_dir: Path, out_dir: Path) -> dict:
    """The pipeline's bench stage (`bench:` section of a recipe): the pruned model against the dense one.

    ort/deepsparse time the verified export of the export stage against a dense export made here (deleted
    afterwards); torch times the two checkpoints. Writes bench.json/.md/.png into `out_dir`.
    """
    import shutil

    from sparsedeploy.bench.config import BenchConfig
    from sparsedeploy.bench.report import markdown, plot
    from sparsedeploy.bench.run import run_bench
    from sparsedeploy.common.files import write_json_atomic
    from sparsedeploy.common.models import resolve_model_path

    section = recipe.bench
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = out_dir / ".dense_onnx"
    device = recipe.device if recipe.device != "auto" else ("cuda" if section.engine == "tensorrt" else "cpu")
    cfg = BenchConfig(
        model=str(onnx_dir),
        engine=section.engine,
        batches=list(section.batch),
        prompt_len=section.prompt_len,
        gen_len=section.gen_len,
        threads=section.threads,
        device=device,
    )
    try:
        if section.engine == "torch":
            cfg.model, cfg.baseline = str(model_dir), str(resolve_model_path(recipe.model))
        else:
            from sparsedeploy.export.run import ExportConfig, export_checkpoint

            log.info("exporting the dense model %s for the baseline timings", recipe.model)
            # the baseline is the dense model as ONNX Runtime runs it (a dense model has nothing for sparse-cpu to pack)
            target = "ort" if recipe.export.target == "sparse-cpu" else recipe.export.target
            export_checkpoint(
                ExportConfig(
                    model=recipe.model,
                    dtype=recipe.export.dtype,
                    opset=recipe.export.opset,
                    target=target,
                    verify=False,
                    **bench_form_fields(recipe),
                ),
                scratch,
                overwrite=True,
            )
            cfg.baseline = str(scratch)
        result = run_bench(cfg)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if "skipped" in result:  # a requested measurement that did not happen fails the run
        raise UserError(f"no measurement: {result['skipped']}")
    md = markdown(result)
    write_json_atomic(out_dir / "bench.json", result)
    (out_dir / "bench.md").write_text(md)
    png = plot(result, out_dir / "bench.png")
    speedups = {f"batch {r['batch']} {r['phase']}": r["speedup"] for r in result["rows"] if "speedup" in r}
    body = md.split("\n", 2)[2] if md.startswith("# ") else md  # REPORT.md gives the heading
    if png is not None:
        body += f"\n![speedup](bench/{png.name})\n"
    return {
        "engine": section.engine,
        "threads": section.threads,
        "speedups": speedups,
        "markdown": body,
        "form": sorted({r["form"] for r in result["rows"]}),
    }
