#!/usr/bin/env bash
# Model-level speed on smollm2-135m: the dense export against Wanda-50% and Wanda-2:4 exports,
# ONNX Runtime (full model with KV cache) and DeepSparse (the linear skeleton it accepts), 1 thread.
# Speed does not depend on calibration quality, so pruning uses a small calibration set.
#   bash benchmarks/speed_model.sh [WORK_DIR]      -> benchmarks/results/speed_model/{ort_wanda50,ort_wanda24,deepsparse_wanda50}/
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${1:-/tmp/sparsedeploy-speed-model}"
out="$here/benchmarks/results/speed_model"
sd=("${SPARSEDEPLOY:-$here/.venv/bin/sparsedeploy}" -q)
export OMP_NUM_THREADS=1 NM_DISABLE_ANALYTICS=1
mkdir -p "$work" "$out"
"${sd[@]}" export --model smollm2-135m --output "$work/dense_onnx" --no-verify --overwrite
for s in 0.5 2:4; do
  tag="wanda${s/:/}"
  "${sd[@]}" prune --model smollm2-135m --method wanda --sparsity "$s" --nsamples 8 --seqlen 256 --output "$work/$tag" --overwrite
  "${sd[@]}" export --model "$work/$tag" --output "$work/${tag}_onnx" --overwrite
  "${sd[@]}" bench --engine ort --model "$work/${tag}_onnx" --baseline "$work/dense_onnx" --batch 1,8 --prompt-len 128 \
    --gen-len 32 --rounds 5 -o "$out/ort_$tag"
done
"${sd[@]}" engines install deepsparse
"${sd[@]}" bench --engine deepsparse --model "$work/wanda50_onnx" --baseline "$work/dense_onnx" --batch 1,8 --prompt-len 128 \
  --gen-len 32 --rounds 5 -o "$out/deepsparse_wanda50"
