"""What a run reports: the training loss totals pulled from the workers, the divergence
guard, and the log (``metrics.jsonl``, one line per epoch on the console, ``summary.json``)."""
from __future__ import annotations

import json
import math
import os
import time

from ..files import append_line, write_json
from ..parallel.backend import StepTimes, Totals, placement_of
from .checkpointer import TrainingDiverged
from .extension import PRIORITY_CHECK, PRIORITY_OBSERVE, PRIORITY_REPORT, Extension
from .triggers import AnyTrigger, IntervalTrigger, every_epoch


def append_record(path: str, record: dict) -> None:
    """One JSON line appended to ``metrics.jsonl`` at ``path`` (never through a link)."""
    append_line(path, json.dumps(record))


def rate(totals: Totals, what: str):
    """Mean loss or accuracy of exact totals (None without samples)."""
    if totals is None or totals.count == 0:
        return None
    return (totals.loss_sum / totals.count) if what == "loss" else totals.correct / totals.count


def log_points(log_every: int):
    """Every ``log_every`` steps and at the end of every epoch."""
    return AnyTrigger(IntervalTrigger(log_every), every_epoch)


class TrainTotals(Extension):
    """Pulls the workers' running loss and accuracy totals (one host sync) into
    ``trainer.epoch_totals``; a lazy backend finishes its queued steps here, so this counts
    as training time."""

    priority = PRIORITY_OBSERVE
    training_time = True

    def __init__(self, log_every: int):
        self.trigger = log_points(log_every)

    def __call__(self, trainer):
        trainer.last_totals = t = trainer.backend.train_totals()
        trainer.epoch_totals.add(t.loss_sum, t.correct, t.count)


class DivergenceGuard(Extension):
    """Stops the run when the training loss becomes NaN or infinite; the last good
    checkpoint is kept."""

    priority = PRIORITY_CHECK

    def __init__(self, log_every: int, checkpoint_dir: str):
        self.trigger = log_points(log_every)
        self.checkpoint_dir = checkpoint_dir

    def __call__(self, trainer):
        loss = trainer.last_totals.loss_sum
        if not math.isfinite(loss):
            raise TrainingDiverged(f"training diverged at step {trainer.state.step}: the loss is "
                                   f"{loss} (lower optimizer.lr?); stopped, and the last good "
                                   f"checkpoint in {self.checkpoint_dir} is kept")


def throughput(samples: int, seconds: float, startup: tuple) -> float | None:
    """Samples per second leaving out ``startup`` (seconds, samples: the first step of a
    backend's life, see ``Trainer._time_startup``), unless that step is all there is."""
    s0, n0 = startup
    if samples > n0 and seconds > s0:
        samples, seconds = samples - n0, seconds - s0
    return round(samples / seconds, 1) if seconds > 0 else None


def restart_cost(trainer) -> dict:
    """What the failure before this life of the run cost: the wall time from the failure to
    training again (new workers placed and started, the checkpoint read) and the steps done
    again since the checkpoint, with the error and the workers before and now."""
    f = trainer.failure
    return {"error": f["error"], "num_workers_before": f["num_workers"],
            "num_workers": trainer.backend.num_workers, "down_s": round(time.monotonic() - f["at"], 3),
            "steps_redone": max(0, f["step"] - trainer.state.step)}


