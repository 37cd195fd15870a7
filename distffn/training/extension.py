"""Trainer extensions, in Chainer's manner: the loop only steps; everything else a run does
(pulling the loss, evaluating, checkpointing, logging, drawing progress, stopping early) is an
extension fired by its trigger after a step.

Extensions due after the same step run by descending ``priority``. Those that are not
``training_time`` (evaluation, checkpoints, logs) run after the backend has finished its
queued steps, and their time is left out of the training time and throughput.
"""
from __future__ import annotations

from .triggers import IntervalTrigger

PRIORITY_OBSERVE = 300      # read what the steps produced (training loss totals)
PRIORITY_CHECK = 250        # act on it (divergence, early stopping)
PRIORITY_EVALUATE = 200     # evaluation
PRIORITY_STOP = 150         # stop early on what the evaluation found (before the checkpoint)
PRIORITY_WRITE = 100        # checkpoints
PRIORITY_REPORT = 0         # logs, progress, printing


class Extension:
    """Something the trainer does when ``trigger(trainer)`` holds after a step.

    Subclasses override ``__call__`` and, where needed, ``initialize`` (once, before the first
    step; also on a resumed run) and ``finalize`` (once, after the last step, also when the
    run had nothing left to do). Every process that runs the trainer (each MPI rank) runs its
    extensions in the same order, so extensions may use the backend's collectives; only the
    root writes files (``trainer.is_root``).
    """

    trigger = IntervalTrigger(1, "epoch")
    priority = PRIORITY_REPORT
    training_time = False

    def initialize(self, trainer) -> None:
        pass

    def __call__(self, trainer) -> None:
        raise NotImplementedError

    def finalize(self, trainer) -> None:
        pass

    @property
    def name(self) -> str:
        return type(self).__name__
