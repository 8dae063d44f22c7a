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

import hashlib
import json
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmcli.console import byte_progress, fail, info, warn
from llmcli.data.records import read_records, record_problem, record_text
from llmcli.data.token_cache import (
    TOKENS_FORMAT,
    candidates,
    expand_inputs,
    find_tokens,
    sidecar_path,
)
from llmcli.data.tokenizer import Tokenizer, cpu_threads, get_tokenizer
from llmcli.files import atomic_path, sha256_file, write_json

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


def find_cut(buf: bytes, start: int = 0) -> int:
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


def _text_jobs(path: Path, errors: str, reading: _Reading, source: _Source, block: int,
               on_bytes: Callable[[int], None]) -> Iterator[_Job]:
    digest = hashlib.sha256()
    pending = b""
    offset = 0  # file offset of the next piece, for error messages
    lines = 0  # newlines before it
    with open(path, "rb") as fh:
        while True:
            data = fh.read(block)
            if data:
                digest.update(data)
                on_bytes(len(data))
                buf = pending + data
                # pending held no cut; its last two bytes could not be judged without `data`
                cut = find_cut(buf, max(0, len(pending) - 2))
                if cut < 0:
                    pending = buf
                    continue
                piece, pending = buf[:cut], buf[cut:]
            else:
                piece, pending = pending, b""
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


def _decode(piece: bytes, path: Path, errors: str, offset: int, lines: int) -> str:
    try:
        return piece.decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        line = lines + piece.count(b"\n", 0, exc.start) + 1
        bad = piece[exc.start:exc.end].hex(" ")
        fail(f"{path}: line {line} (byte {offset + exc.start}): not UTF-8 (bytes {bad}); "
             "convert the file to UTF-8, or pass --errors replace to substitute U+FFFD")


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
    if not texts:
        fail(f"{path}: no usable records (objects with string 'instruction' and 'output'); "
             "check the file's layout")
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
          on_bytes: Callable[[int], None]) -> Iterator[_Job]:
    for path in files:
        stat = path.stat()
        source = _Source(path.resolve(), stat.st_size, stat.st_mtime_ns)
        reading.sources.append(source)
        if path.suffix.lower() in RECORD_EXTENSIONS:
            yield from _record_jobs(path, reading, source, block, on_bytes)
        else:
            yield from _text_jobs(path, errors, reading, source, block, on_bytes)
            if not source.started and len(files) > 1:
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


def _encoder(tok: Tokenizer) -> Callable[[_Job], np.ndarray]:
    eot = np.array([tok.eot_id], dtype=np.uint32)

    def encode(job: _Job) -> np.ndarray:
        if isinstance(job.text, str):
            return tok.encode_array(job.text)
        parts: list[np.ndarray] = []
        for i, text in enumerate(job.text):
            if i:
                parts.append(eot)
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


def tokenize_files(
    inputs: list[Path],
    out: Path,
    tokenizer: str = "cl100k_base",
    val_fraction: float = 0.1,
    errors: str = "strict",
    *,
    threads: int | None = None,
    block: int = BLOCK,
) -> dict:
    """Tokenize `inputs` into `out` (a .tokens path) and its sidecar; returns the sidecar.

    Inputs are .txt files (any other extension is read as UTF-8 text too), .json/.jsonl
    Alpaca records (one document per record) and directories of .txt files. Both files are
    written atomically: an error or interrupt leaves the previous ones untouched.
    """
    if errors not in ERRORS:
        fail(f"--errors {errors!r}: choose {' or '.join(ERRORS)}")
    if not 0 <= val_fraction < 1:
        fail(f"val_fraction {val_fraction}: must be in [0, 1) (0.1 keeps the last 10% for "
             "validation)")
    out = Path(out)
    if not out.name.endswith(".tokens"):
        out = out.with_name(out.name + ".tokens")
    files = expand_inputs(inputs)
    tok = get_tokenizer(tokenizer)
    reading = _Reading()
    counter = _Counter(tok.n_vocab)
    eot = np.array([tok.eot_id], dtype=np.uint32)
    total_bytes = sum(p.stat().st_size for p in files)

    with atomic_path(out) as tmp, open(tmp, "wb", buffering=BLOCK) as fh, \
            byte_progress() as bar:
        task = bar.add_task(f"tokenizing ({tok.name})", total=total_bytes)
        written_documents = 0

        def emit(new_document: bool, ids: np.ndarray) -> None:
            nonlocal written_documents
            if new_document:
                if written_documents:
                    fh.write(eot.data)
                    counter.add(eot)
                written_documents += 1
            fh.write(ids.astype("<u4", copy=False).data)
            counter.add(ids)

        def on_bytes(n: int) -> None:
            bar.advance(task, n)

        jobs = _jobs(files, errors, reading, block, on_bytes)
        _encode_all(jobs, tok, emit, threads or cpu_threads())
        if counter.count == 0:
            fail(f"{', '.join(str(p) for p in files)}: no text to tokenize (the corpus is "
                 "empty); give files that contain text")
        fh.flush()

    meta = {
        "format": FORMAT,
        "tokenizer": tok.name,
        "vocab_size": tok.n_vocab,
        "dtype": "uint32",
        "num_tokens": counter.count,
        "max_id": counter.max_id,
        "distinct_ids": int(counter.seen.sum()),
        "eot_id": tok.eot_id,
        "val_fraction": val_fraction,
        "val_start": val_start(counter.count, val_fraction),
        "train_distinct_ids": train_distinct_ids(out, val_start(counter.count, val_fraction)),
        "documents": reading.documents,
        "sources": [
            {"path": str(s.path), "sha256": s.sha256, "bytes": s.size, "mtime_ns": s.mtime_ns}
            for s in reading.sources
        ],
    }
    write_json(sidecar_path(out), meta)
    return meta


