"""The `llm` console script's first moments: a Ctrl-C while the libraries load ends the command
at once (exit 130, "interrupted"), not in a traceback or an abort.

The default handler raises KeyboardInterrupt wherever Python happens to be, and during the first
second that is inside `import torch`, whose C++ set-up can swallow it (the command then runs to
the end), turn it into an unrelated error or abort the process. Nothing is written while
libraries load, so leaving at once is safe; the command itself runs with the usual handler, so
its interrupts save checkpoints and remove temporary files as before. Only the standard library
is imported here, and torch only for the commands that load it anyway, so `llm --help` and the
pure-Python commands stay fast.
"""

from __future__ import annotations

import os
import signal
import sys

# Commands that import torch whatever they are asked (their --help excepted).
TORCH_COMMANDS = frozenset({"pretrain", "finetune", "generate", "inspect", "params", "export",
                            "import", "imagine"})


def _leave(signum: int, frame: object) -> None:
    os.write(2, b"interrupted\n")
    os._exit(130)


def _tolerant_stdout() -> None:
    """Output that cannot take a character (PYTHONIOENCODING=ascii, a C locale without UTF-8
    mode) gets '?' for it: a finished job must not fail while reporting, after its files are
    written. Standard error already replaces what it cannot encode."""
    if sys.stdout is not None and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")


def _check_stdout() -> None:
    """A closed standard output (`>&-`) would drop every result while the command exits 0, as
    if it had printed them: refused before any work, as coreutils' tools fail on it."""
    try:
        os.fstat(1)
        closed = sys.stdout is None
    except OSError:  # closed after Python started: sys.stdout is there, its writes fail
        closed = True
    if closed:
        os.write(2, b"error: standard output is closed (>&-), so the results would be lost; "
                    b"redirect it to a file, or to /dev/null to discard them\n")
        sys.exit(2)


def _writable(fd: int) -> bool:
    """Whether `fd` is open for writing. A closed one may not stay closed: a launcher script
    (pyenv's shim) can open a file of its own there before Python starts."""
    try:
        import fcntl
    except ImportError:  # Windows
        return True
    try:
        return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY
    except OSError:
        return False


def _quiet_closed_stderr() -> None:
    """A closed standard error (`2>&-`) made the first progress line fail, and the error about
    that failed too: exit 1 with nothing said and the results lost. Messages go to /dev/null
    instead (what was closed was asked not to be seen); results and exit codes are kept."""
    if _writable(2) and sys.stderr is not None:
        return
    from llmcli.console import stderr_to_devnull

    stderr_to_devnull()


def main() -> None:
    _quiet_closed_stderr()
    previous = signal.signal(signal.SIGINT, _leave)
    _check_stdout()
    _tolerant_stdout()
    from llmcli.cli import main as run

    words = sys.argv[1:]
    command = next((w for w in words if not w.startswith("-")), None)
    if command in TORCH_COMMANDS and not {"--help", "-h", "--keys"} & set(words):
        import torch  # noqa: F401  (loaded here, where an interrupt is answered at once)
    signal.signal(signal.SIGINT, previous)
    try:
        run()
    finally:  # the command has ended and said so: a Ctrl-C now would only kill the exit silently
        signal.signal(signal.SIGINT, signal.SIG_IGN)
