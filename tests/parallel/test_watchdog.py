"""No orphans: when a run's driver is SIGKILLed, every process it started (mpiexec and its
ranks; Ray's raylet, GCS, agents and workers) is gone within 10 s, and so is Ray's temp folder."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from distffn.parallel.watchdog import descendants, process_table

from helpers import processes_in_sessions, write_equiv_job


@pytest.mark.parametrize("backend", ["mpi", "ray"])
def test_sigkill_of_the_driver_leaves_no_process_behind(tmp_path, backend):
    job = write_equiv_job(tmp_path, training={"epochs": 100_000})
    out = tmp_path / "run"
    driver = subprocess.Popen([sys.executable, "-m", "distffn", "run", job, "--out", str(out), "--no-progress",
                               "--set", f"scaling.backend={backend}", "--set", "scaling.num_workers=2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not (out / "workers.json").exists():
            assert driver.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(1)
        started = descendants(driver.pid, process_table())
        temp = _watched_folders(driver.pid)    # this run's (other runs may be going on meanwhile)
        assert len(started) >= 3                                  # mpiexec + 2 ranks; or Ray's many
        assert len(temp) == (1 if backend == "ray" else 0)
        driver.kill()
        driver.wait()
        assert not processes_in_sessions({driver.pid}, within_s=10), "orphans outlived the driver by 10 s"
        deadline = time.monotonic() + 10                            # the watchdog removes it
        while [p for p in temp if os.path.exists(p)] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in temp if os.path.exists(p)]
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _watched_folders(driver_pid: int) -> list[str]:
    """The temp folders that a watchdog of ``driver_pid`` guards (from its command line:
    ``-m distffn.parallel.watchdog PID FOLDER``)."""
    found = []
    for pid in process_table():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "distffn.parallel.watchdog" in args:
            i = args.index("distffn.parallel.watchdog")
            if args[i + 1:i + 2] == [str(driver_pid)]:
                found += args[i + 2:i + 3]
    return found
