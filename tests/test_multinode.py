"""Several machines, played by several launches on localhost (gloo, rendezvous on 127.0.0.1):
torchrun's c10d and static rendezvous, srun's environment, one checkpoint, exact resume."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
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


@pytest.mark.parametrize(("env", "message"), [
    ({"SLURM_PROCID": "abc"}, "SLURM_PROCID='abc': expected an integer from 0"),
    ({"SLURM_PROCID": "0", "SLURM_LOCALID": "x"}, "SLURM_LOCALID='x': expected an integer"),
    ({"SLURM_PROCID": "5"}, "SLURM_PROCID 5 is not below SLURM_NTASKS 2"),
    ({"WORLD_SIZE": "2"}, "RANK is empty or not set"),
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc': expected an integer from 1"),
    ({"WORLD_SIZE": "2", "RANK": "3"}, "RANK 3 is not below WORLD_SIZE 2: ranks go from 0 to 1"),
])
def test_a_malformed_launcher_environment_is_named_not_waited_on(monkeypatch, env, message):
    """A bare int() gave ValueError/KeyError; a rank beyond the world size waited forever."""
    from llmcli.console import UserError

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LLM_IGNORE_SLURM"):
        monkeypatch.delenv(key, raising=False)
    if "WORLD_SIZE" not in env:
        monkeypatch.setenv("SLURM_STEP_ID", "0")
        monkeypatch.setenv("SLURM_NTASKS", "2")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match=re.escape(message)) as info:
        from_env()
    assert info.value.exit_code == 2


@pytest.mark.parametrize("missing", ["MASTER_ADDR", "MASTER_PORT"])
def test_ranks_set_by_hand_need_where_to_meet_and_say_they_wait(monkeypatch, capsys, missing):
    """WORLD_SIZE/RANK by hand, no torchrun: a missing MASTER_ADDR was torch's ValueError
    (exit 1), and with it set the process waited 15 minutes without a word."""
    import torch
    import torch.distributed as dist

    from llmcli.console import UserError, settings
    from llmcli.train import distributed

    for key in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "LLM_IGNORE_SLURM"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setitem(settings, "quiet", False)
    env = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    joined = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: joined.append(kw))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    distributed.setup(torch.device("cpu"))
    assert len(joined) == 1
    assert "meeting at 127.0.0.1:29511: waiting for all 2 processes (RANK 0 to 1) to join" \
        in capsys.readouterr().err
    monkeypatch.delenv(missing)
    with pytest.raises(UserError, match=f"WORLD_SIZE=2 and RANK=0 are set but {missing} is "
                                        "not: export MASTER_ADDR") as info:
        distributed.setup(torch.device("cpu"))
    assert info.value.exit_code == 2 and len(joined) == 1


def test_bad_input_is_refused_before_any_worker_starts(tmp_path, monkeypatch):
    """fp16 under FSDP, an unknown device and a directory holding another run were refused by
    every worker after loading the data, each saying so."""
    from llmcli.train import distributed

    def launched(*args, **kwargs):
        raise AssertionError("launched")

    monkeypatch.setattr(distributed, "relaunch", launched)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe()), encoding="utf-8")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "step-00000002.safetensors").write_bytes(b"x")
    for args, message in [
        (["train.parallel=fsdp", "train.precision=fp16"], "fp16 needs loss scaling"),
        (["--device", "bogus"], "--device bogus: not a device"),
        (["-o", "old"], "old already holds an earlier run"),
        (["data.source=missing.txt"], "missing.txt: no such file"),
    ]:
        result = runner.invoke(app, ["pretrain", "r.yaml", "--nproc", "2", *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and "launched" not in result.output
    (tmp_path / "records.json").write_text("[]", encoding="utf-8")
    result = runner.invoke(app, ["finetune", "r.yaml", "data.source=records.json",
                                 "finetune.init=no-base", "--nproc", "2"])
    assert result.exit_code == 2 and "launched" not in result.output, result.output
    assert "no-base: checkpoint not found" in result.output


def test_a_busy_master_port_is_one_line_before_and_after_launching(tmp_path, monkeypatch):
    from llmcli.train.distributed import meeting_problem

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe()), encoding="utf-8")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["pretrain", "r.yaml", "--nproc", "2", "--master-addr",
                                     "127.0.0.1", "--master-port", str(port)])
    assert result.exit_code == 2
    assert f"--master-port {port}: in use on 127.0.0.1; pick a free port" in result.output
    # the same from torchrun's error, when the port was taken after the check
    error = RuntimeError("The server socket has failed to listen on any local network address. "
                         "port: 5, useIpv6: false, code: -98, name: EADDRINUSE")
    said = meeting_problem(["--master-addr=h", "--master-port=5", "--nproc-per-node=2"], error)
    assert said == "--master-port 5: in use on h; pick a free port"


def test_a_rendezvous_says_what_it_waits_for(capsys):
    Launch(nproc=2, nnodes=2, rdzv_endpoint="node0:29400").say_where_they_meet()
    assert "meeting at node0:29400 (torchrun's c10d rendezvous): waiting for all 4 processes " \
           "(2 machine(s)) to join" in capsys.readouterr().err
    Launch(nproc=2).say_where_they_meet()  # one machine, torchrun picks a port: no wait
    assert capsys.readouterr().err == ""


def test_start_lines_and_process_count_notes_read_right():
    from llmcli.train.distributed import Dist
    from llmcli.train.loop import world_change_note

    assert Dist(0, 2).describe("ddp") == " x 2 processes (ddp)"  # llm finetune's start line too
    assert Dist().describe("ddp") == ""
    fewer = world_change_note("s", 4, 2)
    assert "ranks 0 to 1 continue their own batch streams, the batch streams of ranks 2 to 3 " \
           "end, and a step now averages 2 batches instead of 4" in fewer
    more = world_change_note("s", 1, 2)
    assert "saved by 1 process, this run has 2" in more
    assert "rank 0 continues its own batch stream, rank 1 starts a new batch stream" in more


class Failure:
    """torchrun's ProcessFailure, as root_cause reads it."""

    def __init__(self, exitcode: int, pid: int = 100) -> None:
        self.exitcode, self.pid = exitcode, pid

    def signal_name(self) -> str:
        return signal.Signals(-self.exitcode).name


