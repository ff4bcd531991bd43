"""`sparsedeploy bench`: dense vs sparse inference speed of whole models; run_bench dispatches to one module per engine.

Engines:
- ``ort``: an optimum ONNX export with KV cache (``model.onnx`` taking ``past_key_values.*``), run in
  ONNX Runtime: prefill latency (prompt of P tokens), decode tokens/s (G steps reusing the KV cache)
  and end-to-end time.
- ``sparse-cpu``: a ``--target sparse-cpu`` export, its SparseLinear nodes in sparsedeploy's own kernels and
  every other operator in ONNX Runtime (sparsedeploy.onnx.segmented), against the dense export in plain
  ONNX Runtime: the same phases as ``ort``; ``--threads`` sets both the kernels' and ONNX Runtime's threads.
- ``deepsparse``: DeepSparse 1.8 in its own venv (see runtimes/deepsparse_env.py). Its engine aborts on
  optimum's Llama export with static shapes (and with dynamic shapes it only hands the graph to its
  bundled ONNX Runtime), so the bench first *tries* the full graph and records the verdict, then
  measures the most complete forms that compile: the **decoder stack** -- every block (attention,
  norms, MLP, residuals) with its real weights, static shapes, eager attention, rotary tables and mask
  as inputs, each layer's new keys/values as outputs -- over the prompt for prefill, and for a decode
  step over one token attending to a KV cache of the prompt's length (cache tensors as inputs): the files
  each export wrote and lists under ``static_forms`` (a form not exported: exit 2 naming the export option).
  The embedding lookup and lm_head stay outside. For exports without static forms the **linear skeleton** --
  every MatMul with its real (pruned) weights, a ReLU after each, residual adds -- stands in. With
  ``--gen-len`` > 0 it then times **whole generations** through the two stack graphs with the embedding
  lookup and lm_head in NumPy (sparsedeploy.runtimes.decoder_stack, what ``generate --engine deepsparse`` runs):
  prefill, decode tokens/s and end-to-end, in DeepSparse and in ONNX Runtime on the same files. The
  report names the form of every row.
- ``torch``: a Hugging Face checkpoint directory in PyTorch. On CUDA the sparse model's 2:4 linears
  are converted with ``torch.sparse.to_sparse_semi_structured`` (fp16/bf16); without CUDA and with
  ``--device cuda`` the command says so and stops cleanly. Eager by default (a DynamicCache, every
  kernel's host-side setup paid per call); with ``--cuda-graphs`` the prefill and each decode step are
  replayed as CUDA graphs over a static KV cache (sparsedeploy.runtimes.static_cache).
- ``tensorrt``: the same static forms as DeepSparse (decoder stack, or linear skeleton) built into TensorRT
  engines on a GPU (runtimes/tensorrt_runner.py): the dense export dense, the sparse one with
  SPARSE_WEIGHTS; outputs checked against ONNX Runtime, sparse-kernel layers listed. Without CUDA or the
  tensorrt package the command says which is missing and stops cleanly.

Dense and sparse models run alternately in the same process (sparsedeploy.common.timing), so the ratio is
taken per round and machine drift cancels.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path

from sparsedeploy.bench.config import ENGINES, BenchConfig, machine_info
from sparsedeploy.bench.deepsparse import bench_deepsparse
from sparsedeploy.bench.ort import bench_ort
from sparsedeploy.bench.pytorch import bench_torch
from sparsedeploy.bench.sparse_cpu import bench_sparse_cpu
from sparsedeploy.bench.tensorrt import bench_tensorrt
from sparsedeploy.common.errors import UserError
from sparsedeploy.kernels.native import core_round_trip_ns
from sparsedeploy.onnx.storage import onnx_file

log = logging.getLogger(__name__)


def run_bench(cfg: BenchConfig, progress=None) -> dict:
    if cfg.engine not in ENGINES:
        raise UserError(f"unknown --engine {cfg.engine!r}: use {', '.join(ENGINES)}")
    if any(b < 1 for b in cfg.batches) or cfg.prompt_len < 1 or cfg.gen_len < 0 or cfg.threads < 1 or cfg.rounds < 1:
        raise UserError("--batch, --prompt-len, --threads and --rounds must be positive and --gen-len >= 0")
    if cfg.cuda_graphs and cfg.engine != "torch":
        raise UserError(
            f"--cuda-graphs is for --engine torch (checkpoints on a GPU), not --engine {cfg.engine}: drop --cuda-graphs"
        )
    if cfg.all_logits and cfg.engine not in ("ort", "sparse-cpu"):
        raise UserError(
            f"--all-logits is for --engine ort / sparse-cpu (ONNX exports in ONNX Runtime), not --engine {cfg.engine}: "
            "drop --all-logits"
        )
    if cfg.ort_op_library and cfg.engine != "sparse-cpu":
        raise UserError(
            f"--ort-op-library is for --engine sparse-cpu (a sparse-cpu export), not --engine {cfg.engine}: drop "
            "--ort-op-library"
        )
    if cfg.cuda_graphs and not cfg.device.startswith("cuda"):
        raise UserError(
            f"--cuda-graphs needs a GPU, not --device {cfg.device}: add --device cuda or drop --cuda-graphs"
        )
    if cfg.engine == "torch":
        for what, p in (("--model", cfg.model), ("--baseline", cfg.baseline)):
            if p and not Path(p, "config.json").is_file():
                raise UserError(
                    f"{what} {p} is not a Hugging Face checkpoint directory (no config.json): --engine torch times "
                    "checkpoints, not ONNX"
                )
        variants = {**({"dense": Path(cfg.baseline)} if cfg.baseline else {}), "sparse": Path(cfg.model)}
    else:
        variants = {
            **({"dense": onnx_file(cfg.baseline, "--baseline")} if cfg.baseline else {}),
            "sparse": onnx_file(cfg.model, "--model"),
        }
    if cfg.engine == "tensorrt":
        from sparsedeploy.runtimes.tensorrt_runner import unavailable_reason

        if not cfg.device.startswith("cuda"):
            raise UserError(f"--engine tensorrt runs on a GPU, not on --device {cfg.device}: add --device cuda")
        reason = unavailable_reason()
        if reason:
            return {"skipped": f"--engine tensorrt: not run: {reason}"}
    if cfg.engine == "torch" and cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return {
                "skipped": f"--engine torch --device {cfg.device}: CUDA is not available on this machine, so the 2:4 "
                "semi-structured GPU benchmark was not run (use --engine ort or deepsparse on CPU)"
            }
    machine = machine_info(cfg.threads)
    if cfg.engine in ("torch", "tensorrt") and cfg.device.startswith("cuda"):
        import torch

        machine.update(gpu=torch.cuda.get_device_name(torch.device(cfg.device)), torch=torch.__version__)
    result = {
        "model": str(cfg.model),
        "baseline": cfg.baseline,
        "engine": cfg.engine,
        "prompt_len": cfg.prompt_len,
        "gen_len": cfg.gen_len,
        "batches": cfg.batches,
        "rounds": cfg.rounds,
        "machine": machine,
        "config": asdict(cfg),
        "notes": {},
    }
    if cfg.engine == "ort":
        result["rows"] = bench_ort(cfg, variants, progress)
    elif cfg.engine == "sparse-cpu":
        # the kernels' threads pay for every move between them: record how far apart the OS placed them
        multi = cfg.threads != 1 and (os.cpu_count() or 1) > 1
        before = core_round_trip_ns() if multi else None
        result["rows"], result["notes"] = bench_sparse_cpu(cfg, variants, progress)
        if multi:
            machine["core_round_trip_ns"] = [before, core_round_trip_ns()]
    elif cfg.engine == "deepsparse":
        from sparsedeploy.runtimes.deepsparse_env import LICENCE_NOTE

        result["rows"], result["notes"] = bench_deepsparse(cfg, variants, progress)
        result["licence"] = LICENCE_NOTE
    elif cfg.engine == "tensorrt":
        result["rows"], result["notes"] = bench_tensorrt(cfg, variants, progress)
    else:
        result["rows"], result["notes"] = bench_torch(cfg, variants, progress)
    return result
