"""The one way every output file is written: to a temporary sibling, fsynced, then renamed.

A run killed at any instant leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

FILE_MODE = 0o666  # before the umask, as open() does: every file the project writes has it


def cache_dir(part: str) -> Path:
    """llm's per-user cache folder `part` ($XDG_CACHE_HOME honoured): what can be rebuilt."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llmcli" / part


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success it replaces `target` atomically.

    For writers that want a file name (safetensors, matplotlib). On error the temporary file
    is removed and `target` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:  # named after the file asked for, not after our temporary one
        if exc.errno not in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        from llmcli.console import UserError

        raise UserError(f"{target}: cannot create files in {target.parent} "
                        f"({(exc.strerror or str(exc)).lower()}); write it elsewhere") from None
    os.close(fd)
    tmp_path = Path(tmp)
    from llmcli.console import writing

    try:
        with writing(target):  # a full disk is named after the file asked for
            yield tmp_path
            # mkstemp makes 0600, and writers that replace the file (safetensors) keep their
            # own mode: every output gets the usual permissions, whoever wrote it.
            os.chmod(tmp_path, FILE_MODE & ~_umask())
            publish(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_path_in_private_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """`atomic_path` for writers that stage files of their own beside the path they are given
    (safetensors writes `.tmpXXXXXX` and renames it): the path lies in a private directory
    `.NAME.XXXXXXXX.tmp/`, so a kill at any instant leaves only names the sweep removes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp",
                                        dir=target.parent))
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        from llmcli.console import UserError

        raise UserError(f"{target}: cannot create files in {target.parent} "
                        f"({(exc.strerror or str(exc)).lower()}); write it elsewhere") from None
    tmp_path = tmp_dir / target.name
    try:
        yield tmp_path
        os.chmod(tmp_path, FILE_MODE & ~_umask())
        publish(tmp_path, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


@contextlib.contextmanager
def atomic_open(target: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file for writing; it becomes `target` only if the block succeeds."""
    if "w" not in mode:
        raise ValueError("atomic_open is for writing ('w' or 'wb')")
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(target) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh
        fh.flush()


def write_text(target: str | os.PathLike[str], text: str) -> None:
    with atomic_open(target, "w") as fh:
        fh.write(text)


_LINKS: list[str] = []  # the private folder of utf8_path's links, made on first use


def utf8_path(path: str | os.PathLike[str]) -> str:
    """`path` as safetensors (Rust) can open it: itself, or, when it holds bytes that are not
    UTF-8 (a folder named in another encoding), a link with a UTF-8 name to it in a private
    temporary folder removed at exit. Such a checkpoint was called damaged."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    if not _LINKS:
        import atexit

        _LINKS.append(tempfile.mkdtemp(prefix="llm-links-"))
        atexit.register(shutil.rmtree, _LINKS[0], True)
    link = os.path.join(_LINKS[0], f"{len(os.listdir(_LINKS[0]))}{Path(text).suffix}")
    os.symlink(os.path.abspath(text), link)
    return link


def write_json(target: str | os.PathLike[str], data: Any) -> None:
    """Readable UTF-8 JSON; escaped (\\udcff) where a path held bytes that are not UTF-8, which
    UTF-8 cannot write (a token file was left without its sidecar)."""
    text = json.dumps(data, indent=2, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(data, indent=2)
    write_text(target, text + "\n")


def append_line(target: str | os.PathLike[str], line: str) -> None:
    """Append one whole line (logs such as metrics.jsonl) in a single write.

    A crash leaves at worst one partial last line, which readers skip; rewriting the whole log
    atomically at every step would cost O(n^2).
    """
    from llmcli.console import writing

    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE & ~_umask())
    try:
        with writing(target):  # os.write's error names no file
            os.write(fd, data)
    finally:
        os.close(fd)


def publish(staged: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Make a finished staging file (a resumable download's `.part`) appear as `target`.

    For files that must outlive a crash before they are complete, so `atomic_path`'s
    throw-away temporary does not fit: fsync, rename over `target`, fsync the directory.
    """
    with open(staged, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(staged, target)
    _fsync_dir(Path(target).parent)


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back while files that belong together are replaced (a token file
    and its sidecar), and deliver them after: an interrupt never leaves a new file beside its
    old partner. Outside the main thread (where handlers cannot be set) it holds nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda sig, _frame: caught.append(sig)) for sig in held}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)  # the previous handler answers, as if it came now


def replace_folder(new: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Move the finished folder `new` to `target`, replacing what is there, with interrupts
    held until the old one is gone: a Ctrl-C between the two renames left neither under the
    name, and one during the removal left the old one hidden beside it."""
    target = Path(target)
    with interrupts_held():
        if not (target.exists() or target.is_symlink()):
            os.replace(new, target)
            return
        old = target.with_name(f".{target.name}.{secrets.token_hex(4)}.old")
        os.replace(target, old)
        os.replace(new, target)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


class Busy(Exception):
    """`locked(..., wait=False)` found the lock held; `holder` is the process id it wrote."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # 0 on Windows, which has no such symlink attack
CLOEXEC = getattr(os, "O_CLOEXEC", 0)


@contextlib.contextmanager
def locked(target: str | os.PathLike[str], *, wait: bool = True) -> Iterator[None]:
    """One process at a time for `target` (a download, a run directory), by a lock file
    `.NAME.lock` beside the file or folder it names (symlinks followed) that holds the owner's
    process id; `wait=False` raises `Busy`.

    The lock file is opened without following symlinks and deleted when done, while still
    held. That is race-free on POSIX: a process that opened the file meanwhile and then gets
    the lock sees that the path no longer names the file it locked, and starts over with a
    fresh one, so two processes never both believe they hold the lock.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks
        yield
        return
    # Through its symlinks: `-o link` to a run directory in use must meet that run's lock.
    real = Path(os.path.realpath(target))
    path = real.with_name(f".{real.name}.lock")
    folder = Path(target).parent
    shown = folder if os.path.realpath(folder) == str(real.parent) else real.parent
    while True:
        fd = _open_lock(path, shown)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise Busy(os.pread(fd, 32, 0).decode("ascii", "replace").strip()) from None
            try:
                current = os.path.samestat(os.fstat(fd), os.lstat(path))
            except FileNotFoundError:
                current = False
            if current:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
                try:
                    yield
                finally:
                    path.unlink(missing_ok=True)
                return
        finally:
            os.close(fd)  # releases the lock


# Errors that say the folder takes no new file (read-only, no permission, full, missing)
_FOLDER_ERRORS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT,
                  errno.ENOENT, errno.ENOTDIR)


def _open_lock(path: Path, folder: Path) -> int:
    """Open (or create) the lock file `path`. A folder that takes no new file is the error,
    named as the user gave it: the hidden `.NAME.lock` is a name they never asked for."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW | CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno not in _FOLDER_ERRORS:
            raise
        raise type(exc)(exc.errno, exc.strerror, os.fspath(folder)) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform lets a directory be opened.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_file(path: str | os.PathLike[str], block: int = 1 << 20) -> str:
    """The file's SHA-256 in hex, read in blocks (memory stays flat for any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()
