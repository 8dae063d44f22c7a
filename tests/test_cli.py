"""The `llm` command itself: help, version, module entry point, lazy heavy imports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from llmcli import __version__
from llmcli.cli import app
from llmcli.commands import REGISTERED

runner = CliRunner()


def test_help_lists_every_registered_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name, _ in REGISTERED:
        assert name in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"llm {__version__}"


HEAVY = ("torch", "tiktoken", "diffusers", "transformers", "numpy")


def run_module(argv: list[str]) -> tuple[str, list[str]]:
    """`python -m llmcli ARGV` in a fresh interpreter: (its stdout, the heavy libraries it
    imported)."""
    code = (f"import json, sys, runpy; sys.argv = ['llm', *{argv!r}]\n"
            "try:\n    runpy.run_module('llmcli', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            f"print('HEAVY', json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    head, _, heavy = result.stdout.rpartition("HEAVY ")
    return head, json.loads(heavy)


def test_module_entry_point_and_help_import_no_heavy_library():
    stdout, heavy = run_module(["--help"])
    assert "Usage" in stdout and heavy == []


@pytest.mark.parametrize("argv", [["generate", "--help"], ["scaling", "--params", "1M"],
                                  ["pretrain", "--keys"]])
def test_help_keys_and_pure_python_commands_do_not_load_torch(argv):
    assert "torch" not in run_module(argv)[1]


def test_ctrl_c_while_libraries_load_ends_at_once_with_130():
    """The console script answers a Ctrl-C during its imports itself: torch's C++ set-up would
    swallow the KeyboardInterrupt, or abort."""
    code = ("import os, signal, time\n"
            "from llmcli import entry\n"
            "signal.signal(signal.SIGINT, entry._leave)\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "time.sleep(10)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 130 and result.stderr == "interrupted\n"


def test_unknown_command_exits_2():
    result = runner.invoke(app, ["frobnicate"])
    assert result.exit_code == 2
