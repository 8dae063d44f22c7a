"""Imported transformers tokenizers: kept by content, loaded with the `tokenizers` library.

`llm import` stores the model's tokenizer.json (with a tokenizer_config.json naming its
end-of-text token) as `tokenizers/hf-<digest>/` inside the run it writes, with a copy in the
user's cache (`~/.cache/llmcli/tokenizers/`), and every run trained with it keeps a copy too
(`keep_with_run`); the digest is the SHA-256 of both files. A
checkpoint read from a run registers that run's folder (`add_run`), so the run works from any
working directory and after being moved; runs imported by earlier versions kept it in
`checkpoints/tokenizers/` of the working directory, which is still searched.

The tokenizer's name, `hf-<digest>`, is what checkpoints and recipes record (`data.tokenizer`),
so fine-tuned runs of an imported model find the same tokenizer, the name is safe in file names,
and a file changed after the import is refused instead of silently giving other ids. The folder
is itself a transformers tokenizer folder.

Only JSON is read (`tokenizers.Tokenizer.from_file`): no code runs, nothing is unpickled. As with
llm's own tokenizers, special-token strings in text are encoded as text.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llmcli.checkpoint import CHECKPOINTS_DIR
from llmcli.console import UserError, check_readable, fail, first_line, warn
from llmcli.constants import RUN_TOKENIZERS
from llmcli.data.tokenizer import Tokenizer
from llmcli.files import atomic_open, cache_dir
from llmcli.recipe import HF_TOKENIZER

FILES = ("tokenizer.json", "tokenizer_config.json")
EOS_GUESSES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")


def is_hf_name(name: Any) -> bool:
    return isinstance(name, str) and HF_TOKENIZER.fullmatch(name) is not None


_runs: list[Path] = []  # run directories whose checkpoints were read, newest first


def add_run(run_dir: Path) -> None:
    """Search `run_dir`'s own tokenizer folder first from now on (a checkpoint was read there)."""
    folder = Path(run_dir) / RUN_TOKENIZERS
    if folder in _runs:
        _runs.remove(folder)
    _runs.insert(0, folder)


def roots() -> list[Path]:
    """Where stored tokenizers are looked for, in order: the runs read, the user's cache, and
    `checkpoints/tokenizers/` of the working directory (where earlier versions kept them)."""
    return [*_runs, cache_dir("tokenizers"), CHECKPOINTS_DIR / "tokenizers"]


def digest(tokenizer_json: bytes, config_json: bytes) -> str:
    h = hashlib.sha256()
    for part in (tokenizer_json, config_json):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def token_text(value: Any) -> str | None:
    """An eos_token entry of tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def store(tokenizer_json: bytes, eos: str, context_length: int) -> tuple[str, dict[str, bytes]]:
    """Keep a tokenizer (already checked to parse) in the user's cache; its name and files, for
    the run to keep a copy of (`write`)."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos,
              "model_max_length": context_length, "clean_up_tokenization_spaces": False}
    config_json = (json.dumps(config, indent=2) + "\n").encode()
    name = f"hf-{digest(tokenizer_json, config_json)}"
    files = dict(zip(FILES, (tokenizer_json, config_json), strict=True))
    with contextlib.suppress(OSError, UserError):  # unwritable: the run's own copy is enough
        write(cache_dir("tokenizers") / name, files)
    return name, files


def write(folder: Path, files: dict[str, bytes]) -> None:
    """A stored tokenizer's folder, unless it already holds these files."""
    if folder_digest(folder) == digest(*files.values()):
        return
    for file, data in files.items():
        with atomic_open(folder / file, "wb") as fh:
            fh.write(data)


def keep_with_run(name: str, run_dir: Path) -> None:
    """A run trained with a stored tokenizer keeps its own copy, as the imported run does, so a
    full fine-tune of an imported model works from any folder, moved, with no cache."""
    if is_hf_name(name):
        source = folder_of(name)
        write(Path(run_dir) / RUN_TOKENIZERS / name, {f: (source / f).read_bytes() for f in FILES})


def folder_digest(folder: Path) -> str | None:
    try:
        return digest(*((folder / f).read_bytes() for f in FILES))
    except OSError:
        return None


