"""distffn starts mpiexec itself for scaling.backend: mpi."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np

from distffn.parallel.mpi_env import shared_memory_segments

from helpers import (
    MPIEXEC,
    assert_same_model,
    final_model,
    kill_a_worker_mid_run,
    needs_mpi,
    run_group,
    run_mpi,
    write_equiv_job,
)


@needs_mpi
def test_distffn_launches_mpiexec_itself(reference, tmp_path):
    r, out, _ = run_mpi(tmp_path, 2, "allreduce", under_mpiexec=False)
    assert r.returncode == 0, r.stderr
    assert_same_model(reference, out)


@needs_mpi
def test_distffns_launcher_restarts_lost_mpi_ranks_and_the_run_ends_bit_for_bit(tmp_path):
    """failure.max_failures: 1 with the mpiexec distffn starts: SIGKILL rank 1 mid-run; rank 0
    names it within scaling.timeout_s, the launcher starts the ranks again with --resume, and
    the final model equals an uninterrupted run's."""
    job = write_equiv_job(tmp_path, training={"epochs": 300}, checkpoint={"every_steps": 30, "num_to_keep": 2},
                          failure={"max_failures": 1}, scaling={"backend": "mpi", "num_workers": 2, "timeout_s": 4})
    cut, full = tmp_path / "cut", tmp_path / "full"
    cmd = [sys.executable, "-m", "distffn", "run", job, "--no-progress"]
    segments = shared_memory_segments()
    r, victim = kill_a_worker_mid_run(cmd + ["--out", str(cut)], str(cut))
    assert r.returncode == 0, r.stderr
    assert "restart 1 of 1 (failure.max_failures) from the newest checkpoint" in r.stderr
    assert f"worker 1 (MPI rank 1 on {socket.gethostname()}) was killed by SIGKILL; restart 1 of 1" in r.stderr
    # the killed rank's MPICH segment is removed by the launcher, not left in /dev/shm
    assert shared_memory_segments() - segments == set()
    assert victim not in [w["pid"] for w in json.loads((cut / "workers.json").read_text())]
    assert subprocess.run(cmd + ["--out", str(full)], capture_output=True, timeout=300).returncode == 0
    a, b = final_model(full)[0], final_model(cut)[0]
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@needs_mpi
def test_without_max_failures_a_killed_rank_fails_fast_naming_it(tmp_path):
    job = write_equiv_job(tmp_path, training={"epochs": 300}, scaling={"backend": "mpi", "num_workers": 2})
    out = tmp_path / "run"
    r, _ = kill_a_worker_mid_run([sys.executable, "-m", "distffn", "run", job, "--no-progress", "--out", str(out)],
                                 str(out), after_checkpoints=2)
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("distffn: error:")]
    assert errors == [f"distffn: error: worker 1 (MPI rank 1 on {socket.gethostname()}) was killed by SIGKILL "
                      f"before the run finished"], r.stderr
    assert "Return code" not in r.stderr and "restart" not in r.stderr       # gforker's report is read, not shown


@needs_mpi
def test_under_an_external_mpiexec_a_lost_rank_fails_fast_saying_how_to_resume(tmp_path):
    """Someone else's mpiexec: nothing in distffn can restart its ranks, so max_failures does not
    apply; a stalled rank ends the run with exit 1 and the command that resumes. (A SIGKILLed
    rank makes MPICH's hydra SIGKILL the others at once, exit 9: no rank can speak then.)"""
    job = write_equiv_job(tmp_path, training={"epochs": 300}, failure={"max_failures": 2},
                          scaling={"backend": "mpi", "timeout_s": 3})
    r = run_group([MPIEXEC, "-n", "2", sys.executable, "-m", "distffn", "run", job, "--no-progress",
                   "--out", str(tmp_path / "run")], timeout=120,
                  env=dict(os.environ, DISTFFN_INJECT_FAULT="1:5:hang"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "did not reach" in r.stderr and "nothing restarts the ranks" in r.stderr and "--resume" in r.stderr
