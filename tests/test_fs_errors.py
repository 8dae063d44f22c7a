"""Files that are not what a command needs: pipes, devices, unreadable files, a full disk, an
output that is an input. Each is one line naming the path, before anything waits or is lost."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_train import make_project, one_thread
from typer.testing import CliRunner

from llmcli.checkpoint import save_model
from llmcli.cli import app
from llmcli.model.gpt import build_model
from llmcli.recipe import build_recipe

_threads = pytest.fixture(autouse=True)(one_thread)
runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
MODEL = {"vocab_size": 48, "context_length": 16, "d_model": 32, "num_blocks": 2, "num_heads": 4,
         "dropout": 0.0}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    project = make_project(tmp_path, monkeypatch)
    recipe = build_recipe({"data": {"tokenizer": "bytes"}, "model": MODEL})
    (project / "run").mkdir()
    save_model(project / "run" / "step-00000001.safetensors", build_model(recipe.model), recipe,
               tokenizer="bytes")
    return project


def llm(*args: str):
    return runner.invoke(app, list(args))


WATCH = """
import os, sys, time
time.sleep(5)
while True:
    for fifo in sys.argv[1:]:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # nobody reading: nothing hangs on it
    time.sleep(1)
"""


@contextlib.contextmanager
def watched(fifos: list[Path]) -> Iterator[None]:
    """FIFOs a hung command would wait on forever: opened for writing after a while by another
    process (a reader blocked inside safetensors holds the GIL), so a regression fails the
    test with the wrong message instead of hanging the suite."""
    for fifo in fifos:
        os.mkfifo(fifo)
    watcher = subprocess.Popen([sys.executable, "-c", WATCH, *map(str, fifos)])
    try:
        yield
    finally:
        watcher.kill()
        watcher.wait()


FIFO_CASES = [
    ("generate", "m.safetensors", "To"),
    ("params", "m.safetensors"),
    ("export", "m.safetensors", "-o", "exported"),
    ("inspect", "positions", "m.safetensors"),
    ("inspect", "positions", "f.yaml"),  # a recipe: read by load_recipe, for every command
    ("params", "f.yaml"),
    ("pretrain", "f.yaml", "--dry-run"),
    ("finetune", "--merge", "m.safetensors"),
    ("pretrain", "mini.yaml", "data.source=corpus.tokens", "--resume", "m.safetensors", "-o",
     "run2"),
    ("finetune", "--merge", "run", "-o", "m.safetensors"),
    ("scaling", "--recipe", "mini.yaml", "--plot", "p.png"),
    ("inspect", "positions", "run", "--png", "p.png"),
    ("tokenize", "corpus.tokens.json", "-o", "m.safetensors"),
]


@pytest.mark.parametrize("args", FIFO_CASES, ids=lambda a: " ".join(a[:2]))
def test_a_pipe_is_refused_at_once_as_input_or_output(project, args):
    names = ["m.safetensors", "p.png", "m.safetensors.tokens", "f.yaml"]  # 3rd: tokenize's output
    with watched([project / n for n in names]):
        started = time.monotonic()
        result = llm(*args)
        took = time.monotonic() - started
    assert result.exit_code == 2, result.output
    assert "not a regular file" in result.output and "Traceback" not in result.output
    assert took < 5  # refused, not unblocked by the watcher


def test_a_device_is_no_tokenize_output(project, tmp_path):
    result = llm("tokenize", "corpus.tokens.json", "-o", "/dev/null", "-t", "bytes")
    assert result.exit_code == 2
    assert "--output /dev/null: not a regular file" in result.output
    assert not Path("/dev/null.tokens").exists() and not Path("/dev/null.tokens.json").exists()


# ---------------------------------------------------------------------------------------------
# Outputs that are inputs, or another program's files


def test_tokenize_never_writes_over_its_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    records = json.dumps([{"instruction": "hi", "input": "", "output": "yo"}])
    (tmp_path / "r.tokens.json").write_text(records, encoding="utf-8")
    result = llm("tokenize", "r.tokens.json", "-o", "r", "-t", "bytes")
    assert result.exit_code == 2 and "is the input r.tokens.json" in result.output
    assert (tmp_path / "r.tokens.json").read_text(encoding="utf-8") == records
    assert not (tmp_path / "r.tokens").exists()
    (tmp_path / "a.txt").write_text("some text", encoding="utf-8")
    os.link(tmp_path / "a.txt", tmp_path / "b.tokens.json")  # the same file by another name
    result = llm("tokenize", "a.txt", "-o", "b", "-t", "bytes")
    assert result.exit_code == 2 and "is the input a.txt" in result.output


@pytest.mark.parametrize("name", ["p.tokens", "p.tokens.json"])
def test_tokenize_replaces_only_its_own_earlier_output(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("some text", encoding="utf-8")
    (tmp_path / name).write_bytes(b"someone else's")
    result = llm("tokenize", "a.txt", "-o", "p", "-t", "bytes")
    assert result.exit_code == 2 and f"{name}: exists and is not" in result.output
    assert (tmp_path / name).read_bytes() == b"someone else's"
    (tmp_path / name).unlink()
    assert llm("tokenize", "a.txt", "-o", "p", "-t", "bytes").exit_code == 0
    assert llm("tokenize", "a.txt", "-o", "p", "-t", "bytes").exit_code == 0  # regenerated


# ---------------------------------------------------------------------------------------------
# A full disk: a real one, a tmpfs of 300 kB mounted in a private mount namespace


def on_full_disk(cwd: Path, args: list[str], fill_kb: int = 0,
                 options: str = "size=300k") -> tuple[str, int, list[str]]:
    """(stderr, exit code, what the disk holds after) of `llm ARGS` writing to ./mnt/."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("mounting a small tmpfs needs root and unshare")
    (cwd / "mnt").mkdir()
    script = (f'mount -t tmpfs -o {options} tmpfs mnt || exit 99; '
              f'[ {fill_kb} = 0 ] || dd if=/dev/zero of=mnt/fill bs=1k count={fill_kb} '
              '2>/dev/null; '
              '"$@"; rc=$?; echo "LEFT $(ls -A mnt | tr "\\n" " ")"; exit $rc')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", sys.executable, "-m",
                           "llmcli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()})")
    left = proc.stdout.rsplit("LEFT", 1)[1].split()
    return proc.stderr, proc.returncode, [n for n in left if n != "fill"]


