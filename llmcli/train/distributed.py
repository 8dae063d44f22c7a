"""Several processes through PyTorch's own engine: torchrun sets RANK/WORLD_SIZE, we join.

`llm pretrain R --nproc N` relaunches itself under `python -m torch.distributed.run` (torchrun);
`torchrun --nproc-per-node N -m llmcli pretrain R` works the same. NCCL on GPUs, gloo on CPU.
Only rank 0 prints and writes files; every rank draws its own batches; gradients are averaged
by DDP, validation losses by `mean_across`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    """The rank layout torchrun put in the environment (a single process when absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group (once) and pick this rank's device (cuda:LOCAL_RANK on GPUs)."""
    info = from_env()
    if not info.enabled:
        return info, device
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    return info, device


def current() -> Dist:
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Dist()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, info: Dist, device: torch.device) -> torch.nn.Module:
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def mean_across(values: torch.Tensor, info: Dist) -> torch.Tensor:
    """The mean of a tensor over all ranks (itself in a single process)."""
    if not info.enabled:
        return values
    home = values.device
    # NCCL reduces only CUDA tensors, gloo only CPU ones.
    where = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    values = values.detach().to(where, copy=True)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return (values / info.world_size).to(home)


def gather_objects(obj: object, info: Dist) -> list[object]:
    """Every rank's `obj`, in rank order (for per-rank RNG states in the trainer state)."""
    if not info.enabled:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: Dist) -> None:
    if info.enabled:
        dist.barrier()


def relaunch_under_torchrun(nproc: int, argv: list[str] | None = None) -> None:
    """Run this same command (without --nproc) under torchrun with `nproc` workers, then exit
    with its code: the one way `llm pretrain` and `llm finetune` go multi-process."""
    from llmcli.console import fail

    if from_env().enabled:
        fail("--nproc is for launching; under torchrun already, drop --nproc")
    cleaned, skip = [], False
    for arg in sys.argv[1:] if argv is None else argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            cleaned.append(arg)
    sys.exit(relaunch(nproc, cleaned))


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run `llm <argv>` under torchrun with `nproc` processes; returns its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "llmcli", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    proc = subprocess.Popen(cmd, env=env)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:  # the workers got the same Ctrl-C: let them save and exit
            continue
