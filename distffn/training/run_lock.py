"""One run per run folder: an exclusive ``flock`` on ``RUN_DIR/.lock`` that holds the holder's
pid. The kernel releases it when the holder exits or dies, so a killed run never leaves a
stale lock behind."""
from __future__ import annotations

import errno
import fcntl
import os

from ..errors import StorageFailed, UserError

# Set by distffn's own mpiexec launcher for its ranks: the launcher already holds the lock.
HELD_ENV = "DISTFFN_RUN_LOCK_HELD"


def live_holder(out_dir: str):
    """The pid (as written) of a live run holding ``out_dir``'s lock, else None; creates nothing."""
    try:
        fd = os.open(os.path.join(out_dir, ".lock"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _holder(fd)
    finally:
        os.close(fd)


def check_not_busy(out_dir: str) -> None:
    """A :class:`UserError` naming the live run that holds ``out_dir``, if one does."""
    holder = live_holder(out_dir)
    if holder is not None:
        raise _busy(out_dir, holder)


def _holder(fd: int) -> str:
    """The pid a lock file holds, as written."""
    return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"


def _busy(out_dir: str, holder: str) -> UserError:
    return UserError(f"{out_dir}: another distffn run (pid {holder}) is using this run folder; "
                     f"wait for it, or use another --out")


class RunLock:
    """``RunLock(out_dir).acquire()`` or a :class:`UserError` naming the other run's pid. A
    folder that the lock itself created, and that holds nothing else when it is released (the
    run was refused before it wrote anything), is removed again."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, ".lock")
        self.fd = None
        self.created = False

    def acquire(self) -> "RunLock":
        try:
            self.created = not os.path.lexists(self.out_dir)
            os.makedirs(self.out_dir, exist_ok=True)
            # never through a link planted at .lock: O_NOFOLLOW fails on one instead
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UserError(f"{self.path}: is a symbolic link; a run folder holds only the run's own "
                                f"files, and distffn never writes through a link (remove it)") from None
            raise StorageFailed(f"cannot create the run folder's lock {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise _busy(self.out_dir, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self):
        if self.fd is None:
            return
        try:
            if self.created and os.listdir(self.out_dir) == [".lock"]:
                os.unlink(self.path)           # still locked: nobody else can be using it
                os.rmdir(self.out_dir)
        except OSError:
            pass                                # a file appeared meanwhile: the folder stays
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
