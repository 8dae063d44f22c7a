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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmcli.checkpoint import CHECKPOINTS_DIR
from llmcli.console import UserError, check_readable, fail, first_line
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
        self.tok.no_truncation()
        self.tok.no_padding()
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
        """Each id's bytes, by how the tokenizer's decoder spells them."""
        if self._table is not None:
            return self._table
        from llmcli.interop.tokenizer_export import byte_chars

        kinds = _decoder_kinds(self._decoder)
        inverse = {c: b for b, c in enumerate(byte_chars())}
        added = {t.content for t in self.tok.get_added_tokens_decoder().values()}
        table: list[bytes | None] = [None] * self.n_vocab
        for text, token_id in self.tok.get_vocab(with_added_tokens=True).items():
            if text in added:
                table[token_id] = text.encode("utf-8")
            elif "ByteLevel" in kinds and all(c in inverse for c in text):
                table[token_id] = bytes(inverse[c] for c in text)
            elif "ByteFallback" in kinds and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
                table[token_id] = bytes((int(text[3:5], 16),))
            elif kinds & {"Metaspace", "Replace"}:
                table[token_id] = text.replace("\u2581", " ").encode("utf-8")
            else:
                table[token_id] = self.tok.decode([token_id], skip_special_tokens=False).encode()
        self._table = table
        return table


def _decoder_kinds(decoder: Any) -> set[str]:
    if not isinstance(decoder, dict):
        return set()
    kinds = {str(decoder.get("type"))}
    for child in decoder.get("decoders") or []:
        kinds |= _decoder_kinds(child)
    return kinds


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
