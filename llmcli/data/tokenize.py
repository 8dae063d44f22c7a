"""Text, directories of .txt files and Alpaca records → a flat uint32 token file + JSON sidecar.

Text streams through in blocks of about a megabyte, so memory stays flat for any corpus size,
and the blocks are encoded on one thread per core (tiktoken's BPE runs without the GIL).
A block is cut only where cl100k's pre-tokenizer starts a new piece whatever text follows (see
`find_cut`), so the streamed tokens equal those of the whole file encoded at once.

`NAME.tokens` holds little-endian uint32 ids (cl100k ids exceed uint16); each input file (or
record) is one document, and documents are separated by the tokenizer's end-of-text id.
`NAME.tokens.json` describes it: tokenizer, vocabulary size, counts, the train/validation
boundary and each source's SHA-256 (see `tokenize_files`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from llmcli.console import UserError, byte_progress, fail, info, warn
from llmcli.data.readers import is_text_records, iter_texts
from llmcli.data.records import read_records, record_problem, record_text
from llmcli.data.shards import (
    ShardWriter,
    is_shard_folder,
    open_shards,
    read_index,
    shard_folder_path,
)
from llmcli.data.token_cache import (
    TOKENS_FORMAT,
    candidates,
    description_problem,
    expand_inputs,
    find_tokens,
    read_json_object,
    sidecar_path,
)
from llmcli.data.tokenizer import Tokenizer, cpu_threads, get_tokenizer
from llmcli.files import atomic_path, interrupts_held, sha256_file, write_json

FORMAT = TOKENS_FORMAT
BLOCK = 1 << 18  # bytes read at a time and encoded as one job: small keeps RSS low
RECORD_EXTENSIONS = (".json", ".jsonl")
ERRORS = ("strict", "replace")
_BOM = "\ufeff"

# Bytes that may follow a cut newline: printable ASCII and UTF-8 lead bytes of code points
# that are never whitespace (C2 starts U+0085/U+00A0, E1 U+1680, E2 U+2000-U+205F, E3 U+3000).
_SAFE_AFTER_NEWLINE = bytes(
    b for b in range(256) if 0x21 <= b <= 0x7E or 0xC3 <= b <= 0xE0 or 0xE4 <= b <= 0xF4
)
_ASCII_LETTERS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def find_cut(buf: bytes | bytearray, start: int = 0) -> int:
    """The last index in buf[start:] where buf can be split without changing its tokens, or -1.

    cl100k's pieces never run across a newline that is followed by a non-space character:
    whitespace runs end at their last newline, punctuation takes trailing newlines only, and
    letters and digits never absorb a newline. Encoding starts afresh at that character, so both
    halves tokenize as they would inside the whole. When a long block has no such newline, a
    space between two ASCII letters serves: the word before it ends there, and " word" is a
    piece of its own. A byte-level tokenizer may cut anywhere, so the same rule is safe for it.
    """
    end = len(buf) - 1  # a newline needs a byte after it to be judged
    i = end
    while True:
        i = buf.rfind(b"\n", start, i)
        if i < 0:
            break
        if buf[i + 1] in _SAFE_AFTER_NEWLINE:
            return i + 1
    i = end
    while True:
        i = buf.rfind(b" ", start + 1, i)
        if i < 0:
            return -1
        if buf[i - 1] in _ASCII_LETTERS and buf[i + 1] in _ASCII_LETTERS:
            return i


# ---------------------------------------------------------------------------------------------
# Inputs → encoding jobs


@dataclass
class _Job:
    """Text encoded as one array: a piece of a document, or several whole documents (records)."""

    text: str | list[str]
    new_document: bool


@dataclass
class _Source:
    path: Path
    size: int
    mtime_ns: int
    sha256: str = ""
    started: bool = False  # a document has begun (the file had text)


@dataclass
class _Reading:
    """What the readers learned on the way: the sources with their hashes, and documents."""

    sources: list[_Source] = field(default_factory=list)
    documents: int = 0
    text_bytes: int = 0  # UTF-8 bytes of the text tokenized (not of the files: JSON, gzip)


def _text_jobs(path: Path, errors: str, reading: _Reading, source: _Source, block: int,
               on_bytes: Callable[[int], None]) -> Iterator[_Job]:
    digest = hashlib.sha256()
    # Grown in place: a file with no cut for megabytes (one long run of spaces) stays linear.
    pending = bytearray()
    offset = 0  # file offset of the next piece, for error messages
    lines = 0  # newlines before it
    with open(path, "rb") as fh:
        while True:
            data = _read(fh, block, path)
            if data:
                digest.update(data)
                on_bytes(len(data))
                # pending held no cut; its last two bytes could not be judged without `data`
                start = max(0, len(pending) - 2)
                pending += data
                cut = find_cut(pending, start)
                if cut < 0:
                    continue
                piece = bytes(pending[:cut])
                del pending[:cut]
            else:
                piece, pending = bytes(pending), bytearray()
            text = _decode(piece, path, errors, offset, lines)
            if not source.started:
                text = text.removeprefix(_BOM)
            if text:
                yield _Job(text, new_document=not source.started)
                if not source.started:
                    source.started = True
                    reading.documents += 1
            lines += piece.count(b"\n")
            offset += len(piece)
            if not data:
                break
    source.sha256 = digest.hexdigest()


def _read(fh: BinaryIO, size: int, path: Path) -> bytes:
    try:
        return fh.read(size)
    except OSError as exc:  # EIO from a device or /proc file, a disk error
        fail(f"{path}: cannot read it ({exc.strerror or exc}); give a regular text file")


def _decode(piece: bytes, path: Path, errors: str, offset: int, lines: int) -> str:
    try:
        return piece.decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        line = lines + piece.count(b"\n", 0, exc.start) + 1
        bad = piece[exc.start:exc.end].hex(" ")
        fail(f"{path}: line {line} (byte {offset + exc.start}): not UTF-8 (bytes {bad}); "
             "convert the file to UTF-8, or substitute U+FFFD for such bytes: `llm tokenize "
             f"{path} --errors replace` (and train on the .tokens file it writes)")


def _record_jobs(path: Path, reading: _Reading, source: _Source, block: int,
                 on_bytes: Callable[[int], None]) -> Iterator[_Job]:
    records = read_records(path)
    source.sha256 = sha256_file(path)
    on_bytes(source.size)
    texts, skipped = [], []
    for index, rec in enumerate(records):
        problem = record_problem(rec)
        if problem:
            skipped.append((index, problem))
            continue
        text = record_text(rec)
        if text:
            texts.append(text)
    if skipped:
        index, problem = skipped[0]
        warn(f"{path}: skipped {len(skipped):,} of {len(records):,} records that are not "
             f"Alpaca records (record {index} {problem})")
    if not records:
        fail(f"{path}: holds no records; give a JSON array (or JSON Lines) of "
             "{instruction, input, output} records")
    if not texts and len(skipped) < len(records):
        fail(f"{path}: every record is empty (no text in instruction, input or output); "
             "give records that hold text")
    if not texts:
        index, problem = skipped[0]
        first = records[index]
        fields = [k for k, v in first.items() if isinstance(v, str)] if isinstance(
            first, dict) else []
        hint = (f"; for text records, name their text field: --text-field {fields[0]}"
                if fields and path.suffix.lower() == ".jsonl" else "")
        fail(f"{path}: no usable records (objects with string 'instruction' and 'output'; "
             f"record {index} {problem}); check the file's layout{hint}")
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= block:
            yield _Job(batch, new_document=True)
            batch, size = [], 0
    if batch:
        yield _Job(batch, new_document=True)
    reading.documents += len(texts)


def _jobs(files: list[Path], errors: str, reading: _Reading, block: int,
          on_bytes: Callable[[int], None], text_field: str | None = None) -> Iterator[_Job]:
    for path in files:
        stat = path.stat()
        source = _Source(path.resolve(), stat.st_size, stat.st_mtime_ns)
        reading.sources.append(source)
        plain = False
        if text_field is not None and is_text_records(path, text_field):
            jobs = _stream_jobs(path, text_field, reading, source, block, on_bytes)
        elif path.suffix.lower() in RECORD_EXTENSIONS:
            jobs = _record_jobs(path, reading, source, block, on_bytes)
        else:
            jobs, plain = _text_jobs(path, errors, reading, source, block, on_bytes), True
        for job in jobs:
            texts = [job.text] if isinstance(job.text, str) else job.text
            reading.text_bytes += sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
            yield job
        if plain and not source.started and len(files) > 1:
            warn(f"{path}: empty, skipped")


# ---------------------------------------------------------------------------------------------
# Encoding


class _Counter:
    """Count, largest id and distinct ids of everything written, chunk by chunk."""

    def __init__(self, n_vocab: int) -> None:
        self.count = 0
        self.max_id = -1
        self.seen = np.zeros(n_vocab, dtype=bool)

    def add(self, ids: np.ndarray) -> None:
        if len(ids):
            self.count += len(ids)
            self.max_id = max(self.max_id, int(ids.max()))
            self.seen[ids] = True


def document_marks(tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """What begins the first document (the tokenizer's start ids: an imported Llama's BOS, as
    it was trained; nothing for cl100k_base), and what begins each later one: end-of-text,
    then the start ids (once, when they are end-of-text itself). The second ends with the
    first."""
    lead = list(tok.start_ids)
    between = lead if lead == [tok.eot_id] else [tok.eot_id, *lead]
    return np.array(lead, dtype=np.uint32), np.array(between, dtype=np.uint32)


def _encoder(tok: Tokenizer) -> Callable[[_Job], np.ndarray]:
    """A job's ids, without the start ids of its first document (the writer puts those)."""
    between = document_marks(tok)[1]

    def encode(job: _Job) -> np.ndarray:
        if isinstance(job.text, str):
            return tok.encode_array(job.text)
        parts: list[np.ndarray] = []
        for i, text in enumerate(job.text):
            if i:
                parts.append(between)
            parts.append(tok.encode_array(text))
        return np.concatenate(parts)

    return encode


