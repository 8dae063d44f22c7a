"""Writing a whole output folder atomically: into a hidden sibling, renamed into place at the end.

A failure (or Ctrl-C) at any point leaves the target as it was: absent, or the earlier folder
when `--overwrite` replaces one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from llmcli.console import fail


def check_target(target: Path, overwrite: bool, flag: str = "-o") -> None:
    """Refuse a target that is a file, or a folder with something in it (without --overwrite)."""
    if target.exists() or target.is_symlink():
        if not target.is_dir() or target.is_symlink():
            fail(f"{target}: exists and is not a folder; give {flag} a new folder")
        if any(target.iterdir()) and not overwrite:
            fail(f"{target}: already exists and is not empty; give {flag} a new folder, or "
                 "replace it with --overwrite")


@contextlib.contextmanager
def staged_folder(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; on success it becomes `target`."""
    target = Path(target)
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; outputs get the usual permissions
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.{secrets.token_hex(4)}.old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
