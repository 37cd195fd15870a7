"""One run per run folder: an exclusive ``flock`` on ``RUN_DIR/.lock`` that holds the holder's
pid. The kernel releases it when the holder exits or dies, so a killed run never leaves a
stale lock behind."""
from __future__ import annotations

import fcntl
import os

from ..errors import StorageFailed, UserError

# Set by distffn's own mpiexec launcher for its ranks: the launcher already holds the lock.
HELD_ENV = "DISTFFN_RUN_LOCK_HELD"


class RunLock:
    """``RunLock(out_dir).acquire()`` or a :class:`UserError` naming the other run's pid."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, ".lock")
        self.fd = None

    def acquire(self) -> "RunLock":
        try:
            os.makedirs(self.out_dir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StorageFailed(f"cannot create the run folder's lock {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{self.out_dir}: another distffn run (pid {holder}) is using this run folder; "
                            f"wait for it, or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