def _encode_all(jobs: Iterable[_Job], tok: Tokenizer,
                emit: Callable[[bool, np.ndarray], None], threads: int) -> None:
    """Encode jobs on `threads` threads; `emit(new_document, ids)` sees results in order."""
    encode = _encoder(tok)
    if threads <= 1:
        for job in jobs:
            emit(job.new_document, encode(job))
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="tokenize") as pool:
        window: deque = deque()
        for job in jobs:
            window.append((job.new_document, pool.submit(encode, job)))
            if len(window) > 2 * threads:  # bounded: memory stays flat
                new_document, future = window.popleft()
                emit(new_document, future.result())
        while window:
            new_document, future = window.popleft()
            emit(new_document, future.result())


def compact_vocab_ids(path: Path, end: int, tokenizer: Tokenizer) -> int:
    """How many ids a compact vocabulary built from the first `end` tokens keeps (its unknown
    id aside): recorded so `llm scaling` and `llm params` count it without numpy."""
    from llmcli.data.vocab import compact_vocab

    tokens = np.memmap(path, dtype="<u4", mode="r") if Path(path).stat().st_size else np.zeros(0)
    return len(compact_vocab(tokens[:end], tokenizer).ids)


def val_start(num_tokens: int, val_fraction: float) -> int:
    """Where validation begins: the seed's `int(len(data) * 0.9)` for val_fraction 0.1."""
    return int(num_tokens * (1 - val_fraction))


