"""SWEEP.yaml: a scaling experiment, typed and validated like a job spec.

A sweep names a base job (a path relative to the sweep file), the batch sizes and worker
counts to measure, the learning rates to try at every batch size (a list, a mapping from batch
size to rates, or a scaling rule from :data:`LR_RULES`), a target
(:data:`~distffn.targets.TARGET_METRICS`) and a budget; optionally seeds to repeat every trial
with, and adaptive-batch entries (``training.batch_size: adaptive``) to set against the fixed
batches. Every mistake raises :class:`UserError` naming the key; unknown keys are refused.
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
from ..jobspec import ADAPTIVE_RULES, JobConfig, _coerce, load_job, parse_override
from ..jobspec import apply_overrides as job_overrides
from ..jobspec import from_dict as job_from_dict
from ..optim import OPTIMIZERS
from ..parallel import BACKENDS
from ..parallel.links import NETWORKS
from ..registry import Registry
from ..targets import TARGET_METRICS

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


@dataclass
class AdaptiveEntry:
    """``adaptive: [{rule, start, max, every_steps, multiple, noise_every, lr, goodput_workers,
    goodput_network}]``: one adaptive batch schedule to run (per rate, per seed); None takes the
    base job's ``training.adaptive`` value, ``noise_every`` :data:`ADAPTIVE_NOISE_EVERY`, ``lr``
    the sweep's rates at ``start``, ``goodput_network`` the sweep's ``network``."""
    rule: str
    start: Optional[int] = None
    max: Optional[int] = None
    every_steps: Optional[int] = None
    multiple: Optional[int] = None
    noise_every: Optional[int] = None
    lr: Optional[Union[list, float]] = None
    goodput_workers: Optional[int] = None
    goodput_network: Optional[str] = None

    def resolved(self, base: JobConfig) -> dict:
        """The schedule's settings (without ``lr``) with the defaults filled in from ``base``;
        the goodput plan's two only where it plans for other workers (so that a sweep folder
        from before they existed resumes)."""
        a = base.training.adaptive
        pick = (lambda k: getattr(self, k) if getattr(self, k) is not None else getattr(a, k))
        out = {"rule": self.rule, "start": pick("start"), "max": pick("max"), "every_steps": pick("every_steps"),
               "multiple": pick("multiple"),
               "noise_every": self.noise_every if self.noise_every is not None else ADAPTIVE_NOISE_EVERY}
        if pick("goodput_workers"):
            out.update(goodput_workers=pick("goodput_workers"), goodput_network=pick("goodput_network"))
        return out


def schedule_label(settings: dict, every: bool = False) -> str:
    """An adaptive schedule as lines and legends name it: ``adaptive goodput (B 128→16384, for
    64 workers on 10gbe[, every 50 steps])``."""
    plan = (f", for {settings['goodput_workers']} workers on {settings['goodput_network']}"
            if settings.get("goodput_workers") else "")
    often = f", every {settings['every_steps']} steps" if every else ""
    return f"adaptive {settings['rule']} (B {settings['start']}→{settings['max']}{plan}{often})"


# the schedule chooses from the norms measured since its last choice: every 5 steps gives it
# ten measurements between choices at every_steps 50, where the default 20 gives two or three
ADAPTIVE_NOISE_EVERY = 5
AUTO = "auto"


@dataclass
class SweepSpec:
    """A validated SWEEP.yaml (see the README's "Scaling experiments" for every key)."""
    job: str                                    # the base job spec, resolved to a path
    batch_sizes: list
    lr: Union[list, dict, LrRule]                  # a grid, {batch size: [rates]}, or a rule
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
    seeds: Optional[list] = None                # None: the base job's seed, one run per trial
    adaptive: list = field(default_factory=list)  # AdaptiveEntry, each
    job_overrides: list = field(default_factory=list)
    source: str = "SWEEP.yaml"

    # ------------------------------------------------------------ derived
    def momenta(self, base: JobConfig) -> list:
        return list(self.momentum) if self.momentum is not None else [base.optimizer.momentum]

    def rates(self, batch: int) -> list[float]:
        if isinstance(self.lr, LrRule):
            return self.lr.rates(batch)
        if isinstance(self.lr, dict):
            if batch not in self.lr:
                raise UserError(f"lr: no rate for batch size {batch}; the mapping has {', '.join(map(str, self.lr))}")
            return list(self.lr[batch])
        return list(self.lr)

    def adaptive_rates(self, entry: AdaptiveEntry, base: JobConfig) -> list[float]:
        """An adaptive entry's rates: its own ``lr``, else the sweep's at its ``start``."""
        return list(entry.lr) if entry.lr is not None else self.rates(entry.resolved(base)["start"])

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
         "network": str, "noise_batches": int, "regime_tolerance": float, "seeds": list, "adaptive": list}
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


