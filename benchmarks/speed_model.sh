#!/usr/bin/env bash
# Model-level CPU speed, 1 thread, dense vs sparse exports:
#   smollm2   smollm2-135m: Wanda-50% and Wanda-2:4; ONNX Runtime (full model with KV cache) and DeepSparse
#             (the decoder stack it compiles, for prefill and for a decode step over a KV cache). Speed does
#             not depend on calibration quality, so pruning uses a small calibration set.
#   llama1b   the speed-only LLaMA-1B-like model (TinyLlama's shapes, random weights, smollm2's tokenizer;
#             sparsedeploy.common.models.build_speed_only_model), magnitude 70% and 2:4: ONNX Runtime at batch 1
#             and DeepSparse. About 4.5 GB per fp32 export and 12 GB of RAM; about an hour on one core.
#   sparsecpu smollm2-135m Wanda-70%: the --target sparse-cpu export (sparsedeploy's kernels) against the dense export
#             in ONNX Runtime, batch 1, prompt 64 + 64 new tokens, 1 and 2 threads (issue 17's whole-model row).
#             Also batch 8 on 1 thread (eight sequences decoded together).
#   deepsparse70 DeepSparse 1.8 on sparsecpu's row (smollm2-135m Wanda-70%, batch 1, prompt 64 + 64 new tokens, 1 thread):
#             the same pruned checkpoint as --target deepsparse exports, so the two engines can be set side by side.
#   sparsecpu1b the speed-only LLaMA-1B-like model, magnitude 70%: --target sparse-cpu against the dense export in
#             ONNX Runtime, batch 1, prompt 64 + 64 new tokens, 1 and 2 threads (issue 17's 1B-like row). ~12 GB of RAM.
#             Also its 2:4 prune on 1 thread.
#   deepsparse1b DeepSparse 1.8 on sparsecpu1b's 70 % row (the same magnitude-70% checkpoint, batch 1, 1 thread): its
#             decoder stack over the 64-token prompt and a decode step over a 64-token cache (static forms: whole
#             generations of both variants would hold ~18 GB of graphs in one process). Run sparsecpu1b first.
#             Disk: ~20 GB an export (--target deepsparse also writes generate's pair) and ~8 GB under TMPDIR while
#             bench runs (the DeepSparse worker gets copies of the forms it times).
#   ortop     sparsecpu's and sparsecpu1b's 70 % rows, 1 and 2 threads, with a third variant: the sparse-cpu export run whole in
#             one ONNX Runtime session with sparsedeploy's custom-op library (scripts/build_ort_op.sh; bench
#             --ort-op-library). Needs the two exports (run sparsecpu and sparsecpu1b first).
#   bench --engine ort / sparse-cpu computes the prefill's logits for the last position only in both models (as the
#   DeepSparse runner does; docs/bench.md), since 2026-12-03.
#   [SPEED_MODEL_OUT=DIR] bash benchmarks/speed_model.sh [WORK_DIR] [smollm2|llama1b|sparsecpu|deepsparse70|sparsecpu1b|deepsparse1b|ortop|all]
#     -> benchmarks/results/speed_model/{ort,deepsparse}_{wanda50,wanda24,llama1b_mag70,llama1b_mag24}/,
#        sparse_cpu_wanda70_t{1,2}/, deepsparse_wanda70_t1/, sparse_cpu_llama1b_mag70_t1/, deepsparse_llama1b_mag70_t1/,
#        sparse_cpu_ort_op_{wanda70,llama1b_mag70}_t{1,2}/
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${1:-/tmp/sparsedeploy-speed-model}"
part="${2:-smollm2}"
out="${SPEED_MODEL_OUT:-$here/benchmarks/results/speed_model}"  # another machine: e.g. .../speed_model/intel_xeon
py="${PYTHON:-$here/.venv/bin/python}"
sd=("${SPARSEDEPLOY:-$here/.venv/bin/sparsedeploy}" -q)
parts=(smollm2 llama1b sparsecpu deepsparse70 sparsecpu1b deepsparse1b ortop all)
if [[ " ${parts[*]} " != *" $part "* ]]; then
  echo "speed_model.sh: unknown part '$part': use one of ${parts[*]}" >&2
  exit 2
fi
if [[ "$part" == deepsparse1b && ! -f "$work/llama1b/mag70/report.json" ]]; then
  echo "speed_model.sh: $work/llama1b/mag70 is missing: run the sparsecpu1b part with the same WORK_DIR first" >&2
  exit 2
fi
export OMP_NUM_THREADS=1 NM_DISABLE_ANALYTICS=1
mkdir -p "$work" "$out"

