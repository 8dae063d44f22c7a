"""The rich consoles, progress bars and the user-error convention shared by every command.

Progress and logs go to stderr, results to stdout, so `llm ... > file` captures only results.
Without a terminal (CI, pipes) rich prints plain text: no colours, no live bars.

Both consoles read strings as plain text (markup off): messages quote paths, prompts and recipe
names, and a `[/x]` in one must print as typed. Styling is explicit (`style=`, `Text`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

out = Console(highlight=False, soft_wrap=True, markup=False)
err = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)

# Set by the CLI's global options; library code reads them through the helpers below.
settings: dict[str, bool] = {"quiet": False, "debug": False}

T = TypeVar("T")

EXIT_USAGE = 2  # bad input: recipe, arguments, files
EXIT_FAILURE = 1  # the job itself failed (network, non-finite loss, ...)
EXIT_INTERRUPTED = 130  # Ctrl-C, after saving


class UserError(Exception):
    """A problem the user can fix: printed as one line (what, where, how to fix), no traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def fail(message: str, exit_code: int = EXIT_USAGE) -> NoReturn:
    raise UserError(message, exit_code)


def first_line(exc: BaseException) -> str:
    """An exception's first line, for one-line error messages."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def info(message: str) -> None:
    """A progress or log line on stderr, silenced by --quiet."""
    if not settings["quiet"]:
        err.print(message)


def warn(message: str) -> None:
    err.print(Text.assemble(("warning:", "yellow"), " ", message))


def one_line(message: str) -> str:
    """Errors are one line whatever the user's text held (newlines shown as \\n)."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def is_interactive() -> bool:
    return err.is_terminal and not settings["quiet"]


def progress(*extra_columns: Any, transient: bool = False) -> Progress:
    """A progress bar on stderr; disabled (prints nothing) without a terminal or with --quiet.

    Extra columns come last (make them with `stats_column`, which cuts them to the width left):
    the phase, the count, elapsed time and ETA stay visible on an 80-column terminal.
    """
    from rich.table import Column

    columns = [
        TextColumn("{task.description}", style="bold", markup=False,
                   table_column=Column(no_wrap=True, min_width=10)),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        *extra_columns,
    ]
    return Progress(*columns, console=err, transient=transient, disable=not is_interactive())


def stats_column(field: str) -> TextColumn:
    """A progress column showing `task.fields[field]`, cut with an ellipsis to the room left."""
    from rich.table import Column

    room = max(8, err.width - 66)
    return TextColumn(f"{{task.fields[{field}]}}", markup=False,
                      table_column=Column(no_wrap=True, overflow="ellipsis", max_width=room))


def byte_progress(transient: bool = False) -> Progress:
    """A progress bar counting bytes (downloads, tokenizing): size done/total, rate and ETA."""
    from rich.progress import DownloadColumn, TransferSpeedColumn

    columns = [
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    return Progress(*columns, console=err, transient=transient, disable=not is_interactive())


def run_guarded(func: Callable[[], T]) -> T:
    """Run a command body, turning user errors (and, without --debug, any error) into one line."""
    try:
        return func()
    except UserError as exc:
        if settings["debug"]:
            raise
        err.print(Text.assemble(("error:", "red"), " ", one_line(str(exc))), soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        if settings["debug"]:
            raise
        err.print("interrupted", style="yellow")
        sys.exit(EXIT_INTERRUPTED)
    except (OSError, ValueError, RuntimeError) as exc:
        if settings["debug"]:
            raise
        name = type(exc).__name__
        err.print(Text.assemble(("error:", "red"), f" {name}: ", one_line(str(exc)),
                                " (rerun with --debug for the traceback)"), soft_wrap=True)
        sys.exit(EXIT_FAILURE)
