"""Job spec: typed sections read from YAML, validated field by field.

Every mistake raises :class:`UserError` naming the field (``model.layers``)
and what was expected, so the CLI can report it on one line.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from . import bounded_yaml, kernels
from .bounded_yaml import short
from .data import DATASETS
from .errors import UserError
from .nn.activations import ACTIVATIONS
from .nn.init import INITIALIZERS
from .nn.objectives import losses, losses_for, outputs
from .optim import OPTIMIZERS, SCHEDULES
from .parallel import AUTO, BACKENDS, PLACEMENTS, aggregations
from .parallel.links import NETWORKS
from .targets import TARGET_METRICS


@dataclass
class DataConfig:
    dataset: str = "digits"
    path: Optional[str] = None          # npz file, or a folder holding IDX files
    test_fraction: float = 0.2          # only where the dataset has no official test split
    normalize: bool = True
    limit_train: Optional[int] = None   # use only the first N training samples (quick runs)
    validation_fraction: float = 0.0    # carved from the training split (stratified, seeded): tune on it, not on test


@dataclass
class ModelConfig:
    layers: list = field(default_factory=lambda: [64, 64, 10])
    activation: str = "relu"
    output: str = "softmax"
    loss: str = "cross_entropy"
    init: str = "he"
    bias_init: float = 0.0
    init_std: float = 0.01              # for init: normal
    leaky_slope: float = 0.01           # leaky_relu
    prelu_init: float = 0.25            # initial PReLU slope (He et al. 2015)
    maxout_pieces: int = 2              # linear pieces per maxout unit


@dataclass
class OptimizerConfig:
    name: str = "momentum"
    lr: float = 0.05
    momentum: float = 0.9               # momentum, nesterov
    betas: list = field(default_factory=lambda: [0.9, 0.999])   # adam
    eps: float = 1e-8                   # adam
    weight_decay: float = 0.0           # L2: the gradient gets + weight_decay·Θ
    schedule: str = "constant"
    decay: float = 0.0                  # inverse_time: lr0 / (1 + decay * step)
    step_size: int = 1000               # step: multiply by gamma every step_size steps
    gamma: float = 0.1
    min_lr: float = 0.0                 # cosine: floor
    warmup_steps: int = 0


ADAPTIVE = "adaptive"
ADAPTIVE_RULES = ("noise", "goodput")


@dataclass
class AdaptiveConfig:
    """``training.batch_size: adaptive``: the run re-chooses its global batch as it trains."""
    start: int = 128                    # the first batch, and AdaScale's base batch (gain 1)
    max: int = 4096                     # the largest batch it may choose
    every_steps: int = 50               # steps between choices
    rule: str = "noise"                 # noise: follow B_simple | goodput: Pollux's throughput × efficiency
    multiple: int = 0                   # batches are multiples of this (0: goodput_workers, else scaling.num_workers)
    goodput_workers: int = 0            # goodput: choose for this many workers (0: the step times measured here)
    goodput_network: str = "10gbe"      # goodput: ... linked by this network preset (sweep `network`)


@dataclass
class TrainingConfig:
    epochs: int = 20
    batch_size: Union[int, str] = 128   # the global mini-batch, or "adaptive" (training.adaptive)
    seed: int = 0
    drop_last: bool = False             # keep the short last batch of an epoch by default
    eval_every: int = 0                 # steps between evaluations; 0 = at the end of every epoch
    eval_batch_size: int = 1024         # as fast as 4096 on a CPU, and ~45 MB less held
    max_steps: int = 0                  # stop after this many updates in all (0: no limit)
    target_metric: Optional[str] = None  # stop at the first evaluation that reaches target_value
    target_value: Optional[float] = None
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)

    @property
    def is_adaptive(self) -> bool:
        return self.batch_size == ADAPTIVE

    @property
    def first_batch(self) -> int:
        """The global batch of the first step."""
        return self.adaptive.start if self.is_adaptive else self.batch_size

    @property
    def largest_batch(self) -> int:
        """The largest global batch the run may step with (what memory is sized for)."""
        return self.adaptive.max if self.is_adaptive else self.batch_size


@dataclass
class ScalingConfig:
    backend: str = "local"
    num_workers: int = 1
    use_gpu: bool = False
    aggregation: str = "auto"          # auto | central | allreduce
    kernels: str = "auto"              # auto | numpy | numba: the CPU step's elementwise kernels
    address: Optional[str] = None       # an existing Ray cluster (else RAY_ADDRESS, else a local one)
    timeout_s: float = 300.0            # a step that takes longer names the missing workers
    connect_timeout_s: float = 60.0     # connecting to a Ray cluster (scaling.address) waits at most this
    oversubscribe: bool = False         # allow more than 4 workers per core on one node
    interface: Optional[str] = None     # network interface for MPI between nodes (Ray allreduce on a cluster)
    placement: str = "auto"             # Ray: auto | spread (one worker a node where it can) | pack (fill a node first)
    cpus_per_worker: int = 0            # Ray: cores each worker holds (0: an even share, chosen at the start)
    cuda_graph: Union[bool, str] = AUTO  # GPU: auto | true | false: the step captured once, replayed
    tf32: bool = False                  # GPU: TF32 matrix products (faster; ~1e-3 relative error)


@dataclass
class MetricsConfig:
    noise_scale: bool = False           # log the gradient noise scale B_simple at each log point
    noise_every: int = 20               # steps between gradient-norm measurements (≤ 5% of a step, measured)
    noise_window: int = 100             # steps: the time constant of the EMA of |G|² and tr(Σ)


@dataclass
class CheckpointConfig:
    every_steps: int = 0                # 0 = at the end of every epoch
    num_to_keep: int = 3


@dataclass
class FailureConfig:
    max_failures: int = 0               # Ray Train's: 0 fail fast, N restarts, -1 without limit
    min_workers: int = 0                # Ray, elastic: go on with the workers left, down to this many (0: off)


@dataclass
class JobConfig:
    name: str = "job"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = {f.name: f.type for f in dataclasses.fields(JobConfig) if f.name != "name"}


# ---------------------------------------------------------------- type checking

def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + (" or null" if type(None) in typing.get_args(tp) else "")
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string",
            list: "a list", dict: "a mapping"}.get(tp, str(tp))


def _coerce(value, tp, where: str):
    """Check ``value`` against the dataclass field type ``tp``; ints are accepted as floats."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for inner in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, inner, where)
            except UserError:
                pass
        raise UserError(f"{where}: expected {_type_name(tp)}, got {short(value)}")
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, where)
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, list),
        dict: lambda v: isinstance(v, dict),
    }[tp]
    if not ok(value):
        raise UserError(f"{where}: expected {_type_name(tp)}, got {short(value)}")
    if tp is float:
        value = float(value)
        if not math.isfinite(value):
            raise UserError(f"{where}: expected a finite number, got {short(value)}")
    return value


