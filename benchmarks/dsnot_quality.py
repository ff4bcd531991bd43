"""SparseGPT and DSnoT on the real model: perplexity, prune time and peak RSS, side by side with Wanda.

Every row runs in its own subprocess (peak RSS is that row's own) with the same calibration windows
and evaluation windows as the baseline table (benchmarks/quality.py). Rows run in priority order and
the result files are rewritten after every row, so an interrupted run keeps what it measured and a
rerun skips rows already in the JSON (--fresh to start over).

    python benchmarks/dsnot_quality.py                      # every row, in priority order
    python benchmarks/dsnot_quality.py --only "wanda 0.6" "wanda+dsnot(verified,attn) 0.6"
    python benchmarks/dsnot_quality.py --list
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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
if not WIKITEXT.is_file():  # a worktree sits one level deeper than the main checkout
    WIKITEXT = Path("/work/shared/data/wikitext-2-raw/wiki.test.raw")


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
    label: str
    method: str
    sparsity: str
    options: dict = field(default_factory=dict)

    def name(self) -> str:
        return f"{self.label} {self.sparsity}"


def dsnot(init: str, mode: str, targets: str, sparsity: str) -> Row:
    return Row(f"{init}+dsnot({mode},{targets})", "dsnot", sparsity, {"init": init, "mode": mode, "targets": targets})


def planned_rows() -> list[Row]:
    """Priority order: the comparisons the issue needs first, the extras after."""
    rows: list[Row] = []
    for s in ("0.6", "0.7", "2:4"):
        rows += [Row("wanda", "wanda", s), dsnot("wanda", "verified", "attn", s), dsnot("wanda", "paper", "attn", s),
                 Row("sparsegpt", "sparsegpt", s)]
    for s in ("0.6", "0.7", "2:4"):
        rows += [dsnot("wanda", "verified", "all", s), dsnot("wanda", "second-order", "attn", s)]
    for s in ("0.6", "0.7", "2:4"):
        rows += [dsnot("sparsegpt", "verified", "attn", s), dsnot("wanda", "paper", "all", s)]
    for s in ("0.6", "0.7", "2:4"):
        rows += [dsnot("magnitude", "verified", "attn", s), Row("magnitude", "magnitude", s)]
    for s in ("0.6", "0.7", "2:4"):
        rows += [dsnot("wanda", "second-order", "all", s), dsnot("sparsegpt", "second-order", "attn", s)]
    rows += [Row("wanda", "wanda", "0.5"), dsnot("wanda", "verified", "attn", "0.5"), Row("sparsegpt", "sparsegpt", "0.5"),
             dsnot("sparsegpt", "verified", "attn", "0.5"), dsnot("magnitude", "verified", "attn", "0.5")]
    return rows


def run_one(setting: Setting, row: Row) -> dict:
    """In a child process: load, calibrate, prune, evaluate; return the row's figures."""
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
    spec = parse_sparsity(row.sparsity)
    samples = calibration_samples(lm.tokenizer, setting.calib, setting.nsamples, setting.calib_seqlen, setting.seed)
    method = build_method(row.method, **row.options)
    start = time.perf_counter()
    prune_model(lm.model, samples, method, lambda _i, _n: spec, device, show_progress=False)
    result = {"row": row.name(), **asdict(row), "prune_seconds": time.perf_counter() - start,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
              "sparsity_measured": overall_sparsity(layer_sparsity(lm.model))}
    if getattr(method, "summary", None):
        result["method_summary"] = method.summary
    tokens = eval_tokens(lm.tokenizer, setting.eval_data)
    ppl = perplexity(lm.model, tokens, setting.eval_seqlen, device, setting.max_windows, show_progress=False)
    result.update(ppl=ppl.ppl, eval_windows=ppl.windows, eval_tokens=ppl.tokens)
    return result


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores (shared with other jobs), {gpu}, torch {torch.__version__}"


