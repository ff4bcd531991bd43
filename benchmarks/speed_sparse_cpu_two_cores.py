"""Two cores: the sparse-cpu kernels on 1 and 2 threads against ONNX Runtime's dense MatMul on 1 and 2, cold weights.

The machines this project runs on throttle CPU time (both cores for ~50 s of load, then about one core until
~150 s of idle), so the main suite's 2-thread rows, which run after minutes of load, do not show two cores. This
script builds everything first (weights, packed copies, row forms, ONNX Runtime sessions, warm-up), then waits
`--idle` seconds, then times for well under 50 s: per shape, pattern and batch, a few rounds of dense 1 thread,
sparse 1 thread, dense 2 threads and sparse 2 threads (order reversed every other round), each pass after an
eviction pass over a buffer larger than the caches, over rotated copies of the weight. Ratios are the median of
the per-round ratios. The dense 2-thread sessions do not spin (see speed_sparse_cpu.ort_matmul).

    python benchmarks/speed_sparse_cpu_two_cores.py --out benchmarks/results/speed_sparse_cpu/intel_xeon/two_cores
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from speed_sparse_cpu import LLAMA1B, Evictor, l3_bytes, loadavg, machine, ort_matmul, select_shapes  # noqa: E402

from sparsedeploy.bench.matmul_cpu import random_pruned_linear  # noqa: E402
from sparsedeploy.common.errors import UserError  # noqa: E402
from sparsedeploy.common.files import write_json_atomic, write_text_atomic  # noqa: E402
from sparsedeploy.common.sparsity import parse_sparsity  # noqa: E402
from sparsedeploy.kernels import best_isa, pack  # noqa: E402
from sparsedeploy.kernels.native import BoundMatmul  # noqa: E402

log = logging.getLogger("benchmarks.speed_sparse_cpu_two_cores")
SPARSE_COPIES, DENSE_COPIES = 16, 4
VARIANTS = ("dense 1t", "sparse 1t", "dense 2t", "sparse 2t")


def prepare(shapes, patterns: list[str], batches: list[int], seed: int = 0) -> list[dict]:
    """Everything timed later, built and run once: per shape and pattern the copies, sessions and bound matmuls."""
    rng = np.random.default_rng(seed)
    cases = []
    for shape in shapes:
        xs = {b: rng.standard_normal((b, shape.k)).astype(np.float32) for b in batches}
        for pattern in patterns:
            w = random_pruned_linear(shape.n, shape.k, parse_sparsity(pattern), seed=seed).numpy()
            packed = [pack(w) for _ in range(SPARSE_COPIES)]  # separate arrays: the copies rotate past the caches
            w_kn = np.ascontiguousarray(w.T)
            sessions = {t: [ort_matmul(w_kn.copy(), t) for _ in range(DENSE_COPIES)] for t in (1, 2)}
            bound = {t: [BoundMatmul(p, t) for p in packed] for t in (1, 2)}
            for b in batches:
                x = xs[b]
                out = np.empty((b, shape.n), np.float32)
                ref = x.astype(np.float64) @ w.T.astype(np.float64)
                err = 0.0
                for t in (1, 2):
                    for bm in bound[t]:
                        bm(x, out)  # builds the row form where this batch uses it; page faults
                    err = max(err, float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30)))
                    for s in sessions[t]:
                        s.run(None, {"x": x})
                cases.append(
                    {
                        "shape": shape.name,
                        "pattern": pattern,
                        "sparsity": round(1 - packed[0].nnz / w.size, 4),
                        "batch": b,
                        "form": bound[2][0].form_for(b),
                        "max_rel_err": err,
                        "x": x,
                        "out": out,
                        "sessions": sessions,
                        "bound": bound,
                    }
                )
    return cases


def time_case(case: dict, rounds: int, evict: Evictor) -> dict:
    x, out = case["x"], case["out"]
    calls = {
        "dense 1t": lambda c: case["sessions"][1][c % DENSE_COPIES].run(None, {"x": x}),
        "sparse 1t": lambda c: case["bound"][1][c](x, out),
        "dense 2t": lambda c: case["sessions"][2][c % DENSE_COPIES].run(None, {"x": x}),
        "sparse 2t": lambda c: case["bound"][2][c](x, out),
    }
    reps = 4 if case["batch"] > 32 else SPARSE_COPIES
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        for name in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            evict()
            t0 = time.perf_counter()
            for c in range(reps):
                calls[name](c)
            times[name].append((time.perf_counter() - t0) / reps)
    row = {k: v for k, v in case.items() if k not in ("x", "out", "sessions", "bound")}
    for t in (1, 2):
        ratios = [d / s for d, s in zip(times[f"dense {t}t"], times[f"sparse {t}t"])]
        row[f"speedup_{t}t"] = statistics.median(ratios)
        row[f"dense_ms_{t}t"] = statistics.median(times[f"dense {t}t"]) * 1e3
        row[f"sparse_ms_{t}t"] = statistics.median(times[f"sparse {t}t"]) * 1e3
    row["dense_scaling"] = row["dense_ms_1t"] / row["dense_ms_2t"]
    row["sparse_scaling"] = row["sparse_ms_1t"] / row["sparse_ms_2t"]
    return row


def markdown(result: dict) -> str:
    m = result["machine"]
    out = [
        "# sparse-cpu kernels on two cores vs ONNX Runtime dense MatMul (cold weights)",
        "",
        f"Machine: {m['cpu']} (family {m['family']} model {m['model']}), {m['logical_cpus']} logical CPUs, "
        f"L3 {m['l3']}; path {m['isa']}. Timed {result['timed_seconds']:.0f} s after {result['idle_seconds']:.0f} s "
        f"idle (load average before/after {result['load_before']} / {result['load_after']}). Scaling = 1-thread "
        "time / 2-thread time of the same side.",
        "",
        "| shape | pattern | batch | form | speedup 1 thread | speedup 2 threads | dense ms 1t / 2t "
        "| sparse ms 1t / 2t | scaling dense / sparse |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        out.append(
            f"| {r['shape']} | {r['pattern']} | {r['batch']} | {r['form']} | {r['speedup_1t']:.2f}x | "
            f"{r['speedup_2t']:.2f}x | {r['dense_ms_1t']:.2f} / {r['dense_ms_2t']:.2f} | "
            f"{r['sparse_ms_1t']:.2f} / {r['sparse_ms_2t']:.2f} | {r['dense_scaling']:.2f} / "
            f"{r['sparse_scaling']:.2f} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shapes", default="2048x5632,5632x2048", help="as speed_sparse_cpu.py --shapes")
    ap.add_argument("--patterns", default="0.5,0.7,0.9")
    ap.add_argument("--batches", default="1,8,128")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle", type=float, default=160.0, help="seconds to wait between setup and timing")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        shapes = select_shapes(args.shapes) if args.shapes else LLAMA1B
        patterns = [p.strip() for p in args.patterns.split(",")]
        for p in patterns:
            parse_sparsity(p)
        batches = [int(b) for b in args.batches.split(",")]
    except (ValueError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cases = prepare(shapes, patterns, batches)
    evict = Evictor(2 * l3_bytes())
    log.info("built %d cases; waiting %.0f s idle", len(cases), args.idle)
    time.sleep(args.idle)
    load_before, t0 = loadavg(), time.perf_counter()
    rows = []
    for case in cases:
        rows.append(time_case(case, args.rounds, evict))
        r = rows[-1]
        log.info(
            "%-9s %-4s b=%-3d %-7s 1t %5.2fx  2t %5.2fx  (scaling dense %.2f sparse %.2f)  %.0f s",
            r["shape"],
            r["pattern"],
            r["batch"],
            r["form"],
            r["speedup_1t"],
            r["speedup_2t"],
            r["dense_scaling"],
            r["sparse_scaling"],
            time.perf_counter() - t0,
        )
    result = {
        "machine": machine(best_isa()),
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "idle_seconds": args.idle,
        "timed_seconds": time.perf_counter() - t0,
        "load_before": load_before,
        "load_after": loadavg(),
        "rows": rows,
    }
    write_json_atomic(args.out / "speed_sparse_cpu_two_cores.json", result)  # makes the folder
    write_text_atomic(args.out / "speed_sparse_cpu_two_cores.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
