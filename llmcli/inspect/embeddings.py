"""The token-embedding table: rows with their token text, nearest neighbours, a 2-D PCA map.

"Most frequent tokens" for the PCA map come from, in order:
1. the recipe's corpus, when its token file (`llm tokenize` / `llm pretrain` output under
   data/) is on disk: ids counted over its first 16M tokens (nothing is downloaded);
2. otherwise a short built-in English text: its tokens that the vocabulary holds, by count;
3. topped up, when that is not enough, with the vocabulary's lowest ids (for cl100k, the
   pieces BPE merged first, roughly its most common ones).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmcli.inspect.tokens import label, textless, token_json

COUNT_LIMIT = 1 << 24  # tokens read from a corpus to count ids
SAMPLE_TEXT = (
    "The first thing you see when you open the book is a list of what is in it. It is one of "
    "the most useful things a reader can have, and it was made by people who knew how to "
    "write. We think that a good idea should be simple: if it is not, then there is more work "
    "to do. She said that he would come back from the city in the morning, but they did not "
    "know when, so we waited at home for a long time and talked about our day and the people "
    "we met. There are many ways to say the same thing, and each of them has its own use. "
    "Which one will you take, and why? All of this can be found in the next part, where the "
    "new names are given with their numbers: one, two, three, four, five, six, seven and ten."
)


@dataclass
class EmbeddingRows:
    """Rows of the token-embedding table (`tok_emb.weight`, vocabulary × d_model)."""

    shape: tuple[int, int]
    ids: list[int]
    tokens: list[str]
    rows: torch.Tensor  # (len(ids), d_model)

    def to_json(self, gen: Any) -> dict[str, Any]:
        return {"shape": list(self.shape),
                "rows": [{**token_json(gen, i), "norm": float(r.norm()), "values": r.tolist()}
                         for i, r in zip(self.ids, self.rows, strict=True)]}


@dataclass
class Neighbour:
    id: int
    token: str
    cosine: float


@dataclass
class Neighbours:
    """The tokens whose embeddings point most nearly the same way as the query's."""

    id: int
    token: str
    nearest: list[Neighbour]

    def to_json(self, gen: Any) -> dict[str, Any]:
        return {**token_json(gen, self.id),
                "nearest": [{**token_json(gen, n.id), "cosine": n.cosine} for n in self.nearest]}


@dataclass
class PCAMap:
    """Embeddings of `ids` projected on their first two principal components."""

    ids: list[int]
    tokens: list[str]
    coords: torch.Tensor  # (n, 2)
    explained: list[float]  # share of the variance along each component
    source: str  # where the token list came from
    components: torch.Tensor = field(repr=False)  # (2, d_model), unit vectors

    def to_json(self, gen: Any) -> dict[str, Any]:
        return {"source": self.source, "explained_variance": self.explained,
                "points": [{**token_json(gen, i), "x": float(c[0]), "y": float(c[1])}
                           for i, c in zip(self.ids, self.coords, strict=True)]}


def table(model: Any) -> torch.Tensor:
    return model.tok_emb.weight.detach().float()


def default_ids(vocab_size: int, head: int = 5, tail: int = 2) -> list[int]:
    """The first and last ids, as the tutorial's printed table shows them."""
    if vocab_size <= head + tail:
        return list(range(vocab_size))
    return list(range(head)) + list(range(vocab_size - tail, vocab_size))


def embedding_rows(gen: Any, ids: list[int] | None = None) -> EmbeddingRows:
    weight = table(gen.model)
    ids = default_ids(weight.shape[0]) if ids is None else [int(i) for i in ids]
    return EmbeddingRows((int(weight.shape[0]), int(weight.shape[1])), ids,
                         [label(gen, i) for i in ids], weight[ids].cpu())


