"""``training.batch_size: adaptive``: the run chooses its global batch as it trains, and scales
the learning rate to match.

The gradient noise scale B_simple = tr(Σ)/|G|² grows as training proceeds (McCandlish et al.
2018), so a batch that is efficient early wastes samples later and one efficient late wastes
steps early. Every ``training.adaptive.every_steps`` steps the batch B is chosen again from the
running estimates of |G|² and tr(Σ) (:mod:`.noise_scale`), by one of two rules:

* ``noise``: B follows B_simple, within [start, max], a multiple of the worker count;
* ``goodput`` (Pollux, Qiao et al., OSDI 2021): B maximises goodput = throughput × statistical
  efficiency, with the step time T(B) = a + b·B fitted to this run's own steps. With
  efficiency E(B) = (φ + B₀)/(φ + B) (φ = B_simple, B₀ = start) and throughput B/T(B),
  d/dB log(B·E/T) = 0 gives B* = √(a·φ/b). With ``goodput_workers: N`` it chooses for N
  workers on the ``goodput_network`` link instead of the machine it runs on: T_N(B) =
  a + allreduce(N) + b·B/N (:mod:`distffn.parallel.links`), so a run on one machine plans a
  schedule for a cluster (the allreduce makes every step dearer, which favours large batches).

The estimates are EMAs over ``metrics.noise_window`` steps (:func:`.noise_scale.ema_update`).

The learning rate follows AdaScale (Johnson et al., ICML 2020). With S = B/B₀ and σ² the
gradient variance at the base batch (tr(Σ)/B₀), the gain ratio is

    r = (σ² + |G|²) / (σ²/S + |G|²) = (tr(Σ)/B₀ + |G|²) / (tr(Σ)/B + |G|²),   1 ≤ r ≤ S,

the step is lr = r · η(⌊τ⌋) and the scale-invariant progress advances τ ← τ + r: the
schedule η (warmup included) is read in steps at the base batch. r is 1 at B = B₀ (the run
steps as a fixed batch of ``start`` until the first change), S where the gradient is all
noise, 1 where it has none.

The choices, the estimates they came from and τ are kept in every checkpoint, so that
``--resume`` continues the same schedule; each choice is a ``batch`` record in metrics.jsonl.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from ..optim import learning_rate
from ..parallel.backend import GradNorms
from ..parallel.links import NETWORKS, communication_seconds
from .extension import PRIORITY_CHECK, Extension
from .metrics import append_record
from .noise_scale import ema_update, measured_estimates
from .triggers import IntervalTrigger

# ---------------------------------------------------------------- the formulas

def adascale_gain(grad_norm_sq: float, trace_sigma: float, base_batch: int, batch: int) -> float:
    """AdaScale's gain ratio r = (tr(Σ)/B₀ + |G|²) / (tr(Σ)/B + |G|²), kept in [1, B/B₀]
    (the estimates are noisy: a negative |G|² means all noise, r = S; a negative tr(Σ) none)."""
    scale = batch / base_batch
    if not grad_norm_sq > 0:
        return scale
    if not trace_sigma > 0:
        return 1.0
    r = (trace_sigma / base_batch + grad_norm_sq) / (trace_sigma / batch + grad_norm_sq)
    return min(max(r, 1.0), scale)


def statistical_efficiency(b_simple: float, base_batch: int, batch: int) -> float:
    """Pollux's efficiency of batch B against the base batch: the progress per sample,
    r / S = (φ + B₀) / (φ + B), φ = B_simple."""
    return (b_simple + base_batch) / (b_simple + batch)


def goodput(b_simple: float, base_batch: int, batch: int, fixed_s: float, per_sample_s: float) -> float:
    """Goodput (base-batch steps of progress per second): throughput B / T(B) with
    T(B) = fixed_s + per_sample_s·B, times :func:`statistical_efficiency`, over B₀."""
    return batch / (fixed_s + per_sample_s * batch) * statistical_efficiency(b_simple, base_batch, batch) / base_batch


def batch_range(lo: int, hi: int, multiple: int) -> tuple[int, int]:
    """The smallest and largest multiple of ``multiple`` in [lo, hi] (at least one multiple)."""
    first = max(multiple, -(-lo // multiple) * multiple)
    return first, max(first, hi // multiple * multiple)


def round_batch(b: float, lo: int, hi: int, multiple: int) -> int:
    """``b`` rounded to the nearest multiple of ``multiple`` within [lo, hi]."""
    first, last = batch_range(lo, hi, multiple)
    return int(min(max(round(b / multiple) * multiple, first), last))


def noise_rule(b_simple: float, lo: int, hi: int, multiple: int) -> int:
    """Rule ``noise``: the batch follows B_simple."""
    return round_batch(b_simple, lo, hi, multiple)


def goodput_rule(b_simple: float, base_batch: int, lo: int, hi: int, multiple: int,
                 fixed_s: float, per_sample_s: float) -> int:
    """Rule ``goodput``: the multiple of ``multiple`` in [lo, hi] with the most goodput. Goodput
    rises then falls in B (its log-derivative a·φ − b·B² has one root, B* = √(a·φ/b)), so the
    best multiple is one of the two around B*."""
    if per_sample_s <= 0:
        return batch_range(lo, hi, multiple)[1]
    best = math.sqrt(max(fixed_s, 0.0) * b_simple / per_sample_s)
    below = round_batch(math.floor(best / multiple) * multiple, lo, hi, multiple)
    above = round_batch(math.ceil(best / multiple) * multiple, lo, hi, multiple)
    return max((below, above), key=lambda b: (goodput(b_simple, base_batch, b, fixed_s, per_sample_s), -b))


SPREAD = 1.5        # the step-time model needs batch sizes at least this far apart


def fit_step_time(segments: list) -> Optional[tuple[float, float]]:
    """T(B) = a + b·B by least squares through the fastest time per step seen at each batch
    size in ``segments`` [(batch, steps, seconds), ...] (other work on the machine only ever
    adds time, as the sweep's timed runs take their fastest); None until batch sizes
    :data:`SPREAD` apart were timed, or where the times do not grow with the batch (no
    usable per-sample cost). a is kept ≥ 0."""
    fastest: dict = {}
    for batch, steps, seconds in segments:
        if steps > 0:
            fastest[int(batch)] = min(fastest.get(int(batch), math.inf), seconds / steps)
    if not fastest or max(fastest) < SPREAD * min(fastest):
        return None
    bs, t = np.array(list(fastest), float), np.array(list(fastest.values()))
    (a, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(bs), bs], 1), t, rcond=None)
    if b <= 0:
        return None
    if a < 0:                           # through the origin: all per-sample cost
        return 0.0, float(np.sum(bs * t) / np.sum(bs * bs))
    return float(a), float(b)


# ---------------------------------------------------------------- the run's schedule

@dataclass
class AdaptiveState:
    """What a checkpoint keeps of the schedule (JSON numbers: floats round-trip exactly)."""
    batch: int                          # the global batch now
    gain: float = 1.0                   # AdaScale's r for it
    progress: float = 0.0               # τ: scale-invariant steps so far
    ema: list = field(default_factory=lambda: [0.0, 0.0])   # EMA of (|G|², tr(Σ)), bias-corrected by weight
    weight: float = 0.0
    estimated_at: int = 0               # the step the EMA was last updated at
    pending: list = field(default_factory=lambda: [0.0] * len(GradNorms.FIELDS))   # norms not yet used
    segments: list = field(default_factory=list)            # [(batch, steps, seconds)] timed (goodput)

    def estimates(self) -> Optional[tuple[float, float]]:
        """The smoothed (|G|², tr(Σ)), or None before the first."""
        if self.weight <= 0:
            return None
        return self.ema[0] / self.weight, self.ema[1] / self.weight

    def b_simple(self) -> Optional[float]:
        est = self.estimates()
        return est[1] / est[0] if est is not None and est[0] > 0 else None


class AdaptiveBatch(Extension):
    """Chooses the global batch every ``training.adaptive.every_steps`` steps and gives the
    trainer each step's batch size and learning rate. Every checkpoint keeps its state with
    the gradient norms measured up to it (:meth:`checkpoint_state`), so that a resumed run
    continues the same schedule."""

    priority = PRIORITY_CHECK

    def __init__(self, job):
        a = job.training.adaptive
        self.job, self.cfg = job, a
        self.multiple = a.multiple or a.goodput_workers or job.scaling.num_workers
        self.lo, self.hi = batch_range(a.start, a.max, self.multiple)
        self.base = self.lo                 # B₀: the first batch, where the gain is 1
        self.window = job.metrics.noise_window
        self.link = NETWORKS.get(a.goodput_network) if a.goodput_workers else None
        self.n_bytes = 0                    # ΔΘ's size, what an allreduce moves (initialize)
        self.trigger = IntervalTrigger(a.every_steps)
        self.state = AdaptiveState(batch=self.lo)
        self._clock, self._pulled_at = None, None

    # the trainer asks these every step
    @property
    def batch_size(self) -> int:
        return self.state.batch

    def learning_rate(self) -> float:
        """r · η(⌊τ⌋) for the coming step; the schedule counts steps at the base batch."""
        return self.state.gain * learning_rate(self.job.optimizer, int(self.state.progress), 0)

    def stepped(self):
        """After each step: τ advances by the gain it stepped with."""
        self.state.progress += self.state.gain

    # ---------------------------------------------------------------- extension
    def restore(self, saved: Optional[dict]):
        if saved:
            self.state = AdaptiveState(**saved)

    def initialize(self, trainer):
        self._clock, self._pulled_at = self._training_clock(trainer), trainer.state.step
        self.n_bytes = 4 * trainer.model.num_params          # float32, as the workers send it
        self._record(trainer)

    def __call__(self, trainer):
        self._pull(trainer)
        s = self.state
        self._estimate(trainer.state.step)
        chosen = self._choose()
        if chosen is not None:
            s.batch = chosen
        est = s.estimates()
        s.gain = adascale_gain(*est, self.base, s.batch) if est is not None else 1.0
        # every process steps with the root's choice (the step times differ between MPI ranks)
        self.state = trainer.backend.broadcast(s)
        self._record(trainer)

    def checkpoint_state(self, trainer) -> dict:
        """The state a checkpoint after this step keeps, with the norms measured up to it
        (every process calls it: a collective on MPI)."""
        if self._pulled_at != trainer.state.step:
            self._pull(trainer)
        return self.state_dict()

    def _pull(self, trainer):
        """The gradient norms and step times since the last pull, into the state."""
        norms = trainer.backend.grad_norms()           # every process: a collective on MPI
        self.state.pending = [float(v) for v in np.add(self.state.pending, norms.as_array())]
        self._time(trainer)
        self._pulled_at = trainer.state.step

    def state_dict(self) -> dict:
        return asdict(self.state)

    # ---------------------------------------------------------------- parts
    def _estimate(self, step: int):
        """Fold the pending norms into the EMA of (|G|², tr(Σ)) (as :class:`NoiseScaleLog`)."""
        s = self.state
        measured = measured_estimates(GradNorms.from_array(s.pending))
        s.pending = [0.0] * len(GradNorms.FIELDS)
        if measured is None:
            return
        s.ema, s.weight = ema_update(s.ema, s.weight, *measured[:2], step - s.estimated_at, self.window)
        s.estimated_at = step

    def _choose(self) -> Optional[int]:
        s = self.state
        b_simple = s.b_simple()
        if b_simple is None:
            return None                 # no estimate yet, or no signal: keep the batch
        if self.cfg.rule == "noise":
            return noise_rule(b_simple, self.lo, self.hi, self.multiple)
        model = fit_step_time(s.segments)
        if model is None:
            # no step-time model yet: time a batch twice (or half) as large, as Pollux explores
            up = s.batch * 2 <= self.hi
            return round_batch(s.batch * 2 if up else s.batch / 2, self.lo, self.hi, self.multiple)
        return goodput_rule(b_simple, self.base, self.lo, self.hi, self.multiple, *self.planned(*model))

    def planned(self, fixed_s: float, per_sample_s: float) -> tuple[float, float]:
        """The step-time model the goodput rule chooses with: this run's own, or with
        ``goodput_workers: N`` the same compute on N workers, each with its share of the batch,
        plus the allreduce of ΔΘ over ``goodput_network``."""
        if self.link is None:
            return fixed_s, per_sample_s
        n = self.cfg.goodput_workers
        return fixed_s + communication_seconds(self.n_bytes, n, self.link), per_sample_s / n

    def _training_clock(self, trainer) -> tuple[int, float]:
        return trainer.steps_run, trainer.train_seconds + trainer.epoch_seconds

    def _time(self, trainer):
        """The steps since the last call, at the batch they ran with (the first step of the
        backend's life, which loads kernels, left out)."""
        steps0, t0 = self._clock
        steps, t = self._training_clock(trainer)
        if steps0 == 0 and steps > 0:
            steps0, t0 = 1, t0 + trainer.startup_seconds
        if steps > steps0:
            self.state.segments.append([self.state.batch, steps - steps0, round(t - t0, 6)])
            del self.state.segments[:-64]           # the recent past: the model of this run now
        self._clock = (steps, t)

    def _record(self, trainer):
        if not trainer.is_root:
            return
        s = self.state
        step = trainer.state.step
        epoch = trainer.epoch_progress()
        path = os.path.join(trainer.out_dir, "metrics.jsonl")
        plan = ({"goodput_workers": self.cfg.goodput_workers, "goodput_network": self.cfg.goodput_network}
                if self.link is not None else {})
        append_record(path, {
            "event": "batch", "step": step, "epoch": epoch, "batch_size": s.batch, "gain": s.gain,
            "lr": self.learning_rate(), "progress": s.progress, "b_simple": s.b_simple(),
            "rule": self.cfg.rule, **plan, "samples": trainer.samples_seen()})
        est = s.estimates()
        if self.job.metrics.noise_scale and est is not None:       # what NoiseScaleLog writes on fixed batches
            append_record(path, {"event": "noise", "step": step, "epoch": epoch, "b_simple": s.b_simple(),
                                 "grad_norm_sq": est[0], "trace_sigma": est[1]})
