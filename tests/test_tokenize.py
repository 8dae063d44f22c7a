"""Token files: streamed equals whole-file tokens; sidecars, records, errors, caching, CLI."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from llmcli.console import EXIT_USAGE, UserError
from llmcli.data import tokenize as tokenize_mod
from llmcli.data.records import read_records, record_problem, record_text
from llmcli.data.tokenize import (
    FORMAT,
    ensure_tokens,
    find_cut,
    head_tokens,
    open_tokens,
    read_sidecar,
    short_corpus_warning,
    sidecar_path,
    tokenize_files,
)
from llmcli.data.tokenizer import get_tokenizer

# Whitespace that cl100k merges across lines, \r\n, Unicode spaces, English, Chinese, digits,
# contractions and punctuation followed by newlines: the places a careless cut changes tokens.
TRICKY = (
    "Chapter 1\n\n\n   \n\tIndented line\r\n\r\n"
    "  Two leading spaces\n \n\u3000全角空格开头\n\xa0no-break space\n"
    "It's what they'll say.\n...\n!!\n\n"
    "我爱北京天安门。画一个大海，鳄鱼和龘。\n第二行：数字12345678。\n"
    "trailing spaces   \nend of line\u2028line separator\n"
    "unicode blank lines\n\u3000\n\xa0 \n\u2028\n\x85\nafter them\n"
    "Ünïcödé wörds and ёлка\n" * 3
)


@pytest.fixture(scope="module")
def cl100k():
    return get_tokenizer("cl100k_base")


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


# ---------------------------------------------------------------------------------------------
# Streaming


@pytest.mark.parametrize("block", [1, 2, 3, 7, 16, 64, 1 << 20])
@pytest.mark.parametrize("threads", [1, 3])
def test_streamed_equals_whole_file(tmp_path: Path, cl100k, block: int, threads: int) -> None:
    src = write(tmp_path / "tricky.txt", TRICKY)
    meta = tokenize_files([src], tmp_path / "out.tokens", block=block, threads=threads)
    tokens = open_tokens(tmp_path / "out.tokens")
    assert tokens.tolist() == cl100k.encode(TRICKY)
    assert meta["num_tokens"] == len(tokens)


ALPHABET = st.sampled_from(
    [" ", "  ", "\n", "\n\u3000\n", "\n\xa0", "\r\n", "\t", "\u3000", "\xa0", "\u2028",
     "a", "Z", "word", "'s", "'ll",
     "1", "123456", ".", "!?", "中", "文字", "é", "ё", "😀", "-", "\x1c"]
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(ALPHABET, max_size=80), block=st.integers(1, 24))
def test_streamed_equals_whole_for_any_text(tmp_path: Path, cl100k, parts: list[str],
                                            block: int) -> None:
    text = "".join(parts)
    data = text.encode("utf-8")
    src = tmp_path / "t.txt"
    src.write_bytes(data)
    cut_positions, start = [], 0
    while start < len(data):
        cut = find_cut(data[: start + block], start)
        if cut < 0:
            break
        cut_positions.append(cut)
        start = cut
    if text:
        tokenize_files([src], tmp_path / "t.tokens", block=block, threads=2)
        assert open_tokens(tmp_path / "t.tokens").tolist() == cl100k.encode(text)
    for cut in cut_positions:  # each cut on its own splits the text into independent halves
        assert cl100k.encode(text[: len(data[:cut].decode())]) + cl100k.encode(
            data[cut:].decode()) == cl100k.encode(text)


def test_find_cut_rules() -> None:
    assert find_cut(b"abc\ndef") == 4
    assert find_cut(b"abc\n def") == -1  # " def" would join the newline's whitespace
    assert find_cut(b"abc\n\n") == -1  # nothing after the last newline to judge it by
    assert find_cut("a\n\u3000b".encode()) == -1  # ideographic space is whitespace
    assert find_cut("a\n中".encode()) == 2
    assert find_cut(b"one two") == 3  # no newline: before a space between letters
    assert find_cut(b"one  two") == -1


def test_round_trip_through_token_file(tmp_path: Path) -> None:
    text = "English text, and 中文文本。\n" * 50
    src = write(tmp_path / "mixed.txt", text)
    for name in ("cl100k_base", "bytes"):
        out = tmp_path / f"mixed.{name}.tokens"
        tokenize_files([src], out, tokenizer=name, block=33)
        tok = get_tokenizer(name)
        assert tok.decode(open_tokens(out).tolist()) == text


def test_sidecar_describes_the_file(tmp_path: Path, cl100k) -> None:
    text = "one two three\n" * 40
    src = write(tmp_path / "c.txt", text)
    out = tmp_path / "c.tokens"
    meta = tokenize_files([src], out, val_fraction=0.25)
    ids = cl100k.encode(text)
    assert out.stat().st_size == 4 * len(ids)
    assert np.fromfile(out, dtype="<u4").tolist() == ids  # flat little-endian uint32
    saved = json.loads(sidecar_path(out).read_text())
    assert saved == meta == read_sidecar(out) == read_sidecar(sidecar_path(out))
    assert meta["format"] == FORMAT
    assert meta["tokenizer"] == "cl100k_base" and meta["vocab_size"] == 100277
    assert meta["dtype"] == "uint32"
    assert meta["num_tokens"] == len(ids)
    assert meta["max_id"] == max(ids)
    assert meta["distinct_ids"] == len(set(ids))
    assert meta["val_fraction"] == 0.25
    assert meta["val_start"] == int(len(ids) * 0.75)
    assert meta["documents"] == 1
    (source,) = meta["sources"]
    assert source["path"] == str(src.resolve())
    assert source["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert source["bytes"] == len(text.encode())


def test_several_files_and_a_directory_are_documents(tmp_path: Path, cl100k) -> None:
    novels = tmp_path / "novels"
    (novels / "part2").mkdir(parents=True)
    write(novels / "b.txt", "Second book.\n")
    write(novels / "a.txt", "First book.\n")
    write(novels / "part2" / "c.txt", "Third book.\n")
    write(novels / "notes.md", "not a .txt file")
    write(novels / "empty.txt", "")
    extra = write(tmp_path / "extra.txt", "\ufeffExtra.")  # a BOM is not text
    meta = tokenize_files([novels, extra], tmp_path / "all.tokens")
    eot = cl100k.eot_id
    expected = (cl100k.encode("First book.\n") + [eot] + cl100k.encode("Second book.\n")
                + [eot] + cl100k.encode("Third book.\n") + [eot] + cl100k.encode("Extra."))
    assert open_tokens(tmp_path / "all.tokens").tolist() == expected
    assert meta["documents"] == 4
    assert [Path(s["path"]).name for s in meta["sources"]] == [
        "a.txt", "b.txt", "empty.txt", "c.txt", "extra.txt"]


def test_records_become_documents(tmp_path: Path, cl100k) -> None:
    records = [
        {"instruction": "Say hi", "input": "", "output": "Hi!"},
        {"instruction": "翻译", "input": "sea", "output": "大海"},
        {"instruction": "no output"},
        "not an object",
    ]
    src = tmp_path / "r.json"
    src.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    lines = tmp_path / "r.jsonl"
    lines.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records[:2]) + "\n\n")
    meta = tokenize_files([src, lines], tmp_path / "r.tokens")
    docs = ["Say hi\n\nHi!", "翻译\n\nsea\n\n大海"] * 2
    expected: list[int] = []
    for i, doc in enumerate(docs):
        expected += ([cl100k.eot_id] if i else []) + cl100k.encode(doc)
    assert open_tokens(tmp_path / "r.tokens").tolist() == expected
    assert meta["documents"] == 4


def test_records_reader(tmp_path: Path) -> None:
    good = {"instruction": "a", "input": "b", "output": "c"}
    assert record_problem(good) is None
    assert record_problem({"instruction": "a", "output": "c"}) is None
    assert "no 'output'" in record_problem({"instruction": "a"})
    assert "'instruction' is a number" in record_problem({"instruction": 1, "output": "c"})
    assert "'input' is an array" in record_problem({"instruction": "a", "input": [], "output": ""})
    assert "not an object" in record_problem(["a"])
    assert record_text(good) == "a\n\nb\n\nc"
    jsonl_named_json = tmp_path / "lines.json"  # many datasets use .json for JSON Lines
    jsonl_named_json.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    assert read_records(jsonl_named_json) == [good, good]
    # separators only str.splitlines knows, raw inside strings (ensure_ascii=False), and CRLF
    odd = {"instruction": "a\u2028b", "input": "\u2029", "output": "c\x85d\x1ce"}
    for name in ("odd.jsonl", "odd.json"):
        (tmp_path / name).write_bytes(
            (json.dumps(odd, ensure_ascii=False) + "\r\n" + json.dumps(good) + "\n").encode())
        assert read_records(tmp_path / name) == [odd, good]
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(UserError, match="line 2 column 2: invalid JSON"):
        read_records(broken)
    bad_array = tmp_path / "bad.json"
    bad_array.write_text('[\n  {"a": 1},\n  {"b": }\n]')
    with pytest.raises(UserError, match="line 3 column"):
        read_records(bad_array)
    obj = tmp_path / "obj.json"
    obj.write_text('{"instruction": "a"}')
    with pytest.raises(UserError, match="expected a JSON array"):
        read_records(obj)


def test_shared_alpaca_records(tmp_path: Path, shared_data: Path) -> None:
    meta = tokenize_files([shared_data / "alpaca_zh_demo.json"], tmp_path / "zh.tokens")
    assert meta["documents"] == len(read_records(shared_data / "alpaca_zh_demo.json"))
    tokens = open_tokens(tmp_path / "zh.tokens")
    assert int((tokens == 100257).sum()) == meta["documents"] - 1


def test_sales_textbook_tokens(tmp_path: Path, shared_data: Path) -> None:
    meta = tokenize_files([shared_data / "sales_textbook.txt"], tmp_path / "sales.tokens")
    assert meta["num_tokens"] == 77_919
    assert meta["max_id"] == 100_069
    assert meta["val_start"] == int(77_919 * 0.9)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_undecodable_bytes(tmp_path: Path, cl100k) -> None:
    src = tmp_path / "latin1.txt"
    src.write_bytes(b"line one\nline two\ncaf\xe9 au lait\n")
    out = tmp_path / "x.tokens"
    out.write_bytes(b"previous")  # an earlier run's pair: replaced only by a successful one
    sidecar_path(out).write_text(json.dumps({"format": FORMAT}), encoding="utf-8")
    with pytest.raises(UserError) as info:
        tokenize_files([src], out, block=4)
    message = str(info.value)
    assert "line 3" in message and "byte 21" in message and "--errors replace" in message
    assert out.read_bytes() == b"previous"  # the old file survives a failed run
    tokenize_files([src], out, errors="replace")
    assert cl100k.decode(open_tokens(out).tolist()) == "line one\nline two\ncaf\ufffd au lait\n"


def test_empty_missing_and_wrong_inputs(tmp_path: Path) -> None:
    empty = write(tmp_path / "empty.txt", "")
    with pytest.raises(UserError, match="empty"):
        tokenize_files([empty], tmp_path / "e.tokens")
    assert not (tmp_path / "e.tokens").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["empty.txt"]  # no temporary left behind
    with pytest.raises(UserError, match="no such file"):
        tokenize_files([tmp_path / "missing.txt"], tmp_path / "m.tokens")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match=r"no \.txt, \.jsonl"):
        tokenize_files([tmp_path / "nothing"], tmp_path / "n.tokens")
    with pytest.raises(UserError, match="--errors"):
        tokenize_files([empty], tmp_path / "e.tokens", errors="ignore")
    with pytest.raises(UserError, match="val_fraction"):
        tokenize_files([empty], tmp_path / "e.tokens", val_fraction=1.0)


def test_short_corpus_warning() -> None:
    meta = {"num_tokens": 100, "val_start": 90, "val_fraction": 0.1}
    warning = short_corpus_warning(meta, context_length=16)
    assert warning and "10 validation" in warning and "17" in warning
    assert short_corpus_warning(meta, context_length=8) is None


def test_open_tokens_errors(tmp_path: Path) -> None:
    src = write(tmp_path / "c.txt", "some text here\n")
    out = tmp_path / "c.tokens"
    tokenize_files([src], out)
    tokens = open_tokens(out)
    assert tokens.dtype == np.uint32 and not tokens.flags.writeable
    with open(out, "ab") as fh:
        fh.write(b"\0\0\0\0")
    with pytest.raises(UserError, match="out of step"):
        open_tokens(out)
    sidecar_path(out).write_text("{not json")
    with pytest.raises(UserError, match="corrupt sidecar"):
        read_sidecar(out)
    sidecar_path(out).write_text('{"format": "other"}')
    with pytest.raises(UserError, match="not a token sidecar"):
        read_sidecar(out)
    sidecar_path(out).unlink()
    with pytest.raises(UserError, match="missing"):
        open_tokens(out)
    with pytest.raises(UserError, match="no such token file"):
        open_tokens(tmp_path / "nope.tokens")


# ---------------------------------------------------------------------------------------------
# Cached token files for training


def test_ensure_tokens_reuses_until_the_source_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cl100k) -> None:
    src = write(tmp_path / "corpus.txt", "first version\n")
    cache = tmp_path / "cache"
    calls = []
    real = tokenize_mod.tokenize_files
    monkeypatch.setattr(tokenize_mod, "tokenize_files",
                        lambda *a, **k: calls.append(a) or real(*a, **k))
    out = ensure_tokens(src, "cl100k_base", 0.1, cache)
    assert out == cache / "corpus.cl100k_base.tokens" and len(calls) == 1
    assert ensure_tokens(src, "cl100k_base", 0.1, cache) == out and len(calls) == 1

    os.utime(src, ns=(1, 1))  # touched, same bytes: the SHA-256 says it is unchanged
    assert ensure_tokens(src, "cl100k_base", 0.1, cache) == out and len(calls) == 1
    assert read_sidecar(out)["sources"][0]["mtime_ns"] == 1

    ensure_tokens(src, "cl100k_base", 0.5, cache)  # only the split moves
    assert len(calls) == 1 and read_sidecar(out)["val_start"] == int(read_sidecar(out)[
        "num_tokens"] * 0.5)

    write(src, "second version, longer\n")
    ensure_tokens(src, "cl100k_base", 0.5, cache)
    assert len(calls) == 2
    assert cl100k.decode(open_tokens(out).tolist()) == "second version, longer\n"

    other = ensure_tokens(src, "bytes", 0.5, cache)
    assert other == cache / "corpus.bytes.tokens" and len(calls) == 3


def test_ensure_tokens_with_token_files_and_directories(tmp_path: Path) -> None:
    src = write(tmp_path / "c.txt", "text\n")
    made = tmp_path / "made.tokens"
    tokenize_files([src], made, tokenizer="bytes")
    assert ensure_tokens(made, "bytes", 0.1, tmp_path) == made
    with pytest.raises(UserError, match="data.tokenizer=bytes"):
        ensure_tokens(made, "cl100k_base", 0.1, tmp_path)
    with pytest.raises(UserError, match="no such file"):
        ensure_tokens(tmp_path / "missing.txt", "bytes", 0.1, tmp_path)
    books = tmp_path / "books"
    books.mkdir()
    write(books / "one.txt", "one\n")
    out = ensure_tokens(books, "bytes", 0.1, tmp_path / "cache")
    assert out.name == "books.bytes.tokens"
    write(books / "two.txt", "two\n")  # a new file in the directory makes it stale
    ensure_tokens(books, "bytes", 0.1, tmp_path / "cache")
    assert read_sidecar(out)["documents"] == 2


def test_head_tokens_match_the_token_file(tmp_path: Path) -> None:
    src = write(tmp_path / "t.txt", TRICKY * 20)
    tokenize_files([src], tmp_path / "t.tokens")
    full = open_tokens(tmp_path / "t.tokens").tolist()
    assert head_tokens([src], 57) == full[:57]
    assert head_tokens([src], 10**6) == full


# ---------------------------------------------------------------------------------------------
# The command


def run_cli(*args: str) -> object:
    from llmcli.cli import app

    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("args", [
    ["--show", "hi", "-o", "s"],
    ["text.txt", "--head", "3", "-o", "h", "--workers", "2"],
    ["--show", "hi", "--errors", "replace"],
])
def test_show_and_head_refuse_the_options_of_writing(tmp_path: Path, monkeypatch, args) -> None:
    """`--show hi -o s.tokens` ended 0, wrote nothing and said nothing about -o."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text("some text to read", encoding="utf-8")
    result = run_cli("tokenize", *args, "-t", "bytes")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "not used with --" in result.stderr and "writes nothing" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt"]


