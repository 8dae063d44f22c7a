"""Several machines, played by several launches on localhost (gloo, rendezvous on 127.0.0.1):
torchrun's c10d and static rendezvous, srun's environment, one checkpoint, exact resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from helpers_train import markov_tokens, tiny_recipe, write_tokens
from typer.testing import CliRunner

from llmcli.checkpoint import read_metadata, read_tensors, step_checkpoints
from llmcli.cli import app
from llmcli.train.distributed import (
    Launch,
    from_env,
    strip_launch_options,
    torchrun_command,
)

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gloo over localhost")

runner = CliRunner()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables, one thread per process."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "GROUP_RANK", "TORCHELASTIC_RUN_ID")
    env = {k: v for k, v in os.environ.items()
           if k not in launcher and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen]) -> list[tuple[str, str]]:
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return outs


# ---------------------------------------------------------------------------------------------
# The launch settings (no processes)


def test_torchrun_arguments_for_one_machine_and_for_several():
    assert Launch(nproc=4).torchrun_args() == ["--standalone", "--nproc-per-node=4"]
    c10d = Launch(nproc=8, nnodes=2, rdzv_endpoint="node0:29400").torchrun_args()
    assert c10d == ["--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
                    "--rdzv-endpoint=node0:29400", "--rdzv-id=llmcli"]
    static = Launch(nproc=8, nnodes=2, node_rank=1, master_addr="10.0.0.1").torchrun_args()
    assert static == ["--nnodes=2", "--node-rank=1", "--nproc-per-node=8",
                      "--master-addr=10.0.0.1", "--master-port=29500"]
    assert "--standalone" not in torchrun_command(Launch(2, 2, None, "h:1"), ["pretrain"])
    assert torchrun_command(2, ["pretrain"])[-3:] == ["-m", "llmcli", "pretrain"]
    assert not Launch().needed and Launch(nnodes=2).needed and Launch(nproc=2).needed
    argv = ["pretrain", "r.yaml", "--nproc", "8", "--nnodes=2", "--node-rank", "1",
            "--master-addr", "h", "--master-port=5", "--rdzv-endpoint", "h:1", "-o", "run"]
    assert strip_launch_options(argv) == ["pretrain", "r.yaml", "-o", "run"]


@pytest.mark.parametrize(("args", "message"), [
    (["--nnodes", "2"], "say where the machines meet"),
    (["--nnodes", "2", "--master-addr", "h"], "needs --node-rank"),
    (["--nnodes", "2", "--rdzv-endpoint", "h:1", "--node-rank", "0"], "goes with --master-addr"),
    (["--rdzv-endpoint", "nohost"], "expected HOST:PORT"),
    (["--nnodes", "2", "--master-addr", "h", "--node-rank", "2"], "expected 0 to 1"),
    (["--rdzv-endpoint", "h:1", "--master-addr", "h"], "two ways to meet"),
    (["--nnodes", "0"], "--nnodes 0"),
])
def test_bad_launch_settings_are_one_line_errors(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe()), encoding="utf-8")
    result = runner.invoke(app, ["pretrain", "r.yaml", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_srun_variables_give_the_rank_layout(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert not from_env().enabled  # an allocation's shell, not a job step: one process
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    layout = from_env()
    assert (layout.rank, layout.world_size, layout.local_rank) == (5, 8, 1)
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun's variables win
    assert not from_env().enabled
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("LLM_IGNORE_SLURM", "1")
    assert not from_env().enabled


# ---------------------------------------------------------------------------------------------
# Two "machines" on localhost

WORKER = textwrap.dedent("""
    import hashlib, json, os, sys
    from pathlib import Path
    import llmcli.pretrain as pretrain
    from llmcli.recipe import load_recipe

    original = pretrain.train

    def train(recipe, model, batches, run_dir, **kwargs):
        result = original(recipe, model, batches, run_dir, **kwargs)
        digest = hashlib.sha256()
        for name, p in model.named_parameters():
            digest.update(name.encode() + p.detach().numpy().tobytes())
        rank = os.environ["RANK"]
        Path(f"rank{{rank}}.json").write_text(json.dumps({{
            "digest": digest.hexdigest(), "seed": batches.generators["train"].initial_seed(),
            "world": os.environ["WORLD_SIZE"], "group": os.environ["GROUP_RANK"]}}))
        return result

    pretrain.train = train
    pretrain.pretrain(load_recipe("r.yaml", ["data.source=corpus.tokens"]), run_dir=Path({run!r}))