def _resolved_types(cls) -> dict:
    return typing.get_type_hints(cls)


def build_section(cls, raw, where: str, key=None):
    """``cls`` (a dataclass) from the mapping ``raw``, every value checked against its field's
    type; mistakes are named ``where.key`` (or ``key(name)`` when given)."""
    key = key or (lambda k: f"{where}.{k}")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping of keys, got {short(raw)}")
    types = _resolved_types(cls)
    unknown = sorted(set(raw) - set(types))
    if unknown:
        raise UserError(f"{key(unknown[0])}: unknown key (expected one of: {', '.join(types)})")
    kwargs = {k: _coerce(v, types[k], key(k)) for k, v in raw.items()}
    return cls(**kwargs)


def _positive(value, where, allow_zero=False):
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"{where}: expected a {'non-negative' if allow_zero else 'positive'} value, got {short(value)}")


def validate(job: JobConfig) -> JobConfig:
    """Check every field's range and the cross-field rules; returns ``job``."""
    d, m, o, t, s, c = job.data, job.model, job.optimizer, job.training, job.scaling, job.checkpoint
    if job.name in ("", ".", "..") or any(c in job.name for c in "/\\\0"):
        raise UserError(f"name: expected one folder name (it names runs/<name>): not empty, not '.' "
                        f"or '..', no '/', got {short(job.name)}")
    DATASETS.check(d.dataset)
    if not 0.0 < d.test_fraction < 1.0:
        raise UserError(f"data.test_fraction: expected a number between 0 and 1, got {d.test_fraction}")
    if d.dataset == "npz" and not d.path:
        raise UserError("data.path: dataset 'npz' needs the path of an .npz file")
    if d.limit_train is not None:
        _positive(d.limit_train, "data.limit_train")
    if not 0.0 <= d.validation_fraction < 1.0:
        raise UserError(f"data.validation_fraction: expected a number in [0, 1), got {d.validation_fraction}")

    if len(m.layers) < 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in m.layers):
        raise UserError(f"model.layers: expected a list of at least two positive integers "
                        f"(input width, hidden widths..., outputs), got {short(m.layers)}")
    if not ACTIVATIONS.get(m.activation).trainable:
        raise UserError(f"model.activation: {short(m.activation)} has zero gradient almost everywhere, so "
                        f"backpropagation cannot train it; choose one of "
                        f"{ACTIVATIONS.choices(lambda act: act.trainable)}")
    if m.output not in outputs():
        raise UserError(f"model.output: expected one of {', '.join(outputs())}; got {short(m.output)}")
    if m.loss not in losses():
        raise UserError(f"model.loss: expected one of {', '.join(losses())}; got {short(m.loss)}")
    if m.loss not in losses_for(m.output):
        raise UserError(f"model.loss: {short(m.loss)} does not go with output {short(m.output)}; "
                        f"use one of {', '.join(losses_for(m.output))}")
    if m.output == "softmax" and m.layers[-1] < 2:
        raise UserError(f"model.layers: a softmax output needs at least 2 units, got {m.layers[-1]}")
    INITIALIZERS.check(m.init)
    _positive(m.init_std, "model.init_std")
    if m.maxout_pieces < 2:
        raise UserError(f"model.maxout_pieces: expected an integer >= 2, got {m.maxout_pieces}")

    optimizer = OPTIMIZERS.check(o.name)
    _positive(o.lr, "optimizer.lr")
    _positive(o.weight_decay, "optimizer.weight_decay", allow_zero=True)
    optimizer.check(o)
    SCHEDULES.check(o.schedule)
    _positive(o.decay, "optimizer.decay", allow_zero=True)
    _positive(o.step_size, "optimizer.step_size")
    _positive(o.gamma, "optimizer.gamma")
    _positive(o.min_lr, "optimizer.min_lr", allow_zero=True)
    _positive(o.warmup_steps, "optimizer.warmup_steps", allow_zero=True)

    _positive(t.epochs, "training.epochs")
    _positive(t.seed, "training.seed", allow_zero=True)
    if isinstance(t.batch_size, str):
        if t.batch_size != ADAPTIVE:
            raise UserError(f"training.batch_size: expected a positive integer or {ADAPTIVE}, got {short(t.batch_size)}")
        _check_adaptive(job)
    else:
        _positive(t.batch_size, "training.batch_size")
    _positive(t.eval_every, "training.eval_every", allow_zero=True)
    _positive(t.eval_batch_size, "training.eval_batch_size")
    _positive(t.max_steps, "training.max_steps", allow_zero=True)
    if (t.target_metric is None) != (t.target_value is None):
        raise UserError("training.target_value: expected both training.target_metric and "
                        "training.target_value, or neither")
    if t.target_metric is not None:
        metric = TARGET_METRICS.get(t.target_metric)
        if metric.split == "validation" and d.validation_fraction == 0:
            raise UserError(f"training.target_metric: {t.target_metric} needs a validation split; "
                            f"set data.validation_fraction (e.g. 0.1)")
        if metric.measure == "accuracy" and not 0.0 < t.target_value <= 1.0:
            raise UserError(f"training.target_value: an accuracy target is a fraction in (0, 1], "
                            f"got {t.target_value}")
        if metric.measure == "loss" and t.target_value <= 0:
            raise UserError(f"training.target_value: expected a positive loss, got {t.target_value}")

    modes = BACKENDS.check(s.backend)
    if s.aggregation != AUTO and s.aggregation not in modes:
        raise UserError(f"scaling.aggregation: expected one of {', '.join(aggregations())}; "
                        f"got {short(s.aggregation)}")
    kernels.check(s.kernels, s.use_gpu)
    _positive(s.num_workers, "scaling.num_workers")
    _positive(s.timeout_s, "scaling.timeout_s")
    _positive(s.connect_timeout_s, "scaling.connect_timeout_s")
    if s.placement != AUTO and s.placement not in PLACEMENTS:
        raise UserError(f"scaling.placement: expected auto, {' or '.join(PLACEMENTS)}; got {short(s.placement)}")
    if s.placement != AUTO and s.backend != "ray":
        raise UserError(f"scaling.placement: {s.placement} places Ray actors; with scaling.backend: {s.backend} "
                        f"the launcher places the workers (mpiexec's host file, SLURM's nodes); use auto")
    _positive(s.cpus_per_worker, "scaling.cpus_per_worker", allow_zero=True)
    _check_gpu_options(s)
    if s.cpus_per_worker and s.backend != "ray":
        raise UserError(f"scaling.cpus_per_worker: sizes Ray's workers; with scaling.backend: {s.backend} "
                        f"each worker uses the cores of its share of the node; use 0")
    smallest = t.first_batch
    field_name = "training.adaptive.start" if t.is_adaptive else "training.batch_size"
    if s.num_workers > smallest:
        raise UserError(f"scaling.num_workers: {s.num_workers} workers cannot share a global batch of "
                        f"{smallest} samples ({field_name}); use at most {smallest}")

    _positive(job.metrics.noise_every, "metrics.noise_every")
    _positive(job.metrics.noise_window, "metrics.noise_window")

    _positive(c.every_steps, "checkpoint.every_steps", allow_zero=True)
    _positive(c.num_to_keep, "checkpoint.num_to_keep")
    if job.failure.max_failures < -1:
        raise UserError(f"failure.max_failures: expected -1 (no limit), 0 (fail fast) or a positive count, "
                        f"got {job.failure.max_failures}")
    k = job.failure.min_workers
    if not 0 <= k <= s.num_workers:
        raise UserError(f"failure.min_workers: expected 0 (not elastic) up to scaling.num_workers ({s.num_workers}), "
                        f"got {k}")
    if 0 < k < s.num_workers and s.backend != "ray":
        raise UserError(f"failure.min_workers: going on with fewer workers needs scaling.backend: ray (with "
                        f"{s.backend} the launcher starts every rank again); got {k} of {s.num_workers}")
    return job


