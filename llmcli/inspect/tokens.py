"""Text ↔ the model's ids for the inspect views, with the checks every view shares.

Tables show token text as `llm generate --show-probs` shows it (`visible`: quoted, whitespace
escaped); ids without text are `<unknown>` (a compact vocabulary's unknown id) or `<id N>`.

`--json` (`token_json`) writes tokens as `llm generate --json` does, one convention for a
consumer: "id" is the tokenizer's id (what `llm tokenize` gives, also for a compact vocabulary)
and "token" the raw text (`Generator.token_text`: bytes that are not UTF-8 on their own become
U+FFFD). An id that stands for no text has "token": null; the compact vocabulary's unknown id,
which has no tokenizer id either, is {"id": null, "token": null}. Attention's prompt is the same
pairs as two lists ("ids", "tokens"), and score's "start" is the start token's text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmcli.console import fail
from llmcli.generate.inspect import visible

UNKNOWN = "<unknown>"


def open_model(spec: str | Path | None, device: str = "auto") -> Any:
    """A checkpoint as a `Generator` in fp32 (the numbers the views show are exact)."""
    from llmcli.generate.pipeline import load_generator

    return load_generator(spec, device, "fp32")


def label(gen: Any, model_id: int) -> str:
    """A model id's token text, visible and quoted; ids without text in angle brackets."""
    model_id = int(model_id)
    compact = gen.vocab.compact
    if compact is not None and model_id == compact.unknown_id:
        return UNKNOWN
    try:
        return visible(gen.token_bytes(model_id))
    except (ValueError, IndexError, KeyError):
        return f"<id {model_id}>"


def token_json(gen: Any, model_id: int) -> dict[str, Any]:
    """A model id as `--json` writes it: the tokenizer's id and raw text, None where absent."""
    model_id = int(model_id)
    tokenizer_id = gen.tokenizer_ids([model_id])  # empty for a compact vocabulary's unknown id
    try:
        text = gen.token_text(model_id)
    except (ValueError, IndexError, KeyError):
        text = None
    return {"id": tokenizer_id[0] if tokenizer_id else None, "token": text}


def textless(gen: Any) -> set[int]:
    """Ids that stand for no text: a compact vocabulary's unknown id, gaps in the tokenizer."""
    return {int(i) for i in gen.banned}


def prompt_ids(gen: Any, text: str, what: str = "prompt") -> list[int]:
    """Prompt text → model ids that fit the context; an empty prompt is end-of-text."""
    ids = gen.encode(text)
    if len(ids) > gen.context_length:
        fail(f"{what} is {len(ids):,} tokens, longer than this model's context of "
             f"{gen.context_length}; shorten it to at most {gen.context_length} tokens")
    return ids


def text_ids(gen: Any, text: str, what: str = "--tokens") -> list[int]:
    """The model ids of each token of `text`; a token outside the vocabulary is an error."""
    if not text:
        fail(f"{what}: empty text; give the text whose tokens to show")
    ids = gen.tokenizer.encode(text)
    why = ("it never appeared in the training data" if gen.vocab.compact is not None else
           "its id is beyond the model's ids")
    for token_id in ids:
        if not gen.vocab.has(token_id):
            fail(f"{what}: token {visible(gen.tokenizer.token_bytes(token_id))} "
                 f"({gen.tokenizer.name} id {token_id:,}) is not in this model's vocabulary "
                 f"({gen.vocab.vocab_size:,} ids): {why}; choose another token")
    return gen.vocab.map(ids)[0]


def single_id(gen: Any, text: str, what: str = "--near") -> int:
    """The model id of a text that is exactly one token of the vocabulary."""
    if not text:
        fail(f"{what}: empty text; give one token, such as 'the' or ' the'")
    ids = gen.tokenizer.encode(text)
    if len(ids) != 1:
        parts = ", ".join(visible(gen.tokenizer.token_bytes(i)) for i in ids[:6])
        fail(f"{what} {visible(text.encode())}: not one token but {len(ids)} ({parts}); give a "
             "single token (a leading space is part of a token: ' the' differs from 'the')")
    return text_ids(gen, text, what)[0]


def position_index(length: int, position: int, what: str = "--position") -> int:
    """A 0-based position in a prompt of `length` tokens; negative counts from the end."""
    if not -length <= position < length:
        fail(f"{what} {position}: the prompt has {length} token(s), so use 0..{length - 1} "
             f"(or -1 for the last)")
    return position % length