def head_tokens(inputs: list[Path], n: int, tokenizer: str = "cl100k_base",
                errors: str = "strict", text_field: str = "text") -> list[int]:
    """The first `n` tokens `tokenize_files` would write, reading only as much as needed."""
    tok = get_tokenizer(tokenizer)
    encode = _encoder(tok)
    lead, between = document_marks(tok)
    ids: list[int] = []
    block = max(4096, 8 * n)
    for job in _jobs(expand_inputs(inputs), errors, _Reading(), block, lambda _n: None,
                     text_field):
        if job.new_document:
            ids.extend(int(i) for i in (between if ids else lead))
        ids.extend(int(i) for i in encode(job))
        if len(ids) >= n:
            break
    return ids[:n]


# ---------------------------------------------------------------------------------------------
# Reading token files


REQUIRED = {"tokenizer": str, "vocab_size": int, "num_tokens": int, "max_id": int,
            "val_fraction": (int, float), "val_start": int, "sources": list}


def read_sidecar(path: Path) -> dict:
    """The sidecar of a token file (`X.tokens` or `X.tokens.json`), checked; one-line errors.
    A sharded corpus (a folder with index.json) gives its index."""
    path = Path(path)
    if is_shard_folder(path):
        return read_index(path)
    if path.is_dir():
        fail(f"{path}: a folder without the index.json of a sharded corpus (`llm tokenize "
             "--shard-tokens` writes one); make the corpus again, or give its text files")
    side = path if path.name.endswith(".tokens.json") else sidecar_path(path)
    if not side.is_file():
        fail(f"{side}: missing; a token file needs the sidecar `llm tokenize` writes beside "
             "it; run `llm tokenize` on the text again")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail(f"{side}: corrupt sidecar ({exc}); run `llm tokenize` on the text again")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        fail(f"{side}: not a token sidecar (format {found!r}, expected {FORMAT!r}); run "
             "`llm tokenize` on the text again")
    for key, kind in REQUIRED.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            fail(f"{side}: corrupt sidecar (field '{key}' missing or wrong type); run "
                 "`llm tokenize` on the text again")
    problem = description_problem(meta)
    if problem:
        fail(f"{side}: corrupt sidecar ({problem}); run `llm tokenize` on the text again")
    return meta