def _check_adaptive(job: JobConfig):
    """``training.adaptive``: the bounds, the rule, and an optimizer and schedule that AdaScale
    can scale (its gain is derived for SGD with momentum; a schedule is read in
    scale-invariant steps, so it may not depend on the run's length in steps)."""
    a, o = job.training.adaptive, job.optimizer
    for name in ("start", "max", "every_steps"):
        _positive(getattr(a, name), f"training.adaptive.{name}")
    _positive(a.multiple, "training.adaptive.multiple", allow_zero=True)
    if a.start > a.max:
        raise UserError(f"training.adaptive.start: {a.start} is above training.adaptive.max ({a.max}); "
                        f"expected start <= max")
    if a.rule not in ADAPTIVE_RULES:
        raise UserError(f"training.adaptive.rule: expected one of {', '.join(ADAPTIVE_RULES)}; got {short(a.rule)}")
    _positive(a.goodput_workers, "training.adaptive.goodput_workers", allow_zero=True)
    if a.goodput_workers and a.rule != "goodput":
        raise UserError(f"training.adaptive.goodput_workers: plans the goodput rule's step times; rule "
                        f"{a.rule} does not use them; use 0, or rule: goodput")
    NETWORKS.check(a.goodput_network, "training.adaptive.goodput_network")
    if a.goodput_workers > a.start:
        raise UserError(f"training.adaptive.goodput_workers: {a.goodput_workers} workers cannot share a global "
                        f"batch of {a.start} samples (training.adaptive.start); use at most {a.start}")
    if o.name == "adam":
        raise UserError("optimizer.name: adam with training.batch_size: adaptive: AdaScale's learning-rate "
                        "gain holds for SGD with momentum; use momentum or nesterov, or a fixed batch size")
    if o.schedule == "cosine":
        raise UserError("optimizer.schedule: cosine is fixed to the run's length in steps, which an adaptive "
                        "batch changes as it trains; use constant, inverse_time or step (their steps count "
                        "at training.adaptive.start), or a fixed batch size")


