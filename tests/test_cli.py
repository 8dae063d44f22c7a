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


@pytest.mark.parametrize("closing", ["2>&-", "2</dev/null"])  # closed; or a read-only file
def test_a_closed_standard_error_keeps_the_results_and_the_exit_code(tmp_path, closing):
    """`llm tokenize t.txt 2>&-` exited 1 with nothing printed: its first progress line failed,
    then the error about it. (A launcher script such as pyenv's shim leaves a read-only file
    of its own where standard error was.)"""
    (tmp_path / "t.txt").write_text("hello world\n", encoding="utf-8")
    command = f"'{sys.executable}' -m llmcli tokenize t.txt -o t.tokens --tokenizer bytes"
    result = subprocess.run(f"{command} {closing}", shell=True, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("wrote t.tokens (bytes)\n")
    result = subprocess.run(f"{command.replace('t.txt', 'missing.txt')} {closing}", shell=True,
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""


@pytest.mark.parametrize(("argv", "hint"), [
    (["generate", "--top-k", "many"], "(see llm generate --help)"),
    (["inspect", "attention", "--no-such-option"], "(see llm inspect attention --help)"),
    (["frobnicate"], "(see llm --help)"),
])
def test_a_parse_error_points_at_the_help_of_the_command_given(argv, hint):
    """The hint named `llm --help` whatever the command, where the options are not listed."""
    result = _llm(*argv)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert result.stderr.rstrip().endswith(hint), result.stderr


def _llm(*argv: str, code: str = "") -> subprocess.CompletedProcess[str]:
    """The console script's main() on `argv`, after `code` (a patch) has run."""
    return subprocess.run([sys.executable, "-c", f"{code}\nfrom llmcli.cli import main; main()",
                           *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("argv", "expected"), [
    (["scaling", "--params", "1M", "-q"], "error: -q is an option of llm itself: put it before "
     "the command, as in llm -q scaling ..."),
    (["params", "r.yaml", "--debug"], "error: --debug is an option of llm itself: put it "
     "before the command, as in llm --debug params ..."),
    (["inspect", "lens", "--version"], "error: --version is an option of llm itself: put it "
     "before the command, as in llm --version"),
    (["pretrain", "r.yaml", "--max-iters", "5"], "error: --max-iters: no such option; recipe "
     "keys are set after the recipe as KEY=VALUE, here train.max_iters=..."),
    (["finetune", "r.yaml", "--rank=4"], "error: --rank: no such option; recipe keys are set "
     "after the recipe as KEY=VALUE, here lora.rank=..."),
    (["pretrain", "r.yaml", "--out"], "error: Option '--out' requires an argument. "
     "(see llm pretrain --help)"),
])
def test_a_parse_error_says_how_to_fix_it(argv, expected):
    """Options of llm itself given after the command, and recipe keys written as options, were
    'No such option' with unrelated suggestions (`Possible options: --json`)."""
    result = _llm(*argv)
    assert (result.returncode, result.stderr) == (2, expected + "\n")


@pytest.mark.parametrize("argv", [
    ["pretrain", "--resume=auto", "missing.yaml"],
    ["pretrain", "--resume", "auto", "missing.yaml"],
    ["pretrain", "--resume", "missing.yaml", "step-9.safetensors", "train.max_iters=5"],
    ["finetune", "--resume=run", "missing.yaml"],
])
def test_resume_takes_its_checkpoint_before_or_after_the_recipe(argv):
    """The help says to put the checkpoint (or `auto`) after --resume; `--resume=auto` was
    'does not take a value' and `--resume auto R` read `auto` as the recipe."""
    result = _llm(*argv)
    assert result.returncode == 2
    assert result.stderr.startswith("error: missing.yaml: recipe file not found"), result.stderr


def test_recipe_first_moves_the_yaml_positional_to_the_recipe():
    from pathlib import Path

    from llmcli.commands.common import recipe_first

    assert recipe_first(Path("auto"), ["r.yml", "a=1"], True) == (Path("r.yml"),
                                                                   ["auto", "a=1"])
    assert recipe_first(Path("r.yaml"), ["ck.safetensors"], True) == (Path("r.yaml"),
                                                                      ["ck.safetensors"])
    # without --resume, or with two YAML files, nothing is guessed: the usual errors follow
    assert recipe_first(Path("auto"), ["r.yaml"], False) == (Path("auto"), ["r.yaml"])
    assert recipe_first(Path("x"), ["a.yaml", "b.yaml"], True) == (Path("x"),
                                                                  ["a.yaml", "b.yaml"])


def test_debug_keeps_the_exit_code_of_bad_input():
    """--debug shows the traceback, and still exits 2 for bad input (it exited 1)."""
    result = _llm("--debug", "params", "missing.yaml")
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "recipe file not found" in result.stderr


def test_ctrl_c_while_the_command_line_is_read_says_interrupted():
    """typer turns a KeyboardInterrupt in its parsing into exit 130 without a word."""
    patch = ("import os, signal, typer\n"
             "from typer import core\n"
             "real = core.TyperOption.process_value\n"
             "def interrupted(self, ctx, value):\n"
             "    os.kill(os.getpid(), signal.SIGINT)\n"
             "    return real(self, ctx, value)\n"
             "core.TyperOption.process_value = interrupted\n")
    result = _llm("scaling", "--params", "1M", code=patch)
    assert (result.returncode, result.stderr, result.stdout) == (130, "interrupted\n", "")


def _help_pages():
    from llmcli.cli import _command

    stack = [("llm", _command())]
    while stack:
        path, command = stack.pop()
        yield path, command
        stack.extend((f"{path} {name}", sub)
                     for name, sub in getattr(command, "commands", {}).items())


def test_help_shows_every_text_and_no_type_beside_a_flag():
    """Square brackets in a help text (`[default: data]`) were taken as rich markup and
    dropped; typer 0.29 shows flags as `<bool>`, as if they took a value."""
    env = {**os.environ, "TERMINAL_WIDTH": "4000"}
    for path, command in _help_pages():
        page = subprocess.run([sys.executable, "-m", "llmcli", *path.split()[1:], "--help"],
                              capture_output=True, text=True, env=env, timeout=60).stdout
        flat = " ".join(page.split())
        texts = [getattr(p, "help", None) for p in command.params]
        texts += (command.help or "").split("\n\n")
        for text in filter(None, texts):
            assert " ".join(text.split()).lstrip("\b ") in flat, (path, text)
        for line in page.splitlines():
            if any(f" {opt} " in line for p in command.params
                   if getattr(p, "is_flag", False) for opt in p.opts):
                assert "<bool>" not in line, (path, line)


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


def test_a_warning_is_said_once_per_machine(monkeypatch, capsys) -> None:
    """Every rank of `--nproc 2` read the same folder and each named its skipped files."""
    from llmcli.console import warn

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for rank, local, said in (("1", None, False), ("0", None, True), ("3", "1", False),
                              ("2", "0", True)):  # by hand; then the second of two machines
        monkeypatch.setenv("RANK", rank)
        if local is not None:
            monkeypatch.setenv("LOCAL_RANK", local)
        warn("a folder skipped b.md")
        assert ("warning: a folder skipped b.md" in capsys.readouterr().err) is said
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("LOCAL_RANK")
    warn("no group at all")
    assert "warning: no group at all" in capsys.readouterr().err


def test_a_path_with_control_characters_is_printed_inert_on_one_line(tmp_path, monkeypatch,
                                                                     capsys) -> None:
    """`-o $'odd\\nna\\e[31mme.tokens'` printed its result over two lines and turned the
    terminal red; so did warnings, progress lines and table titles."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("hello world\n", encoding="utf-8")
    name = "odd\nna\x1b[31mme\t.tokens"
    proc = subprocess.run([sys.executable, "-m", "llmcli", "tokenize", "t.txt", "-o", name,
                           "--tokenizer", "bytes"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / name).is_file()
    assert proc.stdout.splitlines()[0] == "wrote odd\\nna\\x1b[31mme\\t.tokens (bytes)"
    from llmcli.console import info, warn

    warn("odd\nname\x1b[2J.tokens: a warning")
    info("odd\x07name\x9b.tokens: a progress line")
    assert capsys.readouterr().err.splitlines() == [
        "warning: odd\\nname\\x1b[2J.tokens: a warning",
        "odd\\x07name\\x9b.tokens: a progress line"]


@pytest.mark.parametrize("text", ["plain", "a b", "it's", "a\nb\x1b[31mc", "tab\there\\",
                                  "z\u2028y\x85"])
def test_a_command_to_paste_is_one_line_and_means_the_path(text) -> None:
    """llm import's "next" line quoted a path with a newline for the shell, over two lines."""
    import shutil

    from llmcli.console import shell_word

    word = shell_word(text)
    assert word.isprintable()
    if shutil.which("bash") is None:
        pytest.skip("no bash to read the word back")
    back = subprocess.run(["bash", "-c", f"printf %s {word}"], capture_output=True,
                          text=True, timeout=30)
    assert back.stdout == text


@pytest.mark.parametrize("exc", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate "
                 "memory: you tried to allocate 268435456 bytes. Error code 12 (Cannot allocate "
                 "memory)"),
    MemoryError(),
])
def test_an_allocation_that_fails_says_out_of_memory_and_what_helps(exc) -> None:
    """`llm imagine --width 4096 --height 4096` under a memory limit ended in the allocator's
    '[enforce fail at alloc_cpu.cpp:127]' as a RuntimeError, with no way out suggested."""
    from llmcli.console import _describe

    message, code = _describe(exc)
    assert code == 1 and message.startswith("out of memory (")
    assert message.endswith("use smaller sizes (batch, context, model or image), fewer "
                            "processes, or a device with more memory")
