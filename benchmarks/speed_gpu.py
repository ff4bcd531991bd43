"""GPU speed suite: 2:4 semi-structured sparse kernels against dense, per linear shape and per model.

Needs a CUDA GPU (without one it says so and exits 0, writing nothing):

    python benchmarks/speed_gpu.py --out benchmarks/results             # kernels + models
    python benchmarks/speed_gpu.py --parts kernels --dtypes float16      # one part

Parts:
  kernels  F.linear(x, W) for smollm2-135m's linear shapes and speed-only LLaMA-1B/8B-like shapes, x of
           1..4096 tokens, dense cuBLAS vs 2:4 through cuSPARSELt and CUTLASS (sparsedeploy.bench.linear_gpu)
           -> speed_gpu_kernels.{json,md}
  models   whole models in PyTorch (sparsedeploy.bench.run, engine torch): smollm2-135m pruned 2:4 by Wanda on
           this GPU vs the dense model, and a speed-only LLaMA-1B-like model (random weights, magnitude 2:4)
           vs its dense twin; prefill and decode with the KV cache, each phase replayed as a CUDA graph over a
           static KV cache (`_graph` files) and eager -> speed_gpu_model/*.{json,md,png}

`--calib` picks the calibration text for the real model (default gensim-wiki, read from the cache of its
cleaned text where gensim is not installed). Every figure states the GPU and torch version it came from.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sparsedeploy.common.files import write_json_atomic  # noqa: E402

log = logging.getLogger("benchmarks.speed_gpu")
RESULTS = ROOT / "benchmarks" / "results"


def gpu_info() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cusparselt": bool(torch.backends.cusparselt.is_available()),
        "cusparselt_version": torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None,
    }


def run_kernels(args, out: Path) -> None:
    from sparsedeploy.bench import linear_gpu as gk

    device = torch.device("cuda")
    shapes = gk.SMOLLM2_LINEARS + gk.LLAMA1B_LINEARS + gk.LLAMA8B_LINEARS
    dtypes = [getattr(torch, d) for d in args.dtypes]
    t0 = time.perf_counter()
    rows = gk.bench_linears(
        shapes,
        args.tokens,
        dtypes,
        device,
        rounds=args.rounds,
        progress=lambda new: log.info(
            "%s",
            "; ".join(
                f"{r['shape']} t={r['tokens']} {r['dtype']} {r['backend']}: "
                + (f"{r['speedup']:.2f}x" if "speedup" in r else r.get("error", "?"))
                for r in new
            ),
        ),
    )
    doc = {
        "suite": "gpu linear kernels, dense vs 2:4 semi-structured",
        "machine": gpu_info(),
        "rounds": args.rounds,
        "seconds": time.perf_counter() - t0,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    write_json_atomic(out / "speed_gpu_kernels.json", doc)
    (out / "speed_gpu_kernels.md").write_text(kernels_markdown(doc))


def kernels_markdown(doc: dict) -> str:
    from sparsedeploy.bench.linear_gpu import linear_markdown

    m = doc["machine"]
    return (
        f"# 2:4 semi-structured vs dense linear kernels on GPU\n\n{m['gpu']}, torch {m['torch']} (CUDA {m['cuda']}, "
        f"cuSPARSELt {m['cusparselt_version']}), {doc['date']}; {doc['rounds']} alternating rounds, each sample timed "
        "with CUDA events over back-to-back calls. Speedup = dense time / sparse time per round, median (p10-p90); "
        "NOISY = spread > 10%. `eager`: `F.linear(x, W)` called from Python, as a PyTorch program pays for it "
        "(dispatch and the kernel library's host-side setup included); `graph`: the same call captured once in a "
        "CUDA graph and replayed, i.e. GPU time only. "
        "Weights random, pruned 2:4 by magnitude; the 1B/8B shapes are speed-only (LLaMA-like sizes, no "
        "checkpoint).\n\n" + linear_markdown(doc["rows"])
    )


def speed_only_llama(
    path_dense: Path, path_sparse: Path, cache_dir=None, seed: int = 0, preset: str = "llama-1b-like"
) -> None:
    """The LLaMA-1B-like speed-only model (random weights, sparsedeploy.common.models preset), dense and 2:4 by
    magnitude."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsedeploy.common.models import build_speed_only_model
    from sparsedeploy.common.sparsity import SparsitySpec
    from sparsedeploy.prune.methods.magnitude import magnitude_prune_linears

    build_speed_only_model(preset, path_dense, seed=seed, dtype="float16", cache=cache_dir)
    model = AutoModelForCausalLM.from_pretrained(str(path_dense), dtype=torch.float16).eval()
    magnitude_prune_linears(model, SparsitySpec.nm(2, 4))
    model.save_pretrained(path_sparse)
    AutoTokenizer.from_pretrained(str(path_dense)).save_pretrained(path_sparse)


