"""Ray, both aggregation modes: N actors give the model of 1 worker; failures end the job fast, named; a two-node cluster."""
from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile

import pytest

from distffn.jobspec import from_dict
from distffn.training import Trainer
from distffn.training import checkpoint as ckpt

from helpers import (
    ADAM,
    assert_cpus_released,
    assert_same_model,
    job_dict,
    run_group,
    run_ray_cli,
    train_in_process,
    write_equiv_job,
)


@pytest.mark.parametrize("n,mode", [(2, "central"), (3, "central"), (2, "allreduce"), (3, "allreduce")])
def test_ray_workers_match_one_worker(ray_instance, reference, tmp_path, n, mode):
    train_in_process(tmp_path / "run", scaling={"backend": "ray", "num_workers": n, "aggregation": mode})
    assert_same_model(reference, tmp_path / "run")


@pytest.mark.parametrize("mode", ["central", "allreduce"])
def test_ray_workers_match_one_worker_with_adam(ray_instance, adam_reference, tmp_path, mode):
    """central: the aggregator actor holds Adam's state; allreduce: every actor does."""
    train_in_process(tmp_path / "run", scaling={"backend": "ray", "num_workers": 2, "aggregation": mode},
                     optimizer=ADAM)
    assert_same_model(adam_reference, tmp_path / "run")


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


@pytest.mark.parametrize("mode", ["central", "allreduce"])
def test_ray_worker_that_raises_ends_the_job(ray_instance, tmp_path, monkeypatch, capsys, mode):
    monkeypatch.setenv("DISTFFN_INJECT_FAULT", "1:3")
    code, err, seconds = run_ray_cli(tmp_path, capsys, mode, timeout_s=60)
    assert code == 1
    assert f"worker 1 on {socket.gethostname()} failed" in err and "injected fault" in err and "Traceback" not in err
    assert seconds < 60
    assert_cpus_released(ray_instance)


@pytest.mark.parametrize("mode", ["central", "allreduce"])
def test_ray_worker_that_stalls_is_named_after_the_timeout(ray_instance, tmp_path, monkeypatch, capsys, mode):
    monkeypatch.setenv("DISTFFN_INJECT_FAULT", "0:2:hang")
    code, err, seconds = run_ray_cli(tmp_path, capsys, mode, timeout_s=4)
    assert code == 1 and "worker 0" in err and f"on {socket.gethostname()}" in err and "timeout_s=4" in err
    assert seconds < 60
    assert_cpus_released(ray_instance)


@pytest.mark.parametrize("mode", ["central", "allreduce"])
def test_ray_job_larger_than_the_cluster_is_a_clear_error(ray_instance, tmp_path, capsys, mode):
    code, err, _ = run_ray_cli(tmp_path, capsys, mode, num_workers=8, timeout_s=2)
    assert code == 2 and "scaling.num_workers" in err and "cannot place 8 workers" in err, err
    assert "Traceback" not in err
    assert_cpus_released(ray_instance)


def test_a_busy_cluster_says_what_the_job_waits_for(ray_instance, tmp_path, capsys):
    """Resources the cluster has but others hold: a line every few seconds names what is
    awaited, and the wait ends at scaling.timeout_s with exit 2."""
    from ray.util.placement_group import placement_group, remove_placement_group
    hog = placement_group([{"CPU": 3}])
    ray_instance.get(hog.ready(), timeout=30)
    try:
        code, err, seconds = run_ray_cli(tmp_path, capsys, "central", timeout_s=6)
    finally:
        remove_placement_group(hog)
    assert code == 2, err
    assert err.count("distffn: waiting for the Ray cluster to place 2 workers with {'CPU': 2} each") >= 1
    assert "did not place 2 workers" in err and "within scaling.timeout_s=6 s" in err
    assert 6 <= seconds < 30
    assert_cpus_released(ray_instance)


def test_embedded_ray_ignores_a_stale_cluster_and_keeps_to_itself(tmp_path):
    """Another Ray's address file (/tmp/ray/ray_current_cluster, here under RAY_TMPDIR) names a
    cluster that is gone: a run without scaling.address starts its own Ray anyway, in a temp
    folder of its own that is gone afterwards, and does not say it connected anywhere."""
    stale = tmp_path / "tmp" / "ray"
    stale.mkdir(parents=True)
    (stale / "ray_current_cluster").write_text("127.0.0.1:1")
    own = tempfile.mkdtemp(dir="/tmp")                  # short: Ray's socket paths hang below it
    env = dict(os.environ, RAY_TMPDIR=str(tmp_path / "tmp"), TMPDIR=own)
    env.pop("RAY_ADDRESS", None)
    r = run_group([sys.executable, "-m", "distffn", "run", write_equiv_job(tmp_path), "--out", str(tmp_path / "run"),
                   "--no-progress", "--set", "scaling.backend=ray", "--set", "scaling.num_workers=2"],
                  timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "connecting to the Ray cluster" not in r.stderr
    try:
        assert os.listdir(own) == []                      # its own temp folder, removed at the end
    finally:
        shutil.rmtree(own, ignore_errors=True)