@pytest.mark.parametrize(("codes", "records", "expected"), [
    # rank 0's own error wins over rank 1 losing it (gloo's "Connection closed by peer")
    ({0: 2, 1: 1}, {0: ("data: no such file", 2, False), 1: ("Connection closed", 1, True)},
     ("data: no such file", 2)),
    # a worker killed by hand: the others only lost it (and torchrun SIGTERMed them)
    # (rank 0 had promised to save on torchrun's SIGTERM, and could not: said so)
    ({0: -15, 1: -9}, {}, ("rank 1 (process 100) was killed by SIGKILL (out of memory? or "
                           "killed by hand); the other processes stopped with it, without "
                           "saving: --resume continues from the newest checkpoint", 1)),
    ({0: 1, 1: -9}, {0: ("Connection closed by peer", 1, True)},
     ("killed by SIGKILL (out of memory? or killed by hand); the other processes stopped with "
      "it, without saving", 1)),
    ({0: 130, 1: -9}, {0: ("interrupted: saved", 130, False, True)},
     ("the other processes stopped with it, after saving a checkpoint", 1)),
    # SIGINT to one worker: every one saved and stopped; rank 0 said so (then got SIGTERM)
    ({0: -15, 1: 130}, {0: ("interrupted: saved", 130, False, True)}, (None, 130)),
    ({0: 1}, {0: ("Connection closed by peer", 1, True)}, ("Connection closed by peer", 1)),
    ({1: 3}, {}, ("rank 1 (process 100) failed with exit code 3", 3)),
])
def test_a_failed_group_ends_with_the_error_that_caused_it(tmp_path, codes, records, expected):
    from llmcli.train.distributed import root_cause

    for rank, (message, code, lost, *said) in records.items():
        (tmp_path / f"rank{rank}.json").write_text(json.dumps(
            {"message": message, "code": code, "peer_lost": lost, "said": bool(said)}))
    message, code = root_cause({r: Failure(c) for r, c in codes.items()}, str(tmp_path))
    assert code == expected[1]
    assert message == expected[0] if expected[0] is None else expected[0] in message