def open_tokens(path: Path) -> np.memmap:
    """A token file as a read-only uint32 memory map, checked against its sidecar (a sharded
    corpus: all its shards, read as one array)."""
    path = Path(path)
    if is_shard_folder(path):
        return open_shards(path)  # type: ignore[return-value]
    if not path.is_file():
        fail(f"{path}: no such token file; make it with `llm tokenize`")
    meta = read_sidecar(path)
    size = path.stat().st_size
    if size != 4 * meta["num_tokens"] or size == 0:
        fail(f"{path}: holds {size // 4:,} tokens ({size:,} bytes) but its sidecar says "
             f"{meta['num_tokens']:,}; the pair is out of step, run `llm tokenize` again")
    return np.memmap(path, dtype="<u4", mode="r")


def short_corpus_warning(meta: dict, context_length: int) -> str | None:
    """A warning when a split holds less than one context window (+1 for the targets)."""
    need = context_length + 1
    train = meta["val_start"]
    val = meta["num_tokens"] - train
    short_val = meta["val_fraction"] > 0 and val < need
    if train >= need and not short_val:
        return None
    which = ("the corpus is shorter than one context window" if train < need else
             "the validation split is shorter than one context window")
    fix = "add text, lower val_fraction" if train < need else "add text, raise val_fraction"
    return (f"{which}: {train:,} training and {val:,} validation tokens, and a window needs "
            f"{need:,} ({context_length} + 1); {fix} or use a smaller model.context_length")


# ---------------------------------------------------------------------------------------------
# Cached token files for training


def ensure_tokens(source: Path | list[Path], tokenizer: str, val_fraction: float,
                  cache_dir: Path = Path("data")) -> Path:
    """A .tokens file for local text/JSON/directory sources, reused while it is up to date.

    An up-to-date token file is found by the one rule in `llmcli.data.token_cache` (what
    `llm tokenize SOURCE...` wrote, or this function's own cache); otherwise the sources are
    tokenized into `cache_dir/<name>.<tokenizer>.tokens`, several sources as one corpus. A
    different val_fraction only rewrites the sidecar, for a `.tokens` source too (a shard
    folder's split is fixed by its index: another one is refused), so the split is always
    the recipe's, which the checkpoint records.
    """
    sources = [Path(p) for p in (source if isinstance(source, list) else [source])]
    for path in sources:
        if not path.exists():
            fail(f"{path}: no such file or directory; check data.source")
    if any(p.name.endswith(".tokens") or is_shard_folder(p) for p in sources):
        if len(sources) > 1:
            fail(f"data.source: {', '.join(map(str, sources))}: a token file cannot be mixed "
                 "with other sources; tokenize them together with `llm tokenize A B -o X`")
        meta = read_sidecar(sources[0])
        if meta["tokenizer"] != tokenizer:
            fail(f"{sources[0]}: made with the {meta['tokenizer']} tokenizer, but "
                 f"data.tokenizer is {tokenizer}; set data.tokenizer={meta['tokenizer']} "
                 "or tokenize the text again")
        if meta["val_fraction"] != val_fraction:
            if is_shard_folder(sources[0]):
                fail(f"data.val_fraction {val_fraction}: {sources[0]} was split at "
                     f"val_fraction {meta['val_fraction']} by llm tokenize (its index.json); "
                     f"set data.val_fraction={meta['val_fraction']}, or tokenize again with "
                     f"--val-fraction {val_fraction}")
            _move_split(sources[0], meta, val_fraction, tokenizer)
        return sources[0]
    cached = find_tokens(sources, tokenizer, cache_dir)
    shown = ", ".join(map(str, sources))
    if cached is None:
        out = candidates(sources, tokenizer, cache_dir)[-1]
        info(f"tokenizing {shown} ({tokenizer}) into {out}")
        tokenize_files(sources, out, tokenizer, val_fraction)
        return out
    out, meta = cached.path, cached.meta
    if meta["val_fraction"] != val_fraction or cached.touched:
        _move_split(out, meta, val_fraction, tokenizer)
    info(f"using {out} (tokens of {shown}, up to date)")
    return out


