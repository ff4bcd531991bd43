"""Two builds of the sparse-cpu library side by side in one process: is a kernel change faster, and by how much?

How docs/sparse_cpu.md judges a kernel change. Build the variant in a copy of the repository (edit
sparsedeploy/kernels/csrc/sparse_cpu.c there, then `python setup.py build_ext --inplace`), and compare it with
the installed build:
    python benchmarks/ab_sparse_cpu_builds.py installed /path/to/copy --batches 128 --patterns 0.5,0.7
A and B are each a compiled library (`_native*.so`), a repository copy holding one in sparsedeploy/kernels/, or
`installed` (the build this Python imports). Each weight (random, pruned per row by magnitude, as the kernel suite's)
is packed once and bound in both libraries, so both read the same bytes; enough copies are cycled to keep weights
cold (twice the L3). For each copy, round after round, A's call and B's call are timed back to back, the order
alternating, and the figure is the median over those pairs of time A / time B (above 1: B is faster), with its
quartiles: pairs taken moments apart see the same machine, which separate processes on a shared guest do not.
Before timing, B's output must match A's (float32 tolerance): a variant that computes something else stops the run
(exit 1). Run it once with the same build on both sides (A/A) to see how small a difference this machine can show.
Writes ab_sparse_cpu_builds.json and .md under --out when given.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from speed_sparse_cpu import l3_bytes, machine, n_copies, select_shapes  # noqa: E402

from sparsedeploy.bench.matmul_cpu import random_pruned_linear  # noqa: E402
from sparsedeploy.common.errors import UserError  # noqa: E402
from sparsedeploy.common.files import write_json_atomic, write_text_atomic  # noqa: E402
from sparsedeploy.common.sparsity import parse_sparsity  # noqa: E402
from sparsedeploy.kernels import pack  # noqa: E402
from sparsedeploy.kernels.native import FORMS, ISAS, NativeLibraryMissing, available_isas, library_path  # noqa: E402

log = logging.getLogger("benchmarks.ab_sparse_cpu_builds")
RTOL, ATOL = 1e-4, 1e-4


class BadInput(Exception):
    """A command-line value that cannot run (the message says what to change)."""


def resolve_library(spec: str) -> Path:
    """`installed`, a compiled library, or a repository copy with one built in sparsedeploy/kernels/."""
    if spec == "installed":
        return library_path()
    path = Path(spec)
    if path.is_dir():
        found = sorted((path / "sparsedeploy" / "kernels").glob("_native*.so"))
        if not found:
            raise BadInput(
                f"no compiled library in {path}/sparsedeploy/kernels: run `python setup.py build_ext --inplace` there"
            )
        return found[0]
    if not path.is_file():
        raise BadInput(f"{spec}: no such library or repository copy (give a _native*.so, a repo copy or 'installed')")
    return path


def load(path: Path) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(str(path.resolve()), mode=ctypes.RTLD_LOCAL)
        new, run = lib.sdk_linear_new, lib.sdk_linear_matmul
    except (OSError, AttributeError) as e:
        raise BadInput(f"{path}: not a sparse-cpu library with sdk_linear_new / sdk_linear_matmul ({e})") from e
    new.restype, new.argtypes = ctypes.c_void_p, [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2
    run.restype = ctypes.c_int
    run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int] * 3
    lib.sdk_linear_free.argtypes = [ctypes.c_void_p]
    return lib


def compare(
    libs: tuple[ctypes.CDLL, ctypes.CDLL],
    k: int,
    n: int,
    pattern: str,
    batch: int,
    threads: int,
    isa: str | None,
    form: str | None,
    rounds: int,
    cold_bytes: int,
) -> dict:
    """One case: the pair ratios time A / time B over rounds x weight copies (see the module doc)."""
    spec = parse_sparsity(pattern)
    packed = [pack(random_pruned_linear(n, k, spec, seed=0).numpy())]
    copies = n_copies(packed[0].kernel_nbytes, cold_bytes)
    packed += [pack(random_pruned_linear(n, k, spec, seed=c).numpy()) for c in range(1, copies)]
    handles = [
        [lib.sdk_linear_new(p.mask.ctypes.data, p.values.ctypes.data, p.block_ptr.ctypes.data, n, k) for p in packed]
        for lib in libs
    ]
    x = np.random.default_rng(0).standard_normal((batch, k), dtype=np.float32)
    ys = [np.empty((batch, n), np.float32) for _ in libs]
    isa_code, form_code = ISAS[isa] if isa else 0, FORMS[form] if form else 0

    def call(side: int, copy: int) -> float:
        t0 = time.perf_counter()
        rc = libs[side].sdk_linear_matmul(
            handles[side][copy], x.ctypes.data, batch, ys[side].ctypes.data, threads, isa_code, form_code
        )
        t = time.perf_counter() - t0
        if rc:
            raise RuntimeError(f"library {'AB'[side]} failed (code {rc}) on {k}x{n} {pattern} batch {batch}")
        return t

    try:
        for c in range(copies):  # warm-up: derived forms built, pools started, pages touched
            call(0, c), call(1, c)
            if not np.allclose(ys[1], ys[0], rtol=RTOL, atol=ATOL):
                raise RuntimeError(
                    f"B's output differs from A's on {k}x{n} {pattern} batch {batch} (copy {c}): max |B - A| "
                    f"{float(np.abs(ys[1] - ys[0]).max()):.3g}; a variant must compute the same y"
                )
        ta, tb, ratios = [], [], []
        for r in range(rounds):
            for c in range(copies):
                if (r + c) % 2 == 0:
                    a = call(0, c)
                    b = call(1, c)
                else:
                    b = call(1, c)
                    a = call(0, c)
                ta.append(a), tb.append(b), ratios.append(a / b)
    finally:
        for lib, hs in zip(libs, handles):
            for h in hs:
                lib.sdk_linear_free(h)
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return {
        "shape": f"{k}x{n}",
        "pattern": pattern,
        "batch": batch,
        "threads": threads,
        "copies": copies,
        "pairs": len(ratios),
        "a_ms": round(statistics.median(ta) * 1e3, 3),
        "b_ms": round(statistics.median(tb) * 1e3, 3),
        "ratio": round(statistics.median(ratios), 3),
        "q1": round(q1, 3),
        "q3": round(q3, 3),
    }


def markdown(result: dict) -> str:
    lines = [
        "# Two sparse-cpu builds side by side (time A / time B: above 1, B is faster)",
        "",
        f"A: `{result['a']}`  ",
        f"B: `{result['b']}`  ",
        f"Machine: {result['machine']['cpu']} (family {result['machine']['family']} model "
        f"{result['machine']['model']}), {result['machine']['logical_cpus']} logical CPUs; isa "
        f"{result['isa'] or 'auto'}, form {result['form'] or 'auto'}; {result['when']}.",
        "",
        "| shape (KxN) | pattern | batch | threads | A ms | B ms | A / B (median of pairs) | quartiles | pairs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['shape']} | {r['pattern']} | {r['batch']} | {r['threads']} | {r['a_ms']} | {r['b_ms']} "
            f"| {r['ratio']:.3f} | {r['q1']:.3f}-{r['q3']:.3f} | {r['pairs']} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", help="build A: a _native*.so, a repository copy holding one, or 'installed'")
    ap.add_argument("b", help="build B (the same choices)")
    ap.add_argument("--shapes", default="1b", help="as the kernel suite: smollm2, 1b, or shape names KxN")
    ap.add_argument("--patterns", default="0.5,0.7")
    ap.add_argument("--batches", default="128")
    ap.add_argument("--threads", default="1")
    ap.add_argument("--isa", default=None, choices=list(ISAS), help="force a dispatch path (default: the best)")
    ap.add_argument("--form", default=None, choices=list(FORMS), help="force a form (default: the library's pick)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", type=Path, default=None, help="a folder for the JSON and Markdown (default: print only)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        paths = resolve_library(args.a), resolve_library(args.b)
        if args.isa and args.isa not in available_isas():
            raise BadInput(f"--isa {args.isa} does not run on this CPU: use one of {available_isas()}")
        if args.rounds < 2:
            raise BadInput(f"--rounds must be at least 2, got {args.rounds}")
        patterns = [p.strip() for p in args.patterns.split(",")]
        for p in patterns:
            parse_sparsity(p)
        batches = [int(b) for b in args.batches.split(",")]
        threads = [int(t) for t in args.threads.split(",")]
        if min(batches) < 1 or min(threads) < 1:
            raise BadInput("--batches and --threads must be positive integers")
        shapes = select_shapes(args.shapes)
        libs = load(paths[0]), load(paths[1])
    except (BadInput, NativeLibraryMissing, UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows, cold_bytes = [], 2 * l3_bytes()
    for shape in shapes:
        for pattern in patterns:
            for batch in batches:
                for t in threads:
                    try:
                        row = compare(
                            libs, shape.k, shape.n, pattern, batch, t, args.isa, args.form, args.rounds, cold_bytes
                        )
                    except RuntimeError as e:
                        print(f"error: {e}", file=sys.stderr)
                        return 1
                    log.info(
                        "%s %s batch %d threads %d: A %.3f ms, B %.3f ms, A/B %.3f (quartiles %.3f-%.3f, %d pairs)",
                        row["shape"],
                        pattern,
                        batch,
                        t,
                        row["a_ms"],
                        row["b_ms"],
                        row["ratio"],
                        row["q1"],
                        row["q3"],
                        row["pairs"],
                    )
                    rows.append(row)
    result = {
        "a": str(paths[0]),
        "b": str(paths[1]),
        "isa": args.isa,
        "form": args.form,
        "rows": rows,
        "machine": machine(args.isa or available_isas()[0]),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if args.out:  # the folder is made by the writes
        write_json_atomic(args.out / "ab_sparse_cpu_builds.json", result)
        write_text_atomic(args.out / "ab_sparse_cpu_builds.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