def test_a_worker_leaves_its_error_to_the_launcher_which_prints_it_once(
        tmp_path, monkeypatch, capsys):
    """Every rank printed its error, then torchrun its traceback and "Root Cause" box (exit 1)."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from llmcli.console import fail, run_guarded
    from llmcli.train import distributed

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LLM_WORKER_ERRORS", str(tmp_path))
    with pytest.raises(SystemExit) as worker:
        run_guarded(lambda: fail("--device bogus: not a device"))
    assert worker.value.code == 2 and capsys.readouterr().err == ""  # said by the launcher
    record = json.loads((tmp_path / "rank1.json").read_text())
    monkeypatch.delenv("RANK")

    def failed(argv):
        print(os.environ["LLM_WORKER_ERRORS"])
        path = Path(os.environ["LLM_WORKER_ERRORS"], "rank0.json")
        path.write_text(json.dumps(record), encoding="utf-8")
        raise ChildFailedError("llmcli", {r: ProcessFailure(r, 100 + r, 2, "") for r in (0, 1)})

    monkeypatch.setattr(torch.distributed.run, "main", failed)
    monkeypatch.setattr(sys, "argv", ["-c", "--standalone", "--nproc-per-node=2", "-m", "llmcli"])
    with pytest.raises(SystemExit) as launcher:
        distributed.torchrun_main()
    out, err = capsys.readouterr()
    assert launcher.value.code == 2
    assert err.strip() == "error: --device bogus: not a device"
    assert not Path(out.strip()).exists()  # the records' folder is removed


RELAY = textwrap.dedent("""
    import os, signal, sys, time
    from llmcli.train import distributed

    def torchrun_command(launch, argv):  # stands for torchrun: it asks its parent to be stopped
        return [sys.executable, "-c", "import os, signal, sys, time\\n"
                "signal.signal(signal.SIGTERM, lambda *a: sys.exit(130))\\n"
                "os.kill(os.getppid(), signal.SIGTERM)\\n"
                "time.sleep(60)\\n"
                "sys.exit(99)"]

    distributed.torchrun_command = torchrun_command
    sys.exit(distributed.relaunch(distributed.Launch(nproc=2), []))
""")


def test_a_signal_to_the_launching_command_reaches_torchrun():
    """SIGTERM to `llm pretrain --nproc 2` ended it alone (143) and left torchrun and the
    workers training; SIGINT by `kill` was ignored. Both are passed on now."""
    proc = subprocess.run([sys.executable, "-c", RELAY], env=clean_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr


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
    assert "saved by 2 processes, this run has 1" in note
    assert "rank 0 continues its own batch stream, the batch stream of rank 1 ends" in note
    assert "a step now averages 1 batch instead of 2" in note
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
    [argv] = seen  # torchrun's logs go in the folder torchrun_main removes
    assert argv[0].startswith("--log-dir=") and argv[0].endswith("/logs")
    assert argv[1:] == ["--standalone", "--nproc-per-node=2", "-m", "llmcli"]


def test_torchrun_answers_ctrl_c_and_sigterm_while_the_processes_meet(tmp_path):
    """An `llm` started in the background hands torchrun SIGINT ignored, and torchrun sets its
    own handlers only once the workers start: a Ctrl-C during the rendezvous was ignored and
    SIGTERM killed it silently (143). torchrun_main answers both with 130 from the start."""
    import signal
    import subprocess
    import sys

    code = ("import os, signal, sys, time\n"
            "from llmcli.train import distributed\n"
            "distributed._answer_signals()\n"
            "from llmcli.console import run_guarded\n"
            "def wait():\n"
            "    print('ready', flush=True)\n"
            "    time.sleep(60)\n"
            "run_guarded(wait)\n")
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130 and "interrupted" in err, (sig, err)


def _torchrun_of(launcher: subprocess.Popen) -> int | None:
    """The torchrun process `llm --nnodes ...` started, once it holds a socket (it is then
    connecting to node 0), else None."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
    for pid in children.read_text().split() if children.exists() else []:
        with contextlib.suppress(OSError):
            if any(os.readlink(fd).startswith("socket:")
                   for fd in Path(f"/proc/{pid}/fd").iterdir()):
                return int(pid)
    return None


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or " Z " in Path(f"/proc/{pid}/stat").read_text():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_node_waiting_for_node_0_stops_at_once(tmp_path, sig):
    """Static rendezvous on node 1 with nobody on node 0: torch's TCPStore retries its connect
    in C++ for 15 minutes through every signal, so Ctrl-C and SIGTERM were ignored, and a
    torchrun whose `llm` was killed (SIGKILL) went on waiting; each retry also printed a C++
    warning with pages of stack frames. Now: one line, 130, and torchrun ends with its `llm`."""
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe()), encoding="utf-8")
    llm = [sys.executable, "-m", "llmcli", "pretrain", "r.yaml", "-o", "run", "--nnodes", "2",
           "--nproc", "1", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "--node-rank", "1"]
    proc = start(llm, tmp_path, clean_env())
    deadline = time.monotonic() + 120
    while (torchrun := _torchrun_of(proc)) is None:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    time.sleep(1)  # inside the connect loop
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=30)
        assert _gone(torchrun, within=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(torchrun, signal.SIGKILL)
    lines = err.strip().splitlines()
    assert "TCPStore" not in err and "frame #" not in err, err[-2000:]
    if sig != signal.SIGKILL:
        assert proc.returncode == 130, err
        assert lines[1:] == ["interrupted"], err


def test_the_settings_compared_across_processes_leave_paths_out(tmp_path):
    from llmcli.recipe import load_recipe
    from llmcli.train.loop import differing_settings, run_settings

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe()), encoding="utf-8")
    recipe = load_recipe(tmp_path / "r.yaml")
    mine = run_settings(recipe, {"corpus": "abc", "vocab_map": [1, 2]})
    assert "data.source" not in mine and "finetune.init" not in mine
    assert mine["train.lr"] == 3e-3
    assert mine["the corpus (the token file's sources and length)"] == "abc"
    other = {**mine, "train.lr": 0.5, "model.dropout": 0.3}
    assert differing_settings([mine, mine]) is None
    assert differing_settings([mine, mine, other, {**other, "train.lr": 0.7}]) == (
        "model.dropout: 0.1 on rank 0, 0.3 on rank 2; train.lr: 0.003 on rank 0, 0.5 on rank 2")


