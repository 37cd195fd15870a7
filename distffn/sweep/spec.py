"""SWEEP.yaml: a scaling experiment, typed and validated like a job spec.

A sweep names a base job (a path relative to the sweep file), the batch sizes and worker
counts to measure, the learning rates to try at every batch size (a list, or a scaling rule
from :data:`LR_RULES`), a target (:data:`~distffn.targets.TARGET_METRICS`) and a budget.
Every mistake raises :class:`UserError` naming the key; unknown keys are refused.
"""
from __future__ import annotations

import math
import os
import typing
from dataclasses import dataclass, field
from typing import Optional, Union

from .. import bounded_yaml
from ..bounded_yaml import short
from ..data.sharding import steps_per_epoch
from ..errors import UserError
from ..jobspec import JobConfig, _coerce, load_job, parse_override
from ..optim import OPTIMIZERS
from ..parallel import BACKENDS
from ..registry import Registry
from ..targets import TARGET_METRICS
from .projection import NETWORKS

# ---------------------------------------------------------------- learning-rate rules

LR_RULES = Registry("learning-rate rule", "lr.rule")


@LR_RULES.register("linear")
def linear_rule(base_lr: float, base_batch: int, batch: int) -> float:
    """base_lr · B / base_batch (Goyal et al. 2017: the linear scaling rule; use with warmup)"""
    return base_lr * batch / base_batch


@LR_RULES.register("sqrt")
def sqrt_rule(base_lr: float, base_batch: int, batch: int) -> float:
    """base_lr · √(B / base_batch) (Krizhevsky 2014; keeps the update's noise constant)"""
    return base_lr * math.sqrt(batch / base_batch)


@dataclass
class LrRule:
    """``lr: {rule, base_lr, base_batch, warmup_epochs, multipliers}``: one rate per batch size
    from the rule, times each multiplier (``[1]`` by default; e.g. ``[0.5, 1, 2]`` to tune around it)."""
    rule: str = "linear"
    base_lr: float = 0.05
    base_batch: int = 128
    warmup_epochs: float = 0.0
    multipliers: list = field(default_factory=lambda: [1.0])

    def rates(self, batch: int) -> list[float]:
        base = LR_RULES.get(self.rule)(self.base_lr, self.base_batch, batch)
        return [base * m for m in self.multipliers]


@dataclass
class Target:
    """``target: {metric, value}``: the figure a trial must reach, and the value."""
    metric: str = "validation_accuracy"
    value: float = 0.9


AUTO = "auto"


@dataclass
class SweepSpec:
    """A validated SWEEP.yaml (see the README's "Scaling experiments" for every key)."""
    job: str                                    # the base job spec, resolved to a path
    batch_sizes: list
    lr: Union[list, LrRule]
    target: Target
    max_epochs: int
    name: str = "sweep"
    num_workers: list = field(default_factory=lambda: [1])
    momentum: Optional[list] = None             # None: the base job's
    eval_every: Union[int, str] = AUTO          # steps, or auto: evals_per_epoch per epoch
    evals_per_epoch: int = 10
    concurrency: int = 1                        # trials at a time (> 1: Ray tasks)
    prune: bool = True                          # stop a trial at the best steps so far at its B
    timing_steps: int = 50                      # steps of each timed (B, N) run
    timing_repeats: int = 3                     # timed runs per (B, N); the fastest counts
    timing_backend: str = "mpi"                 # the backend of the timed runs with N > 1
    network: str = "10gbe"                      # the preset drawn in time_vs_workers.png
    noise_batches: int = 50                     # batch pairs for the measured B_simple
    regime_tolerance: float = 0.25
    job_overrides: list = field(default_factory=list)
    source: str = "SWEEP.yaml"

    # ------------------------------------------------------------ derived
    def momenta(self, base: JobConfig) -> list:
        return list(self.momentum) if self.momentum is not None else [base.optimizer.momentum]

    def rates(self, batch: int) -> list[float]:
        return self.lr.rates(batch) if isinstance(self.lr, LrRule) else list(self.lr)

    def eval_steps(self, n_train: int, batch: int, drop_last: bool) -> int:
        """``eval_every`` for batch size ``batch``: ``auto`` is evals_per_epoch evaluations per epoch."""
        if self.eval_every != AUTO:
            return int(self.eval_every)
        return max(1, round(steps_per_epoch(n_train, batch, drop_last) / self.evals_per_epoch))

    def warmup_steps(self, n_train: int, batch: int, drop_last: bool) -> Optional[int]:
        if not isinstance(self.lr, LrRule):
            return None
        return int(round(self.lr.warmup_epochs * steps_per_epoch(n_train, batch, drop_last)))


