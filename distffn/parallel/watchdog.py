"""No orphans: processes a run starts end when its driver dies, even by SIGKILL.

Children distffn starts itself get ``PR_SET_PDEATHSIG`` (:func:`die_with_parent`: mpiexec, and
each MPI rank with its mpiexec). Ray starts processes of its own (raylet, GCS, the dashboard
and runtime-env agents, worker processes) and some outlive a killed driver by a minute or
more; for an embedded Ray the driver starts :func:`start`, a watchdog process that keeps a
list of the driver's descendants and SIGKILLs them the moment the driver is gone.

Run as ``python -m distffn.parallel.watchdog DRIVER_PID [FOLDER ...]``.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import NamedTuple

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent exits (Linux); where the
    parent is already gone, exit now."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:
        os._exit(128 + sig)


class Proc(NamedTuple):
    ppid: int
    start: str          # start time in clock ticks since boot: tells a reused pid apart
    session: int
    state: str          # "Z" for a zombie (dead, not yet reaped)


def process_table() -> dict[int, Proc]:
    """Every process, from /proc/PID/stat."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(entry)] = Proc(int(fields[1]), fields[19], int(fields[3]), fields[0])
    return out


def descendants(root: int, table: dict | None = None) -> dict[int, str]:
    """{pid: start time} of every descendant of ``root`` (by parent pid) in ``table``
    (default: the process table now)."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, proc in table.items():
        children.setdefault(proc.ppid, []).append(pid)
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = table[child].start
            todo.append(child)
    return found


def watch(driver: int, folders=(), every_s: float = 0.5) -> None:
    """Until ``driver`` is gone, remember its descendants; then SIGKILL those still alive (the
    same processes: checked by start time, so a reused pid is never hit) and remove
    ``folders`` (the run's temp folders)."""
    me = os.getpid()
    table = process_table()
    started = table[driver].start if driver in table else None
    known: dict[int, str] = {}
    while True:
        table = process_table()
        if driver not in table or table[driver].start != started:
            break
        known.update({p: t for p, t in descendants(driver, table).items() if p != me})
        time.sleep(every_s)
    for pid, start in known.items():
        if pid in table and table[pid].start == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def start(*folders: str) -> subprocess.Popen:
    """A watchdog for this process that also removes ``folders`` if it dies (stop it with
    ``terminate()`` when the run ends normally)."""
    # a session of its own: whoever stops the driver's whole process group (a batch system, a
    # timeout) stops the driver, and the watchdog then cleans up after it
    return subprocess.Popen([sys.executable, "-m", "distffn.parallel.watchdog", str(os.getpid()), *folders],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2:])
