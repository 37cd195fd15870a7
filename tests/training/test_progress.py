"""The progress bar: drawn on a terminal (or when asked), never into logs."""
from __future__ import annotations

import io

from distffn.training.progress import ProgressBar


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_drawn_on_a_terminal_with_stats_and_cleared_at_the_end():
    out = Tty()
    bar = ProgressBar(10, "epoch 1/2", stream=out)
    bar.update(10, loss="0.5000", acc="90.0%")
    assert "epoch 1/2 |" in out.getvalue() and "10/10  loss 0.5000  acc 90.0%" in out.getvalue()
    bar.close()
    assert out.getvalue().endswith("\r\x1b[K")


def test_silent_when_not_a_terminal_or_disabled():
    out = io.StringIO()
    bar = ProgressBar(10, "epoch", stream=out)
    bar.update(10, loss="1")
    bar.close()
    tty = Tty()
    ProgressBar(10, "epoch", enabled=False, stream=tty).update(10)
    assert out.getvalue() == "" and tty.getvalue() == ""
