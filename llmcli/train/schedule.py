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


def total_steps(cfg: TrainConfig, tokens_per_step: int) -> int:
    """Optimizer steps a run takes: train.max_iters, or fewer when train.max_tokens runs out
    first (its last step finishes). Pure Python: `llm scaling --recipe` plans with it too."""
    steps = cfg.max_iters
    if cfg.max_tokens:
        steps = min(steps, math.ceil(cfg.max_tokens / tokens_per_step))
    return steps


def warmup_problem(cfg: TrainConfig, total_steps: int) -> str | None:
    """Why the warmup never completes in a run of `total_steps` steps (the peak lr is never
    trained at, a cosine never decays), or None. Legal settings, so a warning, not an error."""
    if not cfg.warmup_iters or cfg.warmup_iters < total_steps or total_steps <= 0:
        return None
    limit = "train.max_tokens" if total_steps < cfg.max_iters else "train.max_iters"
    top = lr_at(total_steps - 1, cfg, total_steps)
    peak = ("reaches train.lr only at its last step" if cfg.warmup_iters == total_steps else
            f"ends at {top:.3g}, below its peak train.lr={cfg.lr:g}")
    decay = ", and the cosine decay never starts" if cfg.lr_schedule == "cosine" else ""
    return (f"train.warmup_iters={cfg.warmup_iters} is not below the run's {total_steps:,} "
            f"steps ({limit}): the learning rate warms up the whole run and {peak}{decay}; "
            f"lower train.warmup_iters below {total_steps:,} (e.g. {total_steps // 10:,}) or "
            "train longer")
