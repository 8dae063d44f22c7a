"""llm's own tokenizers (cl100k_base, bytes) as transformers fast tokenizers (tokenizer.json).

cl100k_base becomes a byte-level BPE: the vocabulary is tiktoken's mergeable ranks, each token's
bytes spelled with GPT-2's byte-to-character table; the merges are recovered from the ranks
(token r is the merge of the two parts that byte-pair encoding with only the ranks below r
leaves of it); the pre-tokenizer splits with cl100k's own pattern, then maps bytes to
characters. BPE applied this way gives tiktoken's ids (tests compare them on varied text).
`bytes` is the same with 256 single-byte tokens and no merges.

Special tokens are added only when the model's vocabulary holds their ids: the seed's model
(vocabulary 100,256) has no end-of-text, and its exported tokenizer reads "<|endoftext|>" as
ordinary text, as llm does.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

from llmcli.console import fail
from llmcli.files import write_json, write_text

NATIVE = ("cl100k_base", "bytes")
EOT_TEXT = "<|endoftext|>"


@functools.cache
def byte_chars() -> tuple[str, ...]:
    """GPT-2's printable stand-in for each byte (what ByteLevel pre-tokenizers produce)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return tuple(chars[b] for b in range(256))


def spell(token: bytes) -> str:
    table = byte_chars()
    return "".join(table[b] for b in token)


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that makes each multi-byte token, in rank order (tiktoken's ranks are merges)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [bytes((b,)) for b in token]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            fail(f"cl100k_base: token {rank} is not a merge of two lower-ranked tokens; the BPE "
                 "file is not a byte-pair encoding llm can convert")
        merges.append((parts[0], parts[1]))
    return merges


def onig_pattern(pattern: str) -> str:
    """tiktoken's regex for the `tokenizers` library (Oniguruma, Ruby syntax): there `{1,3}+` is
    a repeat of `{1,3}`, not a possessive `{1,3}`; a bare `{1,3}` matches the same pieces here."""
    return re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pattern)


def build_tokenizer(name: str, vocab_size: int) -> Any:
    """A `tokenizers.Tokenizer` giving `name`'s ids, special tokens within `vocab_size` only."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    from llmcli.data.tokenizer import get_tokenizer

    if name not in NATIVE:
        fail(f"tokenizer {name!r}: only cl100k_base and bytes are converted")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if name == "bytes":
        vocab = {spell(bytes((b,))): b for b in range(256)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
        tok.pre_tokenizer = byte_level
        specials = {EOT_TEXT: get_tokenizer("bytes").eot_id}
    else:
        encoding = get_tokenizer("cl100k_base").encoding
        ranks = encoding._mergeable_ranks
        vocab = {spell(token): rank for token, rank in ranks.items()}
        merges = [(spell(a), spell(b)) for a, b in recover_merges(ranks)]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
        split = pre_tokenizers.Split(Regex(onig_pattern(encoding._pat_str)), behavior="isolated",
                                     invert=False)
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
        specials = dict(encoding._special_tokens)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    for text, token_id in sorted(specials.items(), key=lambda item: item[1]):
        if token_id >= vocab_size:
            continue
        # tokenizers numbers added tokens consecutively: cl100k's unused ids get placeholders
        gap = range(tok.get_vocab_size(with_added_tokens=True), token_id)
        tok.add_special_tokens([AddedToken(f"<|unused {i}|>", special=True, normalized=False)
                                for i in gap] + [AddedToken(text, special=True, normalized=False)])
    return tok


def tokenizer_config(eos: str | None, context_length: int) -> dict[str, Any]:
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                              "model_max_length": context_length,
                              "clean_up_tokenization_spaces": False}
    if eos is not None:
        config.update(bos_token=eos, eos_token=eos)
    return config


def write_native(folder: Path, name: str, vocab_size: int, context_length: int) -> int | None:
    """tokenizer.json and tokenizer_config.json for `name` in `folder`; the end-of-text id, or
    None when the vocabulary cannot hold it."""
    tok = build_tokenizer(name, vocab_size)
    eot = tok.token_to_id(EOT_TEXT)
    write_text(folder / "tokenizer.json", tok.to_str())
    write_json(folder / "tokenizer_config.json",
               tokenizer_config(EOT_TEXT if eot is not None else None, context_length))
    return eot


def native_name(tokenizer_json: Path) -> str | None:
    """cl100k_base or bytes when `tokenizer_json` is what `write_native` writes for it (so a
    model that went out and came back gets tiktoken again), else None.

    Everything that changes ids or text must match, not only the vocabulary and merges: a
    normalizer, pre-tokenizer, post-processor, decoder or added token of its own makes it
    another tokenizer (stored as any other tokenizer.json is)."""
    try:
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        vocab = data["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(vocab, dict):
        return None
    from llmcli.data.tokenizer import get_tokenizer

    regular = {"bytes": 256, "cl100k_base": len(get_tokenizer("cl100k_base").encoding
                                                 ._mergeable_ranks)}
    name = next((n for n, size in regular.items() if len(vocab) == size), None)
    return name if name is not None and same_tokenizer(data, native_json(name)) else None


@functools.cache
def native_json(name: str) -> dict[str, Any]:
    """The tokenizer.json `write_native` writes for `name` with all its special tokens."""
    return json.loads(build_tokenizer(name, 2**31).to_str())


def same_tokenizer(theirs: dict[str, Any], ours: dict[str, Any]) -> bool:
    """Whether tokenizer.json `theirs` is `ours`: every field equal but the format version,
    merges in either spelling ("a b" or ["a", "b"]), and its special tokens the first of ours
    (a smaller model vocabulary holds fewer)."""
    if set(theirs) != set(ours) or not isinstance(theirs["model"], dict):
        return False
    added = theirs["added_tokens"]
    if not isinstance(added, list) or added != ours["added_tokens"][:len(added)]:
        return False
    if set(theirs["model"]) != set(ours["model"]):
        return False
    if any(theirs["model"][k] != v for k, v in ours["model"].items() if k != "merges"):
        return False
    skip = ("version", "added_tokens", "model")
    if any(theirs[k] != v for k, v in ours.items() if k not in skip):
        return False
    return _merge_pairs(theirs["model"]["merges"]) == _merge_pairs(ours["model"]["merges"])


def _merge_pairs(merges: Any) -> list[list[str]] | None:
    """Merges as pairs, whichever way the tokenizers version spelled them; None if neither."""
    if not isinstance(merges, list):
        return None
    return [m.split(" ", 1) if isinstance(m, str) else m for m in merges]
