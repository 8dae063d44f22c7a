"""Sharded token corpora: a folder of token files with one index, read as one token stream.

Layout (`llm tokenize ... --shard-tokens N -o NAME` writes `NAME.tokens/`):

    NAME.tokens/index.json          format llmcli-shards/1: tokenizer, vocabulary size, counts,
                                    the validation rule, and every shard with its token count
                                    and SHA-256, in order
    NAME.tokens/shard-00000.tokens  little-endian uint32 ids, N per shard (the last: the rest)
    NAME.tokens/shard-00001.tokens  ...

The shards are one token stream cut every N tokens (documents separated by end-of-text as in a
single file), so their concatenation is byte for byte the `.tokens` file the same inputs give
without `--shard-tokens`. The validation split is the same too: the last `val_fraction` of the
stream (`val_start` counts from the first token of shard 0), which is the tail of the last
shard(s).

Training opens every shard memory-mapped (`ShardedTokens`) and samples windows from the whole
stream, so every rank draws from all shards, windows may run across a shard boundary exactly
as they run across a document boundary in one file, and sampling a sharded corpus is sampling
the single file: same seed, same batches, exact resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from llmcli.console import DiskFull, disk_full, fail
from llmcli.data.token_cache import SHARD_INDEX as INDEX_NAME
from llmcli.data.token_cache import description_problem
from llmcli.files import replace_folder

INDEX_FORMAT = "llmcli-shards/1"
SHARD_NAME = "shard-{:05d}.tokens"
VAL_RULE = ("the last val_fraction of the tokens of all shards in order: val_start counts from "
            "the first token of shard 0")
MIN_SHARD_TOKENS = 1024
MAX_SHARDS = 1_000_000


def is_shard_folder(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / INDEX_NAME).is_file()


def shard_folder_path(out: Path) -> Path:
    """Where `-o out` puts a sharded corpus: `out` itself when it ends in .tokens, else
    `out.tokens`."""
    out = Path(out)
    return out if out.name.endswith(".tokens") else out.with_name(out.name + ".tokens")


class ShardWriter:
    """Token ids in, shards of `shard_tokens` ids out, written into a hidden folder beside the
    target and moved into place by `finish`: an error or interrupt leaves the old corpus."""

    def __init__(self, folder: Path, shard_tokens: int) -> None:
        if shard_tokens < MIN_SHARD_TOKENS:
            fail(f"--shard-tokens {shard_tokens:,}: at least {MIN_SHARD_TOKENS:,} tokens per "
                 "shard (typical: 100M-1B)")
        self.folder = Path(folder)
        self.shard_tokens = int(shard_tokens)
        self.tmp = self.folder.with_name(f".{self.folder.name}.{uuid.uuid4().hex[:8]}.tmp")
        self.tmp.mkdir(parents=True)
        self.shards: list[dict[str, Any]] = []
        self._fh: Any = None
        self._digest: Any = None
        self._count = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        if kind is not None:
            self.abort()
            if disk_full(value):  # named after the corpus, not the hidden folder just removed
                raise DiskFull(self.folder) from None

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids).astype("<u4", copy=False)
        while len(ids):
            if self._fh is None:
                self._open()
            room = self.shard_tokens - self._count
            part, ids = ids[:room], ids[room:]
            data = np.ascontiguousarray(part).data
            self._fh.write(data)
            self._digest.update(data)
            self._count += len(part)
            if self._count == self.shard_tokens:
                self._close()

    def _open(self) -> None:
        if len(self.shards) >= MAX_SHARDS:
            fail(f"more than {MAX_SHARDS:,} shards: raise --shard-tokens")
        name = SHARD_NAME.format(len(self.shards))
        self._fh = open(self.tmp / name, "wb", buffering=1 << 20)  # noqa: SIM115
        self._digest = hashlib.sha256()
        self._count = 0
        self.shards.append({"name": name, "tokens": 0, "sha256": ""})

    def _close(self) -> None:
        if self._fh is None:
            return
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self.shards[-1].update(tokens=self._count, sha256=self._digest.hexdigest())
        self._fh = None

    def finish(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Write index.json (`meta` + format + shards) and move the folder into place."""
        self._close()
        index = {**meta, "format": INDEX_FORMAT, "shard_tokens": self.shard_tokens,
                 "val_rule": VAL_RULE, "shards": self.shards}
        (self.tmp / INDEX_NAME).write_text(json.dumps(index, indent=1), encoding="utf-8")
        if (self.folder.exists() or self.folder.is_symlink()) and not is_shard_folder(self.folder):
            self.abort()
            fail(f"{self.folder}: exists and is not a sharded corpus; choose another -o")
        replace_folder(self.tmp, self.folder)  # never a moment without a corpus under the name
        return index

    def abort(self) -> None:
        fh, self._fh = self._fh, None
        with contextlib.suppress(OSError):  # closing flushes: fails again on a full disk
            if fh is not None:
                fh.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


REQUIRED = {"tokenizer": str, "vocab_size": int, "num_tokens": int, "max_id": int,
            "val_fraction": (int, float), "val_start": int, "sources": list, "shards": list}


