"""Learning-rate schedules: ε for the update that follows ``step`` earlier updates.

Each schedule maps (optimizer section, step, total steps) to a rate; linear warmup
(``optimizer.warmup_steps``) multiplies any of them by (t + 1) / warmup_steps at first.
"""
from __future__ import annotations

import math

from ..registry import Registry

SCHEDULES = Registry("schedule", "optimizer.schedule")


@SCHEDULES.register("constant")
def constant(cfg, step: int, total_steps: int) -> float:
    """ε₀"""
    return cfg.lr


@SCHEDULES.register("inverse_time")
def inverse_time(cfg, step: int, total_steps: int) -> float:
    """ε₀ / (1 + decay·t)"""
    return cfg.lr / (1.0 + cfg.decay * step)


@SCHEDULES.register("step")
def step_decay(cfg, step: int, total_steps: int) -> float:
    """ε₀ · gamma^⌊t / step_size⌋"""
    return cfg.lr * cfg.gamma ** (step // cfg.step_size)


@SCHEDULES.register("cosine")
def cosine(cfg, step: int, total_steps: int) -> float:
    """from ε₀ down to min_lr over the run, along half a cosine"""
    frac = min(step, total_steps) / max(total_steps, 1)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


def learning_rate(cfg, step: int, total_steps: int) -> float:
    """ε_t for update number ``step`` (0-based) of ``total_steps``, warmup included."""
    lr = SCHEDULES.get(cfg.schedule)(cfg, step, total_steps)
    if step < cfg.warmup_steps:
        lr *= (step + 1) / cfg.warmup_steps
    return lr
