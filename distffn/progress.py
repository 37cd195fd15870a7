"""A one-line progress bar on stderr, drawn only when stderr is a terminal."""
from __future__ import annotations

import sys
import time


class ProgressBar:
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