# Keys a spec no longer takes, with what replaced them: a spec a user writes with one is refused
# naming the replacement; a spec a checkpoint or run folder stored (:func:`from_stored`) drops it.
RETIRED = {("metrics", "noise_ema"): "metrics.noise_window (steps: the time constant of the same EMA)"}


def _check_retired(raw: dict):
    for (section, key), instead in RETIRED.items():
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raise UserError(f"{section}.{key}: no longer a key; use {instead}")


def from_stored(raw: Any, source: str) -> JobConfig:
    """:func:`from_dict` of a spec a checkpoint or run folder kept, without the :data:`RETIRED`
    keys (an older run's setting of a key that is gone shaped only what that run logged)."""
    if isinstance(raw, dict):
        raw = copy.deepcopy(raw)
        for section, key in RETIRED:
            if isinstance(raw.get(section), dict):
                raw[section].pop(key, None)
    return from_dict(raw, source)


def _check_gpu_options(s: ScalingConfig) -> None:
    """``scaling.cuda_graph`` and ``scaling.tf32`` shape a GPU step; on the CPU they are mistakes."""
    if s.cuda_graph not in (AUTO, True, False):
        raise UserError(f"scaling.cuda_graph: expected auto, true or false; got {short(s.cuda_graph)}")
    if s.cuda_graph is True and not s.use_gpu:
        raise UserError("scaling.cuda_graph: true captures the GPU step in a CUDA graph; set "
                        "scaling.use_gpu: true, or use auto")
    if s.cuda_graph is True and s.backend != "local":
        raise UserError(f"scaling.cuda_graph: true needs scaling.backend: local (with {s.backend}, the "
                        f"gradients leave the GPU for MPI or Ray inside each step); use auto or false")
    if s.tf32 and not s.use_gpu:
        raise UserError("scaling.tf32: TF32 matrix products run on a GPU; set scaling.use_gpu: true or "
                        "leave scaling.tf32 false")


