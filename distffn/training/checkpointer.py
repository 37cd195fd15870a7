"""The :class:`Checkpointer` extension: saves Θ, the optimizer's buffers and the run's
position, and restores the newest valid checkpoint for ``--resume``."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..bounded_yaml import short
from ..errors import StorageFailed, UserError
from ..jobspec import from_stored
from ..parallel.resources import note
from . import checkpoint as ckpt
from .extension import PRIORITY_WRITE, Extension
from .triggers import AnyTrigger, IntervalTrigger, end_of_training, every_epoch


class TrainingDiverged(UserError):
    """The loss or the parameters became NaN or infinite."""


@dataclass
class RunState:
    """Where a run stands: restored from a checkpoint on resume."""
    step: int = 0           # updates applied so far
    epoch: int = 0          # epoch in progress (0-based)
    batch: int = 0          # global batches stepped through in that epoch
    sample: int = 0         # where the next batch starts in the epoch's permutation
    samples: int = 0        # training samples stepped through in all
    adaptive: Optional[dict] = None     # an adaptive batch size's schedule (training.adaptive)


@dataclass
class Restored:
    path: str
    theta: np.ndarray
    optimizer_state: dict
    state: RunState


# What may differ on --resume: where things are and how many workers share the work (N workers
# give the model of 1), what to do when they fail, how often to evaluate, checkpoint or log, when to stop early, and the name.
_FREE_TO_CHANGE = {"name", "data.path", "training.eval_every", "training.eval_batch_size",
                   "training.max_steps", "training.target_metric", "training.target_value",
                   "scaling.*", "metrics.*", "checkpoint.*", "failure.*"}


def trajectory_changes(saved_spec: dict, job) -> list[str]:
    """``key (saved → now)`` for every field of ``job`` that differs from the spec a run was
    started with and would change its trajectory (model, data, batch size, optimizer,
    schedule, seed, ...). More epochs are fine unless the schedule depends on the run's
    length (cosine)."""
    try:
        saved = from_stored(saved_spec, "the run's saved job spec").to_dict()
    except UserError as e:
        return [f"the saved spec no longer reads ({e})"]
    now = job.to_dict()
    changes = []
    for section, fields in now.items():
        if not isinstance(fields, dict):
            fields, saved_fields, keys = {section: fields}, {section: saved.get(section)}, [section]
        else:
            saved_fields, keys = saved.get(section, {}), [f"{section}.{k}" for k in fields]
        for key, (name, value) in zip(keys, fields.items()):
            before = saved_fields.get(name)
            if value == before or key in _FREE_TO_CHANGE or f"{section}.*" in _FREE_TO_CHANGE:
                continue
            if key == "training.epochs" and job.optimizer.schedule != "cosine":
                continue
            changes.append(f"{key} ({short(before)} → {short(value)})")
    return changes


def restored_state(meta: dict, job) -> RunState:
    """The run's position from a checkpoint's meta. One written before positions were kept in
    samples (always a fixed batch size) has them from its batch count; its ``samples`` is
    None for the trainer to count (it knows the split's size)."""
    state = RunState(meta["step"], meta["epoch"], meta["batch"], adaptive=meta.get("adaptive"))
    if "sample" in meta:
        state.sample, state.samples = meta["sample"], meta["samples"]
    else:
        state.sample, state.samples = state.batch * job.training.batch_size, None
    return state


class Checkpointer(Extension):
    """Every ``checkpoint.every_steps`` steps (0: none between epochs), at the end of every
    epoch and of the run (an early stop too), and at step 0 of a new run (so every run can be
    replayed); keeps the newest ``checkpoint.num_to_keep`` besides step 0. Only the root
    process writes."""

    priority = PRIORITY_WRITE

    def __init__(self, job, folder: str, layout, optimizer_buffers):
        every = job.checkpoint.every_steps
        self.trigger = AnyTrigger(*([IntervalTrigger(every)] if every else []), every_epoch, end_of_training)
        self.job, self.folder, self.layout = job, folder, layout
        self.buffers = tuple(optimizer_buffers)
        self.num_to_keep = job.checkpoint.num_to_keep
        self.last_saved = None

    def initialize(self, trainer):
        if trainer.is_root:
            removed = ckpt.remove_leftovers(self.folder)
            if removed:
                note(f"removed {len(removed)} temporary checkpoint file(s) an interrupted write left behind")
        if trainer.resumed_from is None:
            self(trainer)

    def __call__(self, trainer):
        adaptive = getattr(trainer, "adaptive", None)
        if adaptive is not None:             # every process: it may pull norms (a collective)
            trainer.state.adaptive = adaptive.checkpoint_state(trainer)
        if not trainer.is_root:
            return
        theta, optimizer_state = trainer.backend.state()
        self.save(trainer.state, theta, optimizer_state)

    def finalize(self, trainer):
        if trainer.is_root and self.last_saved != trainer.state.step and trainer.steps_run:
            self(trainer)                   # a stop that came between two triggers
    def save(self, state: RunState, theta, optimizer_state) -> str:
        if not (np.isfinite(theta).all() and all(np.isfinite(b).all() for b in optimizer_state.values())):
            raise TrainingDiverged(f"training diverged by step {state.step}: parameters are NaN or "
                                   f"infinite (lower optimizer.lr?); the last good checkpoint is kept")
        seed = self.job.training.seed
        meta = {"step": state.step, "epoch": state.epoch, "batch": state.batch, "sample": state.sample,
                "samples": state.samples, **({"adaptive": state.adaptive} if state.adaptive else {}),
                "optimizer": {"name": self.job.optimizer.name, "buffers": list(self.buffers)},
                "job": self.job.to_dict(),
                "rng": {"generator": "numpy PCG64", "seed": seed, "epoch_seed": [seed, state.epoch],
                        "position": state.sample}}
        path = os.path.join(self.folder, ckpt.checkpoint_name(state.step))
        try:
            ckpt.save_checkpoint(path, ckpt.pack_state(self.layout, theta, optimizer_state), meta)
            ckpt.prune_checkpoints(self.folder, self.num_to_keep)
        except OSError as e:
            raise StorageFailed(f"cannot write the checkpoint {path}: {e.strerror or e}; the older "
                                f"checkpoints in {self.folder} are intact") from None
        self.last_saved = state.step
        return path

    def restore(self) -> Optional[Restored]:
        """The newest checkpoint that verifies and fits this job, or None if there is none."""
        skipped: list[str] = []
        found = ckpt.newest_valid_checkpoint(self.folder, warn=skipped.append)
        if found is None:
            if skipped:                 # never start over silently where a run was
                raise UserError(f"{self.folder}: none of its {len(skipped)} checkpoints is readable (the "
                                f"newest: {skipped[0].split(': ', 1)[1]}), so --resume cannot continue the "
                                f"run; start a new one with --out")
            return None
        for line in skipped:
            note(f"warning: {line}")
        path, arrays, meta = found
        changed = trajectory_changes(meta.get("job", {}), self.job)
        if changed:
            raise UserError(f"{path}: --resume would change the run's trajectory: {'; '.join(changed)} "
                            f"(the run was started with the first value; start a new run with --out, "
                            f"or resume with the run's own spec)")
        theta, optimizer_state = ckpt.unpack_state(self.layout, arrays, self.buffers, path)
        return Restored(path, theta, optimizer_state, restored_state(meta, self.job))
