"""The learning-rate schedule: constant (the seed's), or linear warmup then cosine to a floor."""

from __future__ import annotations

import math

from llmcli.recipe import TrainConfig


def lr_at(step: int, cfg: TrainConfig, total_steps: int | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `total_steps` steps."""
    total = total_steps or cfg.max_iters
    if cfg.warmup_iters and step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, total - cfg.warmup_iters)
    progress = min(1.0, (step - cfg.warmup_iters) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
