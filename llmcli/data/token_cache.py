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

from llmcli.console import fail
from llmcli.files import sha256_file

TOKENS_FORMAT = "llmcli-tokens/1"


def sidecar_path(tokens: Path) -> Path:
    return Path(tokens).with_name(Path(tokens).name + ".json")


def expand_inputs(inputs: Iterable[Path]) -> list[Path]:
    """Files to read, in order: directories become their .txt files (sorted, recursively)."""
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                fail(f"{path}: directory holds no .txt files; put the corpus in .txt files "
                     "or name the files directly")
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


def candidates(source: Path, tokenizer: str, cache_dir: Path) -> list[Path]:
    """Where a token file of `source` may already be, in the order they are preferred."""
    name = source.name if source.is_dir() else source.stem
    return [Path(cache_dir) / f"{name}.tokens", Path(cache_dir) / f"{name}.{tokenizer}.tokens"]


@dataclass
class Cached:
    path: Path  # the .tokens file
    meta: dict[str, Any]  # its sidecar (with refreshed mtimes when `touched`)
    touched: bool  # same bytes, newer modification times: the sidecar should be rewritten


def find_tokens(source: Path, tokenizer: str, cache_dir: Path) -> Cached | None:
    """The up-to-date token file of a local text source, or None; nothing is written."""
    source = Path(source)
    if not source.exists():
        return None
    try:
        files = expand_inputs([source])
    except Exception:  # noqa: BLE001 - a source we cannot list is simply not cached
        return None
    for path in candidates(source, tokenizer, cache_dir):
        found = _describes(path, files, tokenizer)
        if found is not None:
            return found
    return None


def _describes(path: Path, files: list[Path], tokenizer: str) -> Cached | None:
    meta = _read_json(sidecar_path(path))
    if meta is None or meta.get("format") != TOKENS_FORMAT or meta.get("tokenizer") != tokenizer:
        return None
    if not path.is_file() or path.stat().st_size != 4 * int(meta.get("num_tokens") or -1):
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


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None
