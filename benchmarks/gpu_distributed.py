"""A few training steps of a recipe under DDP or FSDP: what `benchmarks/gpu_distributed.sh` runs.

Launched once per mode, by torchrun (several GPUs) or directly (one process). With one process
and `--parallel fsdp` it joins a one-process group itself so the FSDP path (fully_shard, the
bf16 mixed-precision policy, the gathered checkpoint) still runs; with several it is the real
thing. Rank 0 prints one JSON line: tokens/s and MFU (from metrics.jsonl, after the first
logged window), peak GPU memory per rank, the last training loss, the checkpoint and whether it
loads back as a plain model with the same loss on a fixed batch.

    python benchmarks/gpu_distributed.py --parallel ddp --steps 30 [-- key=value ...]
    torchrun --nproc-per-node 8 benchmarks/gpu_distributed.py --parallel fsdp --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "scifi.yaml"))
    parser.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="gpu-runs")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    from llmcli.pretrain import pretrain
    from llmcli.recipe import load_recipe
    from llmcli.train import distributed
    from llmcli.train.metrics import read_metrics

    single = int(os.environ.get("WORLD_SIZE", "1")) <= 1
    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    if single and args.parallel == "fsdp":  # a one-process group: the FSDP path on one GPU
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        if cuda:
            torch.cuda.set_device(0)
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    tag = f"{args.parallel}{'-ac' if args.activation_checkpointing else ''}"
    run = Path(args.out) / tag
    items = [f"train.max_iters={args.steps}", f"train.parallel={args.parallel}",
             f"train.precision={args.precision}",
             f"train.activation_checkpointing={args.activation_checkpointing}",
             f"train.checkpoint_interval={args.steps}", f"train.eval_interval={args.steps}",
             "train.eval_iters=2", "train.log_interval=5", *args.overrides]
    recipe = load_recipe(args.recipe, items)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = pretrain(recipe, run_dir=run, overwrite=True, device=args.device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    info = distributed.from_env()
    (run / f"peak-rank{info.rank}.json").write_text(json.dumps(peak))
    if not info.is_main:
        return
    peaks = []
    for rank in range(info.world_size):  # pretrain has left the group: files, not collectives
        file = run / f"peak-rank{rank}.json"
        for _ in range(600):
            if file.exists() and file.read_text():
                break
            time.sleep(0.05)
        peaks.append(json.loads(file.read_text()) if file.exists() else None)
    logs = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    steady = logs[1:] or logs
    rate = sum(r["tokens_per_s"] for r in steady) / max(1, len(steady))
    mfus = [r["mfu"] for r in steady if r.get("mfu")]
    report = {
        "mode": tag, "processes": int(os.environ.get("WORLD_SIZE", "1")),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "precision": args.precision, "steps": result.step,
        "tokens_per_s": round(rate), "mfu": round(sum(mfus) / len(mfus), 4) if mfus else None,
        "peak_memory_gib_per_rank": [None if p is None else round(p / 2**30, 2)
                                     for p in peaks],
        "train_loss": result.losses.get(result.step), "val_loss": result.val_loss,
        "wall_s": round(seconds, 1), "checkpoint": str(result.checkpoint),
    }
    report["reload"] = reload_check(result.checkpoint)
    print(json.dumps(report), flush=True)


def reload_check(path: Path | None) -> dict:
    """The written checkpoint as a plain single-process model: it loads and computes a loss."""
    import torch

    from llmcli.checkpoint import Checkpoint

    if path is None:
        return {"ok": False, "why": "no checkpoint"}
    model = Checkpoint.open(path).load("cpu")
    torch.manual_seed(0)
    x = torch.randint(0, int(model.cfg.vocab_size), (2, min(32, model.cfg.context_length)))
    with torch.no_grad():
        _, loss = model(x, x)
    finite = bool(torch.isfinite(loss))
    return {"ok": finite, "loss_on_random_ids": round(float(loss), 4),
            "parameters": sum(p.numel() for p in model.parameters())}


if __name__ == "__main__":
    main()
