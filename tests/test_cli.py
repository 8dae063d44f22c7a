"""The `llm` command itself: help, version, module entry point, lazy heavy imports."""

from __future__ import annotations

import subprocess
import sys

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


def test_unknown_command_exits_2():
    result = runner.invoke(app, ["frobnicate"])
    assert result.exit_code == 2