""")


def test_two_machines_train_as_one_then_resume_after_srun(tmp_path, monkeypatch):
    write_tokens(tmp_path / "corpus.tokens", markov_tokens(4000))
    recipe = tiny_recipe(max_iters=6, checkpoint_interval=2, eval_interval=2)
    recipe["model"]["vocab_size"] = "auto"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    (tmp_path / "worker.py").write_text(WORKER.format(run="one"), encoding="utf-8")

    # 1. Two launches meeting at a c10d rendezvous: one process each, one world of two.
    c10d = Launch(nproc=1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{free_port()}")
    cmd = [sys.executable, "-m", "torch.distributed.run", *c10d.torchrun_args(), "worker.py"]
    outs = finish([start(cmd, tmp_path, clean_env()) for _ in range(2)])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # identical weights on every rank
    assert ranks[0]["seed"] != ranks[1]["seed"]  # each drawing its own batches
    assert {r["world"] for r in ranks} == {"2"} and {r["group"] for r in ranks} == {"0", "1"}
    assert [s for s, _ in step_checkpoints(tmp_path / "one")] == [2, 4, 6]  # one set of files
    assert sum(err.count("Step: 6 Training Loss") for _, err in outs) == 1

    # 2. The same run launched by "srun" (its variables, no torchrun), stopped at step 4 ...
    port = str(free_port())
    srun = [clean_env(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r),
                      SLURM_STEP_ID="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            for r in (0, 1)]
    llm = [sys.executable, "-m", "llmcli", "pretrain", "r.yaml", "data.source=corpus.tokens",
           "-o", "two"]
    finish([start([*llm, "train.max_iters=4"], tmp_path, env) for env in srun])
    assert [s for s, _ in step_checkpoints(tmp_path / "two")] == [2, 4]

    # 3. ... and resumed by `llm pretrain --nnodes 2` (static rendezvous) on two "machines":
    # the weights of the uninterrupted run, bit for bit.
    port = str(free_port())
    outs = finish([start([*llm, "--resume", "--nnodes", "2", "--node-rank", str(r),
                          "--master-addr", "127.0.0.1", "--master-port", port],
                         tmp_path, clean_env()) for r in (0, 1)])
    assert "resuming from two/step-00000004.safetensors" in outs[0][1]
    assert sum(out.count("step 6, train loss") for out, _ in outs) == 1
    one, two = (read_tensors(tmp_path / d / "step-00000006.safetensors") for d in ("one", "two"))
    assert sorted(one) == sorted(two)
    assert all(bool((one[k] == two[k]).all()) for k in one)
    assert read_metadata(tmp_path / "two" / "step-00000006.safetensors")["step"] == 6

    # 4. One process resuming the two-process run says what stays exact and what cannot.

    (tmp_path / "three").mkdir()
    for name in ("step-00000004.safetensors", "step-00000004.trainer.safetensors"):
        shutil.copy(tmp_path / "two" / name, tmp_path / "three" / name)
    monkeypatch.chdir(tmp_path)  # in this process: one more interpreter start costs seconds
    result = runner.invoke(app, [*llm[3:-1], "three", "--resume"])
    assert result.exit_code == 0, result.output
    note = " ".join(result.output.split())
    assert "saved by 2 process(es), this run has 1" in note
    assert "optimizer moments, step and schedule continue exactly" in note
    assert "no longer step-for-step identical" in note


def test_ctrl_c_ends_torchrun_with_130_not_a_traceback(monkeypatch: pytest.MonkeyPatch):
    """torchrun's agent answers a Ctrl-C with SignalException (a traceback, exit 1); the
    workers save and say so, and the launcher exits 130 like a one-process run."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from llmcli.train import distributed

    seen = []

    def interrupted(argv):
        seen.append(argv)
        raise SignalException("Process 1 got signal: 2", sigval=signal.SIGINT)

    monkeypatch.setattr(torch.distributed.run, "main", interrupted)
    monkeypatch.setattr(sys, "argv", ["-c", "--standalone", "--nproc-per-node=2", "-m", "llmcli"])
    with pytest.raises(SystemExit) as info:
        distributed.torchrun_main()
    assert info.value.code == 130
    assert seen == [["--standalone", "--nproc-per-node=2", "-m", "llmcli"]]