def nearest(gen: Any, token_id: int, k: int = 10) -> Neighbours:
    """The k ids of highest cosine similarity to `token_id` (itself and textless ids left out)."""
    weight = table(gen.model)
    unit = torch.nn.functional.normalize(weight, dim=-1)
    cosine = unit @ unit[token_id]
    skip = [token_id, *textless(gen)]
    cosine[torch.tensor(skip, dtype=torch.long, device=cosine.device)] = float("-inf")
    k = min(k, weight.shape[0] - len(set(skip)))
    values, index = cosine.topk(max(k, 0))
    return Neighbours(int(token_id), label(gen, token_id),
                      [Neighbour(int(i), label(gen, int(i)), float(v))
                       for v, i in zip(values.tolist(), index.tolist(), strict=True)])


def pca(gen: Any, ids: list[int], source: str = "") -> PCAMap:
    """Project the rows of `ids` on their two principal components (SVD of the centred rows).

    Each component's sign is chosen so that its largest-magnitude loading is positive, so the
    picture does not flip between runs.
    """
    if len(ids) < 3:
        raise ValueError("PCA needs at least 3 tokens")
    rows = table(gen.model)[ids].cpu().double()
    centred = rows - rows.mean(dim=0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    comps = vh[:2]
    signs = torch.sign(comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)))
    comps = comps * signs
    var = s.pow(2)
    explained = (var[:2] / var.sum()).tolist() if float(var.sum()) > 0 else [0.0, 0.0]
    return PCAMap([int(i) for i in ids], [label(gen, i) for i in ids],
                  (centred @ comps.T).float(), explained, source, comps.float())


# ---------------------------------------------------------------------------------------------
# Which tokens are frequent


def corpus_token_file(recipe: Any, data_dir: Path = Path("data")) -> Path | None:
    """The recipe's corpus as a token file already on disk (never fetched or tokenized here)."""
    from llmcli.console import UserError
    from llmcli.data.token_cache import locate

    try:
        cached = locate(recipe.data.source, recipe.data.tokenizer, data_dir)
    except UserError:
        return None
    return cached.path if cached is not None else None


def frequent_ids(gen: Any, n: int, data_dir: Path = Path("data")) -> tuple[list[int], str]:
    """The model ids of the `n` most frequent tokens, and where the counts came from."""
    import numpy as np

    skip = textless(gen) | ({gen.eos_id} if gen.eos_id is not None else set())
    vocab_size = gen.vocab.vocab_size
    path = corpus_token_file(gen.recipe, data_dir)
    chosen: list[int] = []
    source = ""
    if path is not None:
        if path.is_dir():  # a shard folder: its first COUNT_LIMIT tokens across shards
            from llmcli.data.shards import open_shards

            tokens = np.asarray(open_shards(path).head(COUNT_LIMIT))
        else:
            tokens = np.memmap(path, dtype="<u4", mode="r")[:COUNT_LIMIT]
        counts = np.bincount(tokens, minlength=gen.tokenizer.n_vocab)
        if gen.vocab.compact is not None:
            ids = gen.vocab.compact.ids
            model_counts = np.where(ids < len(counts), counts[np.minimum(ids, len(counts) - 1)],
                                    0)
        else:
            model_counts = counts[:vocab_size]
        for i in np.argsort(-model_counts, kind="stable").tolist():
            if len(chosen) == n or model_counts[i] == 0:
                break
            if i not in skip:
                chosen.append(i)
        source = f"the {len(chosen)} most frequent tokens of {path}"
    if len(chosen) < n:
        counter = Counter(i for i in gen.tokenizer.encode(SAMPLE_TEXT) if gen.vocab.has(i))
        sample = [gen.vocab.map([i])[0][0] for i, _ in counter.most_common()]
        added = [i for i in sample if i not in skip and i not in chosen][:n - len(chosen)]
        if added and source:
            source += ", then of a built-in English paragraph"
        chosen += added
        source = source or "the most frequent tokens of a built-in English paragraph"
    if len(chosen) < n:
        taken = set(chosen)
        added = [i for i in range(vocab_size) if i not in skip and i not in taken][
            :n - len(chosen)]
        if added:
            source += ", then the lowest ids"
        chosen += added
    return chosen, source