def _move_split(path: Path, meta: dict, val_fraction: float, tokenizer: str) -> None:
    """Rewrite a token file's sidecar for another split: only the split moves."""
    meta["val_fraction"] = val_fraction
    meta["val_start"] = val_start(meta["num_tokens"], val_fraction)
    meta["compact_vocab_ids"] = compact_vocab_ids(path, meta["val_start"],
                                                  get_tokenizer(tokenizer))
    write_json(sidecar_path(path), meta)


def data_bytes(meta: dict) -> int:
    """Bytes of text behind a token file (for bytes/token and MB/s): the UTF-8 text tokenized;
    for sidecars written before that was recorded, the size of the source files."""
    if isinstance(meta.get("text_bytes"), int):
        return meta["text_bytes"]
    return sum(int(s.get("bytes", 0)) for s in meta.get("sources", []))


# ---------------------------------------------------------------------------------------------
# Web-scale corpora: text records, several worker processes, sharded output


def _stream_jobs(path: Path, text_field: str, reading: _Reading, source: _Source, block: int,
                 on_bytes: Callable[[int], None]) -> Iterator[_Job]:
    """Text records, one document each, in jobs of about `block` characters (flat memory)."""
    batch: list[str] = []
    size = 0
    for text in iter_texts(path, text_field, on_bytes):
        batch.append(text)
        size += len(text)
        reading.documents += 1
        if size >= block:
            yield _Job(batch, new_document=True)
            batch, size = [], 0
    if batch:
        yield _Job(batch, new_document=True)
    source.sha256 = sha256_file(path)


MAX_SIDECAR = 1 << 26  # a sidecar lists its sources: 64 MiB is millions of them


def check_replaceable(target: Path, inputs: list[Path]) -> None:
    """Refuse, before any work, to write a token file and sidecar over what is not an earlier
    pair of `llm tokenize`'s: one of the inputs (under any name: samefile), or any other file
    (one with no llmcli-tokens sidecar). Replacing is only ever regenerating."""
    side = sidecar_path(target)
    for path in (target, side):
        for source in inputs:
            with contextlib.suppress(OSError):  # a missing output is no input
                if os.path.samefile(path, source):
                    fail(f"{path}: is the input {source}; writing the tokens there would "
                         "destroy it: choose another -o")
    if _is_sidecar(side):
        return
    keep = "it is not replaced: remove it or choose another -o"
    if side.exists() or side.is_symlink():
        fail(f"{side}: exists and is not a sidecar written by llm tokenize (no format "
             f"{FORMAT}); {keep}")
    if target.exists() or target.is_symlink():
        fail(f"{target}: exists and is not a token file written by llm tokenize (no sidecar "
             f"{side.name} beside it); {keep}")


def _is_sidecar(path: Path) -> bool:
    if not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_SIDECAR:
        return False
    meta = read_json_object(path)
    return meta is not None and meta.get("format") == FORMAT


