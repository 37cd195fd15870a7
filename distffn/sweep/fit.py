"""The critical batch size: McCandlish et al.'s S = S_min·(1 + B_crit/B) fitted to the best
steps-to-target per batch size, E_min = S_min·B_crit, and Shallue et al.'s three regimes.

The fit minimises the squared error of log S (steps span decades; every batch size counts
alike): for a fixed B_crit the best log S_min is a mean, so only B_crit is searched, on a
log grid and then by golden-section refinement.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

REGIMES = ("perfect_scaling", "diminishing_returns", "maximal_data_parallelism")


@dataclass
class CriticalBatchFit:
    """S(B) = s_min·(1 + b_crit/B); E(B) = e_min·(1 + B/b_crit) with e_min = s_min·b_crit."""
    s_min: float
    b_crit: float
    e_min: float
    rms_log_error: float    # root mean square of log(S_measured / S_fit)
    points: int

    def steps(self, batch):
        return self.s_min * (1.0 + self.b_crit / np.asarray(batch, np.float64))

    def steps_at_samples(self, samples: float):
        """:func:`steps_at_samples` of this fit."""
        return steps_at_samples(self.s_min, self.e_min, samples)

    def as_dict(self) -> dict:
        return asdict(self)


def steps_at_samples(s_min: float, e_min: float, samples: float) -> float | None:
    """The fitted curve in (samples, steps) space: the steps S a fixed batch needs to reach
    the target when it does so after E samples, S_fit(E) = S_min / (1 − E_min/E); None for
    E <= E_min (no fixed batch reaches the target with so few samples).

    With E = S·B, B = E/S; put into S = S_min(1 + B_crit/B):

        S = S_min + S_min·B_crit·S/E = S_min + E_min·S/E
        S·(1 − E_min/E) = S_min
        S = S_min / (1 − E_min/E),

    McCandlish et al.'s (S/S_min − 1)(E/E_min − 1) = 1 solved for S. A run whose batch
    changes as it trains reaches the target after S steps and E samples; the fixed batches
    need S_fit(E) steps for the same samples, so 1 − S/S_fit(E) is the steps it saved.
    """
    if samples <= e_min:
        return None
    return s_min / (1.0 - e_min / samples)


def _best_log_s_min(log_b_crit: float, batch: np.ndarray, log_steps: np.ndarray) -> tuple[float, float]:
    """(log S_min, squared error) for one B_crit."""
    shape = np.log1p(math.exp(log_b_crit) / batch)
    log_s_min = float(np.mean(log_steps - shape))
    return log_s_min, float(np.sum((log_steps - shape - log_s_min) ** 2))


def fit_critical_batch(best_steps: dict[int, float]) -> CriticalBatchFit | None:
    """Fit S = S_min(1 + B_crit/B) to ``{batch size: best steps to target}``; None with
    fewer than 3 batch sizes (two parameters need a third point to be tested)."""
    if len(best_steps) < 3:
        return None
    batch = np.array(sorted(best_steps), np.float64)
    log_steps = np.log(np.array([best_steps[b] for b in sorted(best_steps)], np.float64))
    lo, hi = math.log(batch[0] / 1e4), math.log(batch[-1] * 1e4)
    grid = np.linspace(lo, hi, 2001)
    errors = [_best_log_s_min(g, batch, log_steps)[1] for g in grid]
    i = int(np.argmin(errors))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):                       # golden section on the bracketing interval
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if _best_log_s_min(c, batch, log_steps)[1] < _best_log_s_min(d, batch, log_steps)[1]:
            b = d
        else:
            a = c
    log_b_crit = (a + b) / 2
    log_s_min, sq = _best_log_s_min(log_b_crit, batch, log_steps)
    s_min, b_crit = math.exp(log_s_min), math.exp(log_b_crit)
    return CriticalBatchFit(s_min, b_crit, s_min * b_crit, math.sqrt(sq / len(batch)), len(batch))


def regime_bounds(b_crit: float, tolerance: float = 0.25) -> dict[str, list]:
    """The batch-size ranges of the three regimes under the fitted model: perfect scaling
    while the steps stay within ``tolerance`` of S_min·B_crit/B (B ≤ tolerance·B_crit),
    maximal data parallelism once they are within ``tolerance`` of S_min (B ≥ B_crit/tolerance),
    diminishing returns between."""
    return {"perfect_scaling": [None, tolerance * b_crit],
            "diminishing_returns": [tolerance * b_crit, b_crit / tolerance],
            "maximal_data_parallelism": [b_crit / tolerance, None]}


def regime_of(batch: float, b_crit: float, tolerance: float = 0.25) -> str:
    if batch <= tolerance * b_crit:
        return REGIMES[0]
    if batch >= b_crit / tolerance:
        return REGIMES[2]
    return REGIMES[1]


def local_slopes(best_steps: dict[int, float]) -> dict[int, float]:
    """d log S / d log B between each batch size and the next (−1: perfect scaling, 0: no
    gain), keyed by the smaller batch size: the regimes as measured, without the model."""
    keys = sorted(best_steps)
    return {b0: math.log(best_steps[b1] / best_steps[b0]) / math.log(b1 / b0) for b0, b1 in zip(keys, keys[1:])}
