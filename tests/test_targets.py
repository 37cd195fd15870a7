"""The target metrics: accuracy is reached from below, loss from above."""
from __future__ import annotations

from distffn.targets import TARGET_METRICS


def test_accuracy_is_reached_from_below_and_loss_from_above():
    assert set(TARGET_METRICS) == {"test_accuracy", "test_loss", "validation_accuracy", "validation_loss"}
    acc, loss = TARGET_METRICS.get("validation_accuracy"), TARGET_METRICS.get("test_loss")
    assert acc.split == "validation" and loss.split == "test"
    assert acc.reached(0.9, 0.9) and acc.reached(0.95, 0.9) and not acc.reached(0.89, 0.9)
    assert loss.reached(0.3, 0.3) and loss.reached(0.2, 0.3) and not loss.reached(0.31, 0.3)
    assert not acc.reached(None, 0.5) and not loss.reached(None, 0.5)
