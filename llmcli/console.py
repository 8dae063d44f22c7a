"""The rich consoles, progress bars and the user-error convention shared by every command.

Progress and logs go to stderr, results to stdout, so `llm ... > file` captures only results.
Without a terminal (CI, pipes) rich prints plain text: no colours, no live bars.

Both consoles read strings as plain text (markup off): messages quote paths, prompts and recipe
names, and a `[/x]` in one must print as typed. Styling is explicit (`style=`, `Text`).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import stat
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
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


def _results_width() -> int | None:
    """Results going to a file or a pipe keep at least 80 columns whatever COLUMNS says: cut to
    a narrow one, a table's numbers would become '…'."""
    columns = os.environ.get("COLUMNS", "")
    try:
        piped = sys.stdout is not None and not sys.stdout.isatty()
    except ValueError:  # a closed stdout
        piped = True
    return max(int(columns), 80) if piped and columns.isdigit() else None


def stderr_to_devnull() -> None:
    """Send standard error (fd 2 and sys.stderr) to /dev/null: for messages nobody can read
    (`2>&-`, a reader that left), which must not end the command or lose its results."""
    fd = os.open(os.devnull, os.O_WRONLY)
    if fd != 2:  # over whatever holds 2 (a closed pipe, a launcher's read-only file)
        os.dup2(fd, 2)
        os.close(fd)
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115


class _Messages:
    """Standard error as the message console writes it: a reader that goes away (`llm
    pretrain 2>&1 >/dev/null | head -2`) silences the messages, not the run; a failed write
    there ended training mid-run, after --overwrite had cleared the earlier run."""

    def write(self, text: str) -> int:
        try:
            return sys.stderr.write(text)
        except BrokenPipeError:
            stderr_to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            sys.stderr.flush()
        except BrokenPipeError:
            stderr_to_devnull()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding: the real stream's
        return getattr(sys.stderr, name)


out = Console(highlight=False, soft_wrap=True, markup=False, width=_results_width())
err = Console(file=_Messages(), highlight=False, markup=False, soft_wrap=True)  # type: ignore[arg-type]

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


class Echoed(UserError):
    """Another process of this process group failed, and it says why: this one leaves quietly
    with the same exit code, so the group prints the message once."""

    def __init__(self, exit_code: int) -> None:
        super().__init__("another process of the group failed", exit_code)


