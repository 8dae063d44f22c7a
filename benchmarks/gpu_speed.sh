#!/usr/bin/env bash
# The GPU check of issue 15, one script for a lent GPU machine (offline; on one H200 it and
# gpu_distributed.sh after it took 314 s): every figure is measured against a baseline in the
# same run. benchmarks/results/README.md holds what it measured there.
#   1. training step, scifi dimensions, batch 96 x 128, bf16 + torch.compile: ours vs the
#      nanoGPT-shaped baseline (also compiled), with eager fp32 (TF32) of both and ours eager in
#      bf16 (what compiling alone buys); MFU against the card's dense bf16 peak
#      (llmcli.hardware's table). Goals: >= 40 % MFU, >= 1.2x nanoGPT.
#   2. greedy decoding, batch 1, scifi dimensions: ours (fp32, bf16) vs transformers' generate.
#   3. `llm imagine` with a tiny randomly initialised SDXL-shaped pipeline built on the spot.
#   4. where the compiled step's time goes: benchmarks/profile_train.py on part 1's step.
#   5. the commands a user runs: `llm pretrain` (bf16 + train.compile) on the built-in corpus,
#      `--resume` past its last checkpoint, then `llm generate` (greedy, beam, sample) on CUDA.
#
#   bash benchmarks/gpu_speed.sh [RESULTS_DIR]     (default benchmarks/results)
#
# Each part writes its output to RESULTS_DIR/gpu-<part>-<card>.txt as well as the terminal.
# PART_SECONDS (default 900) bounds each part, so that a part that hangs on a leased machine
# still leaves the others their time.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-benchmarks/results}
LIMIT="timeout ${PART_SECONDS:-900}"
LLM=(llm)
command -v llm >/dev/null || LLM=(python -m llmcli)  # a checkout that is not installed
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
$LIMIT python benchmarks/bench_train.py --device cuda --batch-size 96 --precision bf16 \
    --compile --steps 10 --no-seed 2>&1 | tee "$RESULTS/gpu-train-$CARD.txt" || status=1
echo "== 2. greedy decoding"
$LIMIT python benchmarks/bench_generate.py --device cuda --rounds 3 2>&1 \
    | tee "$RESULTS/gpu-generate-$CARD.txt" || status=1
echo "== 3. llm imagine, tiny pipeline"
$LIMIT python benchmarks/bench_imagine.py --device cuda 2>&1 \
    | tee "$RESULTS/gpu-imagine-$CARD.txt" || status=1
echo "== 4. where the compiled step's time goes"
$LIMIT python benchmarks/profile_train.py --device cuda --batch-size 96 --precision bf16 \
    --compile --top 25 2>&1 | tee "$RESULTS/gpu-profile-$CARD.txt" || status=1
echo "== 5. the commands: pretrain (bf16 + compile), resume, generate"
RUN=$(mktemp -d)
{
    set -e
    "${LLM[@]}" fetch builtin
    $LIMIT "${LLM[@]}" pretrain recipes/tiny.yaml data.source=builtin train.max_iters=300 \
        train.checkpoint_interval=100 train.precision=bf16 train.compile=true --device cuda \
        -o "$RUN"
    $LIMIT "${LLM[@]}" pretrain recipes/tiny.yaml data.source=builtin train.max_iters=400 \
        train.checkpoint_interval=100 train.precision=bf16 train.compile=true --device cuda \
        -o "$RUN" --resume
    for strategy in greedy beam sample; do
        $LIMIT "${LLM[@]}" generate "$RUN" "The list" --device cuda --strategy $strategy \
            --max-new-tokens 40 --seed 0
    done
} 2>&1 | tee "$RESULTS/gpu-cli-$CARD.txt" || status=1
rm -rf "$RUN"
exit $status
