"""One run per run folder: a second run is refused naming the first one's pid; a killed run
leaves no stale lock."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from helpers import user_error, write_equiv_job


def start_long_run(tmp_path, out):
    job = write_equiv_job(tmp_path, training={"epochs": 100_000})
    p = subprocess.Popen([sys.executable, "-m", "distffn", "run", job, "--out", str(out), "--no-progress"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 60
    while not (out / "workers.json").exists():
        assert p.poll() is None and time.monotonic() < deadline, p.stderr.read().decode()
        time.sleep(0.1)
    return job, p


def test_a_second_run_on_the_same_folder_is_refused_naming_the_first(tmp_path, capsys):
    out = tmp_path / "run"
    job, first = start_long_run(tmp_path, out)
    try:
        user_error(capsys, ["run", job, "--out", str(out), "--resume"], str(out),
                   f"another distffn run (pid {first.pid}) is using this run folder")
        user_error(capsys, ["run", job, "--out", str(out)], f"pid {first.pid}")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    # the kernel released the dead run's lock: the run can be resumed
    r = subprocess.run([sys.executable, "-m", "distffn", "run", job, "--out", str(out), "--resume", "--no-progress",
                        "--set", "training.epochs=1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
