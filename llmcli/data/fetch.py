"""Downloads that survive bad networks: `.part` files, HTTP Range resume, retries, SHA-256.

A source is an http(s) URL, a Hugging Face dataset file (`hf://datasets/OWNER/NAME/PATH`, or
`NAME@REVISION`), a whole folder or glob of a dataset's files (`hf://datasets/OWNER/NAME/DIR/`,
`.../DIR/*.parquet`: each file downloaded as below, verified against the SHA-256 the Hub lists
for it; see `fetch_hf_files`), a local path, or a preset name (`PRESETS`). A download streams into
`DIR/NAME.part`; after a dropped connection the next attempt (or the next run) asks the server
for the remaining bytes only. The file appears under its final name, by an atomic rename, only
once it is complete and its checksum (when one is known) matches; a mismatching file is moved
aside to `NAME.bad` (`NAME.bad.1`, ... when that is taken) and never presented as good.
Standard library only (urllib).

A resume is only trusted when the server can vouch that the remote file is still the one the
`.part` holds: the first response's validator (a strong ETag, else Last-Modified) is kept in
`NAME.part.json` and sent back as `If-Range`; a server whose file changed answers 200 with the
whole new file, which replaces the `.part` instead of being spliced onto it.

`NAME.part` and `NAME.part.json` are only ever llm's own: the record says it was written by
`llm fetch` and names the `.part` it belongs to (device and inode), so a file the user keeps
under such a name (say, a download of `x.part`) is never truncated, resumed, renamed or deleted:
the download that would need the name is refused instead, naming it. Downloads whose names can
be one another's temporary files (`x`, `x.part`, `x.part.json`, `x.bad`) share one lock.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import random
import re
import socket
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from llmcli import __version__
from llmcli.console import (
    EXIT_FAILURE,
    EXIT_USAGE,
    UserError,
    byte_progress,
    fail,
    info,
    shell_word,
    warn,
    writing,
)
from llmcli.data.corpus import FILENAME as BUILTIN_FILENAME
from llmcli.data.corpus import builtin_text
from llmcli.files import (
    CLOEXEC,
    NOFOLLOW,
    atomic_path,
    locked,
    publish,
    sha256_file,
    write_json,
)

HF_DEFAULT_ENDPOINT = "https://huggingface.co"
SCHEMES = ("http", "https", "hf")
BLOCK = 1 << 20
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}
MAX_NAME_BYTES = 200  # leaves room for `.NAME.lock`, `NAME.part.json` and its temporary file
RECORD_KIND = "llm fetch partial download"  # marks a NAME.part.json as written by llm fetch
# marks a .NAME.fetched.json as llm fetch's record of where the complete NAME came from
SOURCE_KIND = "llm fetch source"
SOURCE_SUFFIX = ".fetched.json"
# what llm fetch adds to a download's name
OWN_SUFFIXES = (".part.json", ".part", ".bad", SOURCE_SUFFIX)


@dataclass(frozen=True)
class Preset:
    name: str
    source: str  # URL or hf:// address; empty for the built-in corpus
    filename: str
    sha256: str | None
    description: str


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("builtin", "", BUILTIN_FILENAME, None,
               "Python's language reference topics, written from the standard library "
               "(pydoc_data); no network"),
        Preset("sales-textbook",
               "hf://datasets/goendalf666/sales-textbook_for_convincing_and_selling/"
               "sales_textbook.txt",
               "sales_textbook.txt",
               "1994f20f5becd3f0b3d7a632e5a68513cc38cf6c9737a9f38243f1b652e962da",
               "the seed's pretraining corpus, an English sales textbook (~460 KB)"),
        Preset("tinyshakespeare",
               "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
               "tinyshakespeare/input.txt",
               "tinyshakespeare.txt",
               "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
               "Karpathy's char-rnn Shakespeare corpus (1.1 MB, MIT)"),
    )
}

# Former presets whose checksum could not be established: a preset must be verifiable.
RETIRED = {"webnovel-cn": "hf://datasets/zxbsmk/webnovel_cn/novel_cn_token512_50k.json"}


# ---------------------------------------------------------------------------------------------
# Sources -> local paths


def resolve_source(source: str, data_dir: Path = Path("data")) -> Path:
    """A recipe's `data.source` as a local path, downloading or writing it when needed.

    An existing local path is returned as is; `builtin` is written offline; other presets,
    URLs and hf:// addresses are downloaded into `data_dir` unless a complete copy is there.
    """
    local = Path(source).expanduser()
    if local.exists():
        return local
    try:
        return fetch(source, data_dir)
    except UserError as exc:  # `llm fetch -o DIR` is not an option of the training commands
        if _PICK not in str(exc):
            raise
        raise UserError(str(exc).replace(_PICK, _PICK_FOR_TRAINING), exc.exit_code) from None


@contextlib.contextmanager
def _os_errors() -> Iterator[None]:
    """Turn the OS errors that arguments can cause (a file where a directory should be, a name
    too long, no permission, a symlink refused...) into one line: what, where, how to fix."""
    try:
        yield
    except OSError as exc:
        hint = _OS_HINTS.get(exc.errno or 0)
        if hint is None:
            raise
        where = exc.filename if exc.filename is not None else "?"
        code = EXIT_FAILURE if exc.errno in (errno.ENOSPC, errno.EDQUOT) else EXIT_USAGE
        raise UserError(f"{where}: {hint}", code) from None  # the hint says what, too


_PICK = "use another directory (llm fetch -o DIR)"
_PICK_FOR_TRAINING = ("run from a folder you can write to (training fetches into its data/), "
                      "or fetch it with llm fetch -o DIR and give that file as data.source")
_OS_HINTS: dict[int, str] = {
    errno.ENOTDIR: f"part of this path is a file, not a directory: {_PICK}",
    errno.EEXIST: f"a file is where a directory should be: {_PICK}",
    errno.EISDIR: "a directory is where a file should be: move it away, or " + _PICK,
    errno.ENAMETOOLONG: "the path or a name in it is too long: use a shorter one",
    errno.EACCES: f"no permission: {_PICK} that you can write to",
    errno.EPERM: f"not permitted: {_PICK} that you can write to",
    errno.EROFS: f"read-only file system: {_PICK}",
    errno.ELOOP: "a symbolic link is in the way and is not followed: delete it and retry",
    errno.ENOSPC: f"the disk is full: free some space or {_PICK}",
    errno.EDQUOT: f"the disk quota is exceeded: free some space or {_PICK}",
}


@_os_errors()
def fetch(
    source: str,
    data_dir: Path = Path("data"),
    *,
    sha256: str | None = None,
    force: bool = False,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 30.0,
) -> Path:
    """Bring `source` (preset, URL, hf:// address or local path) into `data_dir`; its path."""
    data_dir = Path(data_dir)
    expected = _check_sha256(sha256) if sha256 is not None else None  # '' is an error too
    preset = PRESETS.get(source)
    if preset is not None and not preset.source:
        path = write_builtin(data_dir, force=force)
        if expected and (actual := sha256_file(path)) != expected:
            fail(f"{path}: SHA-256 is {actual}, expected {expected}; the built-in corpus is "
                 "written from this Python's own documentation, so its checksum follows the "
                 "Python version: check the --sha256 value")
        return path
    if preset is not None:
        url, filename = preset.source, preset.filename
        expected = expected or preset.sha256
    elif is_hf_collection(source):
        if expected:
            fail(f"{source}: --sha256 checks one file; each file of a folder or glob is checked "
                 "against the SHA-256 the Hub lists for it: leave --sha256 out")
        return fetch_hf_files(source, data_dir, force=force, retries=retries, backoff=backoff,
                              timeout=timeout)
    elif "://" in source:
        url, filename = source, None
    else:
        local = Path(source).expanduser()
        if local.exists():
            if expected and not local.is_file():
                fail(f"{local} is not a file; --sha256 checks one file")
            if expected:
                actual = sha256_file(local)
                if actual != expected:
                    fail(f"{local}: SHA-256 is {actual}, expected {expected}; "
                         "check the file or the --sha256 value")
            return local
        fail(_unknown_source_message(source))
    address, headers = resolve_url(url)
    target = data_dir / safe_filename(filename or _url_filename(address, source), data_dir)
    return download(address, target, sha256=expected, force=force, headers=headers,
                    retries=retries, backoff=backoff, timeout=timeout)


def check_source(source: str) -> None:
    """Refuse, without downloading anything, a source that is neither a preset, a URL, an
    hf:// address nor an existing path: `--nproc N` asks before its workers start."""
    if source not in PRESETS and "://" not in source and not Path(source).expanduser().exists():
        fail(_unknown_source_message(source))


def _unknown_source_message(source: str) -> str:
    names = ", ".join(PRESETS)
    if source in RETIRED:
        return (f"'{source}' is no longer a preset: its SHA-256 is not known, so a download "
                f"could not be verified; fetch {RETIRED[source]} (with --sha256 if you know it) "
                "and pass the file's path")
    if "/" in source or "\\" in source or Path(source).suffix:
        return (f"{source}: no such file; check the path, or give a preset ({names}), "
                "an http(s):// URL or hf://datasets/OWNER/NAME/PATH")
    return (f"unknown data source '{source}': it is not a preset ({names}) nor an existing "
            "file; to use your own text pass its path, e.g. data.source=path/to/corpus.txt")


def resolve_url(source: str) -> tuple[str, dict[str, str]]:
    """(download URL, extra headers) for an http(s) URL or an hf:// address; refuses others."""
    scheme = source.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        fail(f"{source}: unsupported URL scheme '{scheme}'; use http(s)://, "
             "hf://datasets/OWNER/NAME/PATH or a local path")
    if scheme != "hf":
        _check_url(source)
        return _ascii_url(source), {}
    return _hf_url(source)


def _ascii_url(url: str) -> str:
    """`url` as a request line can carry it (urllib sends ASCII only): a non-ASCII host name in
    IDNA, other non-ASCII characters percent-encoded as UTF-8, as browsers do. ASCII is kept
    exactly as given, %XX escapes included."""
    if url.isascii():
        return url
    scheme, _, rest = url.partition("://")
    cut = min([i for i in map(rest.find, "/?#") if i >= 0] or [len(rest)])
    netloc, tail = rest[:cut], rest[cut:]
    userinfo, at, hostport = netloc.rpartition("@")
    host, colon, port = (hostport.rpartition(":") if re.search(r":\d*$", hostport)
                         else (hostport, "", ""))
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            fail(f"{url}: the host name {host!r} is not a valid international domain name; "
                 "check the address")
    return f"{scheme}://{_quote_non_ascii(userinfo)}{at}{host}{colon}{port}" + \
        _quote_non_ascii(tail)


def _quote_non_ascii(text: str) -> str:
    return re.sub(r"[^\x00-\x7f]+", lambda m: urllib.parse.quote(m.group()), text)


def _check_url(url: str) -> None:
    """Refuse, before any request, what no retry can fix: no host, a port that is not a number
    from 1 to 65535, a malformed IPv6 address, spaces or control characters."""
    scheme = url.split("://", 1)[0].lower()
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        fail(f"{url}: not a valid URL ({exc}); write it as {scheme}://HOST[:PORT]/PATH")
    if not parts.hostname:
        fail(f"{url}: the URL has no host; write it as {scheme}://HOST/PATH")
    if port == 0:
        fail(f"{url}: port 0 is not a valid port; use one from 1 to 65535")
    if re.search(r"[\x00-\x20\x7f]", url):
        fail(f"{url!r}: the URL holds a space or a control character; percent-encode it "
             "(a space is %20)")


def _hf_url(source: str) -> tuple[str, dict[str, str]]:
    parts = source[len("hf://"):].split("/")
    if len(parts) < 4 or parts[0] != "datasets" or not all(parts[1:]):
        fail(f"{source}: expected hf://datasets/OWNER/NAME/PATH (a file of a Hugging Face "
             "dataset), e.g. hf://datasets/zxbsmk/webnovel_cn/novel_cn_token512_50k.json")
    owner, name, path = parts[1], parts[2], "/".join(parts[3:])
    name, _, revision = name.partition("@")
    endpoint = (os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")
    if urllib.parse.urlsplit(endpoint).scheme not in ("http", "https"):
        fail(f"HF_ENDPOINT={endpoint}: must be an http(s):// URL such as {HF_DEFAULT_ENDPOINT}")
    quote = urllib.parse.quote
    url = (f"{endpoint}/datasets/{quote(owner)}/{quote(name)}/resolve/"
           f"{quote(revision or 'main', safe='')}/{quote(path)}")
    token = os.environ.get("HF_TOKEN")
    return url, ({"Authorization": f"Bearer {token}"} if token else {})


def _url_filename(url: str, source: str) -> str:
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    if not name:
        fail(f"{source}: cannot tell a file name from this URL (it ends with '/'); "
             "give the URL of a file")
    return name


def safe_filename(name: str, data_dir: Path) -> str:
    """`name` if it names a file directly inside `data_dir`; refuses anything that escapes,
    and names too long to get their `.part`/`.lock` siblings (ENAMETOOLONG mid-download)."""
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > MAX_NAME_BYTES:
        fail(f"file name {name[:40]!r}... is {size} bytes long, more than {MAX_NAME_BYTES}; "
             "download it another way under a shorter name and pass its local path")
    if re.search(r"[\x00-\x1f\x7f]", name):
        fail(f"refusing file name {name!r}: it holds a control character; download it another "
             "way under a plain name and pass its local path")
    if (not name or name in (".", "..") or "/" in name or "\\" in name
            or Path(name).is_absolute()):
        fail(f"refusing file name {name!r}: it would be written outside {data_dir}/; "
             "download from a URL whose last part is a plain file name")
    path = Path(data_dir) / name
    if path.resolve().parent != Path(data_dir).resolve():
        if path.is_symlink():
            fail(f"{path} is a symbolic link to {path.resolve()}, outside {data_dir}/; "
                 "refusing to write through it; delete the link and retry")
        fail(f"refusing file name {name!r}: it would be written outside {data_dir}/; "
             "download from a URL whose last part is a plain file name")
    return name


def _check_sha256(value: str) -> str:
    digest = value.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        fail(f"--sha256 {value!r}: expected 64 hexadecimal digits (as `sha256sum` prints); "
             "leave the option out to skip the check")
    return digest


# ---------------------------------------------------------------------------------------------
# Downloading


class _Retry(Exception):
    """A transient failure: try again after a pause, resuming from the .part file."""

    def __init__(self, reason: str, reached: int | None = None, kept: int | None = None,
                 wait: float | None = None) -> None:
        super().__init__(reason)
        self.wait = wait  # seconds the server asked for (Retry-After), else None
        # Bytes the .part holds after this attempt, and those of them it held before (None:
        # the attempt did not touch it). Only going past the furthest point any attempt
        # reached counts as progress and resets the retry count: a server that cannot resume
        # sends the same first bytes every time, which is no progress.
        self.reached, self.kept = reached, kept


class _Restart(Exception):
    """The .part file cannot be continued (the remote file changed): start over."""


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (urllib would also follow ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[override]
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            fail(f"{req.full_url}: redirected to {newurl}, which is not http(s); refusing")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_SafeRedirects)


BUILTIN = "builtin"  # the source a record names for the built-in corpus


def write_builtin(data_dir: Path, *, force: bool = False) -> Path:
    """Write the built-in corpus into `data_dir`, recording it as a download's source is.

    A file already holding this Python's corpus is kept untouched (token files keyed on its
    size and time stay valid); an older one llm wrote (its record says so) is refreshed; any
    other file of that name is someone's own, and only `force` replaces it."""
    target = data_dir / BUILTIN_FILENAME
    data = builtin_text().encode("utf-8")
    if _holds(target, data):
        return target
    _refuse_directory(target, "the built-in corpus")
    target.parent.mkdir(parents=True, exist_ok=True)
    source = source_record(target)
    with locked(_family(target)):
        if _holds(target, data):  # another process wrote it meanwhile
            return target
        if os.path.lexists(target) and not force:
            _refuse_not_builtin(target, source)
        with atomic_path(target) as staged:
            staged.write_bytes(data)
            _write_source(source, BUILTIN, staged)
    return target


def _holds(target: Path, data: bytes) -> bool:
    """Whether `target` is a regular file of exactly these bytes (a pipe is never read)."""
    return (target.is_file() and target.stat().st_size == len(data)
            and target.read_bytes() == data)


def _refuse_not_builtin(target: Path, source: Path) -> None:
    """Refuse to write the built-in corpus over a file llm fetch did not write as one."""
    came_from = _source_of(target, source)
    if came_from == BUILTIN:
        return
    what = (f"came from {came_from}" if came_from is not None
            else "is not this Python's built-in corpus, and no record says llm fetch wrote it")
    where = "" if target.parent == Path("data") else f" -o {shell_word(str(target.parent))}"
    fail(f"{target} {what}; it is kept: move it away, or replace it with llm fetch builtin"
         f"{where} --force")


def _refuse_directory(target: Path, what: str) -> None:
    if target.is_dir():
        fail(f"{target} is a directory, where {what} should go; move it away or {_PICK}")


@_os_errors()
def download(
    url: str,
    target: Path,
    *,
    sha256: str | None = None,
    force: bool = False,
    headers: dict[str, str] | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 30.0,
) -> Path:
    """Download `url` to `target` (resuming `target.part`); the complete file's path.

    An existing `target` is kept (verified when `sha256` is given) unless `force`.
    `Authorization` headers are never forwarded to the hosts a redirect leads to.
    """
    target = Path(target)
    sha256 = _check_sha256(sha256) if sha256 is not None else None
    _refuse_directory(target, "the downloaded file")
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    meta = target.with_name(target.name + ".part.json")
    source = source_record(target)
    with locked(_family(target)):
        _refuse_unfinished_download(target)
        if target.exists() and not force:
            came_from = _source_of(target, source)
            if came_from is not None and came_from != url:
                fail(f"{target} came from {came_from}, not {url}; use another -o folder or "
                     "--force to replace it")
            if sha256:
                actual = sha256_file(target)
                if actual != sha256:
                    fail(f"{target} exists but its SHA-256 is {actual}, expected {sha256}; "
                         "delete it or pass --force to download it again")
            recorded = None if came_from else _read_record(source).get("url")
            if isinstance(recorded, str) and recorded != url:  # copied, touched or replaced
                warn(f"{target} exists and its record says it came from {recorded}, not {url} "
                     "(the file has changed since, so this is not sure); not downloading it "
                     "again (--force to replace it)")
                return target
            state = "is already complete" if came_from else "exists"
            info(f"{target} {state}; not downloading it again (--force to redo)")
            return target
        if force:
            _discard_own(part, meta)
        _refuse_foreign(part, meta, target)
        started = time.monotonic()
        kept = _transfer(url, part, meta, headers or {}, retries, backoff, timeout, target.name)
        actual = sha256_file(part)
        if sha256 and actual != sha256:
            bad = _free_name(target.with_name(target.name + ".bad"))  # never over a file
            os.replace(part, bad)
            meta.unlink(missing_ok=True)
            fail(f"{url}: SHA-256 mismatch (expected {sha256}, got {actual}); the download was "
                 f"not installed and is kept aside as {bad}; check the checksum or retry with "
                 "--force", exit_code=EXIT_FAILURE)
        size = part.stat().st_size
        _write_source(source, url, part)  # names the .part's inode: true once it is renamed
        publish(part, target)
        meta.unlink(missing_ok=True)
    seconds = max(time.monotonic() - started, 1e-9)
    resumed = f", resumed after {_human(kept)} from an earlier run" if kept else ""
    info(f"downloaded {_human(size - kept)} in {seconds:.1f} s to {target}{resumed} "
         f"(sha256 {actual})")
    return target


def _free_name(path: Path) -> Path:
    """`path`, or `path.1`, `path.2`, ...: the first name nothing has (an earlier mismatch,
    or a file of the user's, keeps its own)."""
    return next(candidate for n in range(10_000)
                if not os.path.lexists(candidate := path.with_name(
                    path.name + (f".{n}" if n else ""))))


def _discard(part: Path, meta: Path) -> None:
    """Remove llm's own `part` and its record; the record first, so that a crash in between
    leaves a `.part` nobody vouches for (refused) rather than a record a later file could
    match."""
    meta.unlink(missing_ok=True)
    part.unlink(missing_ok=True)  # removes a symlink itself, never its target


def _family(target: Path) -> Path:
    """The path whose lock guards `target`: its name without llm fetch's own suffixes, so the
    downloads of `x` and of a file named `x.part` (its partial file) never run at once."""
    name = target.name
    while suffix := next((s for s in OWN_SUFFIXES
                          if name.endswith(s) and len(name) > len(s)), None):
        name = name[: -len(suffix)]
    return target.with_name(name)


def _own_record(meta: Path) -> dict[str, Any] | None:
    """The record in `meta` when llm fetch wrote it, else None (absent, or someone's file).
    Earlier versions wrote exactly {url, validator}, naming no file: their unfinished download
    still resumes (its `.part` is taken as the one they started)."""
    record = _read_record(meta)
    if record.get("kind") == RECORD_KIND:
        return record
    if set(record) == {"url", "validator"} and isinstance(record["url"], str):
        return {**record, "part": None}
    return None


def _write_record(meta: Path, url: str, validator: str | None, st: os.stat_result) -> None:
    """Claim the `.part` whose status is `st` as this URL's partial download."""
    write_json(meta, {"kind": RECORD_KIND, "url": url, "validator": validator,
                      "part": [st.st_dev, st.st_ino]})


def source_record(target: Path) -> Path:
    """Where llm fetch records the source of the complete `target`: hidden beside it, as its
    lock is, so that listings and globs of a data folder show the data alone."""
    return target.with_name(f".{target.name}{SOURCE_SUFFIX}")


def _write_source(source: Path, url: str, part: Path) -> None:
    """Record that the file about to be published from `part` came from `url`. Written before
    the rename and naming the file (inode, size, time), so that a crash between the two, or a
    file put in its place later, leaves a record that matches no file (replaced next time)."""
    write_json(source, {"kind": SOURCE_KIND, "url": url, "file": _identity(os.stat(part))})


def _identity(st: os.stat_result) -> list[int]:
    """A file's identity that a rename keeps and a new file (even on a reused inode) does not."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def _source_of(target: Path, source: Path) -> str | None:
    """The URL the complete `target` was downloaded from, or None: no record (a file put there
    by hand, or by an llm older than the record) or one about another file."""
    record = _read_record(source)
    if record.get("kind") != SOURCE_KIND or not isinstance(record.get("url"), str):
        return None
    try:
        st = os.stat(target)
    except OSError:
        return None
    return record["url"] if record.get("file") == _identity(st) else None


def _owned_size(part: Path, record: dict[str, Any] | None) -> int | None:
    """The size of `part` when `record` claims this very file (not a link, not a file put
    there since), else None."""
    try:
        st = os.lstat(part)
    except FileNotFoundError:
        return None
    if record is None or not stat.S_ISREG(st.st_mode):
        return None
    return st.st_size if record.get("part") in ([st.st_dev, st.st_ino], None) else None


def _discard_own(part: Path, meta: Path) -> None:
    """--force: start afresh, removing the partial download only where it is llm's own (a
    symbolic link there is removed as a link; someone's file is left to `_refuse_foreign`)."""
    record = _own_record(meta)
    if record is not None:
        meta.unlink(missing_ok=True)
    if part.is_symlink() or _owned_size(part, record) is not None:
        part.unlink(missing_ok=True)


def _refuse_foreign(part: Path, meta: Path, target: Path) -> None:
    """Refuse, before any request, a `.part` or `.part.json` that llm fetch did not write (a
    file downloaded under that name, say): it would be truncated, resumed or renamed."""
    record = _own_record(meta)
    in_the_way = meta
    if record is not None or not os.path.lexists(meta):
        try:
            st = os.lstat(part)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            fail(f"{part} is a symbolic link; refusing to write through it; delete it and retry")
        if not stat.S_ISREG(st.st_mode):
            fail(f"{part} is not a regular file; move it away and retry")
        if _owned_size(part, record) is not None:
            return
        in_the_way = part
    fail(f"{in_the_way} is in the way: llm fetch keeps the partial download of {target.name} "
         f"under that name, and this file is not one it started; move it away, or {_PICK}")


def _refuse_unfinished_download(target: Path) -> None:
    """`target` named like another download's `.part` or record (`x.part`, `x.part.json`)
    while that download is unfinished: neither take it as complete nor replace it."""
    name = target.name
    if name.endswith(".part"):
        part = target
    elif name.endswith(".part.json"):
        part = target.with_name(name[: -len(".json")])
    else:
        return
    record = _own_record(part.with_name(part.name + ".json"))
    if _owned_size(part, record) is None:
        return
    owner = part.name[: -len(".part")]
    fail(f"{target} belongs to llm fetch's unfinished download of {owner} "
         f"({record.get('url') if record else '?'}): finish that one first, or delete "
         f"{part.name} and {part.name}.json, or fetch {name} into another directory (-o DIR)")


def _transfer(url: str, part: Path, meta: Path, headers: dict[str, str], retries: int,
              backoff: float, timeout: float, label: str) -> int:
    """Bring `part` to the whole remote file; the bytes it already held and this run kept.

    `retries` counts failures in a row without progress (an attempt that took the file further
    than any before starts the count again), so a large download over a flaky line resumes as
    long as it gets somewhere; with 0 the first failure ends it.
    """
    failures = furthest = attempts = 0
    kept = None
    with byte_progress() as bar:
        task = bar.add_task(label, total=None)
        while True:
            attempts += 1
            offset, validator = _resume_point(url, part, meta)
            if kept is None:
                kept = furthest = offset
            wait = None
            try:
                if not _attempt(url, part, meta, offset, validator, headers, timeout, bar, task):
                    kept = 0  # the server sent the whole file again
                return kept
            except _Restart as exc:
                warn(f"{label}: {exc}; starting the download again")
                _discard(part, meta)
                kept = 0
                failures += 1
                reason = str(exc)
            except _Retry as exc:
                reason, wait = str(exc), exc.wait
                reached = offset if exc.reached is None else exc.reached
                kept = min(kept, offset if exc.kept is None else exc.kept)
                failures = 0 if reached > furthest and retries else failures + 1
                furthest = max(furthest, reached)
            if failures > retries:
                tries = f"{attempts} attempt" + ("s" if attempts > 1 else "")
                fail(f"could not download {url}: {reason} (gave up after {tries}); check "
                     "the network, or fetch the file another way and pass its local path (e.g. "
                     "data.source=path/to/file)", exit_code=EXIT_FAILURE)
            delay, why = _pause(backoff, failures, wait)
            warn(f"{label}: {reason}; retrying in {delay:.1f} s{why}")
            time.sleep(delay)


# The longest Retry-After honoured: a server asking for more gets retried sooner
RETRY_AFTER_MAX = 300.0


def retry_after(value: str | None) -> float | None:
    """Seconds a 429/503's Retry-After asks for (a number of seconds or an HTTP date), or None
    when absent or unreadable."""
    import email.utils

    text = (value or "").strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _pause(backoff: float, failures: int, wait: float | None) -> tuple[float, str]:
    """The pause before the next attempt, and what it came from for the retry line: the
    server's Retry-After (capped at RETRY_AFTER_MAX), else an exponential backoff."""
    if wait is None:
        return min(60.0, backoff * 2 ** max(failures - 1, 0)) * random.uniform(0.8, 1.2), ""
    if wait > RETRY_AFTER_MAX:
        return RETRY_AFTER_MAX, (f", the most llm waits (the server's Retry-After asked for "
                                 f"{wait:.0f} s)")
    return wait, " (the server's Retry-After)"


def _resume_point(url: str, part: Path, meta: Path) -> tuple[int, str | None]:
    """(bytes of `part` worth keeping, the validator to send as If-Range with them).

    Kept bytes need llm's own record of this very `.part`, for this same URL, holding a
    validator from the response that started them. Without one (the server sent neither a
    strong ETag nor Last-Modified) nothing could tell us whether the remote file changed since,
    so the download restarts from zero rather than risk splicing two versions into one file.
    """
    record = _own_record(meta)
    size = _owned_size(part, record)
    if not size or record is None or record.get("url") != url or not record.get("validator"):
        return 0, None
    return size, str(record["validator"])


def _read_record(meta: Path) -> dict[str, Any]:
    try:
        fd = os.open(meta, os.O_RDONLY | NOFOLLOW | CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            record = json.loads(fh.read(1 << 16))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _open_part(part: Path, append: bool) -> BinaryIO:
    """`part` for writing, never through a symlink planted there (O_NOFOLLOW: ELOOP)."""
    flags = os.O_WRONLY | os.O_CREAT | NOFOLLOW | CLOEXEC
    try:
        fd = os.open(part, flags | (os.O_APPEND if append else os.O_TRUNC), 0o666)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):  # EMLINK: the BSDs' O_NOFOLLOW error
            fail(f"{part} is a symbolic link; refusing to write through it; delete it and retry")
        raise
    return os.fdopen(fd, "wb")


def _validator(headers: Any) -> str | None:
    """A strong ETag, else Last-Modified: what If-Range accepts (weak ETags are refused)."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified")


def _attempt(url: str, part: Path, meta: Path, offset: int, validator: str | None,
             headers: dict[str, str], timeout: float,
             bar, task) -> bool:  # noqa: ANN001 (rich progress objects)
    """One request, appended to `part` from `offset`; whether the bytes before it were kept."""
    request = _request(url, headers)
    if offset and validator:
        request.add_header("Range", f"bytes={offset}-")
        request.add_header("If-Range", validator)  # a changed file comes back whole (200)
    try:
        response = _OPENER.open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        with exc:
            _http_error(url, exc, offset)
        return True  # 416 on a complete .part
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, socket.gaierror):  # no such host, or no network: retrying won't help
            fail(f"could not download {url}: {_describe(exc)}; check the address and the network "
                 "(or copy the file here and give its path)", EXIT_FAILURE)
        raise _Retry(_describe(exc)) from None
    with response:
        _refuse_encoded(url, response)
        partial = response.status == 206  # asked for or not, a part is checked as such
        resumed = bool(offset) and partial
        end, total = (_range_reply(response, offset, validator) if partial
                      else (None, _length(response)))
        if offset and not resumed:
            warn(f"{part.name}: the remote file changed (or the server cannot resume); "
                        "downloading it again from the start")
        size = offset if resumed else 0
        with writing(part), _open_part(part, append=resumed) as fh:  # names a full disk
            if not resumed:  # after truncating: a crash never pairs old bytes with a new record
                _write_record(meta, url, _validator(response.headers), os.fstat(fh.fileno()))
            bar.update(task, total=total, completed=size)
            try:
                while block := response.read1(BLOCK):
                    fh.write(block)
                    size += len(block)
                    bar.update(task, completed=size)
            except (OSError, http.client.HTTPException) as exc:
                if isinstance(exc, OSError) and exc.errno is not None and not _is_network(exc):
                    raise  # disk full, permissions: not a network problem
                raise _Retry(f"connection lost after {_human(size)} ({_describe(exc)})",
                             size, offset if resumed else 0) from None
    _check_complete(size, end, total, offset, offset if resumed else 0)
    return resumed


def _check_complete(size: int, end: int | None, total: int | None, offset: int,
                    kept: int) -> None:
    """Raise unless the `.part`, now `size` bytes, holds the whole file: a reply that stopped
    short (a closed connection, or a 206 that covers less than the file) is resumed."""
    limit = end + 1 if end is not None else total  # what this reply should bring us to
    if limit is None:
        return  # nothing announced: what came is the file
    if size > limit:
        got, announced = _human_pair(size, limit)
        raise _Restart(f"received {got}, more than the announced {announced}")
    if size < limit:
        got, whole = _human_pair(size, total if total is not None else limit)
        raise _Retry(f"connection closed after {got} of {whole}", size, kept)
    if total is not None and size < total:
        raise _Retry(f"the server sent bytes {offset}-{end} of {total} only (HTTP 206)", size,
                     kept)


def _request(url: str, headers: dict[str, str]) -> urllib.request.Request:
    """A GET for the file's bytes as they are stored (no compression on the way: Range offsets
    and the SHA-256 are of those bytes); `headers` are not sent on to redirect targets."""
    request = urllib.request.Request(url, headers={"User-Agent": f"llmcli/{__version__}",
                                                   "Accept-Encoding": "identity"})
    for key, value in headers.items():
        request.add_unredirected_header(key, value)
    return request


def _refuse_encoded(url: str, response: http.client.HTTPResponse) -> None:
    """A server that compresses anyway would leave a compressed file under the plain name, and
    a resume would splice compressed and plain bytes: refused before the `.part` is touched."""
    encoding = response.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        fail(f"{url}: the server sent the file encoded (Content-Encoding: {encoding}) although "
             "asked for it as stored; download it another way (e.g. curl --compressed) and pass "
             "its local path", EXIT_FAILURE)


def _length(response: http.client.HTTPResponse) -> int | None:
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _range_reply(response: http.client.HTTPResponse, offset: int, validator: str | None
                 ) -> tuple[int, int | None]:
    """(the last byte a 206 holds, the full size it announces), after checking it continues
    exactly our `.part` (starts at `offset`: 0 when no Range was sent).

    If-Range should already make a changed file come back whole; this also catches servers
    that ignore If-Range yet report a different validator for what they send.
    """
    header = response.headers.get("Content-Range", "")
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", header.strip())
    if not match:
        raise _Restart(f"the server sent part of the file without a usable Content-Range "
                       f"({header or 'none'!r})")
    start, end = int(match.group(1)), int(match.group(2))
    total = int(match.group(3)) if match.group(3) != "*" else None
    if start != offset or end < start or (total is not None and end >= total):
        raise _Restart(f"the server sent bytes {start}-{end} of {match.group(3)} where bytes "
                       f"from {offset} were wanted")
    etag, modified = response.headers.get("ETag"), response.headers.get("Last-Modified")
    current = etag if validator and validator.startswith('"') else modified
    if validator and current and current != validator:
        raise _Restart("the remote file changed since the partial download")
    return end, total


def _http_error(url: str, exc: urllib.error.HTTPError, offset: int) -> None:
    code = exc.code
    if code == 416 and offset:
        match = re.match(r"bytes \*/(\d+)", exc.headers.get("Content-Range", ""))
        if match and int(match.group(1)) == offset:
            return  # the .part file already holds everything
        raise _Restart("the partial file no longer fits the remote file")
    reason = " ".join(str(exc.reason).split())  # urllib's own reasons can span lines
    if code in RETRYABLE_STATUS:
        raise _Retry(f"HTTP {code} {reason}", wait=retry_after(exc.headers.get("Retry-After")))
    hint = "check the URL"
    if 300 <= code < 400:
        reason, hint = "redirects", ("the server keeps redirecting (a loop, or more than "
                                     "urllib's 10 hops); check the URL, or download the file "
                                     "another way and pass its local path")
    elif code in (401, 403):
        hint = ("for a gated or private Hugging Face dataset, accept its terms and set HF_TOKEN"
                if "/resolve/" in url else "the server refused access")
    elif code == 404:
        hint = "check the URL (for hf:// the owner, dataset name and file path)"
    raise UserError(f"could not download {url}: HTTP {code} {reason}; {hint}")


def _is_network(exc: OSError) -> bool:
    import errno

    return exc.errno in {errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT,
                         errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return f"{exc.reason}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def _human_pair(a: int, b: int) -> tuple[str, str]:
    """Two sizes to compare, exact in bytes where rounding would show them equal."""
    if _human(a) == _human(b):
        return f"{a} B", f"{b} B"
    return _human(a), _human(b)


# ---------------------------------------------------------------------------------------------
# Many files of a Hugging Face dataset: a folder or a glob (FineWeb, C4, ... ship as shards)

GLOB_CHARS = "*?["
MAX_LISTING_PAGES = 10_000


def is_hf_collection(source: str) -> bool:
    """An hf:// address of a folder (ends with '/') or a glob (*, ?, [...]) of files."""
    if not source.startswith("hf://"):
        return False
    path = source[len("hf://"):]
    return path.endswith("/") or any(c in path for c in GLOB_CHARS)


def _split_hf(source: str) -> tuple[str, str, str, str]:
    """(owner, name, revision, path pattern) of an hf:// address; the pattern may be ''."""
    parts = source[len("hf://"):].split("/")
    if len(parts) < 3 or parts[0] != "datasets" or not parts[1] or not parts[2]:
        fail(f"{source}: expected hf://datasets/OWNER/NAME/PATH, a folder .../DIR/ or a glob "
             ".../DIR/*.parquet, e.g. hf://datasets/HuggingFaceFW/fineweb/sample/10BT/")
    name, _, revision = parts[2].partition("@")
    return parts[1], name, revision or "main", "/".join(parts[3:])


def hf_listing(source: str, *, retries: int = 5, backoff: float = 1.0,
               timeout: float = 30.0) -> list[dict[str, Any]]:
    """The dataset files an hf:// folder or glob names: [{"path", "size", "sha256" or None}].

    Asks the Hub's tree API (`/api/datasets/OWNER/NAME/tree/REVISION/DIR?recursive=true`,
    following its `Link: rel="next"` pages) for the folder before the first glob character,
    then keeps the paths the pattern matches (`fnmatch`: `*` may cross '/'); a folder keeps
    every file under it. LFS files come with their SHA-256, which the downloads are checked
    against.
    """
    import fnmatch

    owner, name, revision, pattern = _split_hf(source)
    globbed = any(c in pattern for c in GLOB_CHARS)
    literal = pattern
    if globbed:
        first = min(pattern.index(c) for c in GLOB_CHARS if c in pattern)
        literal = pattern[:first]
    folder = literal[: literal.rfind("/") + 1] if "/" in literal else ""
    if not globbed:
        folder = pattern
    endpoint = (os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")
    if urllib.parse.urlsplit(endpoint).scheme not in ("http", "https"):
        fail(f"HF_ENDPOINT={endpoint}: must be an http(s):// URL such as {HF_DEFAULT_ENDPOINT}")
    quote = urllib.parse.quote
    url: str | None = (f"{endpoint}/api/datasets/{quote(owner)}/{quote(name)}/tree/"
                       f"{quote(revision, safe='')}/{quote(folder.rstrip('/'))}?recursive=true")
    token = os.environ.get("HF_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    entries: list[dict[str, Any]] = []
    for _ in range(MAX_LISTING_PAGES):
        if url is None:
            break
        page, url = _listing_page(url, headers, retries, backoff, timeout, source)
        entries.extend(page)
    files = []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("type") != "file":
            continue
        path = str(entry.get("path", ""))
        if globbed and not fnmatch.fnmatchcase(path, pattern):
            continue
        if not globbed and folder and not path.startswith(folder.rstrip("/") + "/"):
            continue
        lfs = entry.get("lfs") if isinstance(entry.get("lfs"), dict) else {}
        digest = lfs.get("oid") or lfs.get("sha256")
        files.append({"path": path, "size": entry.get("size"),
                      "sha256": digest if isinstance(digest, str)
                      and re.fullmatch(r"[0-9a-f]{64}", digest) else None})
    if not files:
        fail(f"{source}: no files match in {owner}/{name}@{revision} (looked in "
             f"'{folder or '/'}'); check the path or the pattern")
    return sorted(files, key=lambda f: f["path"])


def _listing_page(url: str, headers: dict[str, str], retries: int, backoff: float,
                  timeout: float, source: str) -> tuple[list, str | None]:
    request = _request(url, headers)
    for attempt in range(retries + 1):
        wait = None
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                body = response.read(64 << 20)
                link = response.headers.get("Link", "")
            break
        except urllib.error.HTTPError as exc:
            with exc:
                if exc.code not in RETRYABLE_STATUS or attempt == retries:
                    hint = ("accept the dataset's terms and set HF_TOKEN" if exc.code in (401, 403)
                            else "check the owner, dataset name, revision and folder")
                    fail(f"{source}: cannot list the dataset's files (HTTP {exc.code} "
                         f"{exc.reason}); {hint}")
                wait = retry_after(exc.headers.get("Retry-After"))
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            if attempt == retries:
                fail(f"{source}: cannot list the dataset's files ({_describe(exc)}); check the "
                     "network", exit_code=EXIT_FAILURE)
        delay, why = _pause(backoff, attempt + 1, wait)
        if why:
            warn(f"{source}: the Hub is busy; listing again in {delay:.1f} s{why}")
        time.sleep(delay)
    try:
        page = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        fail(f"{source}: the Hub's file listing is not JSON; check HF_ENDPOINT")
    if not isinstance(page, list):
        fail(f"{source}: unexpected file listing from the Hub (not a list)")
    match = re.search(r'<([^>]+)>;\s*rel="next"', link)
    return page, match.group(1) if match else None


def fetch_hf_files(source: str, data_dir: Path = Path("data"), *, force: bool = False,
                   retries: int = 5, backoff: float = 1.0, timeout: float = 30.0) -> Path:
    """Download every file an hf:// folder or glob names into
    `data_dir/NAME/<the dataset's own paths>`; returns the folder holding them (the part of the
    path before the first glob), which `llm tokenize` takes whole.

    Each file goes through `download`: `.part` files resumed with Range, retries, the Hub's
    SHA-256 checked (LFS files), atomic rename, files already complete skipped (and checked).
    """
    owner, name, revision, pattern = _split_hf(source)
    files = hf_listing(source, retries=retries, backoff=backoff, timeout=timeout)
    root = Path(data_dir) / safe_filename(name, Path(data_dir))
    endpoint = (os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")
    token = os.environ.get("HF_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    quote = urllib.parse.quote
    total = sum(int(f["size"] or 0) for f in files)
    info(f"{source}: {len(files)} file(s), {_human(total)}, into {root}/")
    for i, entry in enumerate(files, 1):
        parts = entry["path"].split("/")
        folder = root
        for part in parts[:-1]:
            folder = folder / safe_filename(part, folder)
        target = folder / safe_filename(parts[-1], folder)
        url = (f"{endpoint}/datasets/{quote(owner)}/{quote(name)}/resolve/"
               f"{quote(revision, safe='')}/{quote(entry['path'])}")
        info(f"[{i}/{len(files)}] {entry['path']}")
        download(url, target, sha256=entry["sha256"], force=force, headers=headers,
                 retries=retries, backoff=backoff, timeout=timeout)
    globbed = any(c in pattern for c in GLOB_CHARS)
    literal = pattern[:min(pattern.index(c) for c in GLOB_CHARS if c in pattern)] \
        if globbed else pattern
    common = literal[: literal.rfind("/") + 1] if "/" in literal else ""
    return root / common if common else root
