"""Triggers: when an extension fires. A trigger is a callable ``trigger(trainer) -> bool``
asked after every step (Chainer's ``IntervalTrigger``, in steps or epochs)."""
from __future__ import annotations


class IntervalTrigger:
    """Fires every ``period`` steps, or at the end of every ``period``-th epoch."""

    def __init__(self, period: int, unit: str = "step"):
        if unit not in ("step", "epoch"):
            raise ValueError(f"unit must be 'step' or 'epoch', got {unit!r}")
        if period < 1:
            raise ValueError(f"period must be positive, got {period}")
        self.period, self.unit = period, unit

    def __call__(self, trainer) -> bool:
        state = trainer.state
        if self.unit == "step":
            return state.step % self.period == 0
        return trainer.epoch_ended and state.epoch % self.period == 0

    def __repr__(self):
        return f"IntervalTrigger({self.period}, {self.unit!r})"


class AnyTrigger:
    """Fires when any of its triggers does."""

    def __init__(self, *triggers):
        self.triggers = triggers

    def __call__(self, trainer) -> bool:
        return any(t(trainer) for t in self.triggers)


def end_of_training(trainer) -> bool:
    """Fires after the last step of the run, or once an extension has stopped it early."""
    return trainer.finished or trainer.stop_reason is not None


def every_epoch(trainer) -> bool:
    return trainer.epoch_ended


def steps_or_epoch(steps: int):
    """Every ``steps`` steps when ``steps`` > 0, else at the end of every epoch (how
    ``training.eval_every`` and ``checkpoint.every_steps`` read)."""
    return IntervalTrigger(steps, "step") if steps > 0 else IntervalTrigger(1, "epoch")
