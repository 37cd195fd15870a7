"""What a run can aim at: the evaluation figures a run stops at (``training.target_metric``)
and a sweep measures steps to (``target.metric``), one registry, :data:`TARGET_METRICS`.

An accuracy target is reached from below (accuracy >= value), a loss target from above
(loss <= value). The figures are those of the ``eval`` records in ``metrics.jsonl``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .registry import Registry

TARGET_METRICS = Registry("target metric", "training.target_metric")


@dataclass(frozen=True)
class TargetMetric:
    """One evaluation figure: ``split`` (test or validation) and ``measure`` (loss or accuracy)."""
    split: str
    measure: str

    @property
    def higher_is_better(self) -> bool:
        return self.measure == "accuracy"

    def reached(self, observed: Optional[float], target: float) -> bool:
        """Whether ``observed`` meets ``target`` (None, a missing figure, never does)."""
        if observed is None:
            return False
        return observed >= target if self.higher_is_better else observed <= target


for _split in ("test", "validation"):
    for _measure, _how in (("accuracy", "reached when it is at least the value"),
                           ("loss", "reached from above: when it is at most the value")):
        _where = ("the held-out test split" if _split == "test"
                  else "the validation split (data.validation_fraction of the training data)")
        TARGET_METRICS.register(f"{_split}_{_measure}", TargetMetric(_split, _measure),
                                doc=f"{_measure} on {_where}; {_how}")
