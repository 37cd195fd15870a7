"""Triggers: when extensions fire."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from distffn.training.checkpointer import RunState
from distffn.training.triggers import AnyTrigger, IntervalTrigger, end_of_training, steps_or_epoch


def after(step, epoch=0, epoch_ended=False, finished=False, stop_reason=None):
    return SimpleNamespace(state=RunState(step, epoch, 0), epoch_ended=epoch_ended, finished=finished,
                           stop_reason=stop_reason)


def test_step_interval():
    t = IntervalTrigger(3, "step")
    assert [s for s in range(1, 10) if t(after(s))] == [3, 6, 9]


def test_epoch_interval_fires_only_at_the_end_of_every_nth_epoch():
    t = IntervalTrigger(2, "epoch")
    assert not t(after(10, epoch=2))                        # the step is not an epoch end
    assert not t(after(5, epoch=1, epoch_ended=True))
    assert t(after(10, epoch=2, epoch_ended=True))


def test_any_and_end_of_training():
    t = AnyTrigger(IntervalTrigger(4), end_of_training)
    assert [s for s in range(1, 7) if t(after(s, finished=s == 6))] == [4, 6]
    assert t(after(5, stop_reason="target reached"))


def test_steps_or_epoch_reads_like_the_spec_keys():
    assert steps_or_epoch(0)(after(7, epoch=1, epoch_ended=True)) and not steps_or_epoch(0)(after(8))
    assert steps_or_epoch(4)(after(8)) and not steps_or_epoch(4)(after(7, epoch=1, epoch_ended=True))


@pytest.mark.parametrize("period,unit", [(0, "step"), (1, "fortnight")])
def test_bad_triggers_are_programming_errors(period, unit):
    with pytest.raises(ValueError):
        IntervalTrigger(period, unit)
