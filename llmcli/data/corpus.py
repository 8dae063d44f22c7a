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

from llmcli.console import fail

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