class MetricsLog(Extension):
    """``metrics.jsonl``: a ``start`` line, an ``eval`` line per evaluation and an ``epoch``
    line per epoch (with the per-step time breakdown); one console line per epoch; and
    ``summary.json`` at the end. The root process writes; every process pulls the times."""

    priority = PRIORITY_REPORT

    def __init__(self, out_dir: str, eval_trigger, echo=print):
        self.trigger = AnyTrigger(every_epoch, eval_trigger)
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.summary_path = os.path.join(out_dir, "summary.json")
        self.echo = echo
        self.best_accuracy = None
        self.last_epoch: dict = {}
        self.run_times = StepTimes()         # the whole run's per-step breakdown
        self._logged_eval = None

    def _write(self, trainer, record: dict):
        if trainer.is_root:
            append_record(self.path, record)

    def initialize(self, trainer):
        job, backend, state = trainer.job, trainer.backend, trainer.state
        workers = backend.worker_processes()       # one gathering serves both records
        placement = placement_of(workers)
        if not trainer.is_root:
            return
        # where each live worker runs: users (and the failure tests) find a worker here
        write_json(os.path.join(os.path.dirname(self.path), "workers.json"), workers)
        self._write(trainer, {
            "event": "start", "num_params": trainer.model.num_params, "num_workers": backend.num_workers,
            "backend": job.scaling.backend, "aggregation": job.scaling.aggregation, "n_train": trainer.n_train, "n_test": trainer.n_test,
            # an adaptive batch has no fixed count (its batch records say what it steps with)
            "steps_per_epoch": None if job.training.is_adaptive else trainer.steps_per_epoch, "epochs": job.training.epochs, "start_step": state.step,
            "placement": placement, "data_source": trainer.data_source,
            **({"placement_strategy": job.scaling.placement} if job.scaling.backend == "ray" else {}),
            **({"n_validation": trainer.n_validation} if trainer.n_validation else {}),
            **({"restarted_after": restart_cost(trainer)} if getattr(trainer, "failure", None) else {})})
        self.echo(f"{job.name}: {trainer.model.num_params:,} parameters, {trainer.n_train:,} training / "
                  f"{trainer.n_test:,} test samples, {job.training.epochs} epochs of "
                  + (f"adaptive batches ({job.training.adaptive.start} to {job.training.adaptive.max}, rule "
                     f"{job.training.adaptive.rule})" if job.training.is_adaptive else f"{trainer.steps_per_epoch} steps")
                  + f", {backend.num_workers} worker(s) on {job.scaling.backend}"
                  f"{f' ({job.scaling.aggregation})' if job.scaling.backend != 'local' else ''}; "
                  f"data from {trainer.data_source}")

    def _test_fields(self, trainer) -> dict:
        """The test figures if Θ was evaluated after this very step, else nulls."""
        now = trainer.observation.get("test_step") == trainer.state.step
        test = trainer.observation.get("test") if now else None
        classify = trainer.classifies
        fields = {"test_loss": rate(test, "loss"),
                  "test_accuracy": rate(test, "acc") if classify and test else None,
                  "test_correct": test.correct if classify and test else None,
                  "test_count": test.count if test else None}
        if trainer.n_validation:
            val = trainer.observation.get("validation") if now else None
            fields.update(validation_loss=rate(val, "loss"),
                          validation_accuracy=rate(val, "acc") if classify and val else None)
        return fields

    def _log_eval(self, trainer):
        state = trainer.state
        if trainer.observation.get("test_step") != state.step or self._logged_eval == state.step:
            return
        self._logged_eval = state.step
        fields = self._test_fields(trainer)
        if fields["test_accuracy"] is not None:
            self.best_accuracy = max(self.best_accuracy or 0.0, fields["test_accuracy"])
        self._write(trainer, {"event": "eval", "step": state.step,
                              "epoch": trainer.epoch_progress(), "lr": trainer.lr,
                              **fields, "elapsed_s": round(time.perf_counter() - trainer.t_start, 3)})

    def __call__(self, trainer):
        self._log_eval(trainer)
        if not trainer.epoch_ended:
            return
        times = trainer.backend.pop_times()
        self.run_times.add(times)
        if not trainer.is_root:
            return
        state, train = trainer.state, trainer.epoch_totals
        seconds, samples = trainer.epoch_seconds, trainer.epoch_samples
        classify = trainer.classifies
        rec = {"event": "epoch", "epoch": state.epoch, "step": state.step, "lr": trainer.lr,
               "train_loss": rate(train, "loss"), "train_accuracy": rate(train, "acc") if classify else None,
               **self._test_fields(trainer),
               "samples_per_s": throughput(samples, seconds, trainer.epoch_startup),
               "epoch_time_s": round(seconds, 4),
               "elapsed_s": round(time.perf_counter() - trainer.t_start, 3), **times.as_dict()}
        self.last_epoch = rec
        self._write(trainer, rec)
        self.echo(self._epoch_line(rec, trainer.job.training.epochs))

    def finalize(self, trainer):
        self._log_eval(trainer)
        self.run_times.add(trainer.backend.pop_times())     # an early stop's part of an epoch
        job, state = trainer.job, trainer.state
        test = trainer.observation.get("test")
        if trainer.is_root and trainer.steps_run == 0:
            self.echo(f"{job.name}: already trained to step {state.step}; nothing to do")
        summary = {
            "name": job.name, "epochs": job.training.epochs, "step": state.step, "samples": trainer.samples_seen(),
            **({"batch_size": trainer.batch_size} if job.training.is_adaptive else {}),     # the last one chosen
            "train_loss": self.last_epoch.get("train_loss"), "train_accuracy": self.last_epoch.get("train_accuracy"),
            "test_loss": rate(test, "loss"),
            "test_accuracy": rate(test, "acc") if trainer.classifies else None,
            "best_test_accuracy": self.best_accuracy, "num_params": trainer.model.num_params,
            **({"validation_loss": rate(trainer.observation.get("validation"), "loss"),
                "validation_accuracy": rate(trainer.observation.get("validation"), "acc")
                if trainer.classifies else None} if trainer.n_validation else {}),
            **({"target": trainer.observation["target"]} if "target" in trainer.observation else {}),
            "backend": job.scaling.backend, "num_workers": trainer.backend.num_workers,
            "stopped": trainer.stop_reason,
            "wall_time_s": round(time.perf_counter() - trainer.t_start, 3),
            "train_time_s": round(trainer.train_seconds, 6),
            "samples_per_s": throughput(trainer.train_samples, trainer.train_seconds,
                                        (trainer.startup_seconds, trainer.startup_samples)),
            "startup_s": round(trainer.startup_seconds, 6),
            **self.run_times.as_dict(), "ms_per_step": self.run_times.per_step_ms()}
        trainer.summary = summary
        if trainer.is_root:
            write_json(self.summary_path, summary)

    @staticmethod
    def _epoch_line(r: dict, epochs: int) -> str:
        acc = "" if r["train_accuracy"] is None else f"  train acc {100 * r['train_accuracy']:.2f}%"
        if r["test_accuracy"] is not None:
            acc += f"  test acc {100 * r['test_accuracy']:.2f}%"
        test = "" if r["test_loss"] is None else f"  test loss {r['test_loss']:.4f}"
        return (f"epoch {r['epoch']:>3}/{epochs}  step {r['step']:>7}  lr {r['lr']:.4g}  "
                f"train loss {r['train_loss']:.4f}{test}{acc}"
                + ("" if r["samples_per_s"] is None else f"  {r['samples_per_s']:,.0f} samples/s"))


