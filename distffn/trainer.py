"""The training loop: epochs of global mini-batches on any backend, with evaluation on the
held-out test split, metrics, checkpoints and exact resume."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from . import checkpoint as ckpt
from .backends import make_backend
from .backends.base import Data, StepTimes, Totals
from .config import JobConfig
from .data import load_dataset
from .errors import UserError
from .model import MLP
from .progress import ProgressBar
from .schedules import learning_rate
from .sharding import batch_bounds, steps_per_epoch


class TrainingDiverged(UserError):
    """The loss or the parameters became NaN or infinite."""


def prepare_data(job: JobConfig):
    """Load the dataset, check it fits the model, and build the targets the loss needs."""
    ds = load_dataset(job.data, job.training.seed)
    model = MLP(job.model)
    model.check_data(ds.num_features, job.data.dataset)
    where = f"data.dataset {job.data.dataset!r}"
    obj = model.objective
    data = Data(
        x_train=ds.x_train, t_train=obj.prepare_targets(ds.y_train, f"{where} (training labels)"),
        labels_train=ds.y_train if ds.kind == "classification" else None,
        x_test=ds.x_test, t_test=obj.prepare_targets(ds.y_test, f"{where} (test labels)"),
        labels_test=ds.y_test if ds.kind == "classification" else None,
    )
    return ds, data, model


@dataclass
class RunState:
    step: int = 0           # updates applied so far
    epoch: int = 0          # epoch in progress (0-based)
    batch: int = 0          # next global batch within that epoch


def _rate(totals: Totals, what: str):
    if totals.count == 0:
        return None
    return (totals.loss_sum / totals.count) if what == "loss" else totals.correct / totals.count


class Trainer:
    """Runs one job to completion; on MPI every rank runs it and rank 0 writes the files."""

    log_every = 50          # steps between pulls of the running loss (one host sync each)

    def __init__(self, job: JobConfig, out_dir: str, resume: bool = False,
                 echo: Callable[[str], None] = print, progress: Optional[bool] = None):
        self.job, self.out_dir, self.resume = job, out_dir, resume
        self.echo, self.progress = echo, progress
        self.ckpt_dir = os.path.join(out_dir, "checkpoints")
        self.is_root = True

    # ---------------------------------------------------------------- files
    def _prepare_dir(self):
        os.makedirs(self.ckpt_dir, exist_ok=True)
        if not self.resume and ckpt.list_checkpoints(self.ckpt_dir):
            raise UserError(f"{self.out_dir}: already holds a run's checkpoints; pass --resume to "
                            f"continue it, or --out to start a new run elsewhere")
        with open(os.path.join(self.out_dir, "job.yaml"), "w") as f:
            f.write(self.job.to_yaml())

    def _metrics(self, record: dict):
        with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    def _save(self, state: RunState, theta, velocity):
        if not (np.isfinite(theta).all() and np.isfinite(velocity).all()):
            raise TrainingDiverged(f"training diverged by step {state.step}: parameters are NaN or "
                                   f"infinite (lower optimizer.lr?); the last good checkpoint is kept")
        layout = self.model.layout
        arrays = layout.to_arrays(theta)
        arrays.update({f"v_{k}": v for k, v in layout.to_arrays(velocity).items()})
        meta = {"step": state.step, "epoch": state.epoch, "batch": state.batch,
                "job": self.job.to_dict(),
                "rng": {"generator": "numpy PCG64", "seed": self.job.training.seed,
                        "epoch_seed": [self.job.training.seed, state.epoch], "position": state.batch}}
        path = os.path.join(self.ckpt_dir, ckpt.checkpoint_name(state.step))
        ckpt.save_checkpoint(path, arrays, meta)
        ckpt.prune_checkpoints(self.ckpt_dir, self.job.checkpoint.num_to_keep)
        return path

    def _load_resume_state(self):
        found = ckpt.newest_valid_checkpoint(self.ckpt_dir)
        if found is None:
            return None
        path, arrays, meta = found
        saved_model = meta.get("job", {}).get("model")
        if saved_model != self.job.to_dict()["model"]:
            raise UserError(f"{path}: saved from another model spec; --resume needs the same model "
                            f"section as the checkpoint ({saved_model})")
        theta = np.empty(self.model.num_params, np.float32)
        velocity = np.zeros_like(theta)
        self.model.layout.from_arrays(arrays, theta, path)
        self.model.layout.from_arrays(arrays, velocity, path, prefix="v_")
        return path, theta, velocity, RunState(meta["step"], meta["epoch"], meta["batch"])

    # ---------------------------------------------------------------- loop
    def run(self) -> dict:
        job = self.job
        t_start = time.perf_counter()
        ds, data, self.model = prepare_data(job)
        self._classifies = data.labels_train is not None
        backend = make_backend(job, data)
        root = self.is_root = backend.is_root
        try:
            resumed = None
            if root:
                self._prepare_dir()
                resumed = self._load_resume_state() if self.resume else None
            if resumed:
                path, theta, velocity, state = resumed
                self.echo(f"resuming from {path} (step {state.step})")
            else:
                theta = np.empty(self.model.num_params, np.float32)
                self.model.init_params(theta, job.training.seed)
                velocity = np.zeros_like(theta)
                state = RunState()
                if root:
                    self._save(state, theta, velocity)      # step 0: every run can be replayed
            state = backend.broadcast(state)                # rank 0 decides where to start
            backend.init_state(theta, velocity, state.step)
            # overflow is caught explicitly (TrainingDiverged), not by NumPy warnings on stderr
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                return self._loop(backend, ds, state, t_start)
        finally:
            backend.close()

    def _loop(self, backend, ds, state: RunState, t_start: float) -> dict:
        job, root = self.job, backend.is_root
        n_train = ds.x_train.shape[0]
        bs, epochs = job.training.batch_size, job.training.epochs
        spe = steps_per_epoch(n_train, bs, job.training.drop_last)
        if spe == 0:
            raise UserError(f"training.batch_size: {bs} is larger than the {n_train} training samples "
                            f"and training.drop_last is true, so an epoch has no batch")
        total_steps = spe * epochs
        every = job.checkpoint.every_steps
        placement = backend.placement()
        if root:
            self._metrics({"event": "start", "num_params": self.model.num_params,
                           "num_workers": backend.num_workers, "backend": job.scaling.backend,
                           "n_train": n_train, "n_test": int(ds.x_test.shape[0]),
                           "steps_per_epoch": spe, "start_step": state.step,
                           "placement": placement})
            self.echo(f"{job.name}: {self.model.num_params:,} parameters, {n_train:,} training / "
                      f"{ds.x_test.shape[0]:,} test samples, {epochs} epochs of {spe} steps, "
                      f"{backend.num_workers} worker(s) on {job.scaling.backend}")
        train_time = 0.0
        train_samples = 0
        best_acc = None
        last = {}
        run_times = StepTimes()         # the whole run's per-step breakdown, for summary.json
        lr = learning_rate(job.optimizer, state.step, total_steps)
        finished_before = state.epoch >= epochs      # the same on every rank (collectives follow)
        while state.epoch < epochs:
            epoch = state.epoch
            totals = Totals()
            bar = ProgressBar(spe, f"epoch {epoch + 1}/{epochs}", enabled=self.progress if root else False)
            t_epoch = time.perf_counter()
            epoch_samples = 0
            while state.batch < spe:
                start, stop = batch_bounds(n_train, bs, state.batch)
                lr = learning_rate(job.optimizer, state.step, total_steps)
                backend.train_step(epoch, state.batch, stop - start, lr)
                state.step += 1
                state.batch += 1
                epoch_samples += stop - start
                if state.step % self.log_every == 0 or (every and state.step % every == 0):
                    self._pull(backend, totals, state)
                    bar.update(state.batch, loss=f"{_rate(totals, 'loss'):.4f}",
                               **self._acc_field(totals))
                if every and state.step % every == 0 and state.batch < spe:
                    t_pause = time.perf_counter()
                    theta, velocity = backend.state()
                    if root:
                        self._save(state, theta, velocity)
                    t_epoch += time.perf_counter() - t_pause    # checkpoint time is not training time
            self._pull(backend, totals, state)    # a backend may still be running queued steps
            epoch_time = time.perf_counter() - t_epoch
            bar.close()
            state.epoch, state.batch = epoch + 1, 0
            train_time += epoch_time
            train_samples += epoch_samples
            test = backend.evaluate()
            times = backend.pop_times()
            run_times.add(times)
            theta, velocity = backend.state()
            if root:
                self._save(state, theta, velocity)
                last = self._epoch_record(state, lr, totals, test, epoch_samples, epoch_time,
                                          time.perf_counter() - t_start, times)
                self._metrics(last)
                if last.get("test_accuracy") is not None:
                    best_acc = max(best_acc or 0.0, last["test_accuracy"])
                self.echo(self._epoch_line(last, epochs))
        if finished_before:                 # resumed a finished run: report where it stands
            test = backend.evaluate()
            last = {"test_loss": _rate(test, "loss"),
                    "test_accuracy": _rate(test, "acc") if self._classifies else None}
            if root:
                self.echo(f"{job.name}: already trained to step {state.step}; nothing to do")
        summary = {"name": job.name, "epochs": epochs, "step": state.step, **{
            k: last.get(k) for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy")},
            "best_test_accuracy": best_acc, "num_params": self.model.num_params,
            "backend": job.scaling.backend, "num_workers": backend.num_workers,
            "wall_time_s": round(time.perf_counter() - t_start, 3),
            "train_time_s": round(train_time, 3),
            "samples_per_s": round(train_samples / train_time, 1) if train_time else None,
            **run_times.as_dict(), "ms_per_step": run_times.per_step_ms()}
        if root:
            with open(os.path.join(self.out_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        return summary

    # ---------------------------------------------------------------- helpers
    def _pull(self, backend, totals: Totals, state: RunState):
        t = backend.train_totals()
        if not math.isfinite(t.loss_sum):
            raise TrainingDiverged(f"training diverged at step {state.step}: the loss is "
                                   f"{t.loss_sum} (lower optimizer.lr?); stopped, and the last good "
                                   f"checkpoint in {self.ckpt_dir} is kept")
        totals.add(t.loss_sum, t.correct, t.count)

    def _acc_field(self, totals: Totals) -> dict:
        if self.model.objective.output == "softmax" or totals.correct:
            return {"acc": f"{100 * _rate(totals, 'acc'):.1f}%"}
        return {}

    def _epoch_record(self, state, lr, train: Totals, test: Totals, samples, seconds, elapsed, times):
        classify = self._classifies
        rec = {"event": "epoch", "epoch": state.epoch, "step": state.step, "lr": lr,
               "train_loss": _rate(train, "loss"),
               "train_accuracy": _rate(train, "acc") if classify else None,
               "test_loss": _rate(test, "loss"),
               "test_accuracy": _rate(test, "acc") if classify else None,
               "test_correct": test.correct if classify else None, "test_count": test.count,
               "samples_per_s": round(samples / seconds, 1) if seconds else None,
               "epoch_time_s": round(seconds, 4), "elapsed_s": round(elapsed, 3)}
        rec.update(times.as_dict())
        return rec

    @staticmethod
    def _epoch_line(r: dict, epochs: int) -> str:
        acc = "" if r["test_accuracy"] is None else \
            f"  train acc {100 * r['train_accuracy']:.2f}%  test acc {100 * r['test_accuracy']:.2f}%"
        return (f"epoch {r['epoch']:>3}/{epochs}  step {r['step']:>7}  lr {r['lr']:.4g}  "
                f"train loss {r['train_loss']:.4f}  test loss {r['test_loss']:.4f}{acc}  "
                f"{r['samples_per_s']:,.0f} samples/s")
