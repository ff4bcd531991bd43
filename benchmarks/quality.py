"""Quality suite on the real model: perplexity, prune time and peak RSS of every pruning path.

One table for every method (magnitude, Wanda, SparseGPT, DSnoT variants), allocation (uniform, OWL,
ATP) and sparsity-preserving recovery, all with the same calibration windows and the same evaluation
windows, so rows compare pairwise. Each row runs in its own subprocess (peak RSS is that row's own);
the result files are rewritten after every row, so an interrupted run keeps what it measured and a
rerun skips the rows already in the JSON (``--fresh`` starts over).

    python benchmarks/quality.py --list                     # the rows, in priority order
    python benchmarks/quality.py                            # every row (about 2 h on 2 CPU cores, 1 thread)
    python benchmarks/quality.py --suite dsnot              # one group: baseline, dsnot, allocation, recover
    python benchmarks/quality.py --only "wanda 0.7" "dense"
    python benchmarks/quality.py --ci                       # CI gate: dense + Wanda-50%, fails on regression
    python benchmarks/quality.py --device cuda --suite dsnot  # the same rows on a GPU -> quality_cuda.{json,md}
    python benchmarks/quality.py --update-docs              # the tables in docs/dsnot.md and docs/allocation.md

Results: benchmarks/results/quality.{json,md}; CI: quality_ci.{json,md}, gated against the same two rows
of the committed quality.json (TOLERANCE on the Wanda-50% / dense perplexity ratio).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT_DOCS = HERE.parent / "docs"
WIKITEXT = Path(
    os.environ.get(
        "SPARSEDEPLOY_WIKITEXT2", HERE.parent.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    )
)

# Relative tolerance of the CI gate on the Wanda-50% / dense perplexity ratio versus the committed baseline.
TOLERANCE = 0.03


@dataclass
class Setting:
    model: str = "smollm2-135m"
    calib: str = "gensim-wiki"
    nsamples: int = 16
    calib_seqlen: int = 512
    seed: int = 0
    eval_data: str = f"wikitext2:{WIKITEXT}"
    eval_seqlen: int = 512
    max_windows: int = 16
    threads: int = 1
    device: str = "cpu"
    # recovery rows
    recover_data: str = "gensim-wiki"
    recover_steps: int = 50
    recover_seqlen: int = 256
    recover_rank: int = 8
    recover_lr: float = 1e-3


@dataclass
class Row:
    suite: str
    label: str  # "dense", a method, or e.g. "wanda+dsnot(verified,attn)"
    method: str = "dense"
    sparsity: str = "-"
    options: dict = field(default_factory=dict)
    allocation: str = "uniform"
    recover: bool = False

    def name(self) -> str:
        if self.method == "dense":
            return "dense"
        name = f"{self.label} {self.sparsity}"
        if self.allocation != "uniform":
            name += f" {self.allocation}"
        return name + (" +recovery" if self.recover else "")


def dsnot(init: str, mode: str, targets: str, sparsity: str, allocation: str = "uniform", rows: bool = False) -> Row:
    """rows: verify_rows (the refinement kept row by row, not per linear), labelled `...,rows)`."""
    return Row(
        "dsnot" if allocation == "uniform" else "allocation",
        f"{init}+dsnot({mode},{targets}{',rows' if rows else ''})",
        "dsnot",
        sparsity,
        {"init": init, "mode": mode, "targets": targets, **({"verify_rows": True} if rows else {})},
        allocation,
    )


def planned_rows() -> list[Row]:
    """Priority order: the comparisons the issues ask for first, so a cut-short run answers them."""
    rows = [Row("baseline", "dense"), Row("baseline", "wanda", "wanda", "0.5")]
    for s in ("0.7", "2:4", "0.6"):
        rows += [
            Row("baseline", "wanda", "wanda", s),
            dsnot("wanda", "verified", "attn", s),
            dsnot("wanda", "paper", "attn", s),
            dsnot("wanda", "verified", "all", s),
            Row("baseline", "sparsegpt", "sparsegpt", s),
        ]
        if s != "2:4":  # non-uniform allocation is refused with N:M
            rows += [Row("allocation", "wanda", "wanda", s, allocation=a) for a in ("owl", "atp")]
        if s != "0.6":
            rows.append(Row("recover", "wanda", "wanda", s, recover=True))
    rows += [dsnot("wanda", "second-order", "all", s) for s in ("0.7", "2:4", "0.6")]
    # then the baseline table of the foundation issue, then DSnoT (default mode) for every initialiser and allocation
    rows += [
        Row("baseline", m, m, s)
        for s in ("0.5", "4:8")
        for m in ("magnitude", "wanda", "sparsegpt")
        if (m, s) != ("wanda", "0.5")
    ]
    rows += [Row("baseline", "magnitude", "magnitude", s) for s in ("0.6", "0.7", "2:4")]
    so = "second-order"
    rows += [
        dsnot("wanda", so, "all", "0.5"),
        dsnot("wanda", so, "all", "0.7", "owl"),
        dsnot("wanda", so, "all", "0.7", "atp"),
        dsnot("sparsegpt", so, "all", "0.7"),
        dsnot("magnitude", so, "all", "0.7"),
        dsnot("wanda", so, "all", "0.6", "owl"),
        dsnot("wanda", so, "all", "0.6", "atp"),
    ]
    rows += [dsnot("sparsegpt", so, "all", s) for s in ("2:4", "0.6", "0.5")]
    rows += [dsnot("magnitude", so, "all", s) for s in ("2:4", "0.6", "0.5")]
    rows += [dsnot("wanda", "verified", "all", s, rows=True) for s in ("0.6", "0.7", "2:4")]
    return rows


CI_ROWS = [Row("baseline", "dense"), Row("baseline", "wanda", "wanda", "0.5")]


def run_one(setting: Setting, row: Row) -> dict:
    """In a child process: load, calibrate, allocate, prune, (recover), evaluate; return the row's figures."""
    import torch

    from sparsedeploy.common.data import calibration_samples, eval_tokens, window_bos
    from sparsedeploy.common.evaluate import layer_sparsity, overall_sparsity, perplexity
    from sparsedeploy.common.models import load_model, resolve_device
    from sparsedeploy.common.sparsity import parse_sparsity
    from sparsedeploy.prune.allocation import AllocationConfig, plan_allocation
    from sparsedeploy.prune.blocks import prune_model
    from sparsedeploy.prune.methods import build_method

    torch.set_num_threads(setting.threads)
    device = resolve_device(setting.device)
    lm = load_model(setting.model, "float32")
    tokens = eval_tokens(lm.tokenizer, setting.eval_data)
    bos = window_bos(lm.model, lm.tokenizer)  # Gemma: BOS before every calibration and evaluation window

    def ppl() -> tuple[float, int, int]:
        r = perplexity(lm.model, tokens, setting.eval_seqlen, device, setting.max_windows, False, bos)
        return r.ppl, r.windows, r.tokens

    result: dict = {"row": row.name(), **asdict(row), "bos_per_window": bos is not None}
    if row.method != "dense":
        spec = parse_sparsity(row.sparsity)
        samples = calibration_samples(
            lm.tokenizer, setting.calib, setting.nsamples, setting.calib_seqlen, setting.seed, bos
        )
        method = build_method(row.method, **row.options)
        start = time.perf_counter()
        spec_for = lambda _i, _n: spec  # noqa: E731
        if row.allocation != "uniform":
            held_out = lambda n: calibration_samples(
                lm.tokenizer, setting.calib, n, setting.calib_seqlen, setting.seed + 1, bos
            )  # noqa: E731
            alloc = plan_allocation(
                lm.model, samples, method, spec, AllocationConfig(row.allocation), device, held_out, show_progress=False
            )
            result["allocation_seconds"] = time.perf_counter() - start
            result["allocation_report"] = {k: v for k, v in alloc.report().items() if k != "kind"}
            spec_for = alloc.spec_for
        check = None
        if getattr(method, "verify_model", False):  # as `sparsedeploy prune` does: other windows judge the whole model
            check = calibration_samples(
                lm.tokenizer, setting.calib, max(4, setting.nsamples // 4), setting.calib_seqlen, setting.seed + 1, bos
            )
        block_seconds: list[float] = []
        masks = prune_model(
            lm.model,
            samples,
            method,
            spec_for,
            device,
            show_progress=False,
            check_samples=check,
            block_seconds=block_seconds,
        )
        result["prune_seconds"] = time.perf_counter() - start  # allocation included
        result["block_seconds"] = block_seconds
        if getattr(method, "summary", None):
            result["method_summary"] = dict(method.summary)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        if device.type == "cuda":
            result["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        if row.recover:
            from sparsedeploy.prune.recover import RecoverConfig, recover_model, same_zeros, zero_pattern

            before = zero_pattern(lm.model)
            result["ppl_before_recovery"] = ppl()[0]
            cfg = RecoverConfig(
                steps=setting.recover_steps,
                seqlen=setting.recover_seqlen,
                batch=1,
                rank=setting.recover_rank,
                lr=setting.recover_lr,
                seed=setting.seed,
            )
            train = calibration_samples(
                lm.tokenizer, setting.recover_data, cfg.steps, cfg.seqlen, setting.seed + 7, bos
            )
            result["recovery"] = recover_model(lm.model, masks, train, cfg, device, show_progress=False)
            result["zeros_identical"] = same_zeros(before, zero_pattern(lm.model))
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    result["sparsity_measured"] = overall_sparsity(layer_sparsity(lm.model))
    result["ppl"], result["eval_windows"], result["eval_tokens"] = ppl()
    return result


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def _order(r: dict) -> tuple:
    sp = {"-": 0, "0.5": 1, "0.6": 2, "0.7": 3, "2:4": 4, "4:8": 5}
    return (
        sp.get(r["sparsity"], 9),
        r["allocation"] != "uniform",
        r.get("recover", False),
        r["label"] != "wanda",
        r["label"],
    )


def to_markdown(doc: dict) -> str:
    s = Setting(**doc["setting"])
    res = [r for r in doc["results"] if "error" not in r]
    dense = next((r["ppl"] for r in res if r["method"] == "dense"), None)
    wanda = {
        r["sparsity"]: r["ppl"]
        for r in res
        if r["label"] == "wanda" and r["allocation"] == "uniform" and not r.get("recover")
    }
    lines = [
        f"# Pruning quality on {Path(s.model).name}",
        "",
        f"Calibration `{s.calib}` {s.nsamples} x {s.calib_seqlen} tokens (seed {s.seed}); "
        f"evaluation WikiText-2 test, first {s.max_windows} non-overlapping windows x {s.eval_seqlen} "
        f"(the same for every row); device {s.device}, {s.threads} thread{'s' if s.threads > 1 else ''}. "
        + (
            "Every calibration and evaluation window is BOS + text (`bos_per_window`, the protocol for Gemma). "
            if any(r.get("bos_per_window") for r in res)
            else ""
        )
        + f"Machine: {doc['machine']}. Time = allocation + pruning (+ recovery training where marked).",
        "",
        "| sparsity | row | perplexity | vs dense | vs Wanda | measured sparsity | time (s) | s/block (median) | "
        "peak RSS (MiB) | peak GPU (MiB) | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(res, key=_order):
        base = wanda.get(r["sparsity"])
        plain_wanda = r["label"] == "wanda" and r["allocation"] == "uniform" and not r.get("recover")
        vs_wanda = f"{(r['ppl'] / base - 1) * 100:+.2f}%" if base and not plain_wanda else ""
        notes = []
        if summ := r.get("method_summary"):
            notes.append(f"DSnoT refined {summ['refined']}, kept {summ['kept_refined']}, swaps {summ['swaps']}")
        if a := r.get("allocation_report"):
            notes.append(
                f"per-block {a['min']:.3f}..{a['max']:.3f}"
                + (f", ATP d={a['atp_difference']:.4f}" if "atp_difference" in a else "")
            )
        if v := r.get("recovery"):
            notes.append(
                f"before recovery {r['ppl_before_recovery']:.2f}; {v['tokens']} tokens, {v['seconds']:.0f} s; "
                f"zeros identical: {r['zeros_identical']}"
            )
        if r.get("machine", doc["machine"]) != doc["machine"]:
            notes.append(f"measured on {r['machine']}")
        t = r.get("prune_seconds", 0.0) + (r["recovery"]["seconds"] if r.get("recovery") else 0.0)
        vs_dense = f"{r['ppl'] / dense:.2f}x" if dense else ""
        per_block = f"{statistics.median(r['block_seconds']):.2f}" if r.get("block_seconds") else ""
        gpu = f"{r['peak_cuda_mib']:.0f}" if "peak_cuda_mib" in r else ""
        lines.append(
            f"| {r['sparsity']} | {r['row']} | {r['ppl']:.2f} | {vs_dense} | {vs_wanda} | "
            f"{r['sparsity_measured']:.4f} | {t:.0f} | {per_block} | {r['peak_rss_mib']:.0f} | {gpu} | "
            f"{'; '.join(notes)} |"
        )
    failed = [r for r in doc["results"] if "error" in r]
    lines += [""] + [f"- FAILED {r['row']}: {r['error']}" for r in failed]
    if doc.get("notes"):  # hand-written analysis kept in the JSON, so a rerun keeps it
        lines += [doc["notes"].rstrip()]
    return "\n".join(lines) + "\n"


def summary_sections(doc: dict) -> dict[str, str]:
    """Pivot tables for the docs, by section: `methods` (perplexity by row label and sparsity, DSnoT rows also
    vs their initialiser), `allocation` (uniform/OWL/ATP) and `recovery`, each only when it has rows."""
    res = [r for r in doc["results"] if "error" not in r]
    ppl = {(r["label"], r["sparsity"], r["allocation"], bool(r.get("recover"))): r["ppl"] for r in res}
    dense = ppl.get(("dense", "-", "uniform", False))
    cols = [c for c in ("0.5", "0.6", "0.7", "2:4", "4:8") if any(k[1] == c for k in ppl)]

    def cell(label: str, sp: str, alloc: str = "uniform", base: str | None = None, base_alloc: str = "uniform") -> str:
        v = ppl.get((label, sp, alloc, False))
        if v is None:
            return "–"
        ref = ppl.get((base, sp, base_alloc, False)) if base else None
        return f"{v:.1f}" + (f" ({(v / ref - 1) * 100:+.1f}%)" if ref else "")

    labels = []
    for r in sorted(res, key=_order):
        if r["allocation"] == "uniform" and not r.get("recover") and r["label"] not in labels and r["label"] != "dense":
            labels.append(r["label"])
    out = [
        f"Dense: {dense:.2f}." if dense else "",
        "",
        "| method | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for label in labels:
        base = label.split("+dsnot")[0] if "+dsnot" in label else None
        out.append(f"| {label} | " + " | ".join(cell(label, c, base=base) for c in cols) + " |")
    sections = {"methods": out}
    allocs = sorted({(r["label"], r["allocation"]) for r in res if r["allocation"] != "uniform"})
    if allocs:
        acols = [c for c in ("0.6", "0.7") if c in cols]
        out = ["| method | allocation | " + " | ".join(acols) + " |", "|---|---|" + "---|" * len(acols)]
        for label in sorted({a[0] for a in allocs}):
            for alloc in ("uniform", "owl", "atp"):
                out.append(
                    f"| {label} | {alloc} | "
                    + " | ".join(cell(label, c, alloc, base=None if alloc == "uniform" else label) for c in acols)
                    + " |"
                )
        sections["allocation"] = out + ["", "(percentages: against the same method with uniform sparsity)"]
    recs = [r for r in res if r.get("recover")]
    if recs:
        out = [
            "| pruned | before recovery | after | training tokens | training time (s) | zeros identical |",
            "|---|---|---|---|---|---|",
        ]
        for r in recs:
            v = r["recovery"]
            out.append(
                f"| {r['label']} {r['sparsity']} | {r['ppl_before_recovery']:.1f} | {r['ppl']:.1f} | {v['tokens']} | "
                f"{v['seconds']:.0f} | "
                f"{r['zeros_identical']} |"
            )
        sections["recovery"] = out
    return {name: "\n".join(lines) + "\n" for name, lines in sections.items()}


def summary_tables(doc: dict) -> str:
    return "\n".join(summary_sections(doc).values())


DOC_SECTIONS = {
    "methods": ROOT_DOCS / "dsnot.md",
    "allocation": ROOT_DOCS / "allocation.md",
    "recovery": ROOT_DOCS / "allocation.md",
}


def update_docs(doc: dict) -> list[Path]:
    """Replace the generated tables between `<!-- quality:NAME -->` and `<!-- /quality -->` in the docs."""
    import re

    changed = []
    for name, body in summary_sections(doc).items():
        path = DOC_SECTIONS[name]
        old = path.read_text()
        new = re.sub(
            rf"(<!-- quality:{name} -->\n).*?(<!-- /quality -->)",
            lambda m: m.group(1) + body + m.group(2),
            old,
            flags=re.S,
        )
        if new != old:
            path.write_text(new)
            changed.append(path)
    return changed


def write_doc(doc: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    for path, text in (
        (stem.with_suffix(".json"), json.dumps(doc, indent=2) + "\n"),
        (stem.with_suffix(".md"), to_markdown(doc)),
    ):
        tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)


def run_row(setting: Setting, row: Row) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(setting.threads),
        "MKL_NUM_THREADS": str(setting.threads),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH", "")])),
    }
    payload = json.dumps({"setting": asdict(setting), "row": asdict(row)})
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", payload], capture_output=True, text=True, env=env, cwd=HERE.parent
    )
    if proc.returncode != 0:
        logging.error("row %s failed:\n%s", row.name(), proc.stderr[-3000:])
        return {"row": row.name(), **asdict(row), "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["wall_seconds"] = time.perf_counter() - t0
    r["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    r["machine"] = machine()  # times compare only between rows of one machine
    logging.info(
        "%-44s ppl %10.3f  sparsity %.4f  time %6.1f s  wall %6.1f s  RSS %5.0f MiB",
        r["row"],
        r["ppl"],
        r["sparsity_measured"],
        r.get("prune_seconds", 0.0),
        r["wall_seconds"],
        r["peak_rss_mib"],
    )
    return r


def comparable(setting: dict) -> dict:
    """A setting without where the checkout sits: the evaluation file is compared by its name."""
    if "eval_data" not in setting:
        return dict(setting)
    source, _, path = setting["eval_data"].partition(":")
    return {**setting, "eval_data": f"{source}:{Path(path).name}" if path else source}


def ci_gate(doc: dict, baseline_path: Path) -> None:
    """Gate against the committed full-suite results: the CI rows are the same rows in the same setting."""
    current = {r["row"]: r["ppl"] for r in doc["results"]}
    if any("error" in r for r in doc["results"]):
        raise SystemExit("quality CI: a row failed (see the log above)")
    ratio_now = current["wanda 0.5"] / current["dense"]
    if not baseline_path.is_file():
        raise SystemExit(
            f"quality CI: no baseline at {baseline_path}: run the full suite (or --only dense 'wanda 0.5') "
            "and commit it"
        )
    baseline = json.loads(baseline_path.read_text())
    if comparable(baseline["setting"]) != comparable(doc["setting"]):
        raise SystemExit(
            f"quality CI: {baseline_path} was measured in another setting: rerun the full suite and commit it"
        )
    base = {r["row"]: r["ppl"] for r in baseline["results"] if "error" not in r}
    if not {"dense", "wanda 0.5"} <= base.keys():
        raise SystemExit(
            f"quality CI: {baseline_path} lacks the rows 'dense' and 'wanda 0.5': run them and commit the file"
        )
    ratio_base = base["wanda 0.5"] / base["dense"]
    doc["gate"] = {
        "tracked": "ppl(wanda 0.5) / ppl(dense)",
        "baseline": ratio_base,
        "current": ratio_now,
        "tolerance": TOLERANCE,
        "passed": ratio_now <= ratio_base * (1 + TOLERANCE),
    }
    logging.info(
        "CI gate: Wanda-50%%/dense perplexity ratio %.4f vs baseline %.4f (tolerance +%.0f%%)",
        ratio_now,
        ratio_base,
        TOLERANCE * 100,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the planned rows and exit")
    parser.add_argument(
        "--suite", choices=["baseline", "dsnot", "allocation", "recover"], nargs="*", help="only these groups"
    )
    parser.add_argument("--only", nargs="*", help="only these rows (names as --list prints them)")
    parser.add_argument("--fresh", action="store_true", help="ignore rows already in the result file")
    parser.add_argument(
        "--ci", action="store_true", help="dense + Wanda-50%%; fail when their ratio regresses past TOLERANCE"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="result stem [default: benchmarks/results/quality or quality_ci]"
    )
    parser.add_argument(
        "--summary", action="store_true", help="print the pivot tables of the result file (for the docs) and exit"
    )
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="rewrite the generated tables in docs/dsnot.md and docs/allocation.md",
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu (the committed table) or cuda[:N]; a GPU run writes quality_cuda.*"
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per row [1]")
    parser.add_argument(
        "--model",
        default=Setting.model,
        help="--model as sparsedeploy takes it (e.g. a .gguf file) [smollm2-135m]; "
        "another model writes quality_<name>.*",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        payload = json.loads(args.child)
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(run_one(Setting(**payload["setting"]), Row(**payload["row"]))))
        return
    if args.summary or args.update_docs:
        doc = json.loads((args.out or RESULTS / "quality").with_suffix(".json").read_text())
        if args.update_docs:
            print("\n".join(f"updated {p}" for p in update_docs(doc)) or "docs already up to date")
        else:
            print(summary_tables(doc))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = CI_ROWS if args.ci else planned_rows()
    if args.suite:
        rows = [r for r in rows if r.suite in args.suite or r.method == "dense"]
    if args.only:
        by_name = {r.name(): r for r in rows}
        unknown = [n for n in args.only if n not in by_name]
        if unknown:
            raise SystemExit(f"unknown rows {unknown}: see --list")
        rows = [by_name[n] for n in args.only]
    if args.list:
        print("\n".join(f"{r.suite:<10} {r.name()}" for r in rows))
        return
    if not WIKITEXT.is_file():
        raise SystemExit(f"WikiText-2 test file not found at {WIKITEXT}: set SPARSEDEPLOY_WIKITEXT2=PATH/wiki.test.raw")
    setting = Setting(device=args.device, threads=args.threads, model=args.model)
    default_stem = "quality_ci" if args.ci else ("quality" if args.device == "cpu" else "quality_cuda")
    if args.model != Setting.model:
        if args.ci:
            raise SystemExit("--ci gates smollm2-135m against the committed table: drop --model")
        default_stem = f"quality_{Path(args.model).stem}" + ("" if args.device == "cpu" else "_cuda")
    stem = args.out or RESULTS / default_stem
    doc = {"setting": asdict(setting), "machine": machine(), "results": []}
    if stem.with_suffix(".json").is_file() and not (args.fresh or args.ci):
        old = json.loads(stem.with_suffix(".json").read_text())
        if comparable(old["setting"]) == comparable(doc["setting"]):
            doc["results"] = [r for r in old["results"] if "error" not in r]
            doc["machine"] = old.get("machine", doc["machine"])  # the table's machine; other rows name theirs
            if old.get("notes"):
                doc["notes"] = old["notes"]
        else:
            logging.warning("%s has another setting: starting over", stem.with_suffix(".json"))
    done = {r["row"] for r in doc["results"]}
    for row in rows:
        if row.name() in done:
            continue
        doc["results"].append(run_row(setting, row))
        doc["date"] = time.strftime("%Y-%m-%d")
        write_doc(doc, stem)
    if args.ci:
        ci_gate(doc, RESULTS / "quality.json")
        write_doc(doc, stem)
        if not doc.get("gate", {"passed": True})["passed"]:
            g = doc["gate"]
            raise SystemExit(
                f"quality regression: Wanda-50% perplexity ratio {g['current']:.4f} > baseline {g['baseline']:.4f} "
                f"+{TOLERANCE:.0%}"
            )
    logging.info("wrote %s.{json,md}", stem)


if __name__ == "__main__":
    main()
