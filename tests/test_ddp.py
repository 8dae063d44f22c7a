"""DDP on 2 CPU processes (gloo) through torchrun: identical weights, one set of files."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from helpers_train import markov_tokens, tiny_recipe, write_tokens

from llmcli.checkpoint import read_metadata, step_checkpoints
from llmcli.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gloo over localhost")

WORKER = textwrap.dedent("""
    import hashlib, os, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import torch
    from helpers_train import tiny_recipe
    from llmcli.model.gpt import build_model
    from llmcli.pretrain import load_corpus, make_batches
    from llmcli.recipe import build_recipe
    from llmcli.train import distributed
    from llmcli.train.loop import train

    info, device = distributed.setup(torch.device("cpu"))
    raw = tiny_recipe(max_iters=6, checkpoint_interval=3, eval_interval=3)
    raw["data"]["source"] = {tokens!r}
    raw["model"]["vocab_size"] = "auto"
    recipe, corpus = load_corpus(build_recipe(raw))
    torch.manual_seed(1000 + info.rank)  # different initial weights: DDP must broadcast rank 0's
    model = build_model(recipe.model)
    batches = make_batches(recipe, corpus, info.rank)
    first = batches.get_batch("train")[0]
    batches = make_batches(recipe, corpus, info.rank)
    result = train(recipe, model, batches, Path({run!r}), device=device)
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().numpy().tobytes())
    out = Path({out!r})
    (out / f"rank{{info.rank}}.txt").write_text(
        f"{{digest.hexdigest()}} {{result.evals[-1]['val']!r}} {{first[0, :4].tolist()}}")
    distributed.cleanup()
""")


def torchrun(*args: str, env_extra: dict | None = None, cwd: Path = ROOT):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_two_cpu_processes_keep_identical_weights_and_checkpoint_once(tmp_path):
    tokens = write_tokens(tmp_path / "corpus.tokens", markov_tokens(4000))
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(ROOT / "tests"), tokens=str(tokens),
                                    run=str(run), out=str(out)), encoding="utf-8")
    proc = torchrun(str(script))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = ((out / f"rank{r}.txt").read_text().split(" ", 2) for r in (0, 1))
    assert rank0[0] == rank1[0]  # same weights after 6 steps
    assert rank0[1] == rank1[1]  # validation loss averaged across ranks
    assert rank0[2] != rank1[2]  # but each rank drew its own batches
    # One set of files, written by rank 0 only.
    assert [s for s, _ in step_checkpoints(run)] == [3, 6]
    names = sorted(p.name for p in run.iterdir() if p.name != "best.safetensors")
    assert names == [
        "loss.png", "metrics.jsonl", "step-00000003.safetensors",
        "step-00000003.trainer.safetensors", "step-00000006.safetensors",
        "step-00000006.trainer.safetensors"]
    evals = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals == [0, 3, 6]
    assert read_metadata(run / "step-00000006.safetensors")["step"] == 6
    assert proc.stderr.count("Step: 6 Training Loss") == 1  # only rank 0 prints


def test_nproc_relaunches_the_command_under_torchrun(tmp_path):
    write_tokens(tmp_path / "corpus.tokens", markov_tokens(4000))
    recipe = tiny_recipe(max_iters=4, checkpoint_interval=2, eval_interval=2)
    recipe["model"]["vocab_size"] = "auto"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    scratch = tmp_path / "tmp"  # the temporary folder, where torchrun left a log tree a run
    scratch.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)}
    proc = subprocess.run([sys.executable, "-m", "llmcli", "pretrain", "r.yaml",
                           "data.source=corpus.tokens", "--nproc", "2", "-o", "run"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [s for s, _ in step_checkpoints(tmp_path / "run")] == [2, 4]
    assert not [p for p in scratch.iterdir() if p.name.startswith("torchelastic_")]
    assert "x 2 processes" in proc.stderr
    assert proc.stdout.count("step 4, train loss") == 1  # the result, printed by rank 0 only


def test_a_refused_group_leaves_the_running_run_alone_and_says_why_once(tmp_path):
    """`--overwrite --nproc 2` on a directory in use: rank 0 was refused the lock while rank 1
    deleted the running run's checkpoints, then torchrun printed ~40 lines and exited 1."""
    from llmcli.files import locked

    write_tokens(tmp_path / "corpus.tokens", markov_tokens(4000))
    recipe = tiny_recipe(max_iters=4, checkpoint_interval=2, eval_interval=2)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    run = tmp_path / "run"
    run.mkdir()
    theirs = [run / "step-00000100.safetensors", run / "metrics.jsonl", run / ".best.x.tmp"]
    for path in theirs:
        path.write_bytes(b"another run's")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with locked(run, wait=False):  # the run training there
        proc = subprocess.run([sys.executable, "-m", "llmcli", "pretrain", "r.yaml",
                               "data.source=corpus.tokens", "--nproc", "2", "-o", "run",
                               "--overwrite"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == (f"error: run is in use by another run (process {os.getpid()}); "
                                   "wait for it to finish, or write this run elsewhere with -o DIR")
    assert all(path.read_bytes() == b"another run's" for path in theirs)
