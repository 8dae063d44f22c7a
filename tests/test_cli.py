"""The `llm` command itself: help, version, module entry point, lazy heavy imports."""

from __future__ import annotations

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


def test_module_entry_point_and_help_import_no_heavy_library():
    code = ("import sys, runpy; sys.argv = ['llm', '--help']\n"
            "try:\n    runpy.run_module('llmcli', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'tiktoken', 'diffusers', 'transformers', 'numpy')"
            " if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert "Usage" in result.stdout
    assert "HEAVY []" in result.stdout


@pytest.mark.parametrize("argv", [["generate", "--help"], ["scaling", "--params", "1M"],
                                  ["pretrain", "--keys"]])
def test_help_keys_and_pure_python_commands_do_not_load_torch(argv):
    code = (f"import sys, runpy; sys.argv = ['llm', *{argv!r}]\n"
            "try:\n    runpy.run_module('llmcli', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('TORCH', 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert "TORCH False" in result.stdout


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