def test_cli_builtin_offline_flow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    fetched = run_cli("fetch", "builtin")
    assert fetched.exit_code == 0, fetched.output
    path = fetched.stdout.strip()
    result = run_cli("tokenize", path)
    assert result.exit_code == 0, result.output
    out = tmp_path / "data" / "python-reference.tokens"
    meta = read_sidecar(out)
    assert meta["num_tokens"] > 50_000
    for words in ("tokens", "bytes per token", "distinct ids", "largest id", "MB/s"):
        assert words in result.stdout
    assert f"{meta['num_tokens']:,}" in result.stdout


def test_cli_output_json_and_warnings(tmp_path: Path) -> None:
    src = write(tmp_path / "small.txt", "just a few words\n")
    result = run_cli("tokenize", str(src), "-o", str(tmp_path / "small"), "--json",
                     "--tokenizer", "bytes")
    assert result.exit_code == 0, result.output
    meta = json.loads(result.stdout)
    assert meta["tokenizer"] == "bytes" and meta["num_tokens"] == len("just a few words\n")
    assert (tmp_path / "small.tokens").exists()
    assert "shorter than one context window" in result.stderr


def test_cli_show_and_head(tmp_path: Path) -> None:
    shown = run_cli("tokenize", "--show", "我爱北京")
    assert shown.exit_code == 0, shown.output
    assert "<e7 88>" in shown.stdout and "\ufffd" not in shown.stdout
    assert "76207" in shown.stdout
    controls = run_cli("tokenize", "--show", "a\x1b[31mred\x07\x7f\x9b", "-t", "bytes")
    assert controls.exit_code == 0, controls.output  # the terminal is not restyled or rung
    assert "␛" in controls.stdout and "␇" in controls.stdout and "␡" in controls.stdout
    assert not any(c in controls.stdout for c in "\x1b\x07\x7f\x9b")
    src = write(tmp_path / "h.txt", "hello world\n" * 100)
    head = run_cli("tokenize", str(src), "--head", "3")
    assert head.exit_code == 0, head.output
    assert "ids: [15339, 1917, 198]" in head.stdout
    assert not list(tmp_path.glob("*.tokens"))


