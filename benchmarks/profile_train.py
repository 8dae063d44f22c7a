"""Where one training step's time goes: the real step of `llmcli.train.loop` under the profiler.

    python benchmarks/profile_train.py --device cuda --batch-size 96 --precision bf16 --compile
    python benchmarks/profile_train.py --precision bf16          # CPU, 2 threads

Prints the step's wall time, the time the device was busy with kernels during it (on a GPU the
rest is the CPU launching work: what CUDA graphs, `train.compile_mode: reduce-overhead`, remove),
that time by kind of kernel (matrix products, attention, compiled fused kernels, optimizer,
other), and the costliest kernels. Each mode of --compile-mode runs in its own process.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import add_step_arguments, ours_step, step_overrides, sync  # noqa: E402

KINDS = [  # first match wins; names as cuBLAS, cuDNN, inductor and PyTorch give them
    ("matrix products", r"gemm|cutlass|nvjet|xmma|cublas|addmm|\bb?mm\b|matmul|linear"),
    ("attention", r"flash|fmha|attention|sdpa"),
    ("softmax and loss", r"softmax|nll_loss|cross_entropy"),
    ("optimizer", r"adam|multi_tensor_apply"),
    ("other compiled (inductor)", r"^triton_|^cpp_fused"),
]


def kind(name: str) -> str:
    for label, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def profile(args: argparse.Namespace, mode: str) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    overrides = step_overrides(args) + [f"train.compile_mode={mode}"]
    with tempfile.TemporaryDirectory() as scratch:
        _, _, step = ours_step(args.recipe, overrides, args.precision, args.compile, device,
                               Path(scratch))
        for _ in range(args.warmup):
            step()
        walls = []
        for _ in range(args.steps):
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            walls.append(time.perf_counter() - start)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        warnings.filterwarnings("ignore", message=".*Profiler clears events")
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.profile_steps):
                step()
            sync(device)
    on_gpu = device.type == "cuda"
    # Kernel time: the kernels' own time on a GPU; on the CPU the operators' self time.
    if on_gpu:  # kernels and copies, not the ranges the profiler mirrors onto the GPU
        per_step = {}
        for e in prof.events():
            if (e.device_type == torch.autograd.DeviceType.CUDA and "#" not in e.name
                    and not getattr(e, "is_user_annotation", False)):
                per_step[e.name] = per_step.get(e.name, 0.0) + e.time_range.elapsed_us()
    else:
        per_step = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    per_step = {k: us / args.profile_steps / 1e6 for k, us in per_step.items() if us > 0}
    wall = statistics.median(walls)
    busy = sum(per_step.values())
    label = f"{args.precision}" + (f" + compile ({mode})" if args.compile else ", eager")
    print(f"\n== ours {label}, batch {args.batch_size} x {args.context}, {device}")
    print(f"step {wall * 1e3:.2f} ms (median of {args.steps}); kernels "
          + (f"{busy * 1e3:.2f} ms a step: the device is busy {busy / wall:.0%} of the step"
             if on_gpu else f"(operators' own CPU time) {busy * 1e3:.2f} ms a step"))
    by_kind: dict[str, float] = {}
    for name, seconds in per_step.items():
        by_kind[kind(name)] = by_kind.get(kind(name), 0.0) + seconds
    for label, seconds in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {label:<26} {seconds * 1e3:8.2f} ms  {seconds / busy:6.1%}")
    print(f"  costliest {args.top}:")
    for name, seconds in sorted(per_step.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"    {seconds * 1e3:7.3f} ms  {seconds / busy:6.1%}  {name[:100]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(ap)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=15, help="kernels listed")
    args = ap.parse_args()
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    for mode in args.compile_mode.split(",") if args.compile else ["default"]:
        proc = ctx.Process(target=profile, args=(args, mode))
        proc.start()
        proc.join()
        if proc.exitcode:
            print(f"compile mode {mode}: the run failed (exit code {proc.exitcode})")


if __name__ == "__main__":
    main()
