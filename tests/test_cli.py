"""The `llm` command itself: help, version, module entry point, lazy heavy imports."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import typing

import pytest
import typer
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


def test_a_closed_standard_output_is_refused_before_any_work():
    """`llm params R >&-` printed nothing and exited 0, as if its results had been shown."""
    result = subprocess.run(f"'{sys.executable}' -m llmcli scaling --params 1M >&-",
                            shell=True, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: standard output is closed")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(("argv", "hint"), [
    (["generate", "--top-k", "many"], "(see llm generate --help)"),
    (["inspect", "attention", "--no-such-option"], "(see llm inspect attention --help)"),
    (["frobnicate"], "(see llm --help)"),
])
def test_a_parse_error_points_at_the_help_of_the_command_given(argv, hint):
    """The hint named `llm --help` whatever the command, where the options are not listed."""
    result = subprocess.run([sys.executable, "-c", "import sys; from llmcli.cli import main; "
                             "sys.argv[0] = 'llm'; main()", *argv],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert result.stderr.rstrip().endswith(hint), result.stderr


def test_unknown_command_exits_2():
    result = runner.invoke(app, ["frobnicate"])
    assert result.exit_code == 2


def _command_functions():
    for name, func in REGISTERED:
        if isinstance(func, typer.Typer):  # llm inspect VIEW
            for view in func.registered_commands:
                yield f"{name} {view.name or view.callback.__name__}", view.callback
        else:
            yield name, func


def test_every_path_parameter_refuses_an_empty_path():
    """Click reads "" as the current folder, so `-o "$UNSET"` would write there: every
    parameter typed Path takes the parser that refuses it."""
    from llmcli.commands.common import path_text

    checked = []
    for name, func in _command_functions():
        hints = typing.get_type_hints(func)
        for param in inspect.signature(func).parameters.values():
            if "Path" in str(hints.get(param.name)):
                assert getattr(param.default, "parser", None) is path_text, (name, param.name)
                checked.append((name, param.name))
    assert len(checked) >= 15  # the walk found the commands' path options


@pytest.mark.parametrize("argv", [
    ["tokenize", "corpus.txt", "-o", ""], ["tokenize", ""], ["fetch", "builtin", "-o", ""],
    ["scaling", "--params", "1M", "--plot", ""], ["pretrain", ""], ["pretrain", "--out", ""],
    ["params", ""], ["generate", "", "hello"], ["export", "", "-o", "out"], ["import", ""],
    ["inspect", "attention", "", "hi"], ["imagine", "a cat", "-o", ""],
])
def test_an_empty_path_is_a_one_line_error_and_writes_nothing(argv, tmp_path, monkeypatch,
                                                                capsys):
    from llmcli.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("some text to tokenize\n")
    monkeypatch.setattr(sys, "argv", ["llm", *argv])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and "empty" in err
    assert len(err.strip().splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["corpus.txt"]


def test_output_that_cannot_take_a_character_gets_a_question_mark(tmp_path):
    """PYTHONIOENCODING=ascii: the job finishes and exits 0 (its files were already written)."""
    (tmp_path / "in ü.txt").write_text("héllo wörld\n", encoding="utf-8")
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    for argv in (["tokenize", "in ü.txt", "-o", "ü"], ["tokenize", "--show", "画一个大海"]):
        result = subprocess.run([sys.executable, "-m", "llmcli", *argv], cwd=tmp_path, env=env,
                                capture_output=True, text=True, encoding="ascii",
                                errors="strict")
        assert result.returncode == 0, result.stderr
        assert "?" in result.stdout
    assert (tmp_path / "ü.tokens").is_file()


def test_text_arguments_decoded_in_another_locale_are_read_as_utf8():
    """Under a non-UTF-8 locale Python keeps argv's UTF-8 bytes as lone surrogates; text
    arguments are read back as the UTF-8 they were typed in (paths keep their bytes)."""
    typed = "画一个大海"
    as_locale = typed.encode("utf-8").decode("ascii", "surrogateescape")
    shown = [runner.invoke(app, ["tokenize", "--show", text, "--json"]) for text in
             (typed, as_locale)]
    assert shown[0].exit_code == 0 and json.loads(shown[0].stdout) == json.loads(shown[1].stdout)


def test_a_narrow_columns_does_not_cut_results_written_to_a_file():
    env = {**os.environ, "COLUMNS": "20"}
    result = subprocess.run([sys.executable, "-m", "llmcli", "scaling", "--params", "140M"],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "140.0M" in result.stdout and "…" not in result.stdout