def folder_of(name: str) -> Path:
    """The checked folder of a stored tokenizer; a missing or altered one is a one-line error."""
    if not is_hf_name(name):
        fail(f"tokenizer {name!r}: not a stored transformers tokenizer name (hf-<16 hex digits>)")
    present = [root / name for root in roots() if (root / name / "tokenizer.json").is_file()]
    for folder in present:
        if folder_digest(folder) == name[3:]:
            return folder
    if present:
        fail(f"tokenizer {name}: the files in {present[0]} changed after the import, so ids "
             "would differ from the model's; import the model again")
    fail(f"tokenizer {name}: not found in the run's {RUN_TOKENIZERS}/ folder, the cache "
         f"({cache_dir('tokenizers')}) or {CHECKPOINTS_DIR / 'tokenizers'}; it is written by "
         "`llm import`: import the model again, or copy the imported run's tokenizers/ folder "
         "along with it")


class HFTokenizer(Tokenizer):
    """A transformers tokenizer.json through the `tokenizers` library, with llm's interface."""

    def __init__(self, name: str, folder: Path) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self.name = name
        path = folder / "tokenizer.json"
        try:
            self.tok = RustTokenizer.from_file(str(path))
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            self._decoder = json.loads(path.read_text(encoding="utf-8")).get("decoder")
        except Exception as exc:  # tokenizers raises plain Exception on bad JSON
            fail(f"{path}: not a readable tokenizer ({first_line(exc)}); import the model again")
        check_decoder(self._decoder, str(path), "this run (imported by an earlier version, "
                      "which printed such text wrongly) can only be used through transformers")
        start = start_ids(self.tok)
        if isinstance(start, str):
            fail(f"{path}: the tokenizer's post-processor {start}; import the model again")
        self.start_ids = start
        if hasattr(self.tok, "encode_special_tokens"):
            self.tok.encode_special_tokens = True  # "<|endoftext|>" in text is text, as in llm
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.n_vocab = max(vocab.values(), default=-1) + 1
        eos = token_text(config.get("eos_token") if isinstance(config, dict) else None)
        eot = self.tok.token_to_id(eos) if eos else None
        if eot is None:
            fail(f"{folder}: tokenizer_config.json names no end-of-text token in the vocabulary; "
                 "import the model again")
        self.eot_id = eot
        self._table: list[bytes | None] | None = None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return b"".join(self.token_bytes(i) for i in ids)

    def token_bytes(self, token_id: int) -> bytes:
        table = self._bytes_table()
        token_id = int(token_id)
        found = table[token_id] if 0 <= token_id < len(table) else None
        if found is None:
            raise self._bad_id(token_id)
        return found

    def _bytes_table(self) -> list[bytes | None]:
        """Each id's bytes as its decoder renders it inside a text (`render`)."""
        if self._table is not None:
            return self._table
        render = renderer(self._decoder)
        table: list[bytes | None] = [None] * self.n_vocab
        for text, token_id in self.tok.get_vocab(with_added_tokens=True).items():
            table[token_id] = render(text)
        self._table = table
        return table


def additions(tok: Any) -> tuple[tuple[int, ...], tuple[int, ...]] | str:
    """(ids put before, ids put after) a single sequence by the tokenizer's post-processor
    (Llama's BOS; an EOS some tokenizers append), or why llm cannot reproduce what it adds.
    Found by the library itself, encoding probes with and without special tokens, so every
    kind of post-processor is read as transformers runs it; type ids other than 0 (which
    transformers would pass to the model) have no place in llm's input."""
    tok.no_truncation()
    tok.no_padding()
    found = set()
    for probe in ("a", "Hello, world"):
        bare = tok.encode(probe, add_special_tokens=False).ids
        full = tok.encode(probe, add_special_tokens=True)
        if any(full.type_ids):
            return "gives type ids other than 0, which llm's model has no input for"
        at = next((k for k in range(len(full.ids) - len(bare) + 1)
                   if full.ids[k:k + len(bare)] == bare), None)
        if at is None:
            return "changes the text's own tokens, not only adds some around them"
        found.add((tuple(full.ids[:at]), tuple(full.ids[at + len(bare):])))
    if len(found) != 1:
        return "adds tokens that depend on the text"
    return found.pop()


