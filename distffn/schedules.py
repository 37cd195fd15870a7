"""Learning-rate schedules: the rate for the update that follows ``step`` earlier updates."""
from __future__ import annotations

import math

from .config import OptimizerConfig


def learning_rate(cfg: OptimizerConfig, step: int, total_steps: int) -> float:
    """ε_t for update number ``step`` (0-based) of ``total_steps``.

    constant: ε₀; inverse_time: ε₀ / (1 + d·t); step: ε₀·γ^⌊t / step_size⌋;
    cosine: from ε₀ down to min_lr over the run. Linear warmup multiplies any of them by
    (t + 1) / warmup_steps for the first warmup_steps updates.
    """
    lr0 = cfg.lr
    if cfg.schedule == "inverse_time":
        lr = lr0 / (1.0 + cfg.decay * step)
    elif cfg.schedule == "step":
        lr = lr0 * cfg.gamma ** (step // cfg.step_size)
    elif cfg.schedule == "cosine":
        frac = min(step, total_steps) / max(total_steps, 1)
        lr = cfg.min_lr + (lr0 - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
    else:
        lr = lr0
    if step < cfg.warmup_steps:
        lr *= (step + 1) / cfg.warmup_steps
    return lr
