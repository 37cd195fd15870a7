"""Stopping before the last epoch: at ``training.max_steps`` updates, or at the first
evaluation whose ``training.target_metric`` reaches ``training.target_value`` (a scaling
sweep's trials: steps-to-target). The run then ends cleanly: the final checkpoint, the
summary (with a ``target`` record) and the logs are written as at a normal end."""
from __future__ import annotations

from ..parallel.backend import Totals
from ..targets import TARGET_METRICS
from .extension import PRIORITY_STOP, Extension
from .metrics import rate
from .triggers import AnyTrigger


class EarlyStop(Extension):
    """Ends the run at ``max_steps`` or when the target is reached; records in
    ``trainer.observation["target"]`` whether, where (step, samples, training seconds) and
    with what figure the target was reached, or the best figure seen if it was not."""

    priority = PRIORITY_STOP

    def __init__(self, job, eval_trigger):
        t = job.training
        self.max_steps = t.max_steps
        self.metric_name, self.value = t.target_metric, t.target_value
        self.metric = TARGET_METRICS.get(self.metric_name) if self.metric_name else None
        self.trigger = AnyTrigger(*([eval_trigger] if self.metric else []),
                                  *([lambda trainer: trainer.state.step >= self.max_steps] if self.max_steps else []))
        self.best = None
        self.reached = None

    def initialize(self, trainer):
        if self.max_steps and trainer.state.step >= self.max_steps:
            trainer.stop(f"training.max_steps={self.max_steps} reached")

    def _observed(self, trainer):
        if trainer.observation.get("test_step") != trainer.state.step:
            return None
        totals: Totals = trainer.observation.get(self.metric.split)
        if totals is None or (self.metric.measure == "accuracy" and not trainer.classifies):
            return None
        return rate(totals, "acc" if self.metric.measure == "accuracy" else "loss")

    def __call__(self, trainer):
        if self.metric is not None and self.reached is None:
            observed = self._observed(trainer)
            if observed is not None:
                better = (max if self.metric.higher_is_better else min)
                self.best = observed if self.best is None else better(self.best, observed)
            if self.metric.reached(observed, self.value):
                state = trainer.state
                self.reached = {"metric": self.metric_name, "value": self.value, "reached": True,
                                "observed": observed, "step": state.step,
                                "epoch": trainer.epoch_progress(),
                                "samples": trainer.samples_seen(),      # before a resume too
                                "train_seconds": round(trainer.train_seconds + trainer.epoch_seconds, 4)}
                trainer.observation["target"] = self.reached
                if trainer.is_root:
                    trainer.echo(f"target reached: {self.metric_name} {observed:.4g} at step {state.step} "
                                 f"(training.target_value {self.value:g})")
                trainer.stop(f"training.target_metric {self.metric_name} reached {self.value:g}")
                return
        if self.max_steps and trainer.state.step >= self.max_steps:
            trainer.stop(f"training.max_steps={self.max_steps} reached")

    def finalize(self, trainer):
        if self.metric is not None and self.reached is None:
            trainer.observation["target"] = {"metric": self.metric_name, "value": self.value,
                                             "reached": False, "best": self.best, "step": None}