def to_markdown(doc: dict) -> str:
    s = Setting(**doc["setting"])
    res = doc["results"]
    wanda = {r["sparsity"]: r["ppl"] for r in res if r["label"] == "wanda"}
    lines = ["# DSnoT and SparseGPT on smollm2-135m", "",
             f"Calibration `{s.calib}` {s.nsamples}x{s.calib_seqlen} (seed {s.seed}); evaluation WikiText-2 test, "
             f"{s.max_windows} windows x {s.eval_seqlen}; device {s.device}, {s.threads} thread; machine: {doc['machine']}.", "",
             "| sparsity | row | perplexity | vs Wanda | prune time (s) | peak RSS (MiB) | DSnoT refined / kept / swaps |",
             "|---|---|---|---|---|---|---|"]
    order = {"0.5": 0, "0.6": 1, "0.7": 2, "2:4": 3}
    for r in sorted(res, key=lambda r: (order.get(r["sparsity"], 9), r["label"])):
        base = wanda.get(r["sparsity"])
        rel = f"{(r['ppl'] / base - 1) * 100:+.2f}%" if base else ""
        summ = r.get("method_summary")
        ds = f"{summ['refined']} / {summ['kept_refined']} / {summ['swaps']}" if summ else ""
        lines.append(f"| {r['sparsity']} | {r['label']} | {r['ppl']:.2f} | {rel} | {r['prune_seconds']:.0f} | "
                     f"{r['peak_rss_mib']:.0f} | {ds} |")
    return "\n".join(lines) + "\n"


def write_results(doc: dict, json_path: Path, md_path: Path) -> None:
    for path, text in ((json_path, json.dumps(doc, indent=2) + "\n"), (md_path, to_markdown(doc))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="row names to run (see --list)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="ignore rows already in the result file")
    parser.add_argument("--out", type=Path, default=RESULTS / "dsnot_quality")
    parser.add_argument("--merge", nargs="*", type=Path, help="fold rows from other result JSONs (parallel runs) into --out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        payload = json.loads(args.child)
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(run_one(Setting(**payload["setting"]), Row(**payload["row"]))))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = planned_rows()
    if args.list:
        print("\n".join(r.name() for r in rows))
        return
    if args.only:
        by_name = {r.name(): r for r in rows}
        unknown = [n for n in args.only if n not in by_name]
        if unknown:
            raise SystemExit(f"unknown rows {unknown}: see --list")
        rows = [by_name[n] for n in args.only]  # in the order given
    setting = Setting()
    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    doc = {"setting": asdict(setting), "machine": machine(), "results": []}
    if json_path.is_file() and not args.fresh:
        doc["results"] = json.loads(json_path.read_text())["results"]
    done = {r["row"] for r in doc["results"]}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    if args.merge is not None:
        for other in args.merge:
            extra = [r for r in json.loads(other.read_text())["results"] if r["row"] not in done]
            doc["results"] += extra
            done |= {r["row"] for r in extra}
        write_results(doc, json_path, md_path)
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(setting.threads), "MKL_NUM_THREADS": str(setting.threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH", "")]))}
    for row in rows:
        if row.name() in done:
            continue
        payload = json.dumps({"setting": asdict(setting), "row": asdict(row)})
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", payload], capture_output=True, text=True, env=env,
                              cwd=HERE.parent)
        if proc.returncode != 0:
            logging.error("row %s failed:\n%s", row.name(), proc.stderr[-3000:])
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["wall_seconds"] = time.perf_counter() - t0
        r["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        doc["results"].append(r)
        write_results(doc, json_path, md_path)
        logging.info("%-40s ppl %9.3f  prune %6.1f s  wall %6.1f s  RSS %5.0f MiB  %s", r["row"], r["ppl"], r["prune_seconds"],
                     r["wall_seconds"], r["peak_rss_mib"], r.get("method_summary", ""))


if __name__ == "__main__":
    main()