if [[ "$part" == smollm2 || "$part" == all ]]; then
  "${sd[@]}" export --model smollm2-135m --output "$work/dense_onnx" --no-verify --overwrite
  for s in 50% 2:4; do
    tag="wanda${s//[:%]/}"
    "${sd[@]}" prune --model smollm2-135m --method wanda --sparsity "$s" --nsamples 8 --seqlen 256 --output "$work/$tag" --overwrite
    "${sd[@]}" export --model "$work/$tag" --output "$work/${tag}_onnx" --overwrite
    "${sd[@]}" bench --engine ort --model "$work/${tag}_onnx" --baseline "$work/dense_onnx" --batch 1,8 --prompt-len 128 \
      --gen-len 32 --rounds 5 -o "$out/ort_$tag"
  done
  "${sd[@]}" engines install deepsparse
  # bench times only what export wrote: the decoder-stack forms come from --target deepsparse exports
  # (--bench-batch 1,8 --bench-prompt-len 128 --bench-gen-len 64 are the defaults, as bench's)
  "${sd[@]}" export --model smollm2-135m --target deepsparse --output "$work/dense_ds" --no-verify --overwrite
  for tag in wanda50 wanda24; do
    "${sd[@]}" export --model "$work/$tag" --target deepsparse --output "$work/${tag}_ds" --no-verify --overwrite
    "${sd[@]}" bench --engine deepsparse --model "$work/${tag}_ds" --baseline "$work/dense_ds" --batch 1,8 \
      --prompt-len 128 --rounds 5 -o "$out/deepsparse_$tag"
  done
fi

if [[ "$part" == llama1b || "$part" == all ]]; then
  l="$work/llama1b"
  [[ -f "$l/dense/config.json" ]] || "$py" -c "import sys; from sparsedeploy.common.models import build_speed_only_model as b; b('llama-1b-like', sys.argv[1])" "$l/dense"
  [[ -f "$l/dense_onnx/model.onnx" ]] || "${sd[@]}" export --model "$l/dense" --output "$l/dense_onnx" --no-verify --overwrite
  "${sd[@]}" engines install deepsparse
  for s in 70% 2:4; do
    tag="mag${s//[:%]/}"
    [[ -f "$l/$tag/report.json" ]] || "${sd[@]}" prune --model "$l/dense" --method magnitude --sparsity "$s" --nsamples 2 --seqlen 64 \
      --output "$l/$tag" --overwrite
    [[ -f "$l/${tag}_onnx/model.onnx" ]] || "${sd[@]}" export --model "$l/$tag" --output "$l/${tag}_onnx" --overwrite
    "${sd[@]}" bench --engine ort --model "$l/${tag}_onnx" --baseline "$l/dense_onnx" --batch 1 --prompt-len 128 --gen-len 16 \
      --rounds 3 -o "$out/ort_llama1b_$tag"
    # --gen-len 0: static forms only; whole generations would hold both stack graphs of both variants
    # (4 x 4.4 GB of fp32 weights, ~18 GB before DeepSparse's own copies) in one process on a 24 GB machine
    # the two static forms bench times (4.4 GB each; generate's pair is the same two with --deepsparse-context 128)
    forms=(--target deepsparse --bench-batch 1 --bench-prompt-len 128 --bench-gen-len 0 --deepsparse-context 128
      --no-verify --overwrite)
    for v in dense "$tag"; do
      [[ -f "$l/${v}_ds/export_report.json" ]] || "${sd[@]}" export --model "$l/$v" --output "$l/${v}_ds" "${forms[@]}"
    done
    "${sd[@]}" bench --engine deepsparse --model "$l/${tag}_ds" --baseline "$l/dense_ds" --batch 1 --prompt-len 128 \
      --gen-len 0 --rounds 3 -o "$out/deepsparse_llama1b_$tag"
  done
fi

if [[ "$part" == sparsecpu || "$part" == all ]]; then
  [[ -f "$work/dense_onnx/model.onnx" ]] || "${sd[@]}" export --model smollm2-135m --output "$work/dense_onnx" --no-verify --overwrite
  [[ -f "$work/wanda70/report.json" ]] || "${sd[@]}" prune --model smollm2-135m --method wanda --sparsity 70% --nsamples 16 \
    --seqlen 512 --output "$work/wanda70" --overwrite
  [[ -f "$work/wanda70_sc/model.onnx" ]] || "${sd[@]}" export --model "$work/wanda70" --target sparse-cpu \
    --output "$work/wanda70_sc" --overwrite
  for t in 1 2; do
    OMP_NUM_THREADS=$t "${sd[@]}" bench --engine sparse-cpu --model "$work/wanda70_sc" --baseline "$work/dense_onnx" --batch 1 \
      --prompt-len 64 --gen-len 64 --threads "$t" --rounds 5 -o "$out/sparse_cpu_wanda70_t$t" --overwrite
  done
  # batch 8 (eight sequences decoded together: the kernels' batch 5-8 forms)
  OMP_NUM_THREADS=1 "${sd[@]}" bench --engine sparse-cpu --model "$work/wanda70_sc" --baseline "$work/dense_onnx" --batch 8 \
    --prompt-len 64 --gen-len 64 --threads 1 --rounds 3 -o "$out/sparse_cpu_wanda70_b8_t1" --overwrite
fi