def exit_code(exc: BaseException) -> int:
    """The exit code an exception ends the command with (see run_guarded)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else EXIT_FAILURE
    return _describe(exc)[1]


NO_SPACE = "no space left on the device; free some space or choose another output path"
# safetensors' Rust errors keep only the text of the OS error: "... (os error 28)"
_RUST_DISK_FULL = re.compile(rf"os error ({errno.ENOSPC}|{errno.EDQUOT})\b")


class DiskFull(UserError):
    """Writing `path` filled the disk (or the quota): the one line every writer gives."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(f"{os.fsdecode(path)}: {NO_SPACE}", EXIT_FAILURE)


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` says the disk or quota is full (an OSError, safetensors' error, ours)."""
    if isinstance(exc, DiskFull):
        return True
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return type(exc).__name__ == "SafetensorError" and bool(_RUST_DISK_FULL.search(str(exc)))


@contextlib.contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """Name `path` when writing it fills the disk: write() errors name no file, safetensors'
    name none, and a temporary file's name means nothing to the user. The outermost wins."""
    try:
        yield
    except BaseException as exc:
        if disk_full(exc):
            raise DiskFull(path) from None
        raise


def first_line(exc: BaseException) -> str:
    """An exception's first line, for one-line error messages."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def info(message: str) -> None:
    """A progress or log line on stderr, silenced by --quiet; one line whatever paths it names."""
    if not settings["quiet"]:
        err.print(one_line(message))


def warn(message: str) -> None:
    """Said by one process per machine (local rank 0): the others there meet the same inputs
    and would only repeat it, while another machine's may differ (its own data folder)."""
    if os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) != "0":
        return
    err.print(Text.assemble(("warning:", "yellow"), " ", one_line(message)))


# Control characters (C0, DEL, C1) and the line and paragraph separators: what str.splitlines()
# breaks at and what a terminal acts on (ESC starts a colour or a screen clear), shown escaped
# as repr() would.
_CONTROLS = [*map(chr, range(0x20)), *map(chr, range(0x7F, 0xA0)), "\u2028", "\u2029"]
_CONTROLS_TABLE = str.maketrans({c: repr(c)[1:-1] for c in _CONTROLS})


def one_line(message: str) -> str:
    """Messages are one line whatever the user's text held (newlines shown as \\n), inert
    (an ESC in a path shown as \\x1b, never acted on by the terminal), and printable whatever
    bytes it held (argv's undecodable bytes shown as \\udcff)."""
    return message.translate(_CONTROLS_TABLE).encode("utf-8", "backslashreplace").decode()


def shell_word(text: str) -> str:
    """`text` quoted to be pasted into a shell as one word, on one line: shlex's quoting, or
    bash's $'...' when it holds a control character (a newline would split the command)."""
    import shlex

    if text.isprintable():
        return shlex.quote(text)
    body = "".join(c if c.isprintable() and c not in "\\'" else
                   f"\\{c}" if c in "\\'" else one_line(c) if ord(c) < 0x80 else
                   f"\\u{ord(c):04x}" for c in text)
    return f"$'{body}'"


def as_utf8(text: str) -> str:
    """Text from the command line as UTF-8: bytes that were not UTF-8 (which Python keeps as
    lone surrogates) become U+FFFD, as a tokenizer reads them, so echoing them cannot fail."""
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that no undecodable byte stands for
        data = text.encode("utf-8", "replace")
    return data.decode("utf-8", "replace")


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
    """Run a command body, turning user errors (and, without --debug, any error) into one line.

    "Any" includes BaseExceptions such as pyo3's PanicException (a Rust panic in tiktoken or
    safetensors); only SystemExit, GeneratorExit and click's own exits pass through.
    """
    try:
        return func()
    except BaseException as exc:
        if _passes_through(exc):
            raise
        if settings["debug"]:  # the traceback, and still the exit code that tells the kind
            traceback.print_exc()
            sys.exit(exit_code(exc))
        if isinstance(exc, Echoed):
            sys.exit(exc.exit_code)
        if exit_code(exc) == EXIT_INTERRUPTED:
            _interrupted(exc)
        if isinstance(exc, BrokenPipeError) and reader_gone():
            # `llm ... | head`: the reader has what it wanted; leave quietly, as rich does when
            # it meets this itself, with stdout on /dev/null so the exit flush cannot fail
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            sys.exit(EXIT_FAILURE)
        message, code = _describe(exc)
        if not _told_launcher(exc, message, code, said=False):
            _print_error(message)
        sys.exit(code)


def _interrupted(exc: BaseException) -> NoReturn:
    """Asked for, not a failure: said in yellow, without "error:", by one process of a group
    (every one stops alike)."""
    said = _group_voice()
    message = "" if isinstance(exc, KeyboardInterrupt) else _describe(exc)[0]
    if said:
        say_interrupted(message)
    _told_launcher(exc, message or "interrupted", EXIT_INTERRUPTED, said=said)
    sys.exit(EXIT_INTERRUPTED)


def say_interrupted(message: str = "") -> None:
    """The line a command stopped by Ctrl-C or SIGTERM ends with (yellow: asked for)."""
    if message:
        err.print(Text.assemble(("interrupted:", "yellow"), " ", clip(one_line(message))))
    else:
        err.print("interrupted", style="yellow")


def _group_voice() -> bool:
    """Whether this process speaks for its process group (rank 0, or no group at all)."""
    return os.environ.get("RANK", "0") == "0"


# The folder where the workers of `llm ... --nproc N` leave their error (rank<N>.json) for
# the launcher (llmcli.train.distributed.torchrun_main), which prints the one that caused the
# others.
WORKER_ERRORS_ENV = "LLM_WORKER_ERRORS"
# What a collective says when another process of the group went away: a consequence, not a cause
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "NCCL communicator was aborted", "Socket Timeout", "Connection refused")


def _told_launcher(exc: BaseException, message: str, code: int, said: bool) -> bool:
    """In a worker of `llm ... --nproc N`: leave how it ended for the launcher (`said`: this
    worker printed it itself); False when not such a worker (the caller prints it)."""
    import json

    where, rank = os.environ.get(WORKER_ERRORS_ENV), os.environ.get("RANK", "")
    if not where or not rank.isdigit():
        return False
    record = {"message": message, "code": code, "peer_lost": lost_peer(exc), "said": said}
    try:
        with open(os.path.join(where, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
            json.dump(record, fh)
    except OSError:
        return False
    return True


def lost_peer(exc: BaseException) -> bool:
    """Whether `exc` says only that another process of the group went away."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"DistError", "DistBackendError", "DistNetworkError"}) or any(
        text in str(exc) for text in _PEER_LOST)


def _describe(exc: BaseException) -> tuple[str, int]:
    """The one-line message and exit code of an error that reached the top."""
    if isinstance(exc, UserError):
        return str(exc), exc.exit_code
    if disk_full(exc) and _path_of(exc) is None:
        return NO_SPACE, EXIT_FAILURE  # no path known: still the line that says how to fix it
    if isinstance(exc, OSError) and _os_fix(exc) is not None:
        path = exc.filename2 if exc.filename2 is not None else exc.filename
        shown = os.fsdecode(path) if isinstance(path, (str, bytes)) else str(path)
        code = EXIT_FAILURE if disk_full(exc) else EXIT_USAGE
        return f"{shown}: {_os_fix(exc)}", code
    if (lost_peer(exc) and os.environ.get("WORLD_SIZE", "1") not in ("", "1")
            and WORKER_ERRORS_ENV not in os.environ):  # `--nproc`'s launcher finds the cause
        return (f"another process of the group (WORLD_SIZE={os.environ['WORLD_SIZE']}) stopped, "
                f"so this one (RANK={os.environ.get('RANK', '?')}) stops too; its own output says "
                "why"), EXIT_FAILURE
    if out_of_memory(exc):
        return (f"out of memory ({clip(first_line(exc), 200)}); use smaller sizes (batch, "
                "context, model or image), fewer processes, or a device with more memory"), \
            EXIT_FAILURE
    message = str(exc).strip()
    detail = f": {clip(one_line(message))}" if message else ""
    return f"{type(exc).__name__}{detail} (rerun with --debug for the traceback)", EXIT_FAILURE


_NO_MEMORY = ("can't allocate memory", "Cannot allocate memory", "out of memory")


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation that failed (torch's CPU allocator, CUDA, MPS)."""
    if isinstance(exc, MemoryError) or any(c.__name__ == "OutOfMemoryError"
                                           for c in type(exc).__mro__):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _NO_MEMORY)


def _print_error(message: str) -> None:
    err.print(Text.assemble(("error:", "red"), " ", clip(one_line(message), 2000)),
              soft_wrap=True)


# What went wrong and how to fix it, for OSErrors that name a path the user gave.
_OS_FIXES = {
    errno.ENOENT: "no such file or directory; check the path",
    errno.ENOTDIR: "a part of the path is a file, not a directory; fix the path",
    errno.EISDIR: "is a directory where a file is needed; give a file path",
    errno.ENAMETOOLONG: "file name too long; use a shorter name",
    errno.EACCES: "permission denied; check its permissions or use another path",
    errno.EPERM: "operation not permitted; check its permissions or use another path",
    errno.ELOOP: "too many levels of symbolic links (a link loop?); fix the link",
    errno.EEXIST: "already exists; remove it or use another path",
    errno.ENOSPC: NO_SPACE,
    errno.EDQUOT: NO_SPACE,
    errno.EROFS: "read-only file system; write elsewhere",
    errno.EXDEV: "on another file system than its temporary file; write elsewhere",
    errno.ENXIO: "not a regular file (a device or socket?); give a file",
}


def _path_of(exc: BaseException) -> object:
    return getattr(exc, "filename", None) or getattr(exc, "filename2", None)


def _os_fix(exc: OSError) -> str | None:
    """How to fix an OSError about a path, or None when it is not about one."""
    if exc.filename is None and exc.filename2 is None:
        return None
    return _OS_FIXES.get(exc.errno or 0)


def check_range(option: str, value: float | None, lo: float, hi: float, fix: str = "") -> None:
    """Refuse (one line, exit 2) a flag's value outside [lo, hi]; NaN and infinities too."""
    if value is None:
        return
    finite = isinstance(value, int) or math.isfinite(value)  # ints may exceed any float
    if finite and lo <= value <= hi:
        return
    shown = clip(str(value), 40)
    fail(f"{option} {shown}: must be {'' if finite else 'finite and '}in [{_num(lo)}, "
         f"{_num(hi)}]" + (f"; {fix}" if fix else ""))


def _num(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def check_output(path: Path, option: str, *, file: bool | None = True) -> None:
    """Refuse an output path that cannot be written, before any work is done: a name too long,
    a file on the way, or a directory where the file goes (`file` True) or a file where the
    directory goes (`file` False); None accepts either. A pipe, device or socket is never a
    file to write (a FIFO would block until something reads it)."""
    for part in path.parts:
        if len(os.fsencode(part)) > 255:
            fail(f"{option} {path}: the name {clip(part, 40)!r} is {len(os.fsencode(part))} "
                 "bytes, over the 255 a file system allows; use a shorter name")
    for parent in list(reversed(path.parents))[1:] + [path]:
        if parent.is_symlink() and not parent.exists():
            fail(f"{option} {path}: {parent} is a symbolic link to nothing (or a link loop); "
                 "remove it or choose another path")
        if (parent != path or file is False) and parent.exists() and not parent.is_dir():
            fail(f"{option} {path}: {parent} is a file, not a directory; choose another path")
    if file is not False and not_regular(path):
        fail(f"{option} {path}: {NOT_REGULAR}; choose a regular file's path")
    if file and path.is_dir():
        fail(f"{option} {path}: is a directory; give a file name (or remove the directory)")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png_output(path: Path, option: str) -> None:
    """`check_output` for a picture: a .png name, and never over a file that is not a PNG (a
    checkpoint given by mistake is not replaced by a picture of itself)."""
    check_output(path, option)
    if path.suffix.lower() != ".png":
        fail(f"{option} {path}: give a file name ending in .png")
    if path.exists():
        try:
            with open(path, "rb") as fh:
                head = fh.read(len(PNG_SIGNATURE))
        except OSError as exc:
            fail(f"{option} {path}: cannot read it ({exc.strerror or exc}); choose another path")
        if head != PNG_SIGNATURE:
            fail(f"{option} {path}: exists and is not a PNG image; it is not replaced: choose "
                 "another name")


NOT_REGULAR = "not a regular file (a pipe, device or socket)"


def not_regular(path: str | os.PathLike[str]) -> bool:
    """Whether `path` exists and is neither a regular file nor a directory: opening a FIFO
    blocks (beyond Ctrl-C, inside safetensors), a device reads without end or writes nowhere."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False  # missing or unreachable: the caller's own message says so
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


MAX_TEXT_INPUT = 64 * 2**20  # bytes of a prompt file or piped prompt: far past any context


def read_text_input(source: Path | None, where: str) -> str:
    """A text the user hands over whole (a prompt file, `--file`, standard input when `source`
    is None), as UTF-8; refused past MAX_TEXT_INPUT bytes, where /dev/zero or `yes |` would
    otherwise fill the memory. Pipes and process substitution (`-f <(echo hi)`) are read as
    files."""
    limit = MAX_TEXT_INPUT
    try:
        if source is None:
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(source, "rb") as fh:
                data = fh.read(limit + 1)
    except FileNotFoundError:
        fail(f"{where}: file not found")
    except IsADirectoryError:
        fail(f"{where}: is a directory; give a text file")
    except OSError as exc:
        fail(f"{where}: cannot read it ({exc.strerror or exc}); give a readable text file")
    if len(data) > limit:
        fail(f"{where}: more than {limit // 2**20} MiB of text, far more than a model reads "
             "at once; give a shorter text (a device such as /dev/zero never ends)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        fail(f"{where}: not UTF-8 text (byte {exc.start}); save it as UTF-8")
    return text.replace("\r\n", "\n").replace("\r", "\n")  # as text mode reads lines


def check_readable(path: Path, option: str = "") -> None:
    """Refuse an input that exists but cannot be read, before anything waits on it: one line
    naming the option (when given) and the path. A file must be regular and readable (a FIFO
    would hang, a /proc entry fail with a bare EIO); a directory must be listable (else every
    file in it looks missing). Missing paths are left to the caller's own message."""
    where = f"{option} {path}" if option else str(path)
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            with os.scandir(path):
                pass
            os.stat(os.path.join(path, "."))  # needs search (x) permission, as its files do
            return
        if not stat.S_ISREG(mode):
            fail(f"{where}: {NOT_REGULAR}; give a regular file")
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return
        if exc.errno in (errno.EACCES, errno.EPERM):
            fail(f"{where}: {_OS_FIXES[exc.errno]}")
        fail(f"{where}: cannot read it ({exc.strerror or exc}); give a regular file")


def reader_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it (poll says POLLERR): a
    broken pipe elsewhere (a socket, a child process) is still an error to report."""
    import select

    try:
        poller = select.poll()
        poller.register(1, select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no fd 1, no poll on this platform
        return False


def _passes_through(exc: BaseException) -> bool:
    """Exits that are not errors: sys.exit, a closed generator, click's Exit and usage errors
    (click's own, or the copy of click that typer ships from 0.29 on)."""
    return (isinstance(exc, (SystemExit, GeneratorExit))
            or type(exc).__module__.split(".")[0] in ("click", "typer"))


def clip(text: str, limit: int = 1000) -> str:
    """At most `limit` characters of a message: an exception may quote a whole input."""
    return text if len(text) <= limit else f"{text[:limit - 20]} ... ({len(text):,} characters)"
