"""Instruction data: Alpaca records → prompt + answer token ids with a loss mask, in batches.

Prompts come from `templates`; the fine-tuned checkpoint stores the template text itself
(metadata "template"), so `llm generate --instruct` renders questions exactly as training did.

One example is `prompt tokens + answer tokens + end-of-text`, cut to context_length + 1 tokens.
Its mask marks the tokens the model learns to predict: the answer and its end-of-text (the prompt
too with `finetune.train_on_prompt`). Examples are padded to the context one per row, or packed
several to a row (`finetune.packing`; attention then also sees the earlier records of the row,
as in GPT-style packing, and the mask keeps their prompts out of the loss).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmcli.console import fail
from llmcli.constants import IGNORE_INDEX
from llmcli.data.batches import (
    generator_states,
    load_generator_states,
    seeded_generators,
    stream_name,
)
from llmcli.data.templates import render_prompt, resolve_template
from llmcli.data.vocab import CompactVocab

# Texts that can end an answer when the base vocabulary has no end-of-text id (first that fits).
STOP_TEXTS = ("<|endoftext|>", "<|end|>", "<end>", "</s>", "[END]")
PAD_ID = 0  # padding is never a target and sits after the real tokens, so any id will do
# ---------------------------------------------------------------------------------------------
# Records -> examples


@dataclass
class Example:
    """One record as model token ids; `mask[i]` is True where token i is a loss target."""

    index: int  # the record's position in the file, for messages
    ids: list[int]
    mask: list[bool]


@dataclass
class EncodeReport:
    """What happened to the records, for the run's log."""

    total: int = 0  # records in the file
    selected: int = 0  # records in data.records
    malformed: list[tuple[int, str]] = field(default_factory=list)
    truncated: int = 0  # cut to the context (their end-of-text is lost)
    no_room: list[int] = field(default_factory=list)  # prompt alone fills the context
    inputs_dropped: int = 0  # records with an input the template has no {input} for
    tokens: int = 0
    unknown_tokens: int = 0  # mapped to a compact vocabulary's unknown id
    target_tokens: int = 0

    def summary(self) -> str:
        return (f"{self.selected:,} of {self.total:,} records selected, "
                f"{self.selected - len(self.malformed) - len(self.no_room):,} used")

    def warnings(self, context_length: int) -> list[str]:
        """What a user should know about: records skipped, cut, or partly unknown."""
        out = []
        if self.malformed:
            shown = "; ".join(f"record {i}: {why}" for i, why in self.malformed[:3])
            more = f" (and {len(self.malformed) - 3} more)" if len(self.malformed) > 3 else ""
            out.append(f"skipped {len(self.malformed)} malformed record(s): {shown}{more}")
        if self.truncated:
            out.append(f"{self.truncated:,} record(s) longer than the context ({context_length} "
                       "tokens) were truncated")
        if self.no_room:
            out.append(f"skipped {len(self.no_room)} record(s) whose prompt alone fills the "
                       f"context: {_indices(self.no_room)}")
        if self.inputs_dropped:
            out.append(f"{self.inputs_dropped:,} record(s) have an input, but the template has "
                       "no {input} field, so their inputs are left out of the prompts; add "
                       "{input} to finetune.template (or use alpaca / alpaca-short)")
        if self.unknown_tokens:
            share = self.unknown_tokens / max(self.tokens, 1)
            out.append(f"{self.unknown_tokens:,} of {self.tokens:,} tokens ({share:.1%}) are "
                       "outside the base model's compact vocabulary (mapped to its unknown id)")
        return out


