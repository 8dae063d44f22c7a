"""Web-scale text inputs, streamed: `.jsonl`, `.jsonl.gz`, `.jsonl.zst` and `.parquet` files
whose records hold the text in one field (`text` in FineWeb, C4, The Pile, ...).

Each record is one document. Readers yield texts one record at a time (jsonl: one line at a
time through the decompressor; parquet: one record batch of one row group at a time), so
memory stays flat however large the file. pyarrow and zstandard are imported only when such a
file is read.

A plain `.jsonl` is either Alpaca instruction records (`instruction`/`output`, read by
`llmcli.data.records`) or text records: the first record decides (`jsonl_holds_text`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from llmcli.console import fail
from llmcli.data.records import json_kind

STREAM_SUFFIXES = (".jsonl.gz", ".jsonl.zst", ".parquet")  # always text records
PARQUET_BATCH = 1024  # rows per record batch: a few MB of text at web-page sizes


def stream_kind(path: Path) -> str | None:
    """'jsonl.gz', 'jsonl.zst', 'parquet' or 'jsonl' (any .jsonl-like name), else None."""
    name = Path(path).name.lower()
    for suffix in STREAM_SUFFIXES:
        if name.endswith(suffix):
            return suffix[1:]
    return "jsonl" if name.endswith(".jsonl") else None


def is_text_records(path: Path, text_field: str) -> bool:
    """Whether `path` is read as text records: compressed jsonl and parquet always; a plain
    .jsonl when its first record is not an Alpaca record but has `text_field`."""
    kind = stream_kind(path)
    if kind is None:
        return False
    return kind != "jsonl" or jsonl_holds_text(path, text_field)


def jsonl_holds_text(path: Path, text_field: str) -> bool:
    with open(path, "rb") as fh:
        for raw in fh:
            if raw.strip():
                try:
                    first = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return False  # the records reader names the problem
                if not isinstance(first, dict):
                    return False
                alpaca = "instruction" in first and "output" in first
                return not alpaca and text_field in first
    return False


def _open_binary(path: Path, kind: str, raw: IO[bytes]) -> IO[bytes]:
    """The decompressed byte stream of `raw` (the file itself for plain jsonl)."""
    if kind == "jsonl.gz":
        import gzip

        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if kind == "jsonl.zst":
        try:
            import zstandard
        except ImportError:
            fail(f"{path}: reading .zst needs the zstandard package: pip install zstandard")
        reader = zstandard.ZstdDecompressor().stream_reader(raw, closefd=False)
        return io.BufferedReader(reader)  # type: ignore[arg-type]
    return raw


class _Progress:
    """Compressed bytes read so far (the file position of the raw file), for progress bars."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.done = 0

    def advance(self) -> int:
        try:
            now = self.raw.tell()
        except (OSError, ValueError):
            return 0
        step, self.done = now - self.done, now
        return max(0, step)


def iter_texts(path: Path, text_field: str = "text",
               on_bytes: Any = None) -> Iterator[str]:
    """The `text_field` of every record of a jsonl / jsonl.gz / jsonl.zst / parquet file, in
    order. A record without the field (or with a non-string) is an error naming its line or
    row; empty texts are skipped. `on_bytes(n)` hears of the input bytes read."""
    path = Path(path)
    kind = stream_kind(path)
    if kind is None:
        fail(f"{path}: not a .jsonl, .jsonl.gz, .jsonl.zst or .parquet file")
    if kind == "parquet":
        yield from _parquet_texts(path, text_field, on_bytes)
        return
    with open(path, "rb") as raw, _open_binary(path, kind, raw) as fh:
        progress = _Progress(raw)
        for number, line in _lines(path, kind, fh):
            if number % 256 == 0 and on_bytes is not None:
                on_bytes(progress.advance())
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                fail(f"{path}: line {number}: not JSON ({exc}); each line must be one record")
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(record, dict):
                fail(f"{path}: line {number}: {json_kind(record)}, not a record "
                     f"(an object with a '{text_field}' field); each line must be one record")
            if text_field in record and not isinstance(text, str):
                fail(f"{path}: line {number}: field '{text_field}' holds "
                     f"{json_kind(text)}, not text; fix the record or drop it")
            if not isinstance(text, str):
                keys = ", ".join(list(record)[:8]) or "none"
                fail(f"{path}: line {number}: no field '{text_field}' (fields: {keys}); "
                     "name the text field with --text-field")
            if text:
                yield text
        if on_bytes is not None:
            on_bytes(progress.advance())


_BROKEN = {"jsonl.gz": "gzip", "jsonl.zst": "zstd"}


def _lines(path: Path, kind: str, fh: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """Numbered lines of the decompressed stream; a damaged or truncated .gz/.zst is one line
    naming the file (the decompressors raise their own exception types)."""
    lines = enumerate(fh, 1)
    while True:
        try:
            item = next(lines)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - gzip and zstandard raise their own kinds
            if kind not in _BROKEN:
                raise
            fail(f"{path}: not a valid {_BROKEN[kind]} file, or cut short "
                 f"({type(exc).__name__}: {exc}); download it again")
        yield item


def _parquet_texts(path: Path, text_field: str, on_bytes: Any) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        fail(f"{path}: reading .parquet needs the pyarrow package: pip install pyarrow")
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds
        fail(f"{path}: not a readable parquet file ({exc})")
    names = parquet.schema_arrow.names
    if text_field not in names:
        fail(f"{path}: no column '{text_field}' (columns: {', '.join(names[:8])}); name the text "
             "column with --text-field")
    size = Path(path).stat().st_size
    groups = max(1, parquet.num_row_groups)
    row = 0
    for group in range(parquet.num_row_groups):
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH, row_groups=[group],
                                          columns=[text_field]):
            for text in batch.column(0).to_pylist():
                row += 1
                if text is None:
                    continue
                if not isinstance(text, str):
                    fail(f"{path}: row {row}: column '{text_field}' is not text")
                if text:
                    yield text
        if on_bytes is not None:
            on_bytes(size // groups)