def train_distinct_ids(path: Path, end: int, chunk: int = 1 << 22) -> int:
    """Distinct ids before `end`: the size of a compact vocabulary (less its unknown id),
    which is built from the training part only. Chunked: memory stays flat."""
    tokens = np.memmap(path, dtype="<u4", mode="r") if Path(path).stat().st_size else []
    seen = np.zeros(0, dtype=bool)
    for lo in range(0, end, chunk):
        part = np.asarray(tokens[lo:min(end, lo + chunk)])
        if part.size and int(part.max()) >= seen.size:
            seen = np.concatenate([seen, np.zeros(int(part.max()) + 1 - seen.size, dtype=bool)])
        seen[part] = True
    return int(seen.sum())


def val_start(num_tokens: int, val_fraction: float) -> int:
    """Where validation begins: the seed's `int(len(data) * 0.9)` for val_fraction 0.1."""
    return int(num_tokens * (1 - val_fraction))


def head_tokens(inputs: list[Path], n: int, tokenizer: str = "cl100k_base",
                errors: str = "strict") -> list[int]:
    """The first `n` tokens `tokenize_files` would write, reading only as much as needed."""
    tok = get_tokenizer(tokenizer)
    encode = _encoder(tok)
    ids: list[int] = []
    block = max(4096, 8 * n)
    for job in _jobs(expand_inputs(inputs), errors, _Reading(), block, lambda _n: None):
        if job.new_document and ids:
            ids.append(tok.eot_id)
        ids.extend(int(i) for i in encode(job))
        if len(ids) >= n:
            break
    return ids[:n]


# ---------------------------------------------------------------------------------------------
# Reading token files


REQUIRED = {"tokenizer": str, "vocab_size": int, "num_tokens": int, "max_id": int,
            "val_fraction": (int, float), "val_start": int, "sources": list}


def read_sidecar(path: Path) -> dict:
    """The sidecar of a token file (`X.tokens` or `X.tokens.json`), checked; one-line errors."""
    path = Path(path)
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
    return meta


def open_tokens(path: Path) -> np.memmap:
    """A token file as a read-only uint32 memory map, checked against its sidecar."""
    path = Path(path)
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
    if train < need or (meta["val_fraction"] > 0 and val < need):
        return (f"the corpus is shorter than one context window: {train:,} training and "
                f"{val:,} validation tokens, and a window needs {need:,} ({context_length} "
                "+ 1); add text, lower val_fraction or use a smaller model.context_length")
    return None


# ---------------------------------------------------------------------------------------------
# Cached token files for training


def ensure_tokens(source: Path, tokenizer: str, val_fraction: float,
                  cache_dir: Path = Path("data")) -> Path:
    """A .tokens file for a local text/JSON/directory source, reused while it is up to date.

    An up-to-date token file is found by the one rule in `llmcli.data.token_cache` (what
    `llm tokenize SOURCE` wrote, or this function's own cache); otherwise the source is
    tokenized into `cache_dir/<name>.<tokenizer>.tokens`. A different val_fraction only rewrites
    the sidecar. A `.tokens` source is used as it is.
    """
    source = Path(source)
    if not source.exists():
        fail(f"{source}: no such file or directory; check data.source")
    if source.name.endswith(".tokens"):
        meta = read_sidecar(source)
        if meta["tokenizer"] != tokenizer:
            fail(f"{source}: made with the {meta['tokenizer']} tokenizer, but "
                 f"data.tokenizer is {tokenizer}; set data.tokenizer={meta['tokenizer']} "
                 "or tokenize the text again")
        return source
    cached = find_tokens(source, tokenizer, cache_dir)
    if cached is None:
        out = candidates(source, tokenizer, cache_dir)[-1]
        info(f"tokenizing {source} ({tokenizer}) into {out}")
        tokenize_files([source], out, tokenizer, val_fraction)
        return out
    out, meta = cached.path, cached.meta
    if meta["val_fraction"] != val_fraction or cached.touched:
        meta["val_fraction"] = val_fraction
        meta["val_start"] = val_start(meta["num_tokens"], val_fraction)
        meta["train_distinct_ids"] = train_distinct_ids(out, meta["val_start"])
        write_json(sidecar_path(out), meta)
    info(f"using {out} (tokens of {source}, up to date)")
    return out


def data_bytes(meta: dict) -> int:
    """Bytes of text behind a token file (for bytes/token and MB/s)."""
    return sum(int(s.get("bytes", 0)) for s in meta.get("sources", []))
