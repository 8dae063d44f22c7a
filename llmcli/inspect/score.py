"""The probability a model gives every token of a fixed text: loss, perplexity, surprises.

The text starts a document: what a document begins with goes first (`Generator.document_start`:
the tokenizer's BOS where its post-processor adds one, else end-of-text, as between documents in
training), so even the first token is scored; without either, scoring starts at the second
token. Token i is predicted from tokens before it; the loss is the mean of −ln p over
the scored tokens, exactly what the model's own cross-entropy gives for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from llmcli.console import fail
from llmcli.inspect.tokens import label, token_json


@dataclass
class Candidate:
    id: int
    token: str
    prob: float


@dataclass
class TokenScore:
    id: int  # model id of the token
    token: str
    data: bytes  # the token's own bytes (its text even when it reads as the unknown id)
    prob: float
    rank: int  # 1 = the model's first choice
    top: list[Candidate]  # the model's first choices at this position

    @property
    def surprise(self) -> float:
        """−log2 p: bits of surprise."""
        return -math.log2(max(self.prob, 1e-45))


@dataclass
class TextScore:
    tokens: list[TokenScore]
    start: str | None  # the token placed before the text (end-of-text), or None
    lead: bytes  # the unscored first token's bytes when there is no start token
    loss: float  # mean −ln p over the scored tokens (nats)
    num_bytes: int
    start_id: int | None  # the start token's model id

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def accuracy(self) -> float:
        return sum(t.rank == 1 for t in self.tokens) / len(self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.loss * len(self.tokens) / math.log(2) / max(self.num_bytes, 1)

    def wrong(self, limit: int = 10) -> list[tuple[int, TokenScore]]:
        """Where the model's first choice was another token, most surprising first."""
        found = [(i, t) for i, t in enumerate(self.tokens) if t.rank > 1]
        return sorted(found, key=lambda item: item[1].prob)[:limit]

    def to_json(self, gen: Any) -> dict[str, Any]:
        """A token that read as a compact vocabulary's unknown id is {"id": null, "token":
        null}, as the model saw it: its probability is the unknown id's."""
        start = token_json(gen, self.start_id)["token"] if self.start_id is not None else None
        return {
            "loss": self.loss, "perplexity": self.perplexity, "accuracy": self.accuracy,
            "bits_per_byte": self.bits_per_byte, "scored_tokens": len(self.tokens),
            "start": start,
            "tokens": [{**token_json(gen, t.id), "prob": t.prob, "rank": t.rank,
                        "top": candidates_json(gen, t.top)} for t in self.tokens],
        }


def candidates_json(gen: Any, candidates: list[Candidate]) -> list[dict[str, Any]]:
    return [{**token_json(gen, c.id), "prob": c.prob} for c in candidates]


def score_text(gen: Any, text: str, top: int = 3) -> TextScore:
    if not text:
        fail("score: empty text; give the text to score (TEXT or --file)")
    raw = gen.tokenizer.encode(text)
    ids = gen.encode(text)[len(gen.tokenizer.start_ids):]  # the text's own
    lead_in = gen.document_start()
    start = lead_in[-1] if lead_in else None
    seq = lead_in + ids
    if len(seq) < 2:
        fail("score: the text is a single token and this vocabulary has no end-of-text to "
             "predict it from; give a longer text")
    if len(seq) - 1 > gen.context_length:
        fail(f"score: the text is {len(ids):,} tokens and this model's context is "
             f"{gen.context_length}; score at most {gen.context_length - len(lead_in) + 1}"
             " tokens at a time")
    model = gen.model
    device = next(model.parameters()).device
    idx = torch.tensor([seq], dtype=torch.long, device=device)
    skip = max(len(lead_in) - 1, 0)  # positions before the start token predict nothing scored
    with torch.no_grad():
        logits, _ = model(idx[:, :-1])
    logp = torch.log_softmax(logits[0, skip:].float(), dim=-1).cpu()
    targets = idx[0, skip + 1:].cpu()
    chosen = logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    ranks = (logp > chosen.unsqueeze(1)).sum(dim=1) + 1
    best_p, best_i = logp.topk(min(top, logp.shape[-1]), dim=-1)
    scored_raw = raw if start is not None else raw[1:]
    tokens = []
    for pos, token in enumerate(targets.tolist()):
        top_list = [Candidate(int(i), label(gen, int(i)), math.exp(float(v)))
                    for v, i in zip(best_p[pos].tolist(), best_i[pos].tolist(), strict=True)]
        tokens.append(TokenScore(int(token), label(gen, token),
                                 gen.tokenizer.token_bytes(scored_raw[pos]),
                                 math.exp(float(chosen[pos])), int(ranks[pos]), top_list))
    loss = -float(chosen.double().mean())
    lead = b"" if start is not None else gen.tokenizer.token_bytes(raw[0])
    return TextScore(tokens, label(gen, start) if start is not None else None, lead, loss,
                     sum(len(t.data) for t in tokens), start)
