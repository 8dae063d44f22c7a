"""Alpaca-style instruction records (`instruction`, `input`, `output`) from .json or .jsonl files.

The same reader serves `llm tokenize` (each record becomes a document of a token file) and
fine-tuning (which renders records through its prompt template instead of `record_text`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmcli.console import fail

FIELDS = ("instruction", "input", "output")


def read_records(path: Path) -> list:
    """All records of a JSON array file or a JSON Lines file, with one-line errors.

    A `.json` file whose second value starts on a new line is read as JSON Lines, since many
    published datasets use the .json extension for that layout.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "no such file"
        fail(f"{path}: {what}; give a .json or .jsonl file of instruction records")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        fail(f"{path}: not UTF-8 text (byte {exc.start}: 0x{exc.object[exc.start]:02x}); "
             "save the file as UTF-8")
    if path.suffix.lower() == ".jsonl":
        return _read_lines(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text[:exc.pos].rstrip().endswith("}"):
            return _read_lines(path, text)
        fail(f"{path}: line {exc.lineno} column {exc.colno}: invalid JSON ({exc.msg}); "
             "fix the file at that place")
    if not isinstance(data, list):
        fail(f"{path}: expected a JSON array of records, found {json_kind(data)}; "
             "put the records in [ ... ] or write one record per line as .jsonl")
    return data


def _read_lines(path: Path, text: str) -> list:
    """JSON Lines: records end at "\n" only. str.splitlines also breaks at U+2028, U+2029 and
    U+0085, which a JSON string may hold raw (json.dumps(..., ensure_ascii=False))."""
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            fail(f"{path}: line {number} column {exc.colno}: invalid JSON ({exc.msg}); "
                 "in JSON Lines each line must be one JSON record")
    return records


def record_problem(rec: Any) -> str | None:
    """Why `rec` is not a usable Alpaca record, or None when it is."""
    if not isinstance(rec, dict):
        return f"is {json_kind(rec)}, not an object with instruction/input/output"
    for key in ("instruction", "output"):
        if key not in rec:
            return f"has no '{key}' field"
        if not isinstance(rec[key], str):
            return f"'{key}' is {json_kind(rec[key])}, not a string"
    if "input" in rec and rec["input"] is not None and not isinstance(rec["input"], str):
        return f"'input' is {json_kind(rec['input'])}, not a string"
    return None


def record_text(rec: dict) -> str:
    """A record as plain text for a token file: its non-empty fields, separated by blank lines."""
    parts = (rec.get(key) for key in FIELDS)
    return "\n\n".join(p for p in parts if isinstance(p, str) and p.strip())


def json_kind(value: Any) -> str:
    """A JSON value's kind as a message names it: 'an object', 'a number', 'null'."""
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string", bool: "true or false",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)
