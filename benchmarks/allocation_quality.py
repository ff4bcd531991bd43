"""Layer-wise allocation (uniform / OWL / ATP) and sparsity-preserving recovery on smollm2-135m.

All rows of a part run in one process (model loaded once, restored to dense between rows) with the same
calibration and evaluation windows; results are written after every row, so a cut-short run keeps its rows.

    python benchmarks/allocation_quality.py --part alloc      # uniform/OWL/ATP x 0.6/0.7 with Wanda (+DSnoT if present)
    python benchmarks/allocation_quality.py --part recover    # perplexity before/after recovery at 0.7 and 2:4
    (run both parts, in parallel, to fill the combined table)

Results: benchmarks/results/allocation_quality.{alloc,recover}.json (per part) and the combined
benchmarks/results/allocation_quality.{json,md}. Run the two parts in parallel to use both cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # this checkout's package first, then quality.py
from quality import WIKITEXT, machine  # noqa: E402  (same machine string and eval file as the quality baseline)

RESULTS = HERE / "results"
if not WIKITEXT.is_file() and os.environ.get("SPARSEDEPLOY_WIKITEXT2"):  # e.g. a git worktree away from ../shared
    WIKITEXT = Path(os.environ["SPARSEDEPLOY_WIKITEXT2"])
STEM = RESULTS / "allocation_quality"


@dataclass
class Setting:
    model: str = "smollm2-135m"
    calib: str = "gensim-wiki"
    nsamples: int = 32
    calib_seqlen: int = 512
    seed: int = 0
    eval_data: str = f"wikitext2:{WIKITEXT}"
    eval_seqlen: int = 512
    max_windows: int = 16
    threads: int = 1
    device: str = "cpu"
    # recovery
    recover_data: str = "gensim-wiki"
    recover_steps: int = 50
    recover_seqlen: int = 256
    recover_batch: int = 1
    recover_rank: int = 8
    recover_lr: float = 1e-3


@dataclass
class Row:
    kind: str  # "dense", "prune" or "recover"
    method: str = "wanda"
    sparsity: str = "0.7"
    allocation: str = "uniform"
    options: dict = field(default_factory=dict)

    def name(self) -> str:
        if self.kind == "dense":
            return "dense"
        base = f"{self.method} {self.sparsity} {self.allocation}"
        return f"{base} + recovery" if self.kind == "recover" else base


class Runner:
    """All rows of one part in one process: the model is loaded once and restored to dense between rows."""

    def __init__(self, setting: Setting) -> None:
        import torch

        from sparsedeploy.data import calibration_samples, eval_tokens
        from sparsedeploy.models import load_model, resolve_device

        torch.set_num_threads(setting.threads)
        self.setting = setting
        self.device = resolve_device(setting.device)
        self.lm = load_model(setting.model, "float32")
        self.dense = {k: v.clone() for k, v in self.lm.model.state_dict().items()}
        self.tokens = eval_tokens(self.lm.tokenizer, setting.eval_data)
        self.samples = calibration_samples(self.lm.tokenizer, setting.calib, setting.nsamples, setting.calib_seqlen, setting.seed)

    def held_out(self, n: int):
        from sparsedeploy.data import calibration_samples

        s = self.setting
        return calibration_samples(self.lm.tokenizer, s.calib, n, s.calib_seqlen, s.seed + 1)

    def ppl(self, result: dict) -> float:
        from sparsedeploy.evaluate import perplexity

        r = perplexity(self.lm.model, self.tokens, self.setting.eval_seqlen, self.device, self.setting.max_windows, show_progress=False)
        result.update(eval_windows=r.windows, eval_tokens=r.tokens)
        return r.ppl

    def run(self, row: Row) -> dict:
        from sparsedeploy.allocation import AllocationConfig, plan_allocation
        from sparsedeploy.data import calibration_samples
        from sparsedeploy.evaluate import layer_sparsity, overall_sparsity
        from sparsedeploy.methods import build_method
        from sparsedeploy.prune import prune_model
        from sparsedeploy.sparsity import parse_sparsity

        s, model = self.setting, self.lm.model
        model.load_state_dict(self.dense)
        result = {"row": row.name(), **asdict(row)}
        masks = None
        if row.kind != "dense":
            spec = parse_sparsity(row.sparsity)
            method = build_method(row.method, **row.options)
            start = time.perf_counter()
            alloc = plan_allocation(model, self.samples, method, spec, AllocationConfig(row.allocation), self.device, self.held_out,
                                    show_progress=False)
            result["allocation_seconds"] = time.perf_counter() - start
            masks = prune_model(model, self.samples, method, alloc.spec_for, self.device, show_progress=False)
            result["prune_seconds"] = time.perf_counter() - start  # allocation included
            result["allocation"] = {k: v for k, v in alloc.report().items() if k != "kind"}
        result["measured_sparsity"] = overall_sparsity(layer_sparsity(model))
        if row.kind == "recover":
            from sparsedeploy.recover import RecoverConfig, recover_model, same_zeros, zero_pattern

            before = zero_pattern(model)
            result["ppl_before"] = self.ppl(result)
            cfg = RecoverConfig(steps=s.recover_steps, seqlen=s.recover_seqlen, batch=s.recover_batch, rank=s.recover_rank,
                                lr=s.recover_lr, seed=s.seed)
            train = calibration_samples(self.lm.tokenizer, s.recover_data, cfg.steps * cfg.batch, cfg.seqlen, s.seed + 7)
            result["recover"] = recover_model(model, masks, train, cfg, self.device, show_progress=False)
            result["zeros_identical"] = same_zeros(before, zero_pattern(model))
            result["sparsity_after"] = overall_sparsity(layer_sparsity(model))
        result["ppl"] = self.ppl(result)
        return result


def part_file(part: str) -> Path:
    return RESULTS / f"allocation_quality.{part}.json"


def write_combined(setting: Setting) -> None:
    results = []
    for part in ("alloc", "recover"):
        if part_file(part).is_file():
            results += json.loads(part_file(part).read_text())
    doc = {"setting": asdict(setting), "machine": machine(), "date": time.strftime("%Y-%m-%d"),
           "dsnot_available": has_method("dsnot"), "results": results}
    from sparsedeploy.fsutil import write_json_atomic

    write_json_atomic(STEM.with_suffix(".json"), doc)
    tmp = STEM.with_suffix(f".md.tmp{os.getpid()}")
    tmp.write_text(to_markdown(doc))
    os.replace(tmp, STEM.with_suffix(".md"))


def run_rows(setting: Setting, rows: list[Row], part: str) -> list[dict]:
    runner = Runner(setting)
    results = []
    for row in rows:
        try:
            r = runner.run(row)
        except Exception as exc:  # noqa: BLE001 - record the failure, keep the other rows
            logging.exception("row %s failed", row.name())
            r = {"row": row.name(), **asdict(row), "error": f"{type(exc).__name__}: {exc}"}
        results.append(r)
        if "error" not in r:
            logging.info("%-34s ppl %9.3f  sparsity %.5f  time %6.1f s", r["row"], r["ppl"], r["measured_sparsity"], r.get("prune_seconds", 0.0))
        part_file(part).write_text(json.dumps(results, indent=2, default=str) + "\n")
        write_combined(setting)
    return results


def has_method(name: str) -> bool:
    from sparsedeploy.methods import METHODS

    return name in METHODS


def to_markdown(doc: dict) -> str:
    s = Setting(**doc["setting"])
    lines = ["# Layer-wise sparsity allocation and recovery on smollm2-135m", "",
             f"Model `{s.model}`, calibration `{s.calib}` {s.nsamples}x{s.calib_seqlen} (seed {s.seed}), evaluation WikiText-2 test "
             f"{s.max_windows} windows x {s.eval_seqlen}, device {s.device}, {s.threads} thread. Machine: {doc['machine']}; {doc['date']}.", ""]
    alloc = [r for r in doc["results"] if r["kind"] in ("dense", "prune")]
    if alloc:
        lines += ["## Allocation", "",
                  "Time = allocation (OWL statistics pass / ATP search) + pruning, seconds.", "",
                  "| row | allocated mean | measured sparsity | per-block min..max | perplexity | time (s) | of which allocation (s) |",
                  "|---|---|---|---|---|---|---|"]
        for r in alloc:
            if "error" in r:
                lines.append(f"| {r['row']} | failed: {r['error']} | | | | | |")
                continue
            a = r.get("allocation")
            span = f"{a['min']:.3f}..{a['max']:.3f}" if a else "-"
            mean = f"{a['allocated_mean']:.6f}" if a else "-"
            lines.append(f"| {r['row']} | {mean} | {r['measured_sparsity']:.5f} | {span} | {r['ppl']:.2f} | "
                         f"{r.get('prune_seconds', 0):.0f} | {r.get('allocation_seconds', 0):.0f} |")
        lines.append("")
        for r in alloc:
            a = r.get("allocation") or {}
            if a.get("atp_search"):
                trials = ", ".join(f"d={t['difference']:.4f}: {t['ppl']:.2f}" for t in a["atp_search"])
                lines.append(f"- {r['row']}: ATP search (held-out calibration perplexity) {trials}; chose d={a['atp_difference']:.4f}.")
        lines.append("")
    rec = [r for r in doc["results"] if r["kind"] == "recover"]
    if rec:
        lines += ["## Sparsity-preserving recovery (masked LoRA, merged)", "",
                  f"Training: `{s.recover_data}`, {s.recover_steps} steps x batch {s.recover_batch} x {s.recover_seqlen} tokens, "
                  f"rank {s.recover_rank}, lr {s.recover_lr}, LM loss.", "",
                  "| row | sparsity before | sparsity after | zeros identical | ppl before | ppl after | train tokens | train time (s) | loss first→last 10 steps |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rec:
            if "error" in r:
                lines.append(f"| {r['row']} | failed: {r['error']} | | | | | | | |")
                continue
            v = r["recover"]
            lines.append(f"| {r['row']} | {r['measured_sparsity']:.5f} | {r['sparsity_after']:.5f} | {r['zeros_identical']} | {r['ppl_before']:.2f} | "
                         f"{r['ppl']:.2f} | {v['tokens']} | {v['seconds']:.0f} | {v['loss_first']:.3f}→{v['loss_last']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["alloc", "recover"], required=True)
    parser.add_argument("--sparsities", nargs="*", default=["0.6", "0.7"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    setting = Setting()
    rows: list[Row] = []
    if args.part == "alloc":
        methods = ["wanda"] + (["dsnot"] if has_method("dsnot") else [])
        if "dsnot" not in methods:
            logging.warning("no dsnot method in this checkout: Wanda+DSnoT rows skipped")
        # most informative first (0.7), so a cut-short run still answers the main question
        rows += [Row("prune", m, sp, a) for sp in sorted(args.sparsities, reverse=True) for m in methods for a in ("uniform", "owl", "atp")]
        rows += [Row("dense")]
    if args.part == "recover":
        rows += [Row("recover", "wanda", "0.7", "uniform"), Row("recover", "wanda", "2:4", "uniform")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    run_rows(setting, rows, args.part)
    logging.info("wrote %s.{json,md}", STEM)


if __name__ == "__main__":
    main()
