"""The `llm` command: a Typer app whose subcommands live in `llmcli.commands`, one module each.

Command modules only parse, call library functions and print; they import torch, tiktoken and
diffusers inside the function bodies, so `llm --help` stays instant.
"""

from __future__ import annotations

import inspect

import typer

from llmcli import __version__
from llmcli.console import settings

app = typer.Typer(
    name="llm",
    help="Build a GPT-style language model from scratch: fetch a corpus, tokenize it, pretrain, "
    "fine-tune, count parameters, generate text, make an image, plan with scaling laws.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"llm {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print results only, no progress."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    settings["quiet"] = quiet
    settings["debug"] = debug


def _register() -> None:
    from llmcli.commands import REGISTERED

    for name, func in REGISTERED:
        if isinstance(func, typer.Typer):  # a command with subcommands (llm inspect VIEW)
            app.add_typer(func, name=name)
        else:
            app.command(name)(func)


_register()


# Options of `llm` itself, which the parser knows only before the command's name.
GLOBAL_OPTIONS = ("-q", "--quiet", "--debug", "--version")
# Flags that take the thing they act on as a positional argument (`--resume auto`): the
# `--resume=auto` spelling is split into that.
_NAMING_FLAGS = ("--resume", "--merge")


def main() -> None:
    """The console script: the parser's own usage errors become one line, as every other error.

    typer ships its own copy of click, so its exception classes are reached through the public
    `typer.BadParameter` (a usage error) rather than imported from a private module.
    """
    import sys

    usage_error = typer.BadParameter.__mro__[1]  # click's UsageError, as typer vendors it
    args = [part for arg in sys.argv[1:] for part in _split_naming_flag(arg)]
    try:
        code = _command()(args, prog_name="llm", standalone_mode=False)
    except usage_error as exc:
        from llmcli.console import err, one_line

        message = exc.format_message()
        if message:  # empty when the help was shown for a bare `llm` or `llm inspect`
            err.print(f"error: {_usage_line(exc, one_line(message), args)}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    if code == 130:  # typer's answer to a Ctrl-C while it reads the command line
        from llmcli.console import err

        err.print("interrupted", style="yellow")
    sys.exit(code if isinstance(code, int) else 0)


def _command() -> typer.core.TyperGroup:
    """The click command typer builds, shown as typer before 0.29 showed it: flags without a
    type (0.29 labels them `<bool>`, which reads as if they took a value the parser then
    refuses), and every paragraph of a command's text wrapped to the terminal (0.29 keeps the
    docstring's line breaks after the first paragraph, so lines break twice)."""
    root = typer.main.get_command(app)
    stack = [root]
    while stack:
        command = stack.pop()
        stack.extend(getattr(command, "commands", {}).values())
        if command.help:
            command.help = _reflow(command.help)
        for param in command.params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
    return root


def _reflow(text: str) -> str:
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split()) for p in paragraphs)


def _split_naming_flag(arg: str) -> list[str]:
    name, equals, value = arg.partition("=")
    return [name, value] if equals and name in _NAMING_FLAGS and value else [arg]


def _usage_line(exc: Exception, message: str, args: list[str]) -> str:
    """A parse error and how to fix it: where the options are listed, or the fix itself."""
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else _command_path(args)
    option = getattr(exc, "option_name", None)
    if option in GLOBAL_OPTIONS and where != "llm":
        example = "llm --version" if option == "--version" else \
            f"llm {option} {where.removeprefix('llm ')} ..."
        return f"{option} is an option of llm itself: put it before the command, as in {example}"
    key = _recipe_key(option) if where in ("llm pretrain", "llm finetune", "llm params") else None
    if key is not None:
        return (f"{option}: no such option; recipe keys are set after the recipe as KEY=VALUE, "
                f"here {key}=...")
    return f"{message} (see {where} --help)"


def _command_path(args: list[str]) -> str:
    """`llm NAME` for the command a line names (errors met before its context exists)."""
    from llmcli.commands import REGISTERED

    name = next((arg for arg in args if not arg.startswith("-")), None)
    return f"llm {name}" if name in {n for n, _ in REGISTERED} else "llm"


def _recipe_key(option: str | None) -> str | None:
    """The recipe key an unknown `--max-iters` was meant as (train.max_iters), if any."""
    if not option or not option.startswith("--"):
        return None
    from llmcli.recipe import describe_keys

    name = option[2:].split("=")[0].replace("-", "_")
    matches = [key for key, _default, _doc in describe_keys()
               if key == name or key.split(".")[-1] == name]
    return matches[0] if len(matches) == 1 else None
