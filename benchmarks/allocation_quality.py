"""Layer-wise allocation (uniform / OWL / ATP) and sparsity-preserving recovery on smollm2-135m.

Every row runs in its own subprocess with the same calibration and evaluation windows.

    python benchmarks/allocation_quality.py --part alloc      # uniform/OWL/ATP x 0.6/0.7 with Wanda (+DSnoT if present)
    python benchmarks/allocation_quality.py --part recover    # perplexity before/after recovery at 0.7 and 2:4
    python benchmarks/allocation_quality.py                   # both

Results: benchmarks/results/allocation_quality.{json,md} (a part merges into the existing JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
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
    nsamples: int = 64
    calib_seqlen: int = 512
    seed: int = 0
    eval_data: str = f"wikitext2:{WIKITEXT}"
    eval_seqlen: int = 512
    max_windows: int = 64
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


def run_one(setting: Setting, row: Row) -> dict:
    import torch

    from sparsedeploy.allocation import AllocationConfig, plan_allocation
    from sparsedeploy.data import calibration_samples, eval_tokens
    from sparsedeploy.evaluate import layer_sparsity, overall_sparsity, perplexity
    from sparsedeploy.methods import build_method
    from sparsedeploy.models import load_model, resolve_device
    from sparsedeploy.prune import prune_model
    from sparsedeploy.sparsity import parse_sparsity

    torch.set_num_threads(setting.threads)
    device = resolve_device(setting.device)
    lm = load_model(setting.model, "float32")
    tokens = eval_tokens(lm.tokenizer, setting.eval_data)
    result = {"row": row.name(), **asdict(row)}

    def ppl() -> float:
        r = perplexity(lm.model, tokens, setting.eval_seqlen, device, setting.max_windows, show_progress=False)
        result.update(eval_windows=r.windows, eval_tokens=r.tokens)
        return r.ppl

    if row.kind != "dense":
        spec = parse_sparsity(row.sparsity)
        method = build_method(row.method, **row.options)
        samples = calibration_samples(lm.tokenizer, setting.calib, setting.nsamples, setting.calib_seqlen, setting.seed)
        start = time.perf_counter()
        alloc = plan_allocation(lm.model, samples, method, spec, AllocationConfig(row.allocation), device,
                                lambda n: calibration_samples(lm.tokenizer, setting.calib, n, setting.calib_seqlen, setting.seed + 1),
                                show_progress=False)
        result["allocation_seconds"] = time.perf_counter() - start
        masks = prune_model(lm.model, samples, method, alloc.spec_for, device, show_progress=False)
        result["prune_seconds"] = time.perf_counter() - start  # allocation included
        result["allocation"] = {k: v for k, v in alloc.report().items() if k != "kind"}
        result["measured_sparsity"] = overall_sparsity(layer_sparsity(lm.model))
    else:
        result["measured_sparsity"] = 0.0
    if row.kind == "recover":
        from sparsedeploy.recover import RecoverConfig, recover_model, same_zeros, zero_pattern

        before = zero_pattern(lm.model)
        result["ppl_before"] = ppl()
        cfg = RecoverConfig(steps=setting.recover_steps, seqlen=setting.recover_seqlen, batch=setting.recover_batch,
                            rank=setting.recover_rank, lr=setting.recover_lr, seed=setting.seed)
        train = calibration_samples(lm.tokenizer, setting.recover_data, cfg.steps * cfg.batch, cfg.seqlen, setting.seed + 7)
        info = recover_model(lm.model, masks, train, cfg, device, show_progress=False)
        result["recover"] = info
        result["zeros_identical"] = same_zeros(before, zero_pattern(lm.model))
        result["sparsity_after"] = overall_sparsity(layer_sparsity(lm.model))
    result["ppl"] = ppl()
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return result


def run_rows(setting: Setting, rows: list[Row], log_path: Path | None) -> list[dict]:
    results = []
    for row in rows:
        payload = json.dumps({"setting": asdict(setting), "row": asdict(row)})
        proc = subprocess.run([sys.executable, __file__, "--child", payload], capture_output=True, text=True)
        if proc.returncode != 0:
            logging.error("row %s failed:\n%s", row.name(), proc.stderr[-3000:])
            results.append({"row": row.name(), **asdict(row), "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"})
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        logging.info("%-34s ppl %9.3f  sparsity %.5f  time %6.1f s", r["row"], r["ppl"], r["measured_sparsity"], r.get("prune_seconds", 0.0))
        if log_path:
            log_path.write_text(json.dumps(results, indent=2) + "\n")
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
    parser.add_argument("--part", choices=["alloc", "recover", "all"], default="all")
    parser.add_argument("--sparsities", nargs="*", default=["0.6", "0.7"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        payload = json.loads(args.child)
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(run_one(Setting(**payload["setting"]), Row(**payload["row"])), default=str))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    setting = Setting()
    rows: list[Row] = []
    if args.part in ("alloc", "all"):
        methods = ["wanda"] + (["dsnot"] if has_method("dsnot") else [])
        if "dsnot" not in methods:
            logging.warning("no dsnot method in this checkout: Wanda+DSnoT rows skipped")
        rows += [Row("dense")]
        rows += [Row("prune", m, s, a) for s in args.sparsities for m in methods for a in ("uniform", "owl", "atp")]
    if args.part in ("recover", "all"):
        rows += [Row("recover", "wanda", "0.7", "uniform"), Row("recover", "wanda", "2:4", "uniform")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.gettempdir()) / f"allocation_quality_{args.part}.partial.json"
    results = run_rows(setting, rows, partial)
    path = STEM.with_suffix(".json")
    old = json.loads(path.read_text())["results"] if path.is_file() else []
    names = {r["row"] for r in results}
    merged = [r for r in old if r["row"] not in names] + results
    order = {"dense": 0, "prune": 1, "recover": 2}
    merged.sort(key=lambda r: (order[r["kind"]], str(r.get("sparsity")), r["row"]))
    doc = {"setting": asdict(setting), "machine": machine(), "date": time.strftime("%Y-%m-%d"),
           "dsnot_available": has_method("dsnot"), "results": merged}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    STEM.with_suffix(".md").write_text(to_markdown(doc))
    logging.info("wrote %s.{json,md}", STEM)


if __name__ == "__main__":
    main()