def _indices(items: Sequence[int], limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


class ModelVocab:
    """Tokenizer ids -> the base model's ids (identity, or its compact vocabulary)."""

    def __init__(self, vocab_size: int, vocab_map: list[int] | None = None):
        self.vocab_size = vocab_size
        self.compact = CompactVocab(vocab_map) if vocab_map is not None else None
        if self.compact is not None and self.compact.size != vocab_size:
            raise ValueError(f"vocab_map has {self.compact.size} entries with its unknown id, "
                             f"the model's vocabulary is {vocab_size}")

    def has(self, token_id: int) -> bool:
        if self.compact is None:
            return token_id < self.vocab_size
        return bool(self.compact.to_dense([token_id])[1] == 0)

    def map(self, ids: list[int]) -> tuple[list[int], int]:
        """(model ids, how many were unknown); full vocabularies raise on ids out of range."""
        if self.compact is None:
            too_big = [i for i in ids if i >= self.vocab_size]
            if too_big:
                raise ValueError(f"token id {too_big[0]} is outside the base model's vocabulary "
                                 f"of {self.vocab_size}")
            return list(ids), 0
        dense, unknown = self.compact.to_dense(ids)
        return dense.tolist(), unknown


def answer_end(tokenizer: Any, vocab: ModelVocab) -> tuple[list[int], str | None]:
    """The model ids that end every answer, and the stop string generation must watch for.

    End-of-text itself when the base vocabulary holds it (no stop string). Some bases cannot:
    the seed's scifi model (vocabulary 100,256 < cl100k's end-of-text id 100,257), or a compact
    vocabulary built from a single-document corpus. Their answers end with the first of
    STOP_TEXTS whose tokens the vocabulary holds, written as ordinary text; the checkpoint
    records it as its stop string ("stop").
    """
    if vocab.has(tokenizer.eot_id):
        return vocab.map([tokenizer.eot_id])[0], None
    for text in STOP_TEXTS:
        ids = tokenizer.encode(text)
        if all(vocab.has(i) for i in ids):
            return vocab.map(ids)[0], text
    fail(f"the base model's vocabulary ({vocab.vocab_size:,} ids) holds neither end-of-text "
         f"(id {tokenizer.eot_id:,}) nor the tokens of a stop text ({', '.join(STOP_TEXTS)}), "
         "so answers could not end; fine-tune a base whose vocabulary includes end-of-text "
         "(a corpus of several documents, or model.vocab_size above that id)")


def encode_records(
    records: Sequence[Any],
    tokenizer: Any,
    vocab: ModelVocab,
    *,
    template: str,
    context_length: int,
    records_range: slice | None = None,
    train_on_prompt: bool = False,
    strict: bool = False,
    problem: Callable[[Any], str | None] | None = None,
    source: str | Path | None = None,
) -> tuple[list[Example], EncodeReport]:
    """Turn Alpaca records into examples; malformed records are skipped and reported (or fatal).

    `problem(record)` says why a record is unusable (None if fine); record indices in messages
    are positions in the file, so `data.records: 1000:5001` still reports `record 1234`, and
    errors name the file (`source`) they are in.
    """
    template = resolve_template(template)
    problem = problem or _record_problem
    report = EncodeReport(total=len(records))
    indices = range(len(records))[records_range or slice(None)]
    report.selected = len(indices)
    end_ids, _ = answer_end(tokenizer, vocab)

    usable: list[tuple[int, str, str]] = []
    for i in indices:
        why = problem(records[i])
        if why:
            if strict:
                fail(f"{_at(source, i)}: {why}; fix the record or drop --strict to skip "
                     "malformed records")
            report.malformed.append((i, why))
            continue
        rec = records[i]
        given = rec.get("input") or ""
        report.inputs_dropped += bool(given.strip()) and "{input}" not in template
        prompt = render_prompt(template, rec["instruction"], given)
        usable.append((i, prompt, rec["output"]))

    prompts = [[*tokenizer.start_ids, *ids]  # each record is a sequence: `encode_start`
               for ids in tokenizer.encode_batch([p for _, p, _ in usable])]
    answers = tokenizer.encode_batch([a for _, _, a in usable])
    examples: list[Example] = []
    limit = context_length + 1  # x and y of one row come from context_length + 1 tokens
    for (i, _, _), prompt_ids, answer_ids in zip(usable, prompts, answers, strict=True):
        try:
            p_ids, p_unknown = vocab.map(prompt_ids)
            a_ids, a_unknown = vocab.map(answer_ids)
        except ValueError as exc:
            if strict:
                fail(f"{_at(source, i)}: {exc}; use a base model whose vocabulary covers the "
                     "data")
            report.malformed.append((i, str(exc)))
            continue
        if len(p_ids) >= limit:
            report.no_room.append(i)
            continue
        ids = p_ids + a_ids + end_ids
        mask = [train_on_prompt] * len(p_ids) + [True] * (len(a_ids) + len(end_ids))
        if len(ids) > limit:
            report.truncated += 1
            ids, mask = ids[:limit], mask[:limit]
        report.tokens += len(p_ids) + len(a_ids)
        report.unknown_tokens += p_unknown + a_unknown
        report.target_tokens += sum(mask)
        examples.append(Example(i, ids, mask))
    if strict and report.no_room:
        fail(f"{_at(source, report.no_room[0])}: its prompt alone is longer than the context "
             f"({context_length} tokens); shorten it or drop --strict to skip such records")
    return examples, report


def _at(source: str | Path | None, index: int) -> str:
    """Where a record is, as an error names it: `FILE: record N`."""
    return f"{source}: record {index}" if source is not None else f"record {index}"


def _record_problem(rec: Any) -> str | None:
    """An Alpaca record's problem, or one with no text at all (it would teach only the
    end-of-text token; `llm tokenize` refuses a file of them too)."""
    from llmcli.data.records import record_problem, record_text

    problem = record_problem(rec)
    if problem is None and not record_text(rec):
        return "is empty (no text in instruction, input or output)"
    return problem


def split_examples(examples: list[Example], val_fraction: float, seed: int,
                   source: str | Path | None = None) -> tuple[list[Example], list[Example]]:
    """(train, val): a seeded shuffle, then the last `val_fraction` of records held out.
    `source`: the records' file, named by the error."""
    import random

    if len(examples) < 2:
        where = f"{source}: " if source is not None else ""
        fail(f"{where}only {len(examples)} usable record(s); fine-tuning needs at least 2 (one "
             "for validation); check data.records and the data file")
    order = list(examples)
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(order) * val_fraction)), len(order) - 1)
    return order[:-n_val], order[-n_val:]


