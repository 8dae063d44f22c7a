#!/usr/bin/env bash
# The GPU check of issue 15, one script for a lent GPU machine (about 5 minutes on an H100-class
# card; offline): every figure is measured against a baseline in the same run.
#   1. training step, scifi dimensions, batch 96 x 128, bf16 + torch.compile: ours vs the
#      nanoGPT-shaped baseline (also compiled), with eager fp32 (TF32) of both; MFU against the
#      card's dense bf16 peak (llmcli.hardware's table). Goals: >= 40 % MFU, >= 1.2x nanoGPT.
#   2. greedy decoding, batch 1, scifi dimensions: ours (fp32, bf16) vs transformers' generate.
#   3. `llm imagine` with a tiny randomly initialised SDXL-shaped pipeline built on the spot.
#
#   bash benchmarks/gpu_speed.sh [RESULTS_DIR]     (default benchmarks/results)
#
# Each part writes its output to RESULTS_DIR/gpu-<part>-<card>.txt as well as the terminal.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-benchmarks/results}
mkdir -p "$RESULTS"
CARD=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-') \
if torch.cuda.is_available() else 'none')")
if [ "$CARD" = "none" ]; then
    echo "no CUDA device: this script is for a GPU machine" >&2
    exit 2
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
status=0
echo "== 1. training step: bf16 + compile, B 96 x 128"
python benchmarks/bench_train.py --device cuda --batch-size 96 --precision bf16 --compile \
    --steps 5 --no-seed 2>&1 | tee "$RESULTS/gpu-train-$CARD.txt" || status=1
echo "== 2. greedy decoding"
python benchmarks/bench_generate.py --device cuda --rounds 3 2>&1 \
    | tee "$RESULTS/gpu-generate-$CARD.txt" || status=1
echo "== 3. llm imagine, tiny pipeline"
python benchmarks/bench_imagine.py --device cuda 2>&1 | tee "$RESULTS/gpu-imagine-$CARD.txt" \
    || status=1
exit $status
