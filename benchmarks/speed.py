"""Speed suite: dense vs sparse MatMul kernels (ONNX Runtime, DeepSparse), with a CI regression mode.

Full run (about 5-10 minutes on a 2-core box, single thread):
    python benchmarks/speed.py --out benchmarks/results
CI run (about 1-2 minutes): fails (exit 1) when a tracked speedup regresses beyond its tolerance
versus the committed baseline benchmarks/results/speed_baseline.json:
    python benchmarks/speed.py --ci [--install-deepsparse]
Re-baseline after an intended change (commit the file it writes):
    python benchmarks/speed.py --ci --write-baseline

Tracked ratios are dense_time / sparse_time measured alternately in the same process, so machine
drift cancels; absolute times are recorded but never gated.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsedeploy.bench.matmul_cpu import (
    DEFAULT_PATTERNS,
    LLAMA1B_SHAPES,
    SMOLLM2_SHAPES,
    bench_kernels,
    kernel_markdown,
)
from sparsedeploy.common.files import write_json_atomic  # noqa: E402

log = logging.getLogger("benchmarks.speed")
RESULTS = ROOT / "benchmarks" / "results"
BASELINE = RESULTS / "speed_baseline.json"

# What CI tracks: (engine, shape name, batch, pattern). The 1B-like MLP shape at batch 64 is where
# DeepSparse's unstructured-sparsity kernels show a clear speedup; ORT is tracked too (it should stay
# ~1x: a drop well below 1 means sparse graphs got slower than dense ones).
CI_SHAPE = LLAMA1B_SHAPES[0]
CI_TRACKED = [("deepsparse", CI_SHAPE.name, 64, "0.7"), ("ort", CI_SHAPE.name, 64, "0.7")]
DEFAULT_TOLERANCE = 0.25  # fail when speedup < baseline * (1 - tolerance)


def machine() -> dict:
    try:
        model = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            "?",
        )
    except OSError:
        model = platform.processor() or "?"
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "system": platform.system(),
    }


def deepsparse_env(install: bool):
    from sparsedeploy.common.errors import UserError
    from sparsedeploy.runtimes import deepsparse_env as ds

    try:
        if install:
            return ds.install(), None
        return ds.require_env(), None
    except UserError as exc:
        return None, str(exc)


def key(row: dict) -> str:
    return f"{row['engine']}|{row['shape']}|b{row['batch']}|{row['pattern']}"


def run(args) -> int:
    env, why_not = deepsparse_env(args.install_deepsparse)
    engines = ["ort"] + (["deepsparse"] if env else [])
    if env is None:
        print(f"DeepSparse not measured: {why_not}")
    started = time.time()
    if args.ci:
        shapes, patterns, batches, rounds = [CI_SHAPE], ["0.7"], [64], args.rounds or 5
    else:
        shapes, patterns, batches, rounds = SMOLLM2_SHAPES + LLAMA1B_SHAPES, DEFAULT_PATTERNS, [1, 64], args.rounds or 7
    rows = bench_kernels(
        shapes,
        patterns,
        batches,
        engines,
        threads=args.threads,
        rounds=rounds,
        per_round=3,
        deepsparse_env=env,
        progress=lambda rs: [log.info("%s: %.2fx", key(r), r["speedup"]) for r in rs],
    )
    result = {
        "kind": "ci" if args.ci else "full",
        "machine": machine(),
        "threads": args.threads,
        "rounds": rounds,
        "engines": engines,
        "deepsparse": "measured" if env else f"not measured: {why_not}",
        "seconds": round(time.time() - started, 1),
        "rows": rows,
    }
    md = kernel_markdown(rows)
    print(md)
    if env:
        from sparsedeploy.runtimes.deepsparse_env import LICENCE_NOTE

        print(LICENCE_NOTE)
    if args.out:
        out = Path(args.out)
        stem = "speed_ci" if args.ci else "speed_kernels"
        write_json_atomic(out / f"{stem}.json", result)
        header = (
            f"# Kernel speed: dense vs sparse MatMul chains\n\nMachine: {result['machine']['cpu']}, "
            f"{result['machine']['logical_cpus']} logical CPUs (shared, throttled dev box, no GPU); "
            f"threads: {args.threads}; rounds: {rounds} (dense/sparse interleaved); DeepSparse: "
            f"{result['deepsparse']}.\n"
            "Speedup = dense time / sparse time per round, median (p10-p90). NOISY = spread (p90-p10)/median > 10%.\n\n"
        )
        tmp = out / f".{stem}.md.tmp"
        tmp.write_text(header + md + ("\n" + LICENCE_NOTE + "\n" if env else ""))
        tmp.replace(out / f"{stem}.md")
    if args.ci:
        return check(rows, env is not None, args)
    return 0


def load_baseline() -> dict:
    """The committed baselines, one per CPU model (DeepSparse's gain depends on the CPU: AVX-512 Xeon vs EPYC)."""
    if not BASELINE.is_file():
        return {"tolerance": DEFAULT_TOLERANCE, "machines": {}, "generic_floor": {}}
    base = json.loads(BASELINE.read_text())
    if "tracked" in base:  # the first format: one machine
        base = {
            "tolerance": base.get("tolerance", DEFAULT_TOLERANCE),
            "threads": base.get("threads", 1),
            "machines": {base["machine"]["cpu"]: {k: v for k, v in base.items() if k not in ("tolerance", "threads")}},
            "generic_floor": {},
        }
    return base


def check(rows: list[dict], have_deepsparse: bool, args) -> int:
    """Gate the tracked ratios against this CPU model's committed baseline (or the generic floors for a new CPU)."""
    measured = {key(r): r for r in rows}
    tracked = {f"{e}|{s}|b{b}|{p}" for e, s, b, p in CI_TRACKED}
    base = load_baseline()
    cpu = machine()["cpu"]
    if args.write_baseline:
        base["machines"][cpu] = {
            "machine": machine(),
            "threads": args.threads,
            "rounds": args.rounds or 5,
            "tracked": {k: round(measured[k]["speedup"], 3) for k in sorted(tracked) if k in measured},
            "source": f"speed.py --ci --rounds {args.rounds or 5}, {time.strftime('%Y-%m-%d')}",
        }
        write_json_atomic(BASELINE, base)
        print(f"wrote the baseline of {cpu} into {BASELINE}")
        return 0
    tol = float(base.get("tolerance", args.tolerance))
    entry = base["machines"].get(cpu)
    if entry is None:
        print(
            f"no baseline for CPU {cpu!r} in {BASELINE} (it has {sorted(base['machines'])}): gating on the generic "
            "floors; record one with --ci --write-baseline and commit it"
        )
        floors = dict(base.get("generic_floor", {}))
    else:
        floors = {k: ref * (1 - tol) for k, ref in entry["tracked"].items()}
    if not floors:
        print(f"no baseline and no generic floor in {BASELINE}: run with --ci --write-baseline and commit it")
        return 1
    failed = 0
    for k, floor in floors.items():
        if k.startswith("deepsparse|") and not have_deepsparse:
            print(f"SKIPPED {k}: DeepSparse venv not available here (run with --install-deepsparse to track it)")
            continue
        if k not in measured:
            print(f"MISSING {k}: tracked in the baseline but not measured")
            failed += 1
            continue
        got = measured[k]["speedup"]
        ok = got >= floor
        failed += not ok
        ref = f"baseline {entry['tracked'][k]:.2f}x on this CPU, tolerance {tol:.0%}" if entry else "generic floor"
        print(
            f"{'ok  ' if ok else 'FAIL'} {k}: speedup {got:.2f}x (floor {floor:.2f}x: {ref})"
            + ("  [noisy]" if measured[k]["noisy"] else "")
        )
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ci", action="store_true", help="reduced set + regression check against the committed baseline")
    ap.add_argument(
        "--write-baseline", action="store_true", help="with --ci: write the measured tracked ratios as the new baseline"
    )
    ap.add_argument(
        "--install-deepsparse", action="store_true", help="create the DeepSparse venv first if missing (needs PyPI)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    ap.add_argument(
        "--out", default=None, help="directory for JSON + Markdown results (full run default: benchmarks/results)"
    )
    args = ap.parse_args()
    if args.out is None and not args.ci:
        args.out = str(RESULTS)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
