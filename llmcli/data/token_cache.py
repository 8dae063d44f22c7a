"""Which token file already holds a corpus: the one rule training, `params` and `scaling` share.

A token file holds a source when its sidecar names the same tokenizer and the same source files
with the same sizes and modification times (or, when only the time changed, the same SHA-256),
and the file is as long as the sidecar says. Two places are looked at for a source NAME:
`data/NAME.tokens` (what `llm tokenize NAME.txt` writes) and `data/NAME.<tokenizer>.tokens`
(where training caches what it tokenizes itself).

Pure Python (json and hashlib): `llm scaling` and `llm params` use it without numpy.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmcli.console import check_readable, fail
from llmcli.files import sha256_file

TOKENS_FORMAT = "llmcli-tokens/1"
SHARD_INDEX = "index.json"  # a sharded corpus is a folder NAME.tokens/ with this index


def description_problem(meta: dict[str, Any]) -> str | None:
    """Numbers a token file's sidecar (or a shard folder's index), its fields' types checked,
    cannot hold: a hand edit, caught before it sizes an allocation (max_id) or a split."""
    count, start, largest = meta["num_tokens"], meta["val_start"], meta["max_id"]
    n_vocab = meta["vocab_size"]  # the tokenizer's, when it wrote the file
    if count < 0 or not 0 <= start <= count:
        return f"val_start {start:,} is outside its {count:,} tokens"
    if not 0 <= meta["val_fraction"] < 1:
        return f"val_fraction {meta['val_fraction']} is outside [0, 1)"
    if largest < -1:
        return f"max_id {largest:,} is negative"
    if largest >= n_vocab:
        return (f"max_id {largest:,} is beyond the {n_vocab:,} ids of its tokenizer "
                f"({meta['tokenizer']})")
    return None


def sidecar_path(tokens: Path) -> Path:
    return Path(tokens).with_name(Path(tokens).name + ".json")


def description_path(tokens: Path) -> Path:
    """The JSON describing a token file (its sidecar) or a shard folder (its index)."""
    tokens = Path(tokens)
    return tokens / SHARD_INDEX if tokens.is_dir() else sidecar_path(tokens)


def expand_inputs(inputs: Iterable[Path]) -> list[Path]:
    """Files to read, in order: a directory gives its .txt files (sorted, recursively), or,
    holding none, its text-record files (.jsonl, .jsonl.gz, .jsonl.zst, .parquet: a downloaded
    FineWeb or C4 folder). `llm tokenize` and the cache lookup share it, so a token file is
    found for every source it can be made from."""
    from llmcli.data.readers import stream_kind

    files: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        check_readable(path)  # a FIFO, a device, no permission: refused before it is opened
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                found = sorted(p for p in path.rglob("*") if p.is_file() and stream_kind(p))
            if not found:
                fail(f"{path}: directory holds no .txt, .jsonl, .jsonl.gz, .jsonl.zst or "
                     ".parquet files; put the corpus in such files or name the files directly")
            _warn_skipped(path, found)
            files.extend(found)
        elif path.is_file():
            if path.name.endswith(".tokens"):
                fail(f"{path}: is already a token file; give the text it was made from, or use "
                     "it directly as data.source")
            files.append(path)
        else:
            fail(f"{path}: no such file or directory; check the path (`llm fetch --list` shows "
                 "the downloadable corpora)")
    if not files:
        fail("no input files; give one or more text, .json/.jsonl files or directories")
    return files


# Folders whose skipped files were named already: tokenize and the cache lookup list a folder
# more than once in one command, and it is said once
_SKIPS_SAID: set[Path] = set()
SKIPS_SHOWN = 5  # skipped files named in the warning; the rest are counted


def _warn_skipped(folder: Path, found: list[Path]) -> None:
    """One line naming the files of `folder` that expand_inputs leaves out, and why: a file
    dropped without a word is a corpus that silently lacks part of its text."""
    from llmcli.console import warn
    from llmcli.data.fetch import SOURCE_SUFFIX

    if folder.resolve() in _SKIPS_SAID:
        return
    _SKIPS_SAID.add(folder.resolve())
    taken = set(found)
    skipped = [(p, _skip_reason(p, found)) for p in sorted(folder.rglob("*"))
               if p not in taken and (p.is_file() or (p.is_symlink() and not p.exists()))
               and not p.name.endswith(SOURCE_SUFFIX)]  # llm fetch's record of a download
    if not skipped:
        return
    named = ", ".join(f"{p.relative_to(folder)}: {why}" for p, why in skipped[:SKIPS_SHOWN])
    more = f", and {len(skipped) - SKIPS_SHOWN} more" if len(skipped) > SKIPS_SHOWN else ""
    warn(f"{folder}/: skipped {len(skipped)} file(s) ({named}{more})")


def _skip_reason(path: Path, found: list[Path]) -> str:
    from llmcli.data.readers import stream_kind

    if path.is_symlink() and not path.exists():
        return "a broken link"
    if found[0].suffix == ".txt":
        if path.suffix.lower() == ".txt":
            return "not .txt (names are case-sensitive)"
        if stream_kind(path):
            return "folders are read for .txt when they hold any"
        return "not .txt"
    return "not .txt, .jsonl, .jsonl.gz, .jsonl.zst or .parquet"


def source_stem(path: Path) -> str:
    """A source's name without its file type: a folder's own name (`.` too), `x.txt` -> x,
    `x.jsonl.gz` -> x (not x.jsonl)."""
    path = Path(path)
    if path.is_dir():
        return path.resolve().name or "tokens"
    name = path.stem
    for suffix in (".jsonl", ".json"):
        if path.suffix in (".gz", ".zst") and name.endswith(suffix):
            name = name[: -len(suffix)]
    return name or "tokens"


def corpus_name(sources: Path | list[Path]) -> str:
    """The token file name of sources: their stems joined by '+' ('a+b'), or, when that would
    be long, the first one's, a count and a digest of the list."""
    sources = [Path(s) for s in (sources if isinstance(sources, list) else [sources])]
    name = "+".join(source_stem(s) for s in sources)
    if len(name) > 80:  # many sources: a short name that still tells them apart
        import hashlib

        digest = hashlib.sha256("\0".join(map(str, sources)).encode()).hexdigest()[:8]
        name = f"{source_stem(sources[0])[:40]}+{len(sources) - 1}-more-{digest}"
    return name


