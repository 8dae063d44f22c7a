"""Writing a whole output folder atomically: into a hidden sibling, renamed into place at the end.

A failure (or Ctrl-C) at any point leaves the target as it was: absent, or the earlier folder
when `--overwrite` replaces one. `--overwrite` only ever replaces what the same command wrote
before (an earlier export: a transformers model folder whose model.safetensors carries llm's
mark, `EXPORT_MARK` in its metadata; an earlier import: a run directory holding only the
imported step-00000000.safetensors) or an empty folder. A training run, a transformers model
llm did not export (an export by a version before the mark included), any other file, and the
current directory (or one holding it) are refused, never deleted.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from llmcli.checkpoint import raw_metadata, run_files, step_path
from llmcli.console import DiskFull, check_output, disk_full, fail, first_line
from llmcli.constants import RUN_TOKENIZERS
from llmcli.files import replace_folder

Kind = Literal["export", "import"]
# What `llm export` writes, and the other files of a transformers model folder
EXPORT_FILES = frozenset({
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
})
SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")
EXPORT_MARK = "llm_export"  # model.safetensors metadata key: llm's version wrote this folder
HINT = {"export": "-o hf-model", "import": "-o checkpoints/NAME"}


def check_target(target: Path, overwrite: bool, kind: Kind, flag: str = "-o") -> None:
    """Refuse a target that is a file, the current directory (or holds it), a folder holding
    something other than an earlier `kind` output, and a non-empty folder without --overwrite."""
    target = Path(target)
    new = f"give {flag} a new folder (e.g. {HINT[kind]})"
    check_output(target, flag, file=False)  # long names, files and dangling links on the way
    try:
        resolved = target.resolve()
        cwd = Path.cwd().resolve()
    except (OSError, RuntimeError) as exc:  # a symbolic link loop
        fail(f"{flag} {target}: cannot resolve it ({first_line(exc)}); {new}")
    if resolved == cwd or resolved in cwd.parents:
        where = "is" if resolved == cwd else "holds"
        fail(f"{flag} {target}: {where} the current directory, which llm will not replace; {new}")
    if target.name in ("", ".."):
        fail(f"{flag} {target}: name the folder itself ({resolved}), not '..'")
    if not (target.exists() or target.is_symlink()):
        return
    if not target.is_dir() or target.is_symlink():
        kind_of = "a symbolic link" if target.is_symlink() else "a file"
        fail(f"{target}: exists and is {kind_of}, not a folder; {new}")
    if not any(target.iterdir()):
        return
    held = foreign(target, kind)
    if held is not None:
        fail(f"{target}: holds {held}, which --overwrite never deletes (it replaces only an "
             f"earlier {kind} or an empty folder); {new}")
    if not overwrite:
        fail(f"{target}: already holds an earlier {kind}; replace it with --overwrite, or {new}")


def foreign(folder: Path, kind: Kind) -> str | None:
    """What `folder` holds that is not an earlier output of `llm {kind}`, or None.

    A run directory is recognised as checkpoint.run_files does; an import is only a run
    directory when its one checkpoint says it was imported."""
    entries = sorted(folder.iterdir())
    run = run_files(folder)
    own = [p for p in entries if not (p.name == RUN_TOKENIZERS and p.is_dir())]  # its tokenizer
    if kind == "import" and own == [step_path(folder, 0)] and imported(own[0]):
        return None
    if run:
        files = f"{len(run)} files, e.g." if len(run) > 1 else "1 file:"
        return f"an llm run ({files} {run[0].name})"
    others = entries if kind == "import" else [p for p in entries if not export_file(p)]
    if others:
        return f"{listed(others)} (not part of an earlier {kind})"
    if not exported(folder / "model.safetensors"):
        return (f"a transformers model llm did not export ({listed(entries)}; exports by llm "
                "versions before exports were marked count as such too)")
    return None


def listed(paths: list[Path]) -> str:
    """The first few names, folders with a slash."""
    shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in paths[:3])
    return shown + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def export_file(path: Path) -> bool:
    """Whether `path` is a file a transformers model folder holds."""
    plain = path.is_file() and not path.is_symlink()
    return plain and (path.name in EXPORT_FILES or SHARD.fullmatch(path.name) is not None)


def exported(path: Path) -> bool:
    """Whether a model.safetensors was written by `llm export` (its metadata carries the mark)."""
    plain = path.is_file() and not path.is_symlink()
    return plain and EXPORT_MARK in raw_metadata(path)


def imported(path: Path) -> bool:
    """Whether a checkpoint file was written by `llm import` (its metadata says so)."""
    plain = path.is_file() and not path.is_symlink()
    return plain and "imported_from" in raw_metadata(path)


@contextlib.contextmanager
def staged_folder(target: Path, overwrite: bool, kind: Kind) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; on success it becomes `target`.

    The target is checked again just before it is replaced: the work in between can take
    minutes, and a run started there meanwhile must not be lost."""
    target = Path(target)
    check_target(target, overwrite, kind)
    try:
        tmp = make_stage(target)
    except OSError as exc:
        raise named_as(exc, target) from None
    try:
        yield tmp
        check_target(target, overwrite, kind)
        replace_folder(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(exc):  # named after the folder asked for, not the one just removed
            raise DiskFull(target) from None
        if isinstance(exc, OSError) and names_stage(exc, tmp):
            raise named_as(exc, target) from None
        raise


def make_stage(target: Path) -> Path:
    """The empty hidden folder beside `target` that becomes it, with the usual permissions."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; outputs get the usual permissions
    return tmp


def names_stage(exc: OSError, tmp: Path) -> bool:
    """Whether `exc` is about the hidden folder (or a file in it), a name the user never gave."""
    return any(isinstance(name, str) and Path(name).is_relative_to(tmp)
               for name in (exc.filename, exc.filename2))


def named_as(exc: OSError, target: Path) -> Exception:
    """The same error about `target`, the folder the user asked for: a read-only file system
    or a missing permission is reported under -o's path, not llm's hidden temporary one."""
    if disk_full(exc):
        return DiskFull(target)
    return type(exc)(exc.errno, exc.strerror, os.fspath(target))
