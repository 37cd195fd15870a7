"""MPI ranks give the model of 1 worker; a failing or stalled rank ends the job, named."""
from __future__ import annotations

import json
import socket
import sys

import pytest

from helpers import (
    ADAM,
    MPIEXEC,
    assert_same_model,
    is_loopback,
    listeners_during,
    needs_mpi,
    run_group,
    run_mpi,
    write_equiv_job,
)


@needs_mpi
@pytest.mark.parametrize("n,mode", [(2, "allreduce"), (3, "allreduce"), (2, "central"), (3, "central")])
def test_mpi_ranks_match_one_worker(reference, tmp_path, n, mode):
    r, out, _ = run_mpi(tmp_path, n, mode)
    assert r.returncode == 0, r.stderr
    assert_same_model(reference, out)
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["num_workers"] == n and len(start["placement"]) == n


@needs_mpi
@pytest.mark.parametrize("mode", ["allreduce", "central"])
def test_mpi_ranks_match_one_worker_with_adam(adam_reference, tmp_path, mode):
    """allreduce: every rank holds the optimizer; central: rank 0 alone. Both give Adam's
    one-worker model, moments included."""
    r, out, _ = run_mpi(tmp_path, 2, mode, optimizer=ADAM)
    assert r.returncode == 0, r.stderr
    assert_same_model(adam_reference, out)


@needs_mpi
def test_mpi_worker_that_raises_ends_the_job(tmp_path):
    r, _, seconds = run_mpi(tmp_path, 2, "allreduce", env={"DISTFFN_INJECT_FAULT": "1:3"},
                            scaling={"timeout_s": 60})
    assert r.returncode != 0
    assert "injected fault" in r.stderr and "worker 1" in r.stderr
    assert seconds < 60


@needs_mpi
def test_mpi_worker_that_stalls_is_named_after_the_timeout(tmp_path):
    r, _, seconds = run_mpi(tmp_path, 2, "central", env={"DISTFFN_INJECT_FAULT": "1:3:hang"},
                            scaling={"timeout_s": 4})
    assert r.returncode != 0
    assert f"worker(s) [1] (MPI ranks on {socket.gethostname()})" in r.stderr and "timeout_s=4" in r.stderr
    assert seconds < 60


@needs_mpi
def test_mpi_resume_of_a_finished_run_keeps_every_rank_in_step(tmp_path):
    """Control flow must not depend on what only rank 0 knows, or ranks block each other."""
    r, out, _ = run_mpi(tmp_path, 2, "allreduce")
    assert r.returncode == 0, r.stderr
    job = str(tmp_path / "job.yaml")
    again = run_group([MPIEXEC, "-n", "2", sys.executable, "-m", "distffn.cli", "run", job,
                       "--out", str(out), "--no-progress", "--resume", "--set", "scaling.backend=mpi"],
                      timeout=120)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout


@needs_mpi
def test_an_mpi_run_on_one_node_listens_on_loopback_only(tmp_path):
    """distffn's own mpiexec (MPICH's gforker, UCX on shared memory) and its ranks: every socket
    any of them listens on during a whole N=2 run is on loopback (measured: none at all)."""
    job = write_equiv_job(tmp_path, training={"epochs": 40})
    r, seen = listeners_during([sys.executable, "-m", "distffn", "run", job, "--out", str(tmp_path / "run"),
                                "--no-progress", "--set", "scaling.backend=mpi", "--set", "scaling.num_workers=2"],
                               timeout=120)
    assert r.returncode == 0, r.stderr
    assert all(is_loopback(addr) for addr, _ in seen), seen