_KEYS = {"name": str, "job": str, "batch_sizes": list, "num_workers": list, "lr": object,
         "momentum": list, "target": dict, "max_epochs": int, "eval_every": object,
         "evals_per_epoch": int, "concurrency": int, "prune": bool, "timing_steps": int, "timing_repeats": int, "timing_backend": str,
         "network": str, "noise_batches": int, "regime_tolerance": float}
_REQUIRED = ("job", "batch_sizes", "lr", "target", "max_epochs")


def _positive_ints(values, key: str) -> list[int]:
    if not isinstance(values, list) or not values:
        raise UserError(f"{key}: expected a non-empty list of positive integers, got {short(values)}")
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise UserError(f"{key}: expected positive integers, got {short(v)}")
    return sorted(set(values))


def _positive_numbers(values, key: str, upper: Optional[float] = None, zero_ok: bool = False) -> list[float]:
    if not isinstance(values, list) or not values:
        raise UserError(f"{key}: expected a non-empty list of numbers, got {short(values)}")
    out = []
    for v in values:
        v = _coerce(v, float, key)
        if v < 0 or (v == 0 and not zero_ok) or (upper is not None and v >= upper):
            what = f"in [0, {upper:g})" if upper is not None else ("non-negative" if zero_ok else "positive")
            raise UserError(f"{key}: expected numbers {what}, got {short(v)}")
        out.append(v)
    return list(dict.fromkeys(out))


def _section(cls, raw, where: str):
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping of keys, got {short(raw)}")
    types = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(types))
    if unknown:
        raise UserError(f"{where}.{unknown[0]}: unknown key (expected one of: {', '.join(types)})")
    return cls(**{k: _coerce(v, types[k], f"{where}.{k}") for k, v in raw.items()})


