"""Measure the export on the real smollm2-135m: file sizes, ORT load times, parity (fp32 and fp16), per storage.

Usage: SPARSEDEPLOY_CACHE=/tmp/sdcache python benchmarks/export/measure.py [--work /tmp/sd_export_bench]
Writes benchmarks/export/results.json. Pruning uses a small calibration (8 x 128 tokens of gensim-wiki):
the point is the export, not the perplexity.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

from sparsedeploy.export.run import ExportConfig, export_checkpoint
from sparsedeploy.prune.driver import PruneConfig, run_prune

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/sd_export_bench")
    parser.add_argument("--patterns", default="0.5,2:4")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    work = Path(args.work)
    results = {"machine": f"2-core CPU dev box, no GPU ({platform.machine()}, {platform.python_version()})", "runs": []}
    for pattern in args.patterns.split(","):
        tag = pattern.replace(":", "_")
        ckpt = work / f"ckpt_{tag}"
        if not (ckpt / "report.json").is_file():
            run_prune(
                PruneConfig(model="smollm2-135m", method="wanda", sparsity=pattern, nsamples=8, seqlen=128),
                ckpt,
                overwrite=True,
                show_progress=False,
            )
        for kwargs in ({}, {"storage": "sparse"}, {"dtype": "float16"}):
            name = f"{tag}_" + "_".join(f"{v}" for v in kwargs.values()) if kwargs else f"{tag}_dense_fp32"
            start = time.perf_counter()
            report = export_checkpoint(ExportConfig(model=str(ckpt), **kwargs), work / f"onnx_{name}", overwrite=True)
            wall = time.perf_counter() - start
            v = report["verification"]
            run = {
                "pattern": pattern,
                "variant": name,
                "options": kwargs,
                "wall_seconds": wall,
                "export_seconds": report["export_seconds"],
                "storage": report["storage"],
                "ok": v["ok"],
                "problems": v["problems"],
                "zeros_torch": v["sparsity"]["zeros_torch"],
                "zeros_onnx": v["sparsity"]["zeros_onnx"],
                "linears": v["sparsity"]["linears"],
                "nm_qualifying": v["sparsity"]["nm_qualifying"],
                "max_abs_logit_diff": v["parity"]["max_abs_diff"],
                "greedy_identical": v["parity"]["greedy_identical"],
                "prompts": [
                    {
                        k: p[k]
                        for k in (
                            "prompt",
                            "prefill_max_abs_diff",
                            "decode_max_abs_diff",
                            "first_divergence",
                            "onnx_text",
                            "torch_text",
                        )
                        if k in p
                    }
                    for p in v["parity"]["prompts"]
                ],
            }
            results["runs"].append(run)
            print(
                json.dumps(
                    {
                        k: run[k]
                        for k in (
                            "variant",
                            "ok",
                            "max_abs_logit_diff",
                            "greedy_identical",
                            "zeros_onnx",
                            "zeros_torch",
                            "nm_qualifying",
                        )
                    }
                ),
                flush=True,
            )
            (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
