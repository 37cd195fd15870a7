"""Ray allreduce mode: what it needs (mpi4py, mpiexec on every node), said clearly."""
from __future__ import annotations

import os
import sys

import pytest

from helpers import (
    assert_cpus_released,
    is_loopback,
    listeners_during,
    run_ray_cli,
    user_error,
    write_equiv_job,
    write_job,
)


def test_ray_allreduce_without_mpi4py_is_a_clear_error(tmp_path, capsys, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setitem(sys.modules, "mpi4py", None)          # as if the package were missing
    job = write_job(tmp_path, scaling={"backend": "ray", "num_workers": 2, "aggregation": "allreduce"})
    user_error(capsys, ["run", job, "--out", str(tmp_path / "run")],
               "scaling.aggregation", "mpi4py", "central")
    assert not (tmp_path / "run" / "checkpoints").exists() or not os.listdir(tmp_path / "run" / "checkpoints")


def test_ray_allreduce_worker_that_cannot_start_is_named(ray_instance, tmp_path, capsys, monkeypatch):
    """A node without the driver's mpiexec: the message says which command must run there."""
    from distffn.parallel import ray_allreduce
    monkeypatch.setattr(ray_allreduce, "_mpi_launcher", lambda: f"/nonexistent/mpiexec -n 1 {sys.executable}")
    code, err, _ = run_ray_cli(tmp_path, capsys, "allreduce", timeout_s=3)
    assert code == 1 and "worker 0 did not finish start-up" in err and "/nonexistent/mpiexec" in err, err
    assert_cpus_released(ray_instance)


@pytest.mark.parametrize("address", [[], ["--set", "scaling.address=local"]])
def test_embedded_ray_allreduce_listens_on_loopback_only(tmp_path, address):
    """Ray's own processes, its worker actors and the MPI inside them: every listening socket
    of the whole run is on loopback (``scaling.address: local`` means the same Ray)."""
    job = write_equiv_job(tmp_path, training={"epochs": 20})
    r, seen = listeners_during([sys.executable, "-m", "distffn", "run", job, "--out", str(tmp_path / "run"),
                                "--no-progress", "--set", "scaling.backend=ray", "--set", "scaling.num_workers=2",
                                "--set", "scaling.aggregation=allreduce", *address], timeout=180)
    assert r.returncode == 0, r.stderr
    assert seen and all(is_loopback(addr) for addr, _ in seen), seen


def test_allreduce_on_a_named_cluster_needs_an_interface(tmp_path, capsys):
    job = write_equiv_job(tmp_path)
    user_error(capsys, ["run", job, "--set", "scaling.backend=ray", "--set", "scaling.aggregation=allreduce",
                        "--set", "scaling.address=127.0.0.1:1"], "scaling.interface", "scaling.aggregation=central")