def run_models(args, out: Path) -> None:
    from sparsedeploy.bench.config import BenchConfig
    from sparsedeploy.bench.report import markdown, plot
    from sparsedeploy.bench.run import run_bench
    from sparsedeploy.common.errors import UserError
    from sparsedeploy.common.models import resolve_model_path
    from sparsedeploy.prune.driver import PruneConfig, run_prune

    work = Path(tempfile.mkdtemp(prefix="sparsedeploy-gpu-"))
    pairs = {}
    if "smollm2" in args.models:
        dense = resolve_model_path("smollm2-135m", args.cache_dir)
        report = run_prune(
            PruneConfig(
                model="smollm2-135m",
                method="wanda",
                sparsity="2:4",
                calib=args.calib,
                nsamples=32,
                seqlen=512,
                device="cuda",
                cache_dir=args.cache_dir,
            ),
            work / "smollm2_wanda24",
            show_progress=False,
        )
        log.info(
            "smollm2-135m Wanda 2:4 on cuda: %.1f s, measured sparsity %.4f",
            report["prune_seconds"],
            report["overall_sparsity"],
        )
        pairs["smollm2_wanda24"] = (work / "smollm2_wanda24", dense)
    if "llama1b" in args.models:
        speed_dense, speed_sparse = work / "llama1b_dense", work / "llama1b_24"
        speed_only_llama(speed_dense, speed_sparse, args.cache_dir)
        pairs["llama1b_speed_only_24"] = (speed_sparse, speed_dense)
    for tag, (sparse, base) in pairs.items():
        for dtype in args.model_dtypes:
            for form in args.model_forms:
                cfg = BenchConfig(
                    model=str(sparse),
                    baseline=str(base),
                    engine="torch",
                    device="cuda",
                    dtype=dtype,
                    batches=args.batches,
                    prompt_len=args.prompt_len,
                    gen_len=args.gen_len,
                    rounds=args.model_rounds,
                    warmup=2,
                    cache_dir=args.cache_dir,
                    max_seconds=args.max_seconds,
                    cuda_graphs=form == "graph",
                )
                try:
                    result = run_bench(cfg)
                except UserError as exc:  # a capture that fails is reported, and the other forms still run
                    log.error("%s %s %s: %s", tag, dtype, form, exc)
                    continue
                result["machine"].update(gpu_info())
                result["model_label"] = tag + (" (speed-only: random weights)" if "speed_only" in tag else "")
                stem = out / "speed_gpu_model" / (f"{tag}_{dtype}" + ("_graph" if form == "graph" else ""))
                write_json_atomic(stem.with_suffix(".json"), result)
                stem.with_suffix(".md").write_text(markdown(result))
                plot(result, stem.with_suffix(".png"))
                for r in result["rows"]:
                    if "speedup" in r:
                        log.info("%s %s %s batch %d %s: %.2fx", tag, dtype, form, r["batch"], r["phase"], r["speedup"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--parts", nargs="+", choices=["kernels", "models"], default=["kernels", "models"])
    parser.add_argument("--dtypes", nargs="+", choices=["float16", "bfloat16"], default=["float16", "bfloat16"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 1024, 4096])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=16)
    parser.add_argument("--model-rounds", type=int, default=3)
    parser.add_argument(
        "--model-dtypes",
        nargs="+",
        choices=["float16", "bfloat16"],
        default=["float16"],
        help="model part: eager 2:4 models are slow (see docs/bench.md), so one dtype by default",
    )
    parser.add_argument(
        "--model-forms",
        nargs="+",
        choices=["graph", "eager"],
        default=["graph", "eager"],
        help="model part: graph = prefill and decode steps replayed as CUDA graphs over a static KV cache "
        "(GPU time); eager = PyTorch eager with a DynamicCache (host-side setup included)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=["smollm2", "llama1b"],
        default=["smollm2", "llama1b"],
        help="model part: which pairs (llama1b = the speed-only LLaMA-1B-like model)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="model part: stop a bench after this long (at least 2 rounds): eager 2:4 decode is slow",
    )
    parser.add_argument("--calib", default="gensim-wiki")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not torch.cuda.is_available():
        log.warning("no CUDA device: the GPU speed suite was not run (nothing written)")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    log.info("GPU: %s", json.dumps(gpu_info()))
    if "kernels" in args.parts:
        run_kernels(args, args.out)
    if "models" in args.parts:
        run_models(args, args.out)


if __name__ == "__main__":
    main()
