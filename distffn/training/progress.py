"""A one-line progress bar on stderr, drawn only when stderr is a terminal, and the trainer
extension that draws one per epoch."""
from __future__ import annotations

import sys
import time

from .extension import PRIORITY_REPORT, Extension
from .metrics import log_points, rate


class ProgressBar:
    """``desc |█████···| n/total  stats``, redrawn at most every 0.1 s."""

    def __init__(self, total: int, desc: str, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.desc, self.n = total, desc, 0
        self.t0 = self._last = time.perf_counter()

    def update(self, n: int, **stats):
        self.n = n
        now = time.perf_counter()
        if not self.enabled or (now - self._last < 0.1 and n < self.total):
            return
        self._last = now
        width = 24
        fill = int(width * n / max(self.total, 1))
        extra = "  ".join(f"{k} {v}" for k, v in stats.items())
        self.stream.write(f"\r{self.desc} |{'█' * fill}{'·' * (width - fill)}| "
                          f"{n}/{self.total}  {extra}\033[K")
        self.stream.flush()

    def close(self):
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()


class ProgressReport(Extension):
    """A progress bar per epoch with the running loss (and accuracy), redrawn at every log
    point; only on the root process, and only when enabled (a terminal, no --no-progress)."""

    priority = PRIORITY_REPORT + 10         # before the epoch line is printed

    def __init__(self, log_every: int, enabled: bool | None):
        self.trigger = log_points(log_every)
        self.enabled = enabled
        self.bar = None

    def __call__(self, trainer):
        if not trainer.is_root:
            return
        state, epochs = trainer.state, trainer.job.training.epochs
        epoch = state.epoch - 1 if trainer.epoch_ended else state.epoch
        # an adaptive batch has no fixed count of steps per epoch: the bar counts samples
        adaptive = trainer.job.training.is_adaptive
        total = trainer.n_train if adaptive else trainer.steps_per_epoch
        if self.bar is None:
            self.bar = ProgressBar(total, f"epoch {epoch + 1}/{epochs}", enabled=self.enabled)
        totals = trainer.epoch_totals
        stats = {"loss": f"{rate(totals, 'loss'):.4f}"}
        if trainer.classifies:
            stats["acc"] = f"{100 * rate(totals, 'acc'):.1f}%"
        if adaptive:
            stats["batch"] = trainer.batch_size
        self.bar.update(total if trainer.epoch_ended else state.sample if adaptive else state.batch, **stats)
        if trainer.epoch_ended:
            self.bar.close()
            self.bar = None

    def finalize(self, trainer):
        if self.bar is not None:
            self.bar.close()
