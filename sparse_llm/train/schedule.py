"""Learning-rate schedules as pure functions of the step (nothing to checkpoint)."""
from __future__ import annotations

import math

from sparse_llm.config import ScheduleConfig


def lr_at(step: int, base_lr: float, total_steps: int, cfg: ScheduleConfig) -> float:
    """Linear warm-up, then cosine to min_lr_ratio x base_lr, WSD (stable, then a linear decay over
    the last decay_fraction of the steps), or constant."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return base_lr * (step + 1) / cfg.warmup_steps
    min_lr = base_lr * cfg.min_lr_ratio
    if cfg.name == "constant":
        return base_lr
    if cfg.name == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))
    decay_start = int(total_steps * (1 - cfg.decay_fraction))
    if step < decay_start:
        return base_lr
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return base_lr + (min_lr - base_lr) * progress
