"""Batches for training: random context windows from a memory-mapped token file.

The loop only sees the `BatchSource` protocol, so pretraining (windows of a corpus) and
fine-tuning (instruction records) share one loop:

    get_batch(split, purpose)    int64 CPU tensors (B, T); y may hold IGNORE_INDEX (-100);
                                 purpose "train" (the training draws) or "eval"
    state_dict() / load_state_dict(state)   tensors that make resuming exact
    tokens_per_batch             B * T, for tokens/s, max_tokens and MFU

`TokenWindows` samples as the seed did (uniform random start positions, y is x shifted by one)
but reads the corpus through a read-only memmap, so memory stays flat however big the corpus is.
A sharded corpus (`llmcli.data.shards.ShardedTokens`: a folder of token files with one index)
is read the same way, as the concatenation of its shards: start positions are drawn over the
whole training part, so every rank draws from every shard, windows may run across a shard
boundary (as they run across documents), and the batches are those of the single file.
Training draws and evaluation draws come from separate generators, seeded by (seed, rank):
evaluating more or less often never changes the training batches, and every DDP rank draws
different windows.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class BatchSource(Protocol):
    tokens_per_batch: int

    def get_batch(self, split: str,
                  purpose: str = "train") -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


SPLITS = ("train", "val")
# Random streams: training draws, and evaluation's own for each split. The seed offsets keep
# those of earlier versions ("eval.val" was "val"), so old runs evaluate on the same windows.
STREAMS = {"train": 0, "eval.val": 1, "eval.train": 2}


def stream_name(split: str, purpose: str) -> str:
    """Which generator serves a draw: only training's own draws touch the training stream."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
    if purpose not in ("train", "eval"):
        raise ValueError(f"unknown purpose {purpose!r}; use 'train' or 'eval'")
    return "train" if (split, purpose) == ("train", "train") else f"eval.{split}"


def torch_seed(value: int) -> int:
    """A seed derived by arithmetic (`seed * 1_000_003 + ...`), as a 64-bit one torch accepts.

    torch reads a seed as an unsigned 64-bit number and refuses a larger one ("Overflow when
    unpacking long long"), which train.seed up to 2^63 - 1 reaches once multiplied. Modulo 2^64
    is torch's own reading of every value it took before, so those runs keep their streams."""
    return value % 2**64


def seeded_generators(seed: int, rank: int) -> dict[str, torch.Generator]:
    """One generator per stream, distinct and reproducible per (stream, rank)."""
    out = {}
    for name, i in STREAMS.items():
        gen = torch.Generator()
        gen.manual_seed(torch_seed(seed * 1_000_003 + rank * 7919 + i))
        out[name] = gen
    return out


class TokenWindows:
    """Random (x, y) windows of `context_length` tokens from the train or validation part.

    `tokens` is any 1-D integer array (normally the uint32 memmap of a `.tokens` file, or the
    shards of a sharded corpus read as one);
    `val_start` is where validation begins. `lookup`, when given, maps tokenizer ids to model
    ids (a compact vocabulary): `lookup[token_id]`.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        val_start: int,
        batch_size: int,
        context_length: int,
        *,
        seed: int = 1337,
        rank: int = 0,
        lookup: np.ndarray | None = None,
        limit: int | None = None,
        name: str = "the token file",
    ) -> None:
        self.tokens = tokens
        # ids must be below this (the model's vocabulary, or the compact lookup's length): a
        # token file edited or made for another tokenizer is named, not an IndexError
        self.limit = len(lookup) if lookup is not None else limit
        self.name = name
        self.batch_size = batch_size
        self.context_length = context_length
        self.lookup = lookup
        self.bounds = {"train": (0, val_start), "val": (val_start, len(tokens))}
        for split, (lo, hi) in self.bounds.items():
            if split == "val" and hi == lo:
                raise ValueError("the validation split is empty (data.val_fraction 0?): "
                                 "pretraining measures its loss on held-out tokens; set "
                                 "data.val_fraction above 0, e.g. 0.1")
            if hi - lo < context_length + 1:
                raise ValueError(
                    f"the {split} split has {hi - lo:,} token{'s' * (hi - lo != 1)}, fewer than "
                    f"context_length + 1 = "
                    f"{context_length + 1}; use a bigger corpus, a smaller model.context_length "
                    f"or a different data.val_fraction")
        self.generators = seeded_generators(seed, rank)
        self._offsets = np.arange(context_length + 1, dtype=np.int64)

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.context_length

    def get_batch(self, split: str, purpose: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        gen = self.generators[stream_name(split, purpose)]
        lo, hi = self.bounds[split]
        T = self.context_length
        starts = torch.randint(lo, hi - T, (self.batch_size,), generator=gen)
        index = starts.numpy()[:, None] + self._offsets  # (B, T + 1)
        window = np.asarray(self.tokens[index], dtype=np.int64)
        if self.limit is not None:
            check_ids(window, self.limit, self.name)
        if self.lookup is not None:
            window = self.lookup[window]
        window = torch.from_numpy(window)
        return window[:, :-1], window[:, 1:]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return generator_states(self.generators)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_generator_states(self.generators, state)


def generator_states(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    return {f"rng.{name}": gen.get_state() for name, gen in generators.items()}


def load_generator_states(generators: dict[str, torch.Generator],
                          state: dict[str, torch.Tensor]) -> None:
    """Restore every stream; a state from before evaluation had its own training-split stream
    ("rng.val" only) restores what it has."""
    if "rng.eval.val" not in state and "rng.val" in state:
        state = {**state, "rng.eval.val": state["rng.val"]}
    for name, gen in generators.items():
        key = f"rng.{name}"
        if key in state:
            gen.set_state(state[key].to(torch.uint8).contiguous())
        elif name == "train":
            raise ValueError(f"batch sampler state has no '{key}'; the trainer state does not "
                             "belong to this kind of run")


def check_ids(tokens: np.ndarray, limit: int, name: str) -> None:
    """Ids at or beyond `limit` (the model's vocabulary, or a compact lookup's length) come
    from a token file altered, or made for another tokenizer: named, not an IndexError."""
    largest = int(tokens.max()) if len(tokens) else -1
    if largest >= limit:
        from llmcli.console import fail

        fail(f"{name}: holds token id {largest:,}, beyond the {limit:,} ids the model reads; "
             "the file was altered or made with another tokenizer: tokenize the text again "
             "with `llm tokenize`")


def dense_lookup(vocab_ids: np.ndarray, unknown_id: int, max_id: int) -> np.ndarray:
    """A table mapping every tokenizer id up to `max_id` to its compact id (or `unknown_id`).

    One gather per batch instead of a binary search per token.
    """
    table = np.full(max_id + 1, unknown_id, dtype=np.int64)
    ids = vocab_ids[vocab_ids <= max_id]
    table[ids] = np.searchsorted(vocab_ids, ids)
    return table