def candidates(sources: Path | list[Path], tokenizer: str, cache_dir: Path) -> list[Path]:
    """Where a token file of `sources` may already be, in the order they are preferred."""
    name = corpus_name(sources)
    return [Path(cache_dir) / f"{name}.tokens", Path(cache_dir) / f"{name}.{tokenizer}.tokens"]


@dataclass
class Cached:
    path: Path  # the .tokens file (or shard folder)
    meta: dict[str, Any]  # its sidecar (or index) (with refreshed mtimes when `touched`)
    touched: bool  # same bytes, newer modification times: the sidecar should be rewritten


def find_tokens(sources: Path | list[Path], tokenizer: str, cache_dir: Path) -> Cached | None:
    """The up-to-date token file of local text sources, or None; nothing is written."""
    listed = [Path(s) for s in (sources if isinstance(sources, list) else [sources])]
    if not all(s.exists() for s in listed):
        return None
    try:
        files = expand_inputs(listed)
    except Exception:  # noqa: BLE001 - a source we cannot list is simply not cached
        return None
    for path in candidates(listed, tokenizer, cache_dir):
        found = _describes(path, files, tokenizer)
        if found is not None:
            return found
    return None


def locate(source: str | list[str], tokenizer: str, data_dir: Path = Path("data")) -> Cached | None:
    """The token file already holding a recipe's `data.source`, without fetching, tokenizing
    or writing anything: a `.tokens` source itself (a file, or a shard folder with its index),
    else the one rule above (a preset counts once `llm fetch` has put its file in `data_dir`)."""
    from llmcli.data.fetch import PRESETS

    paths = []
    for item in source if isinstance(source, list) else [source]:
        path = Path(item)
        if item in PRESETS and not path.exists():
            path = Path(data_dir) / PRESETS[item].filename
        paths.append(path)
    if len(paths) == 1 and paths[0].name.endswith(".tokens"):
        path = paths[0]
        folder = path.is_dir() and (path / SHARD_INDEX).is_file()
        if not (path.is_file() or folder):
            return None
        meta = read_json_object(description_path(path))
        if meta is None:
            what = "shard folder without a readable index" if folder else (
                "token file without a readable sidecar")
            fail(f"{path}: {what} {description_path(path)}; re-run `llm tokenize` to rebuild it")
        return Cached(path, meta, False)
    return find_tokens(paths, tokenizer, data_dir)


def _describes(path: Path, files: list[Path], tokenizer: str) -> Cached | None:
    meta = read_json_object(sidecar_path(path))
    if meta is None or meta.get("format") != TOKENS_FORMAT or meta.get("tokenizer") != tokenizer:
        return None
    if not path.is_file() or path.stat().st_size != 4 * int(meta.get("num_tokens") or -1):
        return None
    if not _same_document_starts(meta, tokenizer):
        return None
    recorded = meta.get("sources")
    if not isinstance(recorded, list) or len(recorded) != len(files):
        return None
    touched = False
    for file, entry in zip(files, recorded, strict=True):
        stat = file.stat()
        if not isinstance(entry, dict) or entry.get("path") != str(file.resolve()):
            return None
        if entry.get("bytes") != stat.st_size:
            return None
        if entry.get("mtime_ns") != stat.st_mtime_ns:
            if entry.get("sha256") != sha256_file(file):
                return None
            entry["mtime_ns"] = stat.st_mtime_ns  # same bytes, newer time: remember it
            touched = True
    return Cached(path, meta, touched)


def _same_document_starts(meta: dict, tokenizer: str) -> bool:
    """Whether the token file's documents begin as the tokenizer's do now: files made before
    documents began with an imported tokenizer's BOS lack it (cl100k_base and bytes have none)."""
    if not tokenizer.startswith("hf-"):
        return True
    from llmcli.data.tokenizer import get_tokenizer

    try:
        return meta.get("start_ids", []) == list(get_tokenizer(tokenizer).start_ids)
    except Exception:  # noqa: BLE001 - a tokenizer we cannot load is refused where it is used
        return False


def read_json_object(path: Path) -> dict | None:
    """A JSON file holding an object, or None for anything else (missing, unreadable, other)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None