def build_rows(examples: Sequence[Example], context_length: int,
               packing: bool) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask), each (rows, context_length + 1): one example per row, or packed greedily.

    Packing keeps records whole and in order, starting a new row when the next one does not fit.
    """
    width = context_length + 1
    rows: list[list[Example]] = []
    used = width  # forces a new row for the first example
    for ex in examples:
        if packing and used + len(ex.ids) <= width:
            rows[-1].append(ex)
            used += len(ex.ids)
        else:
            rows.append([ex])
            used = len(ex.ids)
    tokens = np.full((len(rows), width), PAD_ID, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=bool)
    for r, row in enumerate(rows):
        col = 0
        for ex in row:
            tokens[r, col:col + len(ex.ids)] = ex.ids
            mask[r, col:col + len(ex.ids)] = ex.mask
            col += len(ex.ids)
    return tokens, mask


# ---------------------------------------------------------------------------------------------
# The BatchSource


class InstructBatches:
    """Batches of instruction rows for the shared training loop (the BatchSource protocol).

    Each split walks through its rows in a seeded random order, a fresh order every epoch, so a
    fine-tuning run sees every record once per epoch. The orders, positions and generators are
    the state that makes resume exact.
    """

    def __init__(self, splits: dict[str, tuple[np.ndarray, np.ndarray]], batch_size: int, *,
                 seed: int = 1337, rank: int = 0) -> None:
        self.batch_size = batch_size
        self.splits = {name: (torch.from_numpy(t), torch.from_numpy(m))
                       for name, (t, m) in splits.items()}
        self.context_length = next(iter(self.splits.values()))[0].shape[1] - 1
        for name, (tokens, _) in self.splits.items():
            if len(tokens) == 0:
                raise ValueError(f"the {name} split has no rows")
        self.generators = seeded_generators(seed, rank)
        self.order = {name: torch.randperm(self.rows(_split_of(name)), generator=gen)
                      for name, gen in self.generators.items()}
        self.cursor = dict.fromkeys(self.generators, 0)

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.context_length

    def rows(self, split: str) -> int:
        return len(self.splits[split][0])

    def _next_rows(self, stream: str) -> torch.Tensor:
        picked = []
        need = self.batch_size
        while need:
            order, at = self.order[stream], self.cursor[stream]
            take = order[at:at + need]
            picked.append(take)
            need -= len(take)
            self.cursor[stream] = at + len(take)
            if self.cursor[stream] >= len(order):  # epoch done: a new order
                self.order[stream] = torch.randperm(len(order), generator=self.generators[stream])
                self.cursor[stream] = 0
        return torch.cat(picked)

    def get_batch(self, split: str, purpose: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        stream = stream_name(split, purpose)
        tokens, mask = self.splits[split]
        index = self._next_rows(stream)
        rows, row_mask = tokens[index], mask[index]
        y = torch.where(row_mask[:, 1:], rows[:, 1:], torch.full_like(rows[:, 1:], IGNORE_INDEX))
        return rows[:, :-1].contiguous(), y

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = generator_states(self.generators)
        for name in self.generators:
            state[f"order.{name}"] = self.order[name].clone()
            state[f"cursor.{name}"] = torch.tensor([self.cursor[name]], dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in self.generators:
            if f"order.{name}" not in state or f"cursor.{name}" not in state:
                raise ValueError(f"batch sampler state has no 'order.{name}'; the trainer state "
                                 "does not belong to a fine-tuning run of this version")
            rows = self.rows(_split_of(name))
            order, cursor = state[f"order.{name}"], state[f"cursor.{name}"]
            if order.dim() == 1 and len(order) != rows:
                raise ValueError(f"the saved {_split_of(name)} split has {len(order)} rows, this "
                                 f"data has {rows}; resume with the same data and recipe")
            # a row out of range would fail in the middle of training, a cursor past the end
            # never fill a batch again
            if order.dim() != 1 or order.is_floating_point() or not torch.equal(
                    torch.sort(order.to(torch.int64)).values, torch.arange(rows)):
                raise ValueError(f"batch sampler state order.{name} is not an order of the "
                                 f"{rows} rows; the trainer state was altered")
            if cursor.numel() != 1 or not 0 <= int(cursor.reshape(-1)[0]) < rows:
                raise ValueError(f"batch sampler state cursor.{name} is not a row of the "
                                 f"{rows}; the trainer state was altered")
            self.order[name] = order.to(dtype=torch.int64).clone()
            self.cursor[name] = int(cursor.reshape(-1)[0])
        load_generator_states(self.generators, state)


def _split_of(stream: str) -> str:
    return stream.rsplit(".", 1)[-1]