def read_index(folder: Path) -> dict[str, Any]:
    """A sharded corpus's index, checked (one-line errors naming the file)."""
    path = Path(folder) / INDEX_NAME
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        fail(f"{folder}: no {INDEX_NAME}; a sharded corpus is the folder `llm tokenize "
             "--shard-tokens` writes")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail(f"{path}: corrupt index ({exc}); run `llm tokenize` again")
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        fail(f"{path}: not a shard index (format {found!r}, expected {INDEX_FORMAT!r})")
    for key, kind in REQUIRED.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            fail(f"{path}: corrupt index (field '{key}' missing or wrong type); run "
                 "`llm tokenize` again")
    total = 0
    for i, shard in enumerate(meta["shards"]):
        name = shard.get("name") if isinstance(shard, dict) else None
        tokens = shard.get("tokens") if isinstance(shard, dict) else None
        if (not isinstance(name, str) or Path(name).name != name or not name.endswith(".tokens")
                or not isinstance(tokens, int) or tokens <= 0):
            fail(f"{path}: corrupt index (shard {i}); run `llm tokenize` again")
        total += tokens
    if not meta["shards"]:
        fail(f"{path}: corrupt index (no shards listed); run `llm tokenize` again")
    if total != meta["num_tokens"]:
        fail(f"{path}: its shards hold {total:,} tokens but it says {meta['num_tokens']:,}; "
             "run `llm tokenize` again")
    problem = description_problem(meta)
    if problem:
        fail(f"{path}: corrupt index ({problem}); run `llm tokenize` again")
    return meta


def open_shards(folder: Path, verify: bool = False) -> ShardedTokens:
    """Every shard memory-mapped read-only, checked against the index (sizes; with `verify`,
    SHA-256 too)."""
    folder = Path(folder)
    meta = read_index(folder)
    arrays = []
    for shard in meta["shards"]:
        path = folder / shard["name"]
        if not path.is_file():
            fail(f"{path}: missing shard of {folder}; copy the whole folder or run "
                 "`llm tokenize` again")
        size = path.stat().st_size
        if size != 4 * shard["tokens"]:
            fail(f"{path}: holds {size // 4:,} tokens but {INDEX_NAME} says "
                 f"{shard['tokens']:,}; the shard is damaged, run `llm tokenize` again")
        if verify:
            from llmcli.files import sha256_file

            if sha256_file(path) != shard.get("sha256"):
                fail(f"{path}: SHA-256 differs from {INDEX_NAME}; the shard is damaged")
        arrays.append(np.memmap(path, dtype="<u4", mode="r"))
    return ShardedTokens(arrays)


class ShardedTokens:
    """Several 1-D token arrays read as their concatenation: `len`, slices (views) and
    integer-array indexing (a gather, shard by shard), what `TokenWindows`, the compact
    vocabulary and the unknown-id count need; `np.asarray` gives the concatenation."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        if not arrays:
            raise ValueError("no shards")
        self.arrays = arrays
        self.starts = np.cumsum([0, *(len(a) for a in arrays)]).astype(np.int64)
        self.dtype = arrays[0].dtype

    def __len__(self) -> int:
        return int(self.starts[-1])

    def head(self, n: int) -> ShardedTokens:
        """The first `n` tokens, still as shards (views: nothing is read or copied)."""
        arrays = []
        for s, array in enumerate(self.arrays):
            lo = int(self.starts[s])
            if lo >= n:
                break
            arrays.append(array[:n - lo])
        return ShardedTokens(arrays or [self.arrays[0][:0]])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            return self._slice(key)
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"token {key} out of range for {len(self)} tokens")
            s = int(np.searchsorted(self.starts, i, side="right")) - 1
            return self.arrays[s][i - self.starts[s]]
        index = np.asarray(key, dtype=np.int64)
        which = np.searchsorted(self.starts, index, side="right") - 1
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"token index out of range for {len(self)} tokens")
        first = int(which.flat[0]) if index.size else 0
        if index.size == 0 or bool((which == first).all()):  # the usual case: one shard
            return self.arrays[first][index - self.starts[first]]
        out = np.empty(index.shape, dtype=self.dtype)
        for s in np.unique(which):
            mask = which == s
            out[mask] = self.arrays[s][index[mask] - self.starts[s]]
        return out

    def _slice(self, key: slice) -> Any:
        """A view: the memmap slice when it lies in one shard, else a `ShardedTokens` of the
        pieces (nothing is read until used; `np.asarray` concatenates)."""
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("sharded tokens: slices with a step are not supported")
        parts = []
        for s, array in enumerate(self.arrays):
            lo, hi = int(self.starts[s]), int(self.starts[s + 1])
            if hi <= start or lo >= stop:
                continue
            parts.append(array[max(start, lo) - lo:min(stop, hi) - lo])
        if not parts:
            return np.zeros(0, dtype=self.dtype)
        return parts[0] if len(parts) == 1 else ShardedTokens(parts)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = np.concatenate(self.arrays)
        return whole if dtype is None else whole.astype(dtype)
