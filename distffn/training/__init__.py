"""Training: the loop (:class:`Trainer`), its extensions and triggers, checkpoints and
evaluation."""
from .checkpointer import Checkpointer, RunState, TrainingDiverged
from .evaluation import Evaluator, evaluate_checkpoint
from .extension import Extension
from .trainer import Trainer
from .triggers import AnyTrigger, IntervalTrigger

__all__ = ["AnyTrigger", "Checkpointer", "Evaluator", "Extension", "IntervalTrigger", "RunState",
           "Trainer", "TrainingDiverged", "evaluate_checkpoint"]
