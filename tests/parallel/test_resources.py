"""Resources are checked before anything is allocated or placed: memory, cores, GPUs, the run
folder; each refusal is one line (exit 2) within seconds, before an engine starts."""
from __future__ import annotations

import os
import time

import pytest

from distffn.errors import UserError
from distffn.jobspec import from_dict
from distffn.nn.model import MLP
from distffn.parallel.resources import check_cores, check_memory, worker_bytes

from helpers import needs_mpi, run_cli, user_error, write_job


def timed(capsys, argv, *needles, within=5.0):
    t0 = time.monotonic()
    err = user_error(capsys, argv, *needles)
    assert time.monotonic() - t0 < within, f"refused after {time.monotonic() - t0:.1f} s"
    return err


def test_a_model_that_cannot_fit_is_refused_with_the_estimate(tmp_path, capsys):
    job = write_job(tmp_path, model={"layers": [64, 100_000_000_000, 10]})
    timed(capsys, ["run", job, "--out", str(tmp_path / "run")], "model.layers", "GiB", "available")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_estimate_counts_parameters_optimizer_state_and_activations():
    job = from_dict({"model": {"layers": [784, 1024, 10]}, "training": {"batch_size": 128}})
    model = MLP(job.model)
    assert worker_bytes(job, model, 2) == 4 * (814_090 * 5 + 4 * 1034 * (128 + 1024))
    check_memory(job, model, 1, 2, free=10 * worker_bytes(job, model, 1))
    with pytest.raises(UserError, match=r"× 3 workers on this node"):
        check_memory(job, model, 1, 3, free=2 * worker_bytes(job, model, 1))


def test_more_workers_than_cores_warns_and_beyond_four_per_core_refuses(capsys):
    lines = []
    check_cores(from_dict({"scaling": {"num_workers": 3}}), cores=2, echo=lines.append)
    assert lines == ["warning: 3 workers share 2 cores on this node; they will run slower than 2 would"]
    check_cores(from_dict({"scaling": {"num_workers": 2}}), cores=2, echo=lines.append)
    assert len(lines) == 1
    with pytest.raises(UserError, match=r"^scaling.num_workers: 9 workers on 2 cores .* scaling.oversubscribe"):
        check_cores(from_dict({"scaling": {"num_workers": 9}}), cores=2, echo=lines.append)
    check_cores(from_dict({"scaling": {"num_workers": 9, "oversubscribe": True}}), cores=2, echo=lines.append)
    assert len(lines) == 2


@needs_mpi
def test_mpi_refuses_too_many_workers_before_mpiexec_starts(tmp_path, capsys):
    n = 4 * (os.cpu_count() or 1) + 1
    job = write_job(tmp_path, training={"batch_size": 64})
    timed(capsys, ["run", job, "--set", "scaling.backend=mpi", "--set", f"scaling.num_workers={n}"],
          "scaling.num_workers", f"{n} workers on {os.cpu_count()} cores")


@pytest.mark.parametrize("backend", ["ray", "mpi"])
def test_an_occupied_run_folder_is_refused_before_the_engine_starts(tmp_path, capsys, backend):
    job = write_job(tmp_path)
    out = str(tmp_path / "run")
    assert run_cli(job, "--out", out) == 0
    capsys.readouterr()
    timed(capsys, ["run", job, "--out", out, "--set", f"scaling.backend={backend}", "--set",
                   "scaling.num_workers=2"], "already holds a run's checkpoints", within=3.0)


@pytest.mark.parametrize("backend", ["ray", "mpi"])
def test_use_gpu_without_cupy_is_refused_before_workers_are_placed(tmp_path, capsys, backend):
    pytest.importorskip("ray")
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here")
    except ImportError:
        pass
    job = write_job(tmp_path)
    timed(capsys, ["run", job, "--out", str(tmp_path / "run"), "--set", f"scaling.backend={backend}",
                   "--set", "scaling.num_workers=2", "--set", "scaling.use_gpu=true"], "scaling.use_gpu", "CuPy",
          within=3.0)
