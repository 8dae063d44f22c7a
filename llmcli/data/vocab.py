"""Compact vocabulary: a small corpus's distinct token ids mapped to a dense range.

The seed's sales corpus uses 3,771 distinct cl100k ids out of 100K, so a compact model's
embedding and output layer shrink about 26x. Dense id i stands for tokenizer id `ids[i]`; the
last dense id (`unknown_id`) stands for every id the corpus never contained.

`compact_vocab` is the one rule for which ids a pretraining run keeps: those of the corpus's
training part, plus end-of-text and the literal text of the built-in prompt templates, so a
later fine-tune can end its answers and finds its template's tokens (`### Instruction:`...).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


class CompactVocab:
    def __init__(self, ids: Iterable[int]):
        self.ids = np.unique(np.fromiter(ids, dtype=np.int64))
        self.unknown_id = len(self.ids)

    @classmethod
    def from_tokens(cls, tokens: np.ndarray) -> CompactVocab:
        """Built from a (memory-mapped) token array, in chunks so RSS stays flat."""
        seen: np.ndarray = np.zeros(0, dtype=np.int64)
        step = 1 << 24
        for start in range(0, len(tokens), step):
            seen = np.union1d(seen, np.unique(tokens[start:start + step]))
        return cls(seen)

    @property
    def size(self) -> int:
        """Model vocabulary: the distinct ids plus one unknown id."""
        return len(self.ids) + 1

    def to_dense(self, tokens: np.ndarray | Sequence[int]) -> tuple[np.ndarray, int]:
        """Tokenizer ids -> dense ids, and how many were unknown."""
        tokens = np.asarray(tokens, dtype=np.int64)
        pos = np.searchsorted(self.ids, tokens)
        pos_clipped = np.minimum(pos, len(self.ids) - 1)
        known = self.ids[pos_clipped] == tokens
        dense = np.where(known, pos_clipped, self.unknown_id)
        return dense, int((~known).sum())

    def to_tokenizer(self, dense: Sequence[int] | np.ndarray) -> list[int]:
        """Dense ids -> tokenizer ids; the unknown id has no text and is dropped."""
        dense = np.asarray(dense, dtype=np.int64)
        return [int(self.ids[d]) for d in dense if 0 <= d < len(self.ids)]

    def to_list(self) -> list[int]:
        """For checkpoint metadata (`vocab_map`)."""
        return [int(i) for i in self.ids]


def reserved_ids(tokenizer: Any) -> np.ndarray:
    """Ids every compact vocabulary keeps: end-of-text and the built-in templates' own text."""
    import re

    from llmcli.data.templates import TEMPLATES

    pieces = [p for t in TEMPLATES.values() for p in re.split(r"\{\w+\}", t) if p]
    ids = {tokenizer.eot_id}
    for piece in pieces:
        ids.update(tokenizer.encode(piece))
    return np.array(sorted(ids), dtype=np.int64)


def compact_vocab(train_tokens: np.ndarray, tokenizer: Any) -> CompactVocab:
    """The compact vocabulary pretraining builds from a corpus's training part (see above)."""
    seen = CompactVocab.from_tokens(train_tokens)
    return CompactVocab(np.union1d(seen.ids, reserved_ids(tokenizer)))
