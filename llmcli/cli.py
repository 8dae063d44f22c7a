"""The `llm` command: a Typer app whose subcommands live in `llmcli.commands`, one module each.

Command modules only parse, call library functions and print; they import torch, tiktoken and
diffusers inside the function bodies, so `llm --help` stays instant.
"""

from __future__ import annotations

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


def main() -> None:
    """The console script: the parser's own usage errors become one line, as every other error.

    typer ships its own copy of click, so its exception classes are reached through the public
    `typer.BadParameter` (a usage error) rather than imported from a private module.
    """
    import sys

    usage_error = typer.BadParameter.__mro__[1]  # click's UsageError, as typer vendors it
    try:
        code = app(standalone_mode=False)
    except usage_error as exc:
        from llmcli.console import err, one_line

        message = exc.format_message()
        if message:  # empty when the help was shown for a bare `llm` or `llm inspect`
            where = exc.ctx.command_path if exc.ctx is not None else "llm"
            err.print(f"error: {one_line(message)} (see {where} --help)")
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
