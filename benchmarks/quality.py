"""Quality baseline: perplexity, prune time and peak RSS of pruning methods on the real model.

Every row runs in its own subprocess (so peak RSS is that row's own) with the same calibration
windows and the same evaluation windows. Results go to benchmarks/results/quality.{json,md}.

    python benchmarks/quality.py                   # the full baseline table (about 30 min on 2 CPU cores)
    python benchmarks/quality.py --ci              # reduced set; fails if Wanda-50% regresses (see TOLERANCE)
    python benchmarks/quality.py --rows wanda:0.5 magnitude:2:4 --out /tmp/q
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WIKITEXT = HERE.parent.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"

# Relative tolerance of the CI gate on Wanda-50% perplexity versus the committed baseline.
TOLERANCE = 0.03


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


@dataclass
class Row:
    method: str  # "dense" for the unpruned model
    sparsity: str = "0.5"
    options: dict = field(default_factory=dict)
    label: str = ""

    def name(self) -> str:
        return self.label or (self.method if self.method == "dense" else f"{self.method} {self.sparsity}")


FULL = [Row("dense")] + [Row(m, s) for m in ("magnitude", "wanda") for s in ("0.5", "0.6", "0.7", "2:4", "4:8")]
CI = [Row("dense"), Row("wanda", "0.5")]


def run_one(setting: Setting, row: Row) -> dict:
    """Executed in a child process: load, calibrate, prune, evaluate; return the row's figures."""
    import torch

    from sparsedeploy.data import calibration_samples, eval_tokens
    from sparsedeploy.evaluate import layer_sparsity, overall_sparsity, perplexity
    from sparsedeploy.methods import build_method
    from sparsedeploy.models import load_model, resolve_device
    from sparsedeploy.prune import prune_model
    from sparsedeploy.sparsity import parse_sparsity

    torch.set_num_threads(setting.threads)
    device = resolve_device(setting.device)
    lm = load_model(setting.model, "float32")
    result = {"row": row.name(), **asdict(row)}
    if row.method != "dense":
        spec = parse_sparsity(row.sparsity)
        samples = calibration_samples(lm.tokenizer, setting.calib, setting.nsamples, setting.calib_seqlen, setting.seed)
        start = time.perf_counter()
        prune_model(lm.model, samples, build_method(row.method, **row.options), lambda _i, _n: spec, device, show_progress=False)
        result["prune_seconds"] = time.perf_counter() - start
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    result["sparsity"] = overall_sparsity(layer_sparsity(lm.model))
    tokens = eval_tokens(lm.tokenizer, setting.eval_data)
    ppl = perplexity(lm.model, tokens, setting.eval_seqlen, device, setting.max_windows, show_progress=False)
    result.update(ppl=ppl.ppl, eval_windows=ppl.windows, eval_tokens=ppl.tokens)
    return result


def run_rows(setting: Setting, rows: list[Row]) -> list[dict]:
    results = []
    for row in rows:
        payload = json.dumps({"setting": asdict(setting), "row": asdict(row)})
        proc = subprocess.run([sys.executable, __file__, "--child", payload], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"row {row.name()} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        logging.info("%-24s ppl %9.3f  sparsity %.4f  prune %6.1f s  peak RSS %6.0f MiB", r["row"], r["ppl"], r["sparsity"],
                     r.get("prune_seconds", 0.0), r["peak_rss_mib"])
    return results


def machine() -> str:
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def to_markdown(setting: Setting, results: list[dict], title: str) -> str:
    dense = next((r["ppl"] for r in results if r["method"] == "dense"), None)
    lines = [f"# {title}", "",
             f"Model `{setting.model}`, calibration `{setting.calib}` {setting.nsamples}x{setting.calib_seqlen} (seed {setting.seed}), "
             f"evaluation WikiText-2 test, {results[0]['eval_windows']} windows x {setting.eval_seqlen} "
             f"({results[0]['eval_tokens']} predicted tokens, the same for every row), device {setting.device}, {setting.threads} thread(s).", "",
             "| row | sparsity | perplexity | vs dense | prune time (s) | peak RSS (MiB) |", "|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r['ppl'] / dense:.2f}x" if dense else ""
        prune = f"{r['prune_seconds']:.1f}" if "prune_seconds" in r else "-"
        lines.append(f"| {r['row']} | {r['sparsity']:.4f} | {r['ppl']:.2f} | {ratio} | {prune} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ci", action="store_true", help="reduced set + regression gate against the committed baseline")
    parser.add_argument("--rows", nargs="*", help="METHOD:SPARSITY items (e.g. wanda:0.5 magnitude:2:4 dense)")
    parser.add_argument("--out", type=Path, default=None, help="result stem (default benchmarks/results/quality)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        payload = json.loads(args.child)
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(run_one(Setting(**payload["setting"]), Row(**payload["row"]))))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    setting = Setting()
    if args.ci:
        setting.max_windows, setting.nsamples = 16, 32
    rows = CI if args.ci else FULL
    if args.rows:
        rows = [Row("dense") if r == "dense" else Row(r.split(":", 1)[0], r.split(":", 1)[1]) for r in args.rows]
    results = run_rows(setting, rows)
    stem = args.out or (RESULTS / ("quality_ci" if args.ci else "quality"))
    stem.parent.mkdir(parents=True, exist_ok=True)
    doc = {"setting": asdict(setting), "machine": machine(), "date": time.strftime("%Y-%m-%d"), "results": results}
    if args.ci:
        baseline_path = RESULTS / "quality_ci_baseline.json"
        current = {r["row"]: r["ppl"] for r in results}
        if baseline_path.is_file():
            base = {r["row"]: r["ppl"] for r in json.loads(baseline_path.read_text())["results"]}
            ratio_now = current["wanda 0.5"] / current["dense"]
            ratio_base = base["wanda 0.5"] / base["dense"]
            doc["gate"] = {"tracked": "ppl(wanda 0.5) / ppl(dense)", "baseline": ratio_base, "current": ratio_now, "tolerance": TOLERANCE}
            logging.info("CI gate: wanda-50%%/dense perplexity ratio %.4f vs baseline %.4f (tolerance %.0f%%)", ratio_now, ratio_base, TOLERANCE * 100)
            if ratio_now > ratio_base * (1 + TOLERANCE):
                raise SystemExit(f"quality regression: Wanda-50% perplexity ratio {ratio_now:.4f} > baseline {ratio_base:.4f} +{TOLERANCE:.0%}")
        else:
            logging.warning("no baseline at %s: writing one; commit it to enable the gate", baseline_path)
            baseline_path.write_text(json.dumps(doc, indent=2) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    stem.with_suffix(".md").write_text(to_markdown(setting, results, "Pruning quality on smollm2-135m") + f"\nMachine: {doc['machine']}; {doc['date']}.\n")
    logging.info("wrote %s.{json,md}", stem)


if __name__ == "__main__":
    main()
