"""N workers give the model of 1 worker, on every backend and in both aggregation modes;
a failing or stalled worker ends the job quickly with a message that names it."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from distffn import checkpoint as ckpt
from distffn.cli import main
from distffn.config import from_dict
from distffn.trainer import Trainer

# 101 samples at batch 50: batches of 50, 50 and 1. With 3 workers the shards are 17/17/16,
# and the last batch leaves two workers with nothing: every weighting case in six steps.
JOB = {
    "name": "equiv",
    "data": {"dataset": "digits", "limit_train": 101},
    "model": {"layers": [64, 24, 10], "activation": "tanh"},
    "optimizer": {"lr": 0.1, "momentum": 0.9, "schedule": "inverse_time", "decay": 0.1},
    "training": {"epochs": 2, "batch_size": 50, "seed": 5},
    "checkpoint": {"every_steps": 0, "num_to_keep": 2},
}
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
needs_mpi = pytest.mark.skipif(not os.access(MPIEXEC, os.X_OK), reason="the mpi extra is not installed")


def run_group(cmd, timeout, env=None):
    """subprocess.run in its own session; on a timeout the whole group dies (mpiexec's ranks
    too), so a failing test never leaves ranks spinning behind it."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def job_dict(**sections):
    job = json.loads(json.dumps(JOB))
    for sec, values in sections.items():
        job.setdefault(sec, {}).update(values)
    return job


def final_params(run_dir):
    found = ckpt.newest_valid_checkpoint(os.path.join(run_dir, "checkpoints"))
    arrays, meta = found[1], found[2]
    return {k: v for k, v in arrays.items() if not k.startswith("v_")}, meta


def train_in_process(out_dir, **sections):
    job = from_dict(job_dict(**sections))
    return Trainer(job, str(out_dir), progress=False, echo=lambda s: None).run()


def assert_same_model(a_dir, b_dir):
    a, meta_a = final_params(a_dir)
    b, meta_b = final_params(b_dir)
    assert meta_a["step"] == meta_b["step"] == 6
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=2e-6, err_msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    train_in_process(out)
    return out


def test_the_reference_is_sensitive_to_weighting(reference, tmp_path):
    """Guard against a vacuous equivalence: averaging shard means instead of weighting by
    sample count gives a measurably different model on this job."""
    from distffn.backends.local import LocalBackend
    from distffn.trainer import prepare_data

    job = from_dict(job_dict(scaling={"num_workers": 3}))
    _, data, model = prepare_data(job)
    backend = LocalBackend(job, data)
    theta = np.empty(model.num_params, np.float32)
    model.init_params(theta, job.training.seed)
    backend.init_state(theta, np.zeros_like(theta), 0)
    start = theta.copy()
    # the 1-sample last batch, split over 3 workers, weighted as if each held a third
    backend.train_step(0, 2, 3, 0.1)
    wrong, _ = backend.state()
    backend.init_state(start, np.zeros_like(start), 0)
    backend.train_step(0, 2, 1, 0.1)
    right, _ = backend.state()
    assert np.abs(wrong - right).max() > 1e-3


@pytest.mark.parametrize("n", [2, 3])
def test_local_workers_match_one_worker(reference, tmp_path, n):
    train_in_process(tmp_path / "run", scaling={"num_workers": n})
    assert_same_model(reference, tmp_path / "run")


# ---------------------------------------------------------------- MPI

def write_job(tmp_path, **sections):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_dict(**sections)))
    return str(path)


def run_mpi(tmp_path, n, mode, env=None, timeout=120, under_mpiexec=True, **sections):
    job = write_job(tmp_path, **sections)
    out = tmp_path / "run"
    args = ["run", job, "--out", str(out), "--no-progress",
            "--set", "scaling.backend=mpi", "--set", f"scaling.num_workers={n}",
            "--set", f"scaling.aggregation={mode}"]
    cli = [sys.executable, "-m", "distffn.cli", *args]
    cmd = [MPIEXEC, "-n", str(n), *cli] if under_mpiexec else cli
    t0 = time.monotonic()
    r = run_group(cmd, timeout, env=dict(os.environ, **(env or {})))
    return r, out, time.monotonic() - t0


@needs_mpi
@pytest.mark.parametrize("n,mode", [(2, "allreduce"), (3, "allreduce"), (2, "central"), (3, "central")])
def test_mpi_ranks_match_one_worker(reference, tmp_path, n, mode):
    r, out, _ = run_mpi(tmp_path, n, mode)
    assert r.returncode == 0, r.stderr
    assert_same_model(reference, out)
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["num_workers"] == n and len(start["placement"]) == n


@needs_mpi
def test_distffn_launches_mpiexec_itself(reference, tmp_path):
    r, out, _ = run_mpi(tmp_path, 2, "allreduce", under_mpiexec=False)
    assert r.returncode == 0, r.stderr
    assert_same_model(reference, out)


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
    assert "worker(s) [1]" in r.stderr and "timeout_s=4" in r.stderr
    assert seconds < 60


# ---------------------------------------------------------------- Ray

