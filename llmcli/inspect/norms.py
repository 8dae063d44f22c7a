"""The normalisation layers at one position, step by step as the tutorial walks through them.

LayerNorm: y = (x − mean) / √(variance + ε) · γ + β (variance without Bessel's correction).
RMSNorm: y = x / √(mean(x²) + ε) · γ. Each block normalises twice (before attention and before
the feed-forward), and the final norm comes before the output layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llmcli.inspect.tokens import label, token_json


@dataclass
class NormStep:
    name: str  # "block 1 norm1", ..., "final norm"
    role: str  # "before attention", ...
    kind: str  # layernorm or rmsnorm
    eps: float
    x: torch.Tensor  # the input at this position (d_model)
    normalized: torch.Tensor  # before γ and β
    gamma: torch.Tensor
    beta: torch.Tensor | None
    y: torch.Tensor  # the layer's real output

    @property
    def mean(self) -> float:
        return float(self.x.mean())

    @property
    def variance(self) -> float:
        return float(self.x.var(unbiased=False))

    @property
    def rms(self) -> float:
        return float(self.x.pow(2).mean().sqrt())

    @property
    def denominator(self) -> float:
        """√(variance + ε) for LayerNorm, √(mean(x²) + ε) for RMSNorm."""
        spread = self.variance if self.kind == "layernorm" else float(self.x.pow(2).mean())
        return (spread + self.eps) ** 0.5

    def by_hand(self) -> torch.Tensor:
        """The output recomputed from the statistics (equals `y`)."""
        out = self.normalized * self.gamma
        return out + self.beta if self.beta is not None else out

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "kind": self.kind, "eps": self.eps,
                "mean": self.mean, "variance": self.variance, "rms": self.rms, "x": self.x.tolist(),
                "normalized": self.normalized.tolist(), "gamma": self.gamma.tolist(),
                "beta": self.beta.tolist() if self.beta is not None else None,
                "y": self.y.tolist()}


@dataclass
class NormReport:
    position: int
    id: int  # model id of the token at `position`
    token: str
    steps: list[NormStep]

    def to_json(self, gen: Any) -> dict[str, Any]:
        return {"position": self.position, **token_json(gen, self.id),
                "norms": [s.to_json() for s in self.steps]}


def _named_norms(model: Any) -> list[tuple[str, str, Any]]:
    named = []
    for i, block in enumerate(model.blocks, 1):
        named.append((f"block {i} norm1", "before attention", block.norm1))
        named.append((f"block {i} norm2", "before the feed-forward", block.norm2))
    named.append(("final norm", "before the output layer", model.norm))
    return named


def norm_report(gen: Any, ids: list[int], position: int = -1) -> NormReport:
    model = gen.model
    device = next(model.parameters()).device
    position = position % len(ids)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(module: Any, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen[id(module)] = (args[0][0, position].detach().float().cpu(),
                            output[0, position].detach().float().cpu())

    named = _named_norms(model)
    handles = [module.register_forward_hook(hook) for _, _, module in named]
    try:
        with torch.no_grad():
            model(torch.tensor([ids], dtype=torch.long, device=device))
    finally:
        for handle in handles:
            handle.remove()
    steps = []
    for name, role, module in named:
        x, y = seen[id(module)]
        rms = isinstance(module, torch.nn.RMSNorm)
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        if rms:
            normalized = x / torch.sqrt(x.pow(2).mean() + eps)
        else:
            normalized = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + eps)
        gamma = (module.weight.detach().float().cpu() if module.weight is not None
                 else torch.ones_like(x))
        bias = getattr(module, "bias", None)
        beta = bias.detach().float().cpu() if bias is not None else None
        steps.append(NormStep(name, role, "rmsnorm" if rms else "layernorm", float(eps), x,
                              normalized, gamma, beta, y))
    return NormReport(position, int(ids[position]), label(gen, ids[position]), steps)
