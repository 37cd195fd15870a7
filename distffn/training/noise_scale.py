"""The gradient noise scale B_simple = tr(Σ) / |G|² (McCandlish et al. 2018, "An empirical
model of large-batch training"), which predicts the critical batch size B_crit.

|G|² is the squared norm of the gradient of the mean training loss and tr(Σ) the trace of
the per-example gradients' covariance. From squared norms of mean gradients over batches of
two sizes, both are estimated without bias (the paper's appendix A.1):

    |G|²  ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

Two places use them: :class:`NoiseScaleLog` during training (``metrics.noise_scale``), where
the small batches are the workers' shards and the big one the global batch, so the estimate
costs a norm per shard every ``metrics.noise_every`` steps, smoothed by an exponential moving
average over ``metrics.noise_window`` steps (:func:`ema_update`; the adaptive batch size
smooths the same way); and :func:`estimate_noise_scale` (``distffn noise-scale``) at a checkpoint's fixed Θ,
from K random batch pairs of the training split, with standard errors.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np

from ..data.byte_images import ByteImages
from ..data.prepare import prepare_data
from ..errors import UserError
from ..nn.model import MLP
from .checkpoint import unpack_state
from .evaluation import checkpoint_with_job
from .extension import PRIORITY_OBSERVE, Extension
from .metrics import append_record, log_points


def two_size_estimates(small_sq, big_sq, b_small, b_big):
    """Unbiased (|G|², tr(Σ)) from mean-gradient squared norms at batch sizes ``b_small`` <
    ``b_big`` (scalars or arrays; ``b_*`` may be harmonic means of unequal shards)."""
    grad_norm_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace_sigma = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return grad_norm_sq, trace_sigma


def measured_estimates(norms) -> Optional[tuple[float, float, float, float]]:
    """(|G|², tr(Σ), b_small, b_big) from the gradient norms measured since the last pull
    (:class:`~distffn.parallel.backend.GradNorms`: the shards are the small batches, the global
    batch the big one, each size the harmonic mean of those measured), or None where there are
    not two sizes: nothing measured, or one sample per step."""
    if norms.shards == 0 or norms.steps == 0:
        return None
    b_small, b_big = norms.shards / norms.small_inv, norms.steps / norms.big_inv
    if not b_small < b_big:
        return None
    g2, tr = two_size_estimates(norms.small_sq / norms.shards, norms.big_sq / norms.steps, b_small, b_big)
    return g2, tr, b_small, b_big


def ema_update(ema: list, weight: float, g2: float, tr: float, steps: int, window: int) -> tuple[list, float]:
    """The EMA of (|G|², tr(Σ)) after an estimate from the last ``steps`` training steps:
    decay exp(−steps/window), so that the time constant is ``window`` steps however often it is
    updated; ``weight`` (1 − e^(−t/window) after t steps) is the bias correction (Adam's), so
    ``ema / weight`` is the smoothed estimate from the first update on.

    Why a window in steps: |G|² falls fast early (on Fashion-MNIST 784-128-10 at B = 128,
    from about 5 at step 50 to 0.3 at step 250), so an average that remembers far back
    overestimates it, and underestimates B_simple while it grows, when a batch is chosen from
    it. A decay per update instead (0.9 per 50 steps: a window of 475) held an adaptive run's
    B_simple under 300 for its first 800 steps; a window of 100 steps keeps e^-5 of step 50's
    estimate at step 550."""
    decay = math.exp(-max(steps, 1) / window)
    return ([decay * ema[0] + (1 - decay) * g2, decay * ema[1] + (1 - decay) * tr],
            decay * weight + (1 - decay))


class NoiseScaleLog(Extension):
    """``metrics.noise_scale``: at every log point, a ``noise`` record in ``metrics.jsonl``
    with B_simple, |G|² and tr(Σ), each an EMA over ``metrics.noise_window`` steps
    (:func:`ema_update`) of the estimates from the steps measured since the last one;
    B_simple is the ratio of the smoothed tr(Σ) and |G|²."""

    priority = PRIORITY_OBSERVE
    training_time = True                    # a pull of six numbers, like the loss totals

    def __init__(self, job, log_every: int):
        self.trigger = log_points(log_every)
        self.window = job.metrics.noise_window
        self.ema, self.weight = [0.0, 0.0], 0.0
        self.at = 0                         # the step of the last update

    def initialize(self, trainer):
        self.path = os.path.join(trainer.out_dir, "metrics.jsonl")
        self.at = trainer.state.step

    def __call__(self, trainer):
        norms = trainer.backend.grad_norms()           # every process: a collective on MPI
        measured = measured_estimates(norms)
        step = trainer.state.step
        if not trainer.is_root or measured is None:
            return
        g2, tr, b_small, b_big = measured
        self.ema, self.weight = ema_update(self.ema, self.weight, g2, tr, step - self.at, self.window)
        self.at = step
        g2_hat, tr_hat = self.ema[0] / self.weight, self.ema[1] / self.weight
        b_simple = tr_hat / g2_hat if g2_hat > 0 else None
        append_record(self.path, {
            "event": "noise", "step": step, "epoch": trainer.epoch_progress(),
            "b_simple": b_simple, "grad_norm_sq": g2_hat, "trace_sigma": tr_hat,
            "b_small": round(b_small, 3), "b_big": round(b_big, 3), "measured_steps": norms.steps})


# ---------------------------------------------------------------- at a fixed Θ

def estimate_noise_scale(job, theta, data, batches: int = 50, small: Optional[int] = None,
                         big: Optional[int] = None, seed: int = 0) -> dict:
    """B_simple, tr(Σ) and |G|² of the mean training loss at Θ, with standard errors, from
    ``batches`` pairs of batches drawn with replacement from the training split (the small
    one inside the big one), in float64.

    ``small`` defaults to the job's batch size, ``big`` to 8 × ``small``. Drawing with
    replacement makes E|G_B|² = |G|² + tr(Σ)/B exact, Σ being the covariance of the
    per-example gradients over the training split (normalised by n).
    """
    n = data.x_train.shape[0]
    small = small or min(job.training.batch_size, n)
    big = big or 8 * small
    if batches < 2:
        raise UserError(f"--batches: expected at least 2 batch pairs (for a standard error), got {batches}")
    if not 0 < small < big:
        raise UserError(f"--small/--big: expected 0 < small < big, got {small} and {big}")
    model = MLP(job.model, np, dtype=np.float64)
    params = model.layout.views(np.asarray(theta, np.float64))
    g_small = np.empty(model.num_params)
    g_rest = np.empty(model.num_params)
    rng = np.random.default_rng(seed)
    g2s, trs = np.empty(batches), np.empty(batches)
    for k in range(batches):
        idx = rng.integers(0, n, big)
        x = _rows_float64(data.x_train, idx)
        t = data.t_train[idx]
        t = t.astype(np.float64) if t.dtype.kind == "f" else t
        model.loss_and_grad(params, model.layout.views(g_small), x[:small], t[:small])
        model.loss_and_grad(params, model.layout.views(g_rest), x[small:], t[small:])
        small_sq = float(g_small @ g_small) / small ** 2
        total = g_small + g_rest
        big_sq = float(total @ total) / big ** 2
        g2s[k], trs[k] = two_size_estimates(small_sq, big_sq, small, big)
    g2, tr = g2s.mean(), trs.mean()
    se_g2, se_tr = g2s.std(ddof=1) / math.sqrt(batches), trs.std(ddof=1) / math.sqrt(batches)
    b_simple = se_b = None
    if g2 > 0:
        b_simple = tr / g2
        cov = np.cov(trs, g2s)[0, 1] / batches                  # delta method for the ratio
        var = (se_tr / g2) ** 2 + (tr * se_g2 / g2 ** 2) ** 2 - 2 * tr * cov / g2 ** 3
        se_b = math.sqrt(max(var, 0.0))
    return {"b_simple": b_simple, "b_simple_se": se_b, "trace_sigma": tr, "trace_sigma_se": se_tr,
            "grad_norm_sq": g2, "grad_norm_sq_se": se_g2, "batches": batches, "b_small": small,
            "b_big": big, "n_train": int(n)}


def _rows_float64(x, idx) -> np.ndarray:
    """Rows ``idx`` of the training inputs in float64: 8-bit images (:class:`ByteImages`) are
    decoded to their float32 values first, the values every training step sees."""
    if isinstance(x, ByteImages):
        return x.take(idx, np.empty((len(idx), x.shape[1]), np.float32)).astype(np.float64)
    return np.asarray(x[idx], np.float64)


def estimate_checkpoint(path: str, job_path: Optional[str] = None, overrides=None, **kwargs) -> dict:
    """:func:`estimate_noise_scale` at the checkpoint ``path`` (a file or a run folder)."""
    path, arrays, meta, job = checkpoint_with_job(path, job_path, overrides)
    _, data, model = prepare_data(job)
    theta, _ = unpack_state(model.layout, arrays, (), path)
    return {"checkpoint": path, "step": meta.get("step"), **estimate_noise_scale(job, theta, data, **kwargs)}