# ---------------------------------------------------------------- reading a run directory

def iter_records(metrics_path: str):
    """The records of a ``metrics.jsonl`` file, in order; lines that do not parse (a run
    killed mid-write) are skipped."""
    with open(metrics_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec


def read_progress(run_dir: str) -> dict:
    """How far a run has got, from its files (for ``distffn status``): ``step``, ``epoch``,
    ``epochs``, ``steps_per_epoch``, the newest ``metrics`` (train loss, test loss and accuracy,
    samples/s) and, once it ended, its ``summary``. Empty where the folder is not readable."""
    out: dict = {}
    metrics = os.path.join(run_dir, "metrics.jsonl")
    try:
        records = list(iter_records(metrics))
        out["updated"] = os.path.getmtime(metrics)
    except OSError:
        return out
    keep = ("lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "samples_per_s")
    for rec in records:
        event = rec.get("event")
        if event == "start":
            out["steps_per_epoch"] = rec.get("steps_per_epoch")
            out["num_workers"] = rec.get("num_workers")
            out["epochs"] = rec.get("epochs")
        elif event in ("epoch", "eval"):
            out["step"] = rec.get("step")
            out["epoch"] = rec.get("epoch")
            metrics_now = out.setdefault("metrics", {})
            metrics_now.update({k: rec[k] for k in keep if rec.get(k) is not None})
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            out["summary"] = json.load(f)
    except (OSError, ValueError):
        pass
    return out