class _FileSink:
    """One .tokens file, staged in `tmp` beside its target and published with its sidecar by
    `finish`; fed like a `ShardWriter`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._atomic = atomic_path(path)
        self.tmp = self._atomic.__enter__()
        self._fh = open(self.tmp, "wb", buffering=BLOCK)  # noqa: SIM115 - closed in finish

    def __enter__(self) -> _FileSink:
        return self

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        if kind is not None and self.tmp.exists():  # failed before `finish` published it
            with contextlib.suppress(OSError):  # closing flushes: fails again on a full disk
                self._fh.close()
            self._atomic.__exit__(kind, value, tb)  # removes tmp; names a full disk's file

    def write(self, ids: np.ndarray) -> None:
        self._fh.write(np.ascontiguousarray(ids, dtype="<u4").data)

    def _close(self) -> None:
        self._fh.close()

    def finish(self, meta: dict) -> dict:
        """Replace the token file and its sidecar as a pair. The old sidecar goes first: even a
        crash between the two renames leaves a token file without one (named as missing when
        read), never one whose sidecar describes other tokens."""
        self._close()
        side = sidecar_path(self.path)
        with interrupts_held():
            side.unlink(missing_ok=True)
            self._atomic.__exit__(None, None, None)
            write_json(side, meta)
        return meta


def _tokenize_part(job: tuple[str, str, str, int, str, str]) -> dict:
    """One input file → a temporary token file (worker process): its documents separated by
    end-of-text, none before the first, exactly as `tokenize_files` writes them."""
    path, tokenizer, errors, block, text_field, part = job
    try:
        tok = get_tokenizer(tokenizer)
        lead, between = (mark.astype("<u4") for mark in document_marks(tok))
        reading = _Reading()
        counts = {"tokens": 0, "documents": 0}
        with open(part, "wb", buffering=BLOCK) as fh:
            def emit(new_document: bool, ids: np.ndarray) -> None:
                if new_document:
                    mark = between if counts["documents"] else lead
                    fh.write(mark.data)
                    counts["tokens"] += len(mark)
                    counts["documents"] += 1
                fh.write(np.ascontiguousarray(ids, dtype="<u4").data)
                counts["tokens"] += len(ids)

            jobs = _jobs([Path(path)], errors, reading, block, lambda _n: None, text_field)
            _encode_all(jobs, tok, emit, 1)
    except UserError as exc:  # sent back as data: the parent fails with the same line
        return {"part": part, "error": str(exc), "exit_code": exc.exit_code}
    s = reading.sources[0]
    return {"part": part, "tokens": counts["tokens"], "documents": reading.documents,
            "text_bytes": reading.text_bytes,
            "source": {"path": str(s.path), "sha256": s.sha256, "bytes": s.size,
                       "mtime_ns": s.mtime_ns}}


def _pool(workers: int) -> Any:
    import multiprocessing
    import sys

    methods = multiprocessing.get_all_start_methods()
    method = "fork" if sys.platform == "linux" and "fork" in methods else "spawn"
    return multiprocessing.get_context(method).Pool(workers, initializer=_ignore_interrupts)


def _ignore_interrupts() -> None:
    """Ctrl-C reaches the whole process group: the parent answers it (removing its temporary
    files, ending the pool); a worker that also raised would print its own traceback. SIGTERM,
    which ends the pool, ends a worker whatever handler it inherited from the parent (one that
    only takes note would leave the pool's end waiting on it for ever)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _read_part(path: Path, chunk: int = 1 << 20) -> Iterator[np.ndarray]:
    with open(path, "rb") as fh:
        while True:
            ids = np.fromfile(fh, dtype="<u4", count=chunk)
            if not len(ids):
                return
            yield ids


def tokenize_files(
    inputs: list[Path],
    out: Path,
    tokenizer: str = "cl100k_base",
    val_fraction: float = 0.1,
    errors: str = "strict",
    *,
    shard_tokens: int | None = None,
    workers: int = 1,
    text_field: str = "text",
    threads: int | None = None,
    block: int = BLOCK,
) -> dict:
    """Tokenize `inputs` into `out` (a .tokens path) and its sidecar; returns the sidecar.

    Inputs are .txt files (any other extension is read as UTF-8 text too), .json/.jsonl
    Alpaca records (one document per record), text records (.jsonl, .jsonl.gz, .jsonl.zst,
    .parquet: `text_field` of each record, see `llmcli.data.readers`) and directories of them.
    The token file and its sidecar are replaced together, with interrupts held off meanwhile:
    an error or Ctrl-C leaves the previous pair untouched, never a new file beside an old one.

    - `shard_tokens`: write `out` as a folder `NAME.tokens/` of shards of that many tokens with
      one `index.json` (`llmcli.data.shards`); their concatenation is the single file.
    - `workers` > 1: that many processes, one input file at a time each (many files: FineWeb's
      or C4's shards); each writes its file's tokens to a temporary part, and the parts are
      appended in input order, so the output is the same as with one worker. One file gains
      nothing (its blocks are encoded on threads already).

    Memory stays flat: texts stream through each worker, parts stream into the output.
    """
    if errors not in ERRORS:
        fail(f"--errors {errors!r}: choose {' or '.join(ERRORS)}")
    if not 0 <= val_fraction < 1:
        fail(f"val_fraction {val_fraction}: must be in [0, 1) (0.1 keeps the last 10% for "
             "validation)")
    files = expand_inputs(inputs)
    tok = get_tokenizer(tokenizer)
    workers = max(1, min(int(workers), len(files)))
    counter = _Counter(tok.n_vocab)
    lead, between = document_marks(tok)
    total_bytes = sum(p.stat().st_size for p in files)
    if shard_tokens is not None:
        target = shard_folder_path(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        sink: Any = ShardWriter(target, shard_tokens)
    else:
        target = Path(out)
        if not target.name.endswith(".tokens"):
            target = target.with_name(target.name + ".tokens")
        check_replaceable(target, files)
        sink = _FileSink(target)
    sources: list[dict] = []
    documents = text_bytes = 0
    pool = _pool(workers) if workers > 1 else None  # forked before the progress thread starts
    tag = uuid.uuid4().hex[:8]
    parts = [target.parent / f".{target.name}.part-{i:06d}.{tag}.tmp" for i in range(len(files))]
    try:
        with sink, byte_progress() as bar:
            task = bar.add_task(f"tokenizing ({tok.name}, {workers} worker(s))",
                                total=total_bytes)

            def put(ids: np.ndarray) -> None:
                counter.add(ids)
                sink.write(ids)

            if pool is None:
                reading = _Reading()
                written = {"documents": 0}

                def emit(new_document: bool, ids: np.ndarray) -> None:
                    if new_document:
                        mark = between if written["documents"] else lead
                        if len(mark):
                            put(mark)
                        written["documents"] += 1
                    put(ids)

                jobs = _jobs(files, errors, reading, block, lambda n: bar.advance(task, n),
                             text_field)
                _encode_all(jobs, tok, emit, threads or cpu_threads())
                documents, text_bytes = reading.documents, reading.text_bytes
                sources = [{"path": str(s.path), "sha256": s.sha256, "bytes": s.size,
                            "mtime_ns": s.mtime_ns} for s in reading.sources]
            else:
                jobs_args = [(str(f), tok.name, errors, block, text_field, str(part))
                             for f, part in zip(files, parts, strict=True)]
                for path, result in zip(files, pool.imap(_tokenize_part, jobs_args),
                                        strict=True):
                    part = Path(result["part"])
                    if "error" in result:
                        fail(result["error"], result["exit_code"])
                    if result["tokens"]:
                        if counter.count and len(between) > len(lead):  # the part has `lead`
                            put(between[:len(between) - len(lead)])
                        for ids in _read_part(part):
                            put(ids)
                    elif len(files) > 1:
                        warn(f"{path}: empty, skipped")
                    part.unlink(missing_ok=True)
                    sources.append(result["source"])
                    documents += result["documents"]
                    text_bytes += result["text_bytes"]
                    bar.advance(task, result["source"]["bytes"])
            if counter.count == 0:
                fail(f"{', '.join(str(p) for p in files)}: no text to tokenize (the corpus is "
                     "empty); give files that contain text")
            start = val_start(counter.count, val_fraction)
            meta = {
                "format": FORMAT, "tokenizer": tok.name, "vocab_size": tok.n_vocab,
                "dtype": "uint32", "num_tokens": counter.count, "max_id": counter.max_id,
                "distinct_ids": int(counter.seen.sum()), "eot_id": tok.eot_id,
                "val_fraction": val_fraction, "val_start": start, "documents": documents,
                "text_bytes": text_bytes, "text_field": text_field, "sources": sources,
            }
            if tok.start_ids:  # what each document begins with (the cache checks it)
                meta["start_ids"] = list(tok.start_ids)
            sink._close()
            if shard_tokens is None:
                meta["compact_vocab_ids"] = compact_vocab_ids(sink.tmp, start, tok)
                return sink.finish(meta)
            from llmcli.data.shards import ShardedTokens
            from llmcli.data.vocab import compact_vocab

            arrays = [np.memmap(sink.tmp / s["name"], dtype="<u4", mode="r")
                      for s in sink.shards]
            head = ShardedTokens(arrays).head(start)  # read in chunks: flat memory
            meta["compact_vocab_ids"] = len(compact_vocab(head, tok).ids)
            del arrays
            return sink.finish(meta)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        for part in parts:
            part.unlink(missing_ok=True)
