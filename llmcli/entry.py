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


def main() -> None:
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
