"""The position information a model adds: the sinusoidal table, a learned table, or RoPE.

Sinusoidal: PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(...), the table the
tutorial prints (context_length × d_model). Learned: the trained `pos_emb` rows. RoPE adds no
table: it rotates each pair (2i, 2i+1) of every query and key by pos × θ_i, θ_i =
rope_theta^(-2i/head_dim); the view shows the frequencies θ_i, their wavelengths 2π/θ_i in
tokens, and cos(pos × θ_i) as the table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from llmcli.console import fail


@dataclass
class PositionTable:
    kind: str  # sinusoidal, learned or rope
    values: torch.Tensor  # (context_length, d_model), or (context_length, head_dim/2) for rope
    frequencies: list[float] | None  # radians per token of each dimension pair (not learned)
    source: str

    @property
    def wavelengths(self) -> list[float] | None:
        """Tokens per full turn of each dimension pair: 2π / frequency."""
        if self.frequencies is None:
            return None
        return [2 * math.pi / f for f in self.frequencies]

    @property
    def column_name(self) -> str:
        return "pair" if self.kind == "rope" else "dimension"

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "source": self.source,
                                "shape": list(self.values.shape)}
        if self.frequencies is not None:
            data["frequencies"] = self.frequencies
            data["wavelengths"] = self.wavelengths
        data["values" if self.kind != "rope" else "cos"] = self.values.tolist()
        return data


def position_table(cfg: Any, model: Any = None, source: str = "") -> PositionTable:
    """The position table of a model config; a learned table needs the trained `model`."""
    from llmcli.model.gpt import rope_tables, sinusoidal_table

    length, d_model = int(cfg.context_length), int(cfg.d_model)
    if cfg.positions == "sinusoidal":
        freqs = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32)
                          * (-math.log(10000.0) / d_model))
        return PositionTable("sinusoidal", sinusoidal_table(length, d_model), freqs.tolist(),
                             source)
    if cfg.positions == "learned":
        if model is None:
            fail(f"{source}: learned positions have no values until the model is trained; give "
                 "a checkpoint of this recipe instead")
        return PositionTable("learned", model.pos_emb.weight.detach().float().cpu(), None, source)
    head_dim = d_model // int(cfg.num_heads)
    cos, _ = rope_tables(length, head_dim, float(cfg.rope_theta))
    freqs = 1.0 / float(cfg.rope_theta) ** (torch.arange(0, head_dim, 2, dtype=torch.float32)
                                            / head_dim)
    return PositionTable("rope", cos, freqs.tolist(), source)


def load_positions(target: str | None) -> PositionTable:
    """From a recipe (.yaml/.yml; no weights needed) or a checkpoint (file, run, newest run)."""
    from pathlib import Path

    if target is not None and Path(target).suffix in (".yaml", ".yml"):
        from llmcli.recipe import load_recipe

        recipe = load_recipe(target)
        return position_table(recipe.model, None, str(target))
    from llmcli.checkpoint import Checkpoint

    ckpt = Checkpoint.open(target)
    cfg = ckpt.recipe.model
    model = ckpt.load("cpu") if cfg.positions == "learned" else None
    return position_table(cfg, model, str(ckpt.path))