def from_dict(raw, path: str, job_overrides: Optional[list[str]] = None) -> SweepSpec:
    """Build and validate a :class:`SweepSpec` from parsed YAML; ``path`` is the sweep file
    (the base job is found relative to it)."""
    source = os.path.basename(path)
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{path}: expected a mapping with keys {', '.join(_REQUIRED)} (and optional "
                        f"{', '.join(k for k in _KEYS if k not in _REQUIRED)})")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise UserError(f"{unknown[0]}: unknown key in {source} (expected: {', '.join(_KEYS)})")
    missing = [k for k in _REQUIRED if raw.get(k) is None]
    if missing:
        raise UserError(f"{missing[0]}: required in {source}")
    kw = {}
    for key in ("name", "job", "max_epochs", "evals_per_epoch", "concurrency", "prune", "timing_steps", "timing_repeats",
                "timing_backend", "network", "noise_batches", "regime_tolerance"):
        if raw.get(key) is not None:
            kw[key] = _coerce(raw[key], _KEYS[key], key)
    for key in ("max_epochs", "evals_per_epoch", "concurrency", "timing_steps", "timing_repeats", "noise_batches"):
        if key in kw and kw[key] <= 0:
            raise UserError(f"{key}: expected a positive integer, got {kw[key]}")
    if not 0 < kw.get("regime_tolerance", 0.25) < 1:
        raise UserError(f"regime_tolerance: expected a number in (0, 1), got {kw['regime_tolerance']}")
    kw["name"] = kw.get("name") or os.path.splitext(source)[0]
    if kw["name"] in ("", ".", "..") or any(c in kw["name"] for c in "/\\\0"):
        raise UserError(f"name: expected one folder name, got {short(kw['name'])}")
    BACKENDS.check(kw.get("timing_backend", "mpi"), "timing_backend")
    NETWORKS.check(kw.get("network", "10gbe"), "network")
    kw["job"] = os.path.join(os.path.dirname(os.path.abspath(path)), kw["job"])
    kw["batch_sizes"] = _positive_ints(raw["batch_sizes"], "batch_sizes")
    kw["num_workers"] = _positive_ints(raw.get("num_workers", [1]), "num_workers")
    if raw.get("momentum") is not None:
        kw["momentum"] = _positive_numbers(raw["momentum"], "momentum", upper=1.0, zero_ok=True)
    lr = raw["lr"]
    if isinstance(lr, dict):
        rule = _section(LrRule, lr, "lr")
        LR_RULES.check(rule.rule)
        if rule.base_lr <= 0:
            raise UserError(f"lr.base_lr: expected a positive number, got {rule.base_lr}")
        if rule.base_batch <= 0:
            raise UserError(f"lr.base_batch: expected a positive integer, got {rule.base_batch}")
        if rule.warmup_epochs < 0:
            raise UserError(f"lr.warmup_epochs: expected a non-negative number, got {rule.warmup_epochs}")
        rule.multipliers = _positive_numbers(rule.multipliers, "lr.multipliers")
        kw["lr"] = rule
    else:
        kw["lr"] = _positive_numbers(lr, "lr")
    target = _section(Target, raw["target"], "target")
    metric = TARGET_METRICS.get(target.metric, "target.metric")
    if metric.measure == "accuracy" and not 0 < target.value <= 1:
        raise UserError(f"target.value: an accuracy target is a fraction in (0, 1], got {target.value}")
    if metric.measure == "loss" and target.value <= 0:
        raise UserError(f"target.value: expected a positive loss, got {target.value}")
    kw["target"] = target
    every = raw.get("eval_every", AUTO)
    if every != AUTO and (not isinstance(every, int) or isinstance(every, bool) or every <= 0):
        raise UserError(f"eval_every: expected a positive number of steps or 'auto', got {short(every)}")
    kw["eval_every"] = every
    return SweepSpec(**kw, job_overrides=list(job_overrides or []), source=path)


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """``--set`` values: ``job.SECTION.KEY=V`` go to the base job, the rest to the sweep."""
    sweep, job = [], []
    for text in overrides or []:
        (job if text.strip().startswith("job.") and "=" in text.split("job.", 1)[1] else sweep).append(text)
    return sweep, [text.strip()[4:] for text in job]


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``key=value`` or ``section.key=value`` (values read as YAML) into the sweep's mapping."""
    raw = dict(raw)
    for text in overrides:
        if "=" not in text:
            raise UserError(f"--set {text!r}: expected key=value, e.g. max_epochs=5 or target.value=0.9")
        key, value = (part.strip() for part in text.split("=", 1))
        if "." not in key:
            try:
                raw[key] = bounded_yaml.loads(value, f"--set {key}") if value else None
            except bounded_yaml.NotYaml:
                raw[key] = value                # not YAML: the plain string
            continue
        (section, sub), value = parse_override(text)
        if section not in ("lr", "target"):
            raise UserError(f"--set {text!r}: only lr.KEY and target.KEY have sub-keys in a sweep "
                            f"(job.SECTION.KEY sets the base job)")
        if not isinstance(raw.get(section), dict):
            raw[section] = {}
        raw[section] = {**raw[section], sub: value}
    return raw


def load_sweep(path: str, overrides: Optional[list[str]] = None) -> tuple[SweepSpec, JobConfig]:
    """Read SWEEP.yaml with ``--set`` overrides; returns the spec and its validated base job."""
    raw = bounded_yaml.load_file(path, "sweep file")
    if raw is None or raw == {}:
        raise UserError(f"{path}: the sweep file is empty; expected keys {', '.join(_REQUIRED)}")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping with keys {', '.join(_REQUIRED)}")
    sweep_sets, job_sets = split_overrides(overrides)
    spec = from_dict(apply_overrides(raw, sweep_sets), path, job_sets)
    base = load_job(spec.job, spec.job_overrides)
    check_against_job(spec, base)
    return spec, base


def check_against_job(spec: SweepSpec, base: JobConfig) -> None:
    """What the sweep asks of its base job: a validation split for a validation target, an
    optimizer with momentum for a momentum grid."""
    metric = TARGET_METRICS.get(spec.target.metric)
    if metric.split == "validation" and base.data.validation_fraction == 0:
        raise UserError(f"target.metric: {spec.target.metric} needs a validation split in the base job; "
                        f"set data.validation_fraction there (or --set job.data.validation_fraction=0.1)")
    # the optimizers with a momentum μ are those that keep a velocity
    if spec.momentum is not None and "velocity" not in OPTIMIZERS.get(base.optimizer.name).buffers:
        raise UserError(f"momentum: the base job's optimizer {base.optimizer.name!r} has no momentum; "
                        f"leave momentum out or use momentum/nesterov")
