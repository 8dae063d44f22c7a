"""kill -9 at random moments of `llm pretrain` (a checkpoint every step), then check every file.

For each trial: start a tiny pretraining run that saves at every step, SIGKILL it after a random
delay, then (1) read every checkpoint and trainer state through `llmcli.checkpoint` (each must be
complete and loadable: the atomic writes promise old-or-new, never half), (2) resume with
`--resume` to the end, (3) compare the resumed run's final weights with an uninterrupted
reference run's, bit for bit. Prints the counts; exits 1 if any file was corrupt or any resume
failed.

    python benchmarks/bench_kill9.py --trials 30
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40


def llm(*args: str, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "llmcli", "--quiet", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def recipe_args(tokens: Path) -> list[str]:
    return ["pretrain", str(ROOT / "recipes" / "tiny.yaml"), f"data.source={tokens}",
            "data.vocab=compact", "model.context_length=32", "model.d_model=32",
            "model.num_blocks=2", "model.num_heads=2", "train.batch_size=4",
            f"train.max_iters={STEPS}", "train.checkpoint_interval=1", "train.keep_last=2",
            "train.eval_interval=10", "train.eval_iters=2", "train.log_interval=5",
            "--device", "cpu"]


def wait_for_first_checkpoint(proc: subprocess.Popen, run: Path) -> float:
    """When training is under way (its first checkpoint exists): kills land inside the loop,
    not in the seconds Python spends importing torch."""
    while not (run / "step-00000001.safetensors").exists() and proc.poll() is None:
        time.sleep(0.01)
    return time.perf_counter()


def final_weights(run: Path) -> dict:
    from llmcli.checkpoint import read_tensors, step_path

    return read_tensors(step_path(run, STEPS))


def check_files(run: Path) -> list[str]:
    """Every checkpoint file in the run must read completely; returns the problems."""
    from llmcli.checkpoint import (
        Checkpoint,
        load_trainer_state,
        resume_damage,
        step_checkpoints,
        trainer_path,
    )
    from llmcli.console import UserError

    problems = []
    for _, path in step_checkpoints(run):
        try:
            Checkpoint.read(path).load()
            if trainer_path(path).exists():
                load_trainer_state(trainer_path(path))
        except UserError as exc:
            problems.append(f"{path.name}: {exc}")
        problem = resume_damage(path)
        if problem and "missing" not in problem:
            problems.append(problem)
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    import torch

    with tempfile.TemporaryDirectory(prefix="llm-kill9-") as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, "-m", "llmcli", "--quiet", "fetch", "builtin"], cwd=work,
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "-m", "llmcli", "--quiet", "tokenize",
                        "data/python-reference.txt"], cwd=work, check=True,
                       stdout=subprocess.DEVNULL)
        tokens = work / "data" / "python-reference.tokens"
        ref = llm(*recipe_args(tokens), "-o", "reference", cwd=work)
        first = wait_for_first_checkpoint(ref, work / "reference")
        if ref.wait() != 0:
            print(ref.stderr.read())
            return 1
        full_seconds = time.perf_counter() - first
        reference = final_weights(work / "reference")
        corrupt = failed = differ = killed_mid = 0
        for trial in range(args.trials):
            run = work / f"trial-{trial}"
            delay = rng.uniform(0.0, full_seconds)
            proc = llm(*recipe_args(tokens), "-o", str(run), cwd=work)
            wait_for_first_checkpoint(proc, run)
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed_mid += 1
            proc.wait()
            problems = check_files(run) if run.exists() else []
            corrupt += len(problems)
            for problem in problems:
                print(f"trial {trial}: corrupt {problem}")
            has_steps = run.exists() and any(run.glob("step-*.safetensors"))
            extra = ["--resume", "auto"] if has_steps else ["--overwrite"]
            resumed = llm(*recipe_args(tokens), "-o", str(run), *extra, cwd=work)
            if resumed.wait() != 0:
                failed += 1
                print(f"trial {trial}: resume failed: {resumed.stderr.read().strip()}")
                continue
            same = all(torch.equal(v, reference[k]) for k, v in final_weights(run).items())
            differ += not same
            print(f"trial {trial}: killed {delay:.2f} s into training ({len(problems)} corrupt), "
                  f"resumed with {' '.join(extra)}: "
                  f"{'bit-exact' if same else 'DIFFERENT'}")
    print(f"\n{args.trials} trials ({killed_mid} killed mid-run; the training loop of an "
          f"uninterrupted run takes {full_seconds:.1f} s): {corrupt} corrupt files, {failed} "
          "failed resumes, "
          f"{differ} resumed runs differing from the uninterrupted one")
    return 1 if corrupt or failed else 0


if __name__ == "__main__":
    sys.exit(main())