def start_ids(tok: Any) -> tuple[int, ...] | str:
    """The ids a sequence begins with (a BOS), or why llm cannot reproduce the post-processor.
    What it puts after a sequence is left out: a prompt is continued, not ended."""
    found = additions(tok)
    return found if isinstance(found, str) else found[0]


def check_post_processor(tok: Any, where: str) -> None:
    """A one-line error for a post-processor whose additions llm cannot reproduce, and a
    warning for the tokens it appends, which llm leaves out."""
    found = additions(tok)
    if isinstance(found, str):
        fail(f"{where}: the tokenizer's post-processor {found}; llm reproduces one that puts "
             "tokens before or after a sequence (a BOS, an EOS); use this model through "
             "transformers")
    end = found[1]
    if end:
        warn(f"{where}: the tokenizer's post-processor appends {len(end)} token(s) to every "
             f"sequence (ids {list(end)[:4]}); llm leaves them out of a prompt, which it continues "
             "rather than ends (transformers' tokenizer(text) keeps them)")


# ---------------------------------------------------------------------------------------------
# Decoders, token by token
#
# llm needs each id's bytes such that a text is their concatenation (streaming, --stop, inspect).
# A decoder's steps each act on the list of token strings: some token by token (Replace, Strip,
# Metaspace, WordPiece, BPEDecoder), some turning them into bytes (ByteLevel, ByteFallback), and
# Fuse joining them into one string, after which a step acts on the whole text. A step whose
# result differs from the token-by-token one only at the very start or end of a text (the space
# Metaspace, WordPiece or Strip drop before the first token, the one BPEDecoder drops after the
# last) is rendered as inside a text, as a continuation of a prompt needs; a step that acts
# across tokens (CTC merges repeats; a Replace after Fuse can match across them) is refused.

RENDERABLE = ("ByteLevel, ByteFallback, Metaspace, WordPiece, BPEDecoder, Replace, Strip and "
              "Fuse, and Sequences of them with nothing but Fuse, Strip or a one-character "
              "Replace after ByteLevel, ByteFallback or Fuse")
PER_TOKEN = ("Replace", "Strip", "Metaspace", "WordPiece", "BPEDecoder")


def decoder_steps(decoder: Any) -> list[dict[str, Any]]:
    """The decoder's steps in order, Sequences flattened; none where the tokenizer has none."""
    if not isinstance(decoder, dict):
        return []
    if decoder.get("type") == "Sequence":
        return [step for child in decoder.get("decoders") or [] for step in decoder_steps(child)]
    return [decoder]


def unrenderable(decoder: Any) -> str | None:
    """Why `decoder` (tokenizer.json's) cannot be rendered token by token, or None if it can."""
    state = "tokens"  # then "bytes" (after ByteFallback: byte runs are joined) or "fused"
    for step in decoder_steps(decoder):
        kind = step.get("type")
        if state == "tokens" and kind in PER_TOKEN:
            continue
        if state == "tokens" and kind in ("ByteLevel", "ByteFallback", "Fuse"):
            state = "bytes" if kind == "ByteFallback" else "fused"
            continue
        if kind == "Fuse" or (state == "fused" and (kind == "Strip" or _one_char(step))):
            state = "fused"
            continue
        if kind == "CTC":
            return "CTC (it merges repeated tokens)"
        if kind not in (*PER_TOKEN, "ByteLevel", "ByteFallback"):
            return f"{str(kind)[:40]!r} (a decoder type llm does not know)"
        after = "ByteFallback" if state == "bytes" else "ByteLevel or Fuse"
        return f"{kind} after {after} (it acts on the joined text, across tokens)"
    return None


def _one_char(step: dict[str, Any]) -> bool:
    """A Replace of one ASCII character: on joined text the same as on each token's bytes."""
    pattern = step.get("pattern")
    text = pattern.get("String") if isinstance(pattern, dict) else None
    return (step.get("type") == "Replace" and isinstance(text, str) and len(text) == 1
            and text.isascii() and isinstance(step.get("content"), str))


