"""The logit lens: what the model would predict next if it stopped after each block.

The residual stream after the embeddings and after every block goes through the final norm and
the output layer, as the real output does after the last block; so the last row is the model's
actual prediction, and the rows above show how it forms layer by layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from llmcli.inspect.score import Candidate, candidates_json
from llmcli.inspect.tokens import label, token_json


@dataclass
class LensRow:
    layer: str  # "embeddings", "block 1", ...
    top: list[Candidate]
    final_prob: float  # probability here of the model's final first choice
    final_rank: int


@dataclass
class Lens:
    position: int
    id: int  # model id of the token at `position`, whose successor is predicted
    token: str
    rows: list[LensRow]
    logits: torch.Tensor = field(repr=False)  # (layers + 1, vocab)

    def to_json(self, gen: Any) -> dict[str, Any]:
        return {"position": self.position, **token_json(gen, self.id),
                "layers": [{"layer": r.layer, "top": candidates_json(gen, r.top),
                            "final_prob": r.final_prob, "final_rank": r.final_rank}
                           for r in self.rows]}


def logit_lens(gen: Any, ids: list[int], position: int = -1, top: int = 5) -> Lens:
    model = gen.model
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    position = position % len(ids)
    kept: list[torch.Tensor] = []
    with torch.no_grad():
        model.hidden(idx, keep=kept)
        stream = torch.stack([h[0, position] for h in kept])  # (layers + 1, d_model)
        logits, _ = model.head(model.norm(stream))
    logits = logits.float().cpu()
    logp = torch.log_softmax(logits, dim=-1)
    final = int(logp[-1].argmax())
    best_p, best_i = logp.topk(min(top, logp.shape[-1]), dim=-1)
    rows = []
    for layer in range(len(kept)):
        name = "embeddings" if layer == 0 else f"block {layer}"
        candidates = [Candidate(int(i), label(gen, int(i)), math.exp(float(v)))
                      for v, i in zip(best_p[layer].tolist(), best_i[layer].tolist(),
                                      strict=True)]
        rank = int((logp[layer] > logp[layer, final]).sum()) + 1
        rows.append(LensRow(name, candidates, math.exp(float(logp[layer, final])), rank))
    return Lens(position, int(ids[position]), label(gen, ids[position]), rows, logits)