@pytest.fixture(scope="module")
def ray_instance():
    """One embedded Ray instance for the module (starting one takes seconds)."""
    pytest.importorskip("ray")
    from distffn.backends.ray import _import_ray
    ray = _import_ray(local=True)
    ray.init(include_dashboard=False, logging_level="warning", num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("n,mode", [(2, "central"), (3, "central"), (2, "allreduce"), (3, "allreduce")])
def test_ray_workers_match_one_worker(ray_instance, reference, tmp_path, n, mode):
    train_in_process(tmp_path / "run", scaling={"backend": "ray", "num_workers": n, "aggregation": mode})
    assert_same_model(reference, tmp_path / "run")


@pytest.mark.parametrize("mode", ["central", "allreduce"])
def test_ray_resumes_a_one_worker_checkpoint(ray_instance, reference, tmp_path, mode):
    """Checkpoints are one format everywhere: epoch 1 on one local worker, epoch 2 on three
    Ray workers (Θ and the velocity restored) end where the one-worker run ends."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for step, path in ckpt.list_checkpoints(str(reference / "checkpoints")):
        if step <= 3:                                        # the end of epoch 1
            shutil.copy(path, run / "checkpoints")
    job = from_dict(job_dict(scaling={"backend": "ray", "num_workers": 3, "aggregation": mode}))
    Trainer(job, str(run), resume=True, progress=False, echo=lambda s: None).run()
    assert_same_model(reference, run)


def run_ray_cli(tmp_path, capsys, mode, **scaling):
    """`distffn run` on the module's Ray instance: (exit code, stderr, seconds)."""
    job = write_job(tmp_path, scaling={"backend": "ray", "num_workers": 2, "aggregation": mode, **scaling})
    t0 = time.monotonic()
    code = main(["run", job, "--out", str(tmp_path / "run"), "--no-progress"])
    return code, capsys.readouterr().err, time.monotonic() - t0


@pytest.mark.parametrize("mode", ["central", "allreduce"])
def test_ray_worker_that_raises_ends_the_job(ray_instance, tmp_path, monkeypatch, capsys, mode):
    monkeypatch.setenv("DISTFFN_INJECT_FAULT", "1:3")
    code, err, seconds = run_ray_cli(tmp_path, capsys, mode, timeout_s=60)
    assert code == 1
    assert "worker 1 failed" in err and "injected fault" in err and "Traceback" not in err
    assert seconds < 60
    assert_cpus_released(ray_instance)


def assert_cpus_released(ray, within_s=20):
    """Torn down: the actors and their placement group gave every CPU back."""
    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + within_s
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == total


@pytest.mark.parametrize("mode", ["central", "allreduce"])
def test_ray_worker_that_stalls_is_named_after_the_timeout(ray_instance, tmp_path, monkeypatch, capsys, mode):
    monkeypatch.setenv("DISTFFN_INJECT_FAULT", "0:2:hang")
    code, err, seconds = run_ray_cli(tmp_path, capsys, mode, timeout_s=4)
    assert code == 1 and "worker 0" in err and "timeout_s=4" in err
    assert seconds < 60
    assert_cpus_released(ray_instance)


@pytest.mark.parametrize("mode", ["central", "allreduce"])
def test_ray_job_larger_than_the_cluster_is_a_clear_error(ray_instance, tmp_path, capsys, mode):
    code, err, _ = run_ray_cli(tmp_path, capsys, mode, num_workers=8, timeout_s=2)
    assert code == 2 and "scaling.num_workers" in err and "cannot place 8 workers" in err, err
    assert "Traceback" not in err
    assert_cpus_released(ray_instance)


def test_ray_allreduce_worker_that_cannot_start_is_named(ray_instance, tmp_path, capsys, monkeypatch):
    """A node without the driver's mpiexec: the message says which command must run there."""
    from distffn.backends import ray_allreduce
    monkeypatch.setattr(ray_allreduce, "_mpi_launcher", lambda: f"/nonexistent/mpiexec -n 1 {sys.executable}")
    code, err, _ = run_ray_cli(tmp_path, capsys, "allreduce", timeout_s=3)
    assert code == 1 and "worker 0 did not finish start-up" in err and "/nonexistent/mpiexec" in err, err
    assert_cpus_released(ray_instance)


# ---------------------------------------------------------------- a two-node Ray cluster

@pytest.mark.parametrize("mode", ["central", "allreduce"])
def test_two_node_ray_cluster_on_loopback(tmp_path, ray_instance, reference, mode):
    """`ray start --head` plus a second `ray start --address` in a private network namespace
    (loopback only): the job's workers (placement group, SPREAD) land on both nodes, train to
    the 1-worker model (allreduce: over MPI between the nodes), and everything is torn down
    afterwards."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--net", "true"]).returncode:
        pytest.skip("needs `unshare --net` (root) for a loopback-only network namespace")
    ray_instance.shutdown()                          # free the cores; this test runs its own
    script = os.path.join(os.path.dirname(__file__), "..", "cluster", "local-two-node.sh")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)     # multi-node needs Ray's default
    out = tmp_path / "run"
    r = run_group(["unshare", "--net", "bash", script, write_job(tmp_path), "--out", str(out),
                   "--no-progress", "--set", f"scaling.aggregation={mode}"], timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "two-node Ray cluster at 127.0.0.1:" in r.stdout
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["num_workers"] == 2 and len(set(start["placement"])) == 2
    assert_same_model(reference, out)
    for leftover in ("raylet", "hydra_pmi_proxy"):
        assert subprocess.run(["pgrep", "-f", leftover], capture_output=True).returncode != 0, leftover


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