def from_dict(raw: Any, source: str = "job spec") -> JobConfig:
    """Build and validate a :class:`JobConfig` from parsed YAML."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping with sections "
                        f"{', '.join(['name', *SECTIONS])}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"name", *SECTIONS})
    if unknown:
        raise UserError(f"{unknown[0]}: unknown key in {source} "
                        f"(expected: {', '.join(['name', *SECTIONS])})")
    _check_retired(raw)
    name = _coerce(raw.get("name", "job"), str, "name")
    sections = {k: build_section(_resolved_types(JobConfig)[k], raw.get(k), k) for k in SECTIONS}
    return validate(JobConfig(name=name, **sections))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], value parsed as YAML)."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected section.key=value")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) not in (2, 3) or not all(parts):
        if parts == ["name"]:
            return parts, value
        raise UserError(f"--set {text!r}: expected section.key=value, e.g. training.epochs=5")
    try:
        parsed = bounded_yaml.loads(value, f"--set {key}") if value.strip() else None
    except bounded_yaml.NotYaml:
        parsed = value                  # not YAML: the plain string
    return parts, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for text in overrides or []:
        parts, value = parse_override(text)
        if parts == ["name"]:
            raw["name"] = value
            continue
        section, key = parts[:2]
        if section not in SECTIONS:
            raise UserError(f"--set {text!r}: unknown section {section!r} (expected: {', '.join(SECTIONS)})")
        if raw.get(section) is None:
            raw[section] = {}
        if not isinstance(raw[section], dict):
            raise UserError(f"{section}: expected a mapping of keys")
        if len(parts) == 3:             # section.mapping.key, e.g. training.adaptive.rule
            if raw[section].get(key) is None:
                raw[section][key] = {}
            if not isinstance(raw[section][key], dict):
                raise UserError(f"{section}.{key}: expected a mapping of keys")
            raw[section][key][parts[2]] = value
        else:
            raw[section][key] = value
    return raw


def read_yaml(path: str) -> Any:
    """A job file's parsed YAML, read with bounds (size, nesting, aliases)."""
    return bounded_yaml.load_file(path, "YAML job file")


def load_job(path: str, overrides: Optional[list[str]] = None) -> JobConfig:
    """Read a job spec file, apply ``--set`` overrides, and validate it."""
    raw = read_yaml(path)
    if raw is None or raw == {}:
        raise UserError(f"{path}: the job spec is empty; expected a mapping with sections "
                        f"{', '.join(['name', *SECTIONS])} (every field has a default, but say at "
                        f"least what to train, e.g. model.layers)")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping with sections {', '.join(['name', *SECTIONS])}")
    return from_dict(apply_overrides(raw, overrides), source=os.path.basename(path))
