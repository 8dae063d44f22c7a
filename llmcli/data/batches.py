"""Batches for training: random context windows from a memory-mapped token file.

The loop only sees the `BatchSource` protocol, so pretraining (windows of a corpus) and
fine-tuning (instruction records) share one loop:

    get_batch(split) -> (x, y)   int64 CPU tensors (B, T); y may hold IGNORE_INDEX (-100)
    state_dict() / load_state_dict(state)   tensors that make resuming exact
    tokens_per_batch             B * T, for tokens/s, max_tokens and MFU

`TokenWindows` samples as the seed did (uniform random start positions, y is x shifted by one)
but reads the corpus through a read-only memmap, so memory stays flat however big the corpus is.
Each split has its own generator, seeded by (seed, rank): evaluating more or less often never
changes the training batches, and every DDP rank draws different windows.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class BatchSource(Protocol):
    tokens_per_batch: int

    def get_batch(self, split: str) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


SPLITS = ("train", "val")


class TokenWindows:
    """Random (x, y) windows of `context_length` tokens from the train or validation part.

    `tokens` is any 1-D integer array (normally the uint32 memmap of a `.tokens` file);
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
    ) -> None:
        self.tokens = tokens
        self.batch_size = batch_size
        self.context_length = context_length
        self.lookup = lookup
        self.bounds = {"train": (0, val_start), "val": (val_start, len(tokens))}
        for split, (lo, hi) in self.bounds.items():
            if hi - lo < context_length + 1:
                raise ValueError(
                    f"the {split} split has {hi - lo} tokens, fewer than context_length + 1 = "
                    f"{context_length + 1}; use a bigger corpus, a smaller model.context_length "
                    f"or a different data.val_fraction")
        self.generators = {}
        for i, split in enumerate(SPLITS):
            gen = torch.Generator()
            # Distinct, reproducible streams per (split, rank).
            gen.manual_seed(seed * 1_000_003 + rank * 7919 + i)
            self.generators[split] = gen
        self._offsets = np.arange(context_length + 1, dtype=np.int64)

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.context_length

    def get_batch(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in self.bounds:
            raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
        lo, hi = self.bounds[split]
        T = self.context_length
        starts = torch.randint(lo, hi - T, (self.batch_size,), generator=self.generators[split])
        index = starts.numpy()[:, None] + self._offsets  # (B, T + 1)
        window = np.asarray(self.tokens[index], dtype=np.int64)
        if self.lookup is not None:
            window = self.lookup[window]
        window = torch.from_numpy(window)
        return window[:, :-1], window[:, 1:]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"rng.{split}": gen.get_state() for split, gen in self.generators.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for split, gen in self.generators.items():
            key = f"rng.{split}"
            if key not in state:
                raise ValueError(f"batch sampler state has no '{key}'; the trainer state does "
                                 "not belong to a pretraining run")
            gen.set_state(state[key].to(torch.uint8).contiguous())


def dense_lookup(vocab_ids: np.ndarray, unknown_id: int, max_id: int) -> np.ndarray:
    """A table mapping every tokenizer id up to `max_id` to its compact id (or `unknown_id`).

    One gather per batch instead of a binary search per token.
    """
    table = np.full(max_id + 1, unknown_id, dtype=np.int64)
    ids = vocab_ids[vocab_ids <= max_id]
    table[ids] = np.searchsorted(vocab_ids, ids)
    return table