def test_machines_started_with_other_overrides_refuse_together(tmp_path):
    """Node 1 with train.lr=0.5 model.dropout=0.3 trained apart, and rank 0's checkpoint said
    lr 0.001; other max_iters ended in gloo's 'Connection reset by peer' and a 300 s wait."""
    write_tokens(tmp_path / "corpus.tokens", markov_tokens(4000))
    recipe = tiny_recipe(max_iters=4)
    recipe["model"]["vocab_size"] = "auto"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    port = str(free_port())
    llm = [sys.executable, "-m", "llmcli", "pretrain", "r.yaml", "data.source=corpus.tokens",
           "-o", "run", "--nnodes", "2", "--nproc", "1", "--master-addr", "127.0.0.1",
           "--master-port", port, "--node-rank"]
    procs = [start([*llm, "0"], tmp_path, clean_env()),
             start([*llm, "1", "train.lr=0.5", "model.dropout=0.3"], tmp_path, clean_env())]
    outs = [p.communicate(timeout=240) for p in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 2, err[-3000:]
        line = err.strip().splitlines()[-1]
        assert line.startswith("error: the processes were started with different settings "
                               "(model.dropout: 0.1 on rank 0, 0.3 on rank 1; train.lr: "
                               "0.003 on rank 0, 0.5 on rank 1)"), err[-3000:]
        assert "Traceback" not in err
    assert not step_checkpoints(tmp_path / "run")


def test_a_failed_rendezvous_is_one_line(tmp_path):
    """A rendezvous endpoint that is not a store (here: a port that hangs up at once) printed
    torch's C++ warning for every retry and its final error, each with pages of stack frames,
    before the one line."""
    with socket.socket() as hangs_up:
        hangs_up.bind(("127.0.0.1", 0))
        hangs_up.listen(16)

        def refuse() -> None:
            with contextlib.suppress(OSError):
                while True:
                    hangs_up.accept()[0].close()

        threading.Thread(target=refuse, daemon=True).start()
        port = hangs_up.getsockname()[1]
        launch = Launch(nproc=1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{port}")
        torchrun = torchrun_command(launch, ["pretrain"])
        at = torchrun.index("-m")  # the store's timeout, 60 s by default: 3 s here
        torchrun[at:at] = ["--rdzv-conf=read_timeout=3"]
        proc = subprocess.run(torchrun, cwd=tmp_path, env=clean_env(), capture_output=True,
                              text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"error: --rdzv-endpoint 127.0.0.1:{port}: the processes "
                                  "could not meet there"), proc.stderr[-3000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]


def test_a_group_started_by_hand_says_another_process_stopped_not_gloos_words(monkeypatch):
    """RANK/WORLD_SIZE by hand, rank 1 refused its data.source: rank 0 ended with gloo's
    'Connection closed by peer ... GLHF!' as a RuntimeError."""
    from llmcli.console import WORKER_ERRORS_ENV, _describe

    gloo = RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:49840. This is "
                        "typically caused by a remote worker crashing. GLHF!")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv(WORKER_ERRORS_ENV, raising=False)
    assert _describe(gloo) == ("another process of the group (WORLD_SIZE=2) stopped, so this "
                               "one (RANK=0) stops too; its own output says why", 1)
    monkeypatch.setenv(WORKER_ERRORS_ENV, "/tmp/errors")  # `--nproc`: the launcher finds why
    assert _describe(gloo)[0].startswith("RuntimeError: [pair.cc:553] Connection closed")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv(WORKER_ERRORS_ENV)
    assert _describe(gloo)[0].startswith("RuntimeError: ")


def test_one_process_says_that_train_parallel_fsdp_goes_unused():
    """train.parallel=fsdp in a single-process run was silently ignored."""
    from llmcli.train.distributed import Dist

    assert Dist().describe("fsdp") == " (one process: train.parallel=fsdp unused)"
    assert Dist().describe("ddp") == ""
    assert Dist(0, 2, 0).describe("fsdp") == " x 2 processes (fsdp)"
