"""The built-in corpus: English text that ships with every Python, so training works offline.

It is the Python Language Reference's topic pages as `help()` shows them (the standard
library module `pydoc_data.topics`, generated from the CPython documentation): about 80
sections such as "The assert statement" or "Augmented assignment statements", roughly 465 KB
and 106K cl100k tokens, written as plain text, one section after another. It is real technical
prose with code examples, small enough to train a tiny model on a laptop CPU in minutes. The
exact text follows the running Python's version; the CPython documentation is under the PSF
licence.
"""

from __future__ import annotations

from pathlib import Path

from llmcli.console import fail
from llmcli.files import atomic_open

FILENAME = "python-reference.txt"
DESCRIPTION = "Python's language reference topics (pydoc_data, ships with Python; offline)"


def builtin_text() -> str:
    """The corpus as one string: every topic, in alphabetical order, separated by blank lines."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        fail("the built-in corpus needs the standard library's pydoc_data module, which this "
             "Python lacks; pass a local text file instead (e.g. data.source=path/to/text.txt)")
    sections = [topics[name].strip("\n") for name in sorted(topics)]
    return "\n\n\n".join(s for s in sections if s.strip()) + "\n"


def write_builtin(data_dir: Path = Path("data")) -> Path:
    """Write the built-in corpus into `data_dir` (kept untouched when already identical)."""
    target = Path(data_dir) / FILENAME
    data = builtin_text().encode("utf-8")
    if target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data:
        return target  # unchanged: token caches keyed on size and mtime stay valid
    with atomic_open(target, "wb") as fh:
        fh.write(data)
    return target