def _batch_key(key) -> Optional[int]:
    """A key of an ``lr`` mapping of rates as a batch size (``16`` or ``'16'``), or None."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key if key > 0 else None
    return int(key) if isinstance(key, str) and key.isdigit() and int(key) > 0 else None


def _seeds(values) -> list[int]:
    if not isinstance(values, list) or not values:
        raise UserError(f"seeds: expected a non-empty list of non-negative integers, got {short(values)}")
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise UserError(f"seeds: expected non-negative integers, got {short(v)}")
    return list(dict.fromkeys(values))


def _adaptive_entries(raw) -> list[AdaptiveEntry]:
    """``adaptive``: each entry's own checks; those that need the base job (its defaults, the
    optimizer AdaScale can scale) are :func:`check_against_job`'s."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise UserError(f"adaptive: expected a list of {{rule, start, max, every_steps, ...}}, got {short(raw)}")
    out = []
    for i, item in enumerate(raw):
        where = f"adaptive[{i}]"
        if isinstance(item, dict) and "rule" not in item:
            raise UserError(f"{where}.rule: required ({' or '.join(ADAPTIVE_RULES)})")
        e = _section(AdaptiveEntry, item, where)
        if e.rule not in ADAPTIVE_RULES:
            raise UserError(f"{where}.rule: expected one of {', '.join(ADAPTIVE_RULES)}; got {short(e.rule)}")
        for key in ("start", "max", "every_steps", "noise_every", "goodput_workers"):
            if getattr(e, key) is not None and getattr(e, key) <= 0:
                raise UserError(f"{where}.{key}: expected a positive integer, got {getattr(e, key)}")
        if e.goodput_network is not None:
            NETWORKS.check(e.goodput_network, f"{where}.goodput_network")
        if e.start is not None and e.max is not None and e.start > e.max:
            raise UserError(f"{where}.start: {e.start} is above {where}.max ({e.max}); expected start <= max")
        if e.lr is not None:
            e.lr = _positive_numbers(e.lr if isinstance(e.lr, list) else [e.lr], f"{where}.lr")
        out.append(e)
    return out


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
    if raw.get("seeds") is not None:
        kw["seeds"] = _seeds(raw["seeds"])
    lr = raw["lr"]
    if isinstance(lr, dict) and lr and all(_batch_key(k) is not None for k in lr):
        # {batch size: rate or [rates]}; YAML keys are names (bounded_yaml), so '16': 0.05
        kw["lr"] = {_batch_key(b): _positive_numbers(v if isinstance(v, list) else [v], f"lr.{b}")
                    for b, v in sorted(lr.items(), key=lambda kv: _batch_key(kv[0]))}
    elif isinstance(lr, dict):
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
    kw["adaptive"] = _adaptive_entries(raw.get("adaptive"))
    for e in kw["adaptive"]:                # a schedule planned for a cluster: the sweep's own link
        if e.goodput_workers and e.goodput_network is None:
            e.goodput_network = kw.get("network", "10gbe")
    if isinstance(kw["lr"], dict):
        needed = kw["batch_sizes"] + [e.start for e in kw["adaptive"] if e.start is not None and e.lr is None]
        missing = [b for b in needed if b not in kw["lr"]]
        if missing:
            raise UserError(f"lr: no rate for batch size {missing[0]}; a mapping of rates needs every batch size "
                            f"in batch_sizes and every adaptive start")
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
    for i, entry in enumerate(spec.adaptive):
        check_adaptive_entry(spec, base, entry, i)


def adaptive_overrides(settings: dict) -> list[str]:
    """The ``--set`` values that make a job run an adaptive entry's schedule (``settings``:
    :meth:`AdaptiveEntry.resolved`)."""
    keys = ("rule", "start", "max", "every_steps", "multiple", "goodput_workers", "goodput_network")
    return ["training.batch_size=adaptive", f"metrics.noise_every={settings['noise_every']}",
            *(f"training.adaptive.{k}={settings[k]}" for k in keys if k in settings)]


def check_adaptive_entry(spec: SweepSpec, base: JobConfig, entry: AdaptiveEntry, i: int) -> None:
    """Validate an adaptive entry as the job spec its trials run (the job's own checks: the
    bounds, an optimizer and a schedule AdaScale can scale), its errors named ``adaptive[i].KEY``."""
    settings = entry.resolved(base)
    where = f"adaptive[{i}]"
    if settings["start"] > settings["max"]:          # one of them from the base job
        raise UserError(f"{where}.start: {settings['start']} is above {where}.max ({settings['max']}); "
                        f"expected start <= max")
    try:
        job_from_dict(job_overrides(base.to_dict(), adaptive_overrides(settings)), source=f"{where}'s trials")
    except UserError as e:
        text = str(e).replace("training.adaptive.", f"{where}.").replace("metrics.noise_every", f"{where}.noise_every")
        raise UserError(text if text.startswith(where) else f"{where}: {text}") from None
    spec.adaptive_rates(entry, base)            # a mapping of rates without its start: lr