if [[ "$part" == deepsparse70 || "$part" == all ]]; then
  [[ -f "$work/wanda70/report.json" ]] || "${sd[@]}" prune --model smollm2-135m --method wanda --sparsity 70% --nsamples 16 \
    --seqlen 512 --output "$work/wanda70" --overwrite
  "${sd[@]}" engines install deepsparse
  # prompt 64 + 64 new tokens: 127 KV-cache slots
  forms=(--target deepsparse --bench-batch 1 --bench-prompt-len 64 --bench-gen-len 64 --deepsparse-context 128 --no-verify
    --overwrite)
  [[ -f "$work/dense_ds64/export_report.json" ]] || "${sd[@]}" export --model smollm2-135m --output "$work/dense_ds64" "${forms[@]}"
  [[ -f "$work/wanda70_ds64/export_report.json" ]] || "${sd[@]}" export --model "$work/wanda70" --output "$work/wanda70_ds64" \
    "${forms[@]}"
  "${sd[@]}" bench --engine deepsparse --model "$work/wanda70_ds64" --baseline "$work/dense_ds64" --batch 1 --prompt-len 64 \
    --gen-len 64 --threads 1 --rounds 5 -o "$out/deepsparse_wanda70_t1" --overwrite
fi

if [[ "$part" == sparsecpu1b || "$part" == all ]]; then
  l="$work/llama1b"
  [[ -f "$l/dense/config.json" ]] || "$py" -c "import sys; from sparsedeploy.common.models import build_speed_only_model as b; b('llama-1b-like', sys.argv[1])" "$l/dense"
  [[ -f "$l/dense_onnx/model.onnx" ]] || "${sd[@]}" export --model "$l/dense" --output "$l/dense_onnx" --no-verify --overwrite
  [[ -f "$l/mag70/report.json" ]] || "${sd[@]}" prune --model "$l/dense" --method magnitude --sparsity 70% --nsamples 2 --seqlen 64 \
    --output "$l/mag70" --overwrite
  [[ -f "$l/mag70_sc/model.onnx" ]] || "${sd[@]}" export --model "$l/mag70" --target sparse-cpu --output "$l/mag70_sc" --overwrite
  for t in 1 2; do
    OMP_NUM_THREADS=$t "${sd[@]}" bench --engine sparse-cpu --model "$l/mag70_sc" --baseline "$l/dense_onnx" --batch 1 \
      --prompt-len 64 --gen-len 64 --threads "$t" --rounds 3 -o "$out/sparse_cpu_llama1b_mag70_t$t" --overwrite
  done
  # 2:4 (its batch-1 decode runs the 4-of-8 GEMV)
  [[ -f "$l/mag24/report.json" ]] || "${sd[@]}" prune --model "$l/dense" --method magnitude --sparsity 2:4 --nsamples 2 --seqlen 64 \
    --output "$l/mag24" --overwrite
  [[ -f "$l/mag24_sc/model.onnx" ]] || "${sd[@]}" export --model "$l/mag24" --target sparse-cpu --output "$l/mag24_sc" --overwrite
  OMP_NUM_THREADS=1 "${sd[@]}" bench --engine sparse-cpu --model "$l/mag24_sc" --baseline "$l/dense_onnx" --batch 1 \
    --prompt-len 64 --gen-len 64 --threads 1 --rounds 3 -o "$out/sparse_cpu_llama1b_mag24_t1" --overwrite
fi

if [[ "$part" == deepsparse1b || "$part" == all ]]; then
  l="$work/llama1b"
  "${sd[@]}" engines install deepsparse
  forms=(--target deepsparse --bench-batch 1 --bench-prompt-len 64 --bench-gen-len 0 --deepsparse-context 128 --no-verify
    --overwrite)
  for v in dense mag70; do
    [[ -f "$l/${v}_ds64/export_report.json" ]] || "${sd[@]}" export --model "$l/$v" --output "$l/${v}_ds64" "${forms[@]}"
  done
  "${sd[@]}" bench --engine deepsparse --model "$l/mag70_ds64" --baseline "$l/dense_ds64" --batch 1 --prompt-len 64 \
    --gen-len 0 --threads 1 --rounds 3 -o "$out/deepsparse_llama1b_mag70_t1" --overwrite
fi

if [[ "$part" == ortop || "$part" == all ]]; then
  lib="$(bash "$here/scripts/build_ort_op.sh" "$work/ort_op")"
  for t in 1 2; do
    OMP_NUM_THREADS=$t "${sd[@]}" bench --engine sparse-cpu --model "$work/wanda70_sc" --baseline "$work/dense_onnx" --batch 1 \
      --prompt-len 64 --gen-len 64 --threads "$t" --rounds 5 --ort-op-library "$lib" -o "$out/sparse_cpu_ort_op_wanda70_t$t" \
      --overwrite
    OMP_NUM_THREADS=$t "${sd[@]}" bench --engine sparse-cpu --model "$work/llama1b/mag70_sc" \
      --baseline "$work/llama1b/dense_onnx" --batch 1 --prompt-len 64 --gen-len 64 --threads "$t" --rounds 3 \
      --ort-op-library "$lib" -o "$out/sparse_cpu_ort_op_llama1b_mag70_t$t" --overwrite
  done
fi
