"""Attention weights of every block and head over a prompt, by the seed's explicit steps.

`GPT.attention_mode("reference")` makes every block compute scores = Q·Kᵀ/√d, set the future
(above the diagonal) to −inf, softmax, and keep the weights; the outputs equal the fused
kernel's (tests check it). Row i of a map is query token i; column j is how much it takes from
token j (rows sum to 1, zero above the diagonal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llmcli.inspect.tokens import label, token_json


@dataclass
class Attended:
    index: int  # position of the key token in the prompt
    token: str
    weight: float


@dataclass
class AttentionMaps:
    ids: list[int]
    tokens: list[str]
    weights: torch.Tensor  # (blocks, heads, T, T)

    @property
    def num_blocks(self) -> int:
        return int(self.weights.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.weights.shape[1])

    def top(self, block: int, head: int, k: int = 3) -> list[list[Attended]]:
        """For each query position, the k key positions it attends to most."""
        rows = []
        for query, row in enumerate(self.weights[block, head]):
            values, index = row[:query + 1].topk(min(k, query + 1))
            rows.append([Attended(int(i), self.tokens[int(i)], float(v))
                         for v, i in zip(values.tolist(), index.tolist(), strict=True)])
        return rows

    def to_json(self, gen: Any, blocks: list[int], heads: list[int],
                k: int = 3) -> dict[str, Any]:
        prompt = [token_json(gen, i) for i in self.ids]
        maps = [{"block": b + 1, "head": h + 1, "weights": self.weights[b, h].tolist(),
                 "top": [[{"index": a.index, **prompt[a.index], "weight": a.weight} for a in row]
                         for row in self.top(b, h, k)]}
                for b in blocks for h in heads]
        return {"ids": [t["id"] for t in prompt], "tokens": [t["token"] for t in prompt],
                "maps": maps}


def attention_maps(gen: Any, ids: list[int]) -> AttentionMaps:
    """Run the prompt through the reference attention path and collect every block's weights."""
    model = gen.model
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    model.attention_mode("reference")
    try:
        with torch.no_grad():
            model(idx)
        weights = torch.stack([block.attn.weights[0].float().cpu() for block in model.blocks])
    finally:
        model.attention_mode("sdpa")
    return AttentionMaps(list(ids), [label(gen, i) for i in ids], weights)
