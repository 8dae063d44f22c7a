"""Does bf16 training learn what fp32 learns? The tiny recipe's loss curve, fp32 vs bf16.

    python benchmarks/bench_bf16_curve.py [--steps 300]

Three runs of `llm pretrain recipes/tiny.yaml` on its built-in corpus alone at context 64
(`data.source=builtin model.context_length=64`: offline, a minute a run), each its own process:
fp32 with the recipe's seed, bf16 with the same seed, and fp32 with another seed. The last one
is the noise: how far two equally good fp32 runs drift apart. bf16 matches fp32 "within noise"
when its largest gap to the fp32 curve is no larger than the two fp32 runs' gap. Also printed:
each run's tokens/s (the tiny model is too small for bf16 to be much faster; the speed
comparison at scale is benchmarks/bench_train.py).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmcli.train.metrics import read_metrics  # noqa: E402


def run(out: Path, steps: int, precision: str, seed: int, eval_every: int) -> list[dict]:
    cmd = [sys.executable, "-m", "llmcli", "pretrain", str(ROOT / "recipes" / "tiny.yaml"),
           f"train.max_iters={steps}", f"train.precision={precision}", f"train.seed={seed}",
           f"train.eval_interval={eval_every}", f"train.checkpoint_interval={steps}",
           "data.source=builtin", "model.context_length=64",
           "-o", str(out), "--overwrite"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return read_metrics(out / "metrics.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    runs = {"fp32": ("fp32", args.seed), "bf16": ("bf16", args.seed),
            "fp32, other seed": ("fp32", args.seed + 1)}
    curves: dict[str, dict[int, float]] = {}
    speed: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, (precision, seed) in runs.items():
            records = run(Path(scratch) / name.replace(" ", "_").replace(",", ""), args.steps,
                          precision, seed, args.eval_every)
            curves[name] = {r["step"]: r["val"] for r in records if r.get("kind") == "eval"}
            rates = [r["tokens_per_s"] for r in records if r.get("kind") == "train"]
            speed[name] = sorted(rates)[len(rates) // 2] if rates else float("nan")
    steps = sorted(set.intersection(*(set(c) for c in curves.values())))
    print(f"recipes/tiny.yaml (built-in corpus, context 64), {args.steps} steps, validation "
          f"loss (same batches for the two seed-{args.seed} runs)")
    print(f"{'step':>6} " + " ".join(f"{name:>17}" for name in runs) + "   bf16 - fp32")
    for step in steps:
        row = " ".join(f"{curves[name][step]:17.4f}" for name in runs)
        print(f"{step:>6} {row}   {curves['bf16'][step] - curves['fp32'][step]:+.4f}")
    later = [s for s in steps if s > 0]
    gap = max(abs(curves["bf16"][s] - curves["fp32"][s]) for s in later)
    noise = max(abs(curves["fp32, other seed"][s] - curves["fp32"][s]) for s in later)
    print(f"largest gap after step 0: bf16 vs fp32 {gap:.4f}; fp32 vs fp32 with another seed "
          f"{noise:.4f} -> bf16 {'within' if gap <= noise else 'OUTSIDE'} the seed noise")
    print("median tokens/s: " + ", ".join(f"{name} {speed[name]:,.0f}" for name in runs))


if __name__ == "__main__":
    main()