@pytest.mark.parametrize("extra", [[], ["--shard-tokens", "50000"]], ids=["file", "shards"])
def test_tokenize_on_a_full_disk_names_the_output_and_leaves_nothing(tmp_path, extra):
    (tmp_path / "big.txt").write_text("".join(f"line {i} of some text\n" for i in range(40000)),
                                      encoding="utf-8")
    stderr, code, left = on_full_disk(tmp_path, ["tokenize", "big.txt", "-o", "mnt/t", "-t",
                                                 "bytes", *extra])
    assert code == 1
    assert stderr.strip() == ("error: mnt/t.tokens: no space left on the device; free some "
                              "space or choose another output path")
    assert left == []


@pytest.mark.parametrize("args", [["scaling", "--recipe", "mini.yaml", "--plot", "mnt/p.png"],
                                  ["pretrain", "mini.yaml", "data.source=corpus.tokens", "-o",
                                   "mnt/run"]], ids=["png", "pretrain"])
def test_other_writers_on_a_full_disk_name_their_file(project, args):
    stderr, code, left = on_full_disk(project, args, fill_kb=296)
    line = stderr.strip().splitlines()[-1]
    assert code == 1 and line.startswith("error: mnt/"), stderr
    assert line.endswith(": no space left on the device; free some space or choose another "
                         "output path")
    assert not [n for n in left if n.endswith(".tmp")]


def test_a_download_on_a_full_disk_names_its_file(tmp_path):
    import http.server

    (tmp_path / "big.txt").write_bytes(b"x" * 600_000)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/big.txt"
        stderr, code, _ = on_full_disk(tmp_path, ["fetch", url, "-o", "mnt"])
    finally:
        server.shutdown()
    assert code == 1
    assert "error: mnt/big.txt.part: no space left on the device" in stderr


@pytest.mark.parametrize("args, line", [
    (["fetch", "http://127.0.0.1:9/small.txt", "-o", "mnt"],
     "mnt: read-only file system: use another directory (llm fetch -o DIR)"),
    (["fetch", "http://127.0.0.1:9/small.txt", "-o", "mnt/data"],
     "mnt/data: read-only file system: use another directory (llm fetch -o DIR)"),
    (["fetch", "builtin", "-o", "mnt"],
     "mnt: read-only file system: use another directory (llm fetch -o DIR)"),
    (["pretrain", "mini.yaml", "data.source=corpus.tokens", "-o", "mnt/run"],
     "mnt: read-only file system; write elsewhere"),
], ids=["fetch", "fetch-mkdir", "builtin", "pretrain"])
def test_a_read_only_folder_is_named_once(project, args, line):
    """"error: mnt/.small.txt.lock: Read-only file system; read-only file system: use another
    directory": said twice, and about the lock file, a name the user never gave."""
    stderr, code, left = on_full_disk(project, args, options="ro")
    assert code == 2 and stderr.strip() == f"error: {line}", stderr
    assert left == []


def test_safetensors_disk_full_is_named_without_a_path_too():
    from safetensors import SafetensorError

    from llmcli.console import _describe, disk_full

    exc = SafetensorError("Error while serializing: I/O error: No space left on device (os "
                          "error 28)")
    assert disk_full(exc)
    assert _describe(exc)[0].startswith("no space left on the device")


# ---------------------------------------------------------------------------------------------
# Permissions (root reads anything: the commands run without its override capabilities)


def unprivileged(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "llmcli", *args]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root reads any file, and setpriv is missing to drop that")
        command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *command]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_an_unreadable_checkpoint_or_run_is_permission_denied(project):
    ckpt = project / "run" / "step-00000001.safetensors"
    shutil.copy(ckpt, project / "u.safetensors")
    os.chmod(project / "u.safetensors", 0)
    os.chmod(ckpt, 0)
    try:
        for target, named in (("u.safetensors", "u.safetensors"), ("run", str(ckpt.relative_to(
                project)))):
            proc = unprivileged(project, "generate", target, "To")
            assert proc.returncode == 2, proc.stderr
            assert proc.stderr.strip() == (f"error: {named}: permission denied; check its "
                                           "permissions or use another path")
        os.chmod(ckpt, 0o644)
        os.chmod(project / "run", 0)
        proc = unprivileged(project, "generate", "run", "To")
        assert proc.stderr.strip() == ("error: run: permission denied; check its permissions "
                                       "or use another path")
    finally:
        os.chmod(project / "run", 0o755)
