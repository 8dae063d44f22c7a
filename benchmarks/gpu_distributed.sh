#!/usr/bin/env bash
# The GPU check of issue 14: a few steps of the scifi recipe (140.6M parameters, bf16) trained
# plainly, with DDP, with FSDP (FSDP2 + bf16 mixed-precision policy) and with FSDP plus
# activation checkpointing, each printing one JSON line (tokens/s, MFU, peak memory per rank,
# losses, and a reload of the consolidated checkpoint as a plain model).
#
#   bash benchmarks/gpu_distributed.sh [STEPS]        (default 30; about a minute per mode)
#
# Offline: the corpus is the built-in one (`llm fetch builtin`). With one GPU, DDP needs two
# processes and is skipped (NCCL refuses two ranks on one device); FSDP then runs in a
# one-process group, which exercises its whole code path (sharding, mixed precision, gathering
# the checkpoint) without the communication. With N >= 2 GPUs both run on all N.
set -uo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-30}
OUT=${OUT:-gpu-runs}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'gpus', torch.cuda.device_count(), torch.cuda.get_device_name(0) if torch.cuda.is_available() \
else 'none')"
python -m llmcli fetch builtin >/dev/null
RUN="python benchmarks/gpu_distributed.py --steps $STEPS --out $OUT"
if [ "$NGPU" -ge 2 ]; then
    LAUNCH="python -m torch.distributed.run --standalone --nproc-per-node=$NGPU"
    RUN_N="$LAUNCH benchmarks/gpu_distributed.py --steps $STEPS --out $OUT"
fi
status=0
echo "== one process (bf16 autocast)"
$RUN --parallel ddp || status=1
if [ "$NGPU" -ge 2 ]; then
    echo "== DDP x $NGPU"
    $RUN_N --parallel ddp || status=1
    echo "== FSDP x $NGPU"
    $RUN_N --parallel fsdp || status=1
    echo "== FSDP x $NGPU + activation checkpointing"
    $RUN_N --parallel fsdp --activation-checkpointing || status=1
else
    echo "== DDP: skipped (one GPU; DDP needs two processes, NCCL one device per rank)"
    echo "== FSDP, one-process group"
    $RUN --parallel fsdp || status=1
    echo "== FSDP, one-process group + activation checkpointing"
    $RUN --parallel fsdp --activation-checkpointing || status=1
fi
exit $status