@pytest.mark.parametrize("args, words", [
    (["missing.txt"], "no such file"),
    ([], "give the files"),
    (["--show", "x", "--head", "3"], "--show"),
    (["x.txt", "--errors", "ignore"], "--errors"),
])
def test_cli_bad_input_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   args: list[str], words: str) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "x.txt", "x")
    result = run_cli("tokenize", *args)
    assert result.exit_code == EXIT_USAGE
    assert words in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# Found by an adversarial sweep: pairs, sizes, messages


def test_an_interrupt_never_leaves_new_tokens_beside_an_old_sidecar(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "c.tokens"
    tokenize_files([write(tmp_path / "a.txt", "first corpus\n")], out)
    before = out.read_bytes(), sidecar_path(out).read_text()
    big = write(tmp_path / "b.txt", "a second, longer corpus with more words\n" * 50)

    def interrupted(*args: object) -> int:
        raise KeyboardInterrupt  # Ctrl-C while the vocabulary is counted, before publishing

    monkeypatch.setattr(tokenize_mod, "compact_vocab_ids", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tokenize_files([big], out)
    assert (out.read_bytes(), sidecar_path(out).read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "c.tokens",
                                                           "c.tokens.json"]
    monkeypatch.undo()

    real_write_json = tokenize_mod.write_json

    def ctrl_c_then_write(*args: object) -> None:  # Ctrl-C between the two files
        os.kill(os.getpid(), signal.SIGINT)
        real_write_json(*args)

    monkeypatch.setattr(tokenize_mod, "write_json", ctrl_c_then_write)
    with pytest.raises(KeyboardInterrupt):  # delivered once the pair is whole
        tokenize_files([big], out)
    assert open_tokens(out).shape[0] == read_sidecar(out)["num_tokens"] > 100


def test_bytes_per_token_counts_the_text_not_the_files(tmp_path: Path) -> None:
    lines = "".join(json.dumps({"text": f"line {i} with some words"}) + "\n" for i in range(50))
    plain = write(tmp_path / "t.jsonl", lines)
    packed = tmp_path / "t.jsonl.gz"
    packed.write_bytes(gzip.compress(lines.encode()))
    text = sum(len(f"line {i} with some words") for i in range(50))
    for source in (plain, packed):
        meta = tokenize_files([source], tmp_path / f"{source.name}.tokens")
        assert tokenize_mod.data_bytes(meta) == meta["text_bytes"] == text
    two = tokenize_files([plain, packed], tmp_path / "two", workers=2)
    assert two["text_bytes"] == 2 * text
    assert tokenize_mod.data_bytes({"sources": [{"bytes": 7}]}) == 7  # an older sidecar


@pytest.mark.parametrize("name, data, words", [
    ("cut.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 20)[:20], "not a valid gzip file"),
    ("fake.jsonl.gz", b"not gzip\n", "not a valid gzip file"),
    ("fake.jsonl.zst", b"x\n", "not a valid zstd file"),
    ("num.jsonl", b'{"text": "a"}\n{"text": 5}\n', "line 2: field 'text' holds a number"),
    ("list.jsonl.gz", gzip.compress(b'{"text": "a"}\n[1, 2]\n'), "line 2: an array, not a record"),
    ("garbage.json", b'[{"instruction": "x", "input": "", "output": "y"}] garbage',
     "invalid JSON (Extra data)"),
    ("blank.json", b'[{"instruction": "", "input": "", "output": ""}]', "every record is empty"),
    ("kinds.json", b'[{"instruction": "x", "output": {}}]', "'output' is an object"),
    ("none.json", b'[]', "holds no records"),
])
def test_damaged_inputs_are_named(tmp_path: Path, name: str, data: bytes, words: str) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(UserError) as info:
        tokenize_files([path], tmp_path / "out")
    assert info.value.exit_code == EXIT_USAGE
    assert words in str(info.value) and name in str(info.value)
    assert "jsonl file must" not in str(info.value)
    assert not list(tmp_path.glob("out*"))


def test_a_short_validation_split_is_named_as_such() -> None:
    meta = {"num_tokens": 1000, "val_start": 990, "val_fraction": 0.01}
    warning = short_corpus_warning(meta, context_length=16)
    assert warning and warning.startswith("the validation split is shorter")
    assert "raise val_fraction" in warning


def test_cli_json_with_show_and_head(tmp_path: Path) -> None:
    shown = run_cli("tokenize", "--show", "hi 我", "--json")
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert data["tokenizer"] == "cl100k_base" and data["ids"][0] == 6151
    assert b"".join(bytes.fromhex(h) for h in data["bytes"]).decode() == "hi 我"
    src = write(tmp_path / "h.txt", "hello world\n")
    head = run_cli("tokenize", str(src), "--head", "2", "--json")
    assert json.loads(head.stdout)["ids"] == [15339, 1917]


def test_cli_duplicate_inputs_and_odd_outputs(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "a.txt", "hello there\n")
    twice = run_cli("tokenize", "a.txt", "./a.txt", "-o", "two")
    assert twice.exit_code == 0, twice.output
    assert "a.txt: given twice" in twice.stderr
    sharded = run_cli("tokenize", "a.txt", "-o", "sh", "--shard-tokens", "1024",
                      "--tokenizer", "bytes")
    assert sharded.exit_code == 0, sharded.output
    into = run_cli("tokenize", "a.txt", "-o", "sh.tokens")
    assert into.exit_code == EXIT_USAGE and "is a sharded corpus" in into.stderr
    assert not (tmp_path / "sh.tokens" / "a.tokens").exists()
    device = run_cli("tokenize", "/dev/null")
    assert device.exit_code == EXIT_USAGE and "not a regular file" in device.stderr


def test_tokenize_workers_leave_ctrl_c_to_the_parent():
    """Ctrl-C reaches the whole process group; only the parent answers it (no worker
    tracebacks), and it ends the pool."""
    import signal

    from llmcli.data.tokenize import _pool

    with _pool(2) as pool:
        assert pool.apply(signal.getsignal, (signal.SIGINT,)) == signal.SIG_IGN


# ---------------------------------------------------------------------------------------------
# Found by the data sweep: what `llm tokenize` wrote is what training finds; edited files


@pytest.mark.parametrize("source", ["web", "g.jsonl.gz", "g.jsonl"])
def test_training_finds_what_llm_tokenize_wrote_for_record_sources(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    """A folder of .jsonl files and a .jsonl.gz were tokenized again by every run: the cache
    lookup listed only .txt files, and named x.jsonl.gz's file x.jsonl, not x."""
    monkeypatch.chdir(tmp_path)
    lines = "".join(json.dumps({"text": f"record {i} of a web corpus"}) + "\n" for i in range(40))
    (tmp_path / "web").mkdir()
    write(tmp_path / "web" / "a.jsonl", lines)
    (tmp_path / "g.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    write(tmp_path / "g.jsonl", lines)
    result = run_cli("tokenize", source, "-t", "bytes")
    assert result.exit_code == 0, result.output
    written = Path(result.stdout.split()[1])
    assert ensure_tokens(Path(source), "bytes", 0.1) == written
    assert sorted(p.name for p in Path("data").iterdir()) == [written.name,
                                                              written.name + ".json"]


def test_a_token_file_source_takes_the_recipes_split(tmp_path: Path) -> None:
    """data.val_fraction was ignored for a .tokens source, yet recorded in the checkpoint."""
    made = tokenize_files([write(tmp_path / "c.txt", "some text to split\n" * 50)],
                          tmp_path / "made.tokens", tokenizer="bytes")
    ensure_tokens(tmp_path / "made.tokens", "bytes", 0.5, tmp_path)
    meta = read_sidecar(tmp_path / "made.tokens")
    assert meta["val_fraction"] == 0.5 and meta["val_start"] == made["num_tokens"] // 2
    shards = tmp_path / "sharded.tokens"
    tokenize_files([tmp_path / "c.txt"], shards, tokenizer="bytes", shard_tokens=1024)
    with pytest.raises(UserError, match=r"data.val_fraction 0.5: .* was split at val_fraction "
                       r"0.1 .* set data.val_fraction=0.1"):
        ensure_tokens(shards, "bytes", 0.5, tmp_path)


@pytest.mark.parametrize("edit, message", [
    ({"max_id": 4_000_000_000}, "max_id 4,000,000,000 is beyond the 257 ids"),
    ({"val_start": 10**9}, "val_start 1,000,000,000 is outside its"),
    ({"val_start": -5}, "val_start -5 is outside"),
    ({"val_fraction": 3.0}, "val_fraction 3.0 is outside"),
])
def test_numbers_a_sidecar_cannot_hold_are_refused_before_use(tmp_path: Path, edit: dict,
                                                               message: str) -> None:
    out = tmp_path / "e.tokens"
    tokenize_files([write(tmp_path / "c.txt", "text\n" * 40)], out, tokenizer="bytes")
    meta = json.loads(sidecar_path(out).read_text())
    sidecar_path(out).write_text(json.dumps({**meta, **edit}))
    with pytest.raises(UserError, match=f"corrupt sidecar \\({message}") as caught:
        read_sidecar(out)
    assert "\n" not in str(caught.value)


def test_text_records_under_another_field_name_it(tmp_path: Path) -> None:
    """A .jsonl whose text is under "content" was refused as Alpaca records missing an
    instruction, with no word of --text-field."""
    source = write(tmp_path / "c.jsonl", '{"content": "hello"}\n{"content": "more"}\n')
    with pytest.raises(UserError, match="--text-field content$"):
        tokenize_files([source], tmp_path / "c.tokens", tokenizer="bytes")
    meta = tokenize_files([source], tmp_path / "c.tokens", tokenizer="bytes",
                          text_field="content")
    assert meta["documents"] == 2


def test_a_folder_names_the_files_it_skips_once(tmp_path: Path, capsys) -> None:
    """b.TXT, a dangling c.txt link and d.jsonl beside a.txt were left out without a word."""
    from llmcli.data.token_cache import expand_inputs

    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.txt").write_text("some text", encoding="utf-8")
    (folder / "b.TXT").write_text("more text", encoding="utf-8")
    (folder / "c.txt").symlink_to(folder / "nowhere")
    (folder / "d.jsonl").write_text('{"text": "hi"}\n', encoding="utf-8")
    assert expand_inputs([folder]) == [folder / "a.txt"]  # the rule is kept
    assert expand_inputs([folder]) == [folder / "a.txt"]
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("warning:") == 1, err
    assert f"{folder}/: skipped 3 file(s) (b.TXT: not .txt (names are case-sensitive), c.txt: " \
           "a broken link, d.jsonl: folders are read for .txt when they hold any)" in err