def check_decoder(decoder: Any, where: str, fix: str) -> None:
    """A one-line error for a decoder llm cannot render token by token (`unrenderable`)."""
    reason = unrenderable(decoder)
    if reason is not None:
        fail(f"{where}: the tokenizer's decoder {reason} cannot give each token's own text, "
             f"which llm needs to stream, stop and inspect text; llm renders {RENDERABLE}; "
             f"{fix}")


def renderer(decoder: Any) -> Callable[[str], bytes]:
    """A token's string → its bytes inside a text, by the decoder's steps (`unrenderable` is
    None). Token-by-token steps run in the `tokenizers` library itself, so they spell text as
    transformers does."""
    from llmcli.interop.tokenizer_export import byte_chars

    if not isinstance(decoder, dict):
        return lambda text: f" {text}".encode()  # no decoder: transformers joins with spaces
    steps = decoder_steps(decoder)
    split = next((i for i, s in enumerate(steps) if s.get("type") not in PER_TOKEN), len(steps))
    per_token = [_per_token(step) for step in steps[:split]]
    joined = steps[split:]  # starts with ByteLevel, ByteFallback or Fuse (`unrenderable`)
    inverse = {c: b for b, c in enumerate(byte_chars())}

    def render(text: str) -> bytes:
        for step in per_token:
            text = step(text)
        piece = text.encode("utf-8")
        kind = joined[0].get("type") if joined else None
        if kind == "ByteLevel" and all(c in inverse for c in text):
            piece = bytes(inverse[c] for c in text)
        elif kind == "ByteFallback" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            piece = bytes((int(text[3:5], 16),))
        for step in joined[1:]:  # Fuse; Strip, only at the text's ends; one-character Replace
            if step.get("type") == "Replace":
                piece = piece.replace(step["pattern"]["String"].encode(), step["content"].encode())
        return piece

    return render


def _per_token(step: dict[str, Any]) -> Callable[[str], str]:
    """One token-by-token step, run by the library's own decoder, on a token inside a text:
    after an empty first token (Metaspace and WordPiece treat the first one apart), before an
    empty last one (BPEDecoder treats the last one apart)."""
    from tokenizers import Regex, decoders

    kind = step["type"]
    if kind == "Replace":
        pattern = step.get("pattern") or {}
        what = Regex(pattern["Regex"]) if "Regex" in pattern else pattern.get("String")
        one = decoders.Replace(what, step["content"])
        return lambda text: one.decode([text])
    if kind == "Strip":
        strip = decoders.Strip(step["content"], step["start"], step["stop"])
        return lambda text: strip.decode([text])
    if kind == "BPEDecoder":
        bpe = decoders.BPEDecoder(step.get("suffix", "</w>"))
        return lambda text: bpe.decode([text, ""])
    if kind == "WordPiece":
        word = decoders.WordPiece(step.get("prefix", "##"), step.get("cleanup", True))
        return lambda text: word.decode(["", text])
    meta = decoders.Metaspace(step.get("replacement", "\u2581"))  # the first token apart: the same
    return lambda text: meta.decode(["", text])


def load(name: str) -> HFTokenizer:
    return HFTokenizer(name, folder_of(name))


def eos_token(source: Path, tok: Any, config: dict[str, Any]) -> str | None:
    """The end-of-text token of a transformers folder: its tokenizer_config.json, else the
    model config's (or generation config's) eos_token_id, else a well-known name."""
    candidates: list[str | None] = [token_text(_json_field(source / "tokenizer_config.json",
                                                           "eos_token"))]
    for ids in (config.get("eos_token_id"),
                _json_field(source / "generation_config.json", "eos_token_id")):
        first = ids[0] if isinstance(ids, list) and ids else ids
        if isinstance(first, int) and not isinstance(first, bool):
            candidates.append(tok.id_to_token(first))
    candidates += EOS_GUESSES
    return next((c for c in candidates if c and tok.token_to_id(c) is not None), None)


def _json_field(path: Path, key: str) -> Any:
    check_readable(path)  # a pipe would hang the read
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None
