"""`distffn submit/status/logs/stop/jobs` against a real Ray head: `cluster/ray-head.sh up` on
127.0.0.1 with token authentication and a temp folder of its own, stopped by its process
session (never `ray stop`)."""
from __future__ import annotations

import json
import os
import time

import pytest

from distffn.parallel.watchdog import process_table

from helpers import is_loopback, processes_naming, session_listeners, wait_for_status, write_job

DIGITS_2 = {"name": "digits2", "data": {"dataset": "digits"}, "model": {"layers": [64, 32, 10]},
            "training": {"epochs": 3, "batch_size": 64}, "scaling": {"num_workers": 2}}


@pytest.fixture
def client(ray_client):
    return ray_client


def wait_for(distffn, job_id, states, timeout=180):
    return wait_for_status(distffn, job_id, lambda s: s["state"] in states, timeout, poll_s=1)


def test_head_listens_on_loopback_only(ray_head):
    _, session, _ = ray_head
    listening = session_listeners({session})
    assert listening, "the head's session should listen somewhere (GCS, job server)"
    assert all(is_loopback(address) for address, _ in listening), listening


def test_a_two_worker_job_succeeds_and_leaves_its_run_directory(client, tmp_path):
    job = write_job(tmp_path, DIGITS_2)
    r = client("submit", job, "--cluster", client.profile)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().splitlines()[-1]          # the id is the last line on stdout
    status = wait_for(client, job_id, {"SUCCEEDED", "FAILED"})
    assert status["state"] == "SUCCEEDED", status
    run_dir = status["run_dir"]
    assert run_dir == str(tmp_path / "runs" / job_id)
    assert status["step"] == status["steps_per_epoch"] * 3 and status["epoch"] == 3
    assert status["num_workers"] == 2 and status["metrics"]["test_accuracy"] > 0.5
    assert os.listdir(os.path.join(run_dir, "checkpoints"))
    assert json.load(open(os.path.join(run_dir, "summary.json")))["num_workers"] == 2

    text = client("status", job_id).stdout
    assert text.startswith("SUCCEEDED ") and "epoch 3/3" in text
    logs = client("logs", job_id)
    assert logs.returncode == 0 and logs.stdout.count("epoch ") >= 3 and "  1/3  step" in logs.stdout
    follow = client("logs", job_id, "--follow")             # an ended job: all of it, then exit
    assert follow.returncode == 0 and "done:" in follow.stdout
    assert f" as Ray job {job_id}; run directory {run_dir}" in r.stderr
    header, row = client("jobs").stdout.splitlines()
    assert header.split()[:4] == ["ID", "STATE", "CLUSTER", "SUBMITTED"]
    assert row.split()[:3] == [job_id, "SUCCEEDED", f"ray:127.0.0.1:{client.env['RAY_DASHBOARD_PORT']}"]


def test_a_job_that_fails_on_the_cluster_says_why_in_its_status(client, tmp_path):
    """data.path exists (submit checks that) but is no .npz: the run fails there, and the status
    line ends with the run's own error, not with Ray's announcement of logs it leaves out."""
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    job = write_job(tmp_path, {**DIGITS_2, "data": {"dataset": "npz", "path": str(bad)}, "model": {"layers": [3, 4, 2]}})
    r = client("submit", job, "--cluster", client.profile)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().splitlines()[-1]
    assert wait_for(client, job_id, {"SUCCEEDED", "FAILED"})["state"] == "FAILED"
    line = client("status", job_id).stdout.splitlines()[0]
    assert line.startswith(f"FAILED  {job_id}  (Ray job {job_id}: Job entrypoint command failed with exit code 2"), line
    assert line.endswith(f"its last line: distffn: error: {bad}: not an .npz archive; expected one written by "
                         f"np.savez with x_train, y_train, x_test, y_test)"), line


def test_stop_checkpoints_and_leaves_no_training_process(client, tmp_path):
    job = write_job(tmp_path, {**DIGITS_2, "training": {"epochs": 100000, "batch_size": 64},
                               "scaling": {"backend": "ray", "num_workers": 2},
                               "checkpoint": {"every_steps": 1000000}})
    job_id = client("submit", job, "--cluster", client.profile).stdout.strip().splitlines()[-1]
    status = wait_for(client, job_id, {"RUNNING"})
    run_dir = status["run_dir"]
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(run_dir, "workers.json")) and time.monotonic() < deadline:
        time.sleep(0.5)
    workers = [w["pid"] for w in json.load(open(os.path.join(run_dir, "workers.json")))]
    while (wait_for(client, job_id, {"FAILED", "SUCCEEDED"}, timeout=0).get("step") or 0) < 50:
        time.sleep(0.5)

    r = client("stop", job_id)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("STOPPED "), r.stdout
    assert client("status", job_id).stdout.startswith("STOPPED ")
    # the SIGTERM made the run checkpoint its current step before it exited
    steps = sorted(int(n[5:13]) for n in os.listdir(os.path.join(run_dir, "checkpoints")))
    assert steps[-1] > 0 and steps[-1] == json.load(open(os.path.join(run_dir, "summary.json")))["step"]
    assert "stopped by SIGTERM" in client("logs", job_id).stdout
    assert _alive(workers, within_s=15) == [], "a Ray worker of the stopped job is still alive"
    assert processes_naming(run_dir, within_s=15) == [], "a process of the stopped job is still alive"


def test_unknown_id_and_invalid_spec_exit_2(client, tmp_path):
    r = client("status", "no-such-job-123456")
    assert r.returncode == 2 and "no-such-job-123456: no such job" in r.stderr
    assert "Traceback" not in r.stderr
    for verb in ("logs", "stop"):
        assert client(verb, "no-such-job-123456").returncode == 2

    bad = write_job(tmp_path, {**DIGITS_2, "model": {"layers": [64, 10], "activation": "sign"}})
    r = client("submit", bad, "--cluster", client.profile)
    assert r.returncode == 2 and "model.activation" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert client("jobs").stdout == ""                       # nothing reached the cluster

    profile = tmp_path / "bad.yaml"
    profile.write_text("kind: ray\naddress: 127.0.0.1:8265\n")
    r = client("submit", write_job(tmp_path, DIGITS_2), "--cluster", profile)
    assert r.returncode == 2 and "address" in r.stderr and str(profile) in r.stderr


def test_submitting_without_or_with_a_wrong_token_exits_2(client, tmp_path):
    job = write_job(tmp_path, DIGITS_2)
    r = client("submit", job, "--cluster", client.profile, RAY_AUTH_TOKEN_PATH=None)
    assert r.returncode == 2 and "RAY_AUTH_TOKEN" in r.stderr and "requires a token" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = client("submit", job, "--cluster", client.profile, RAY_AUTH_TOKEN="not-the-token")
    assert r.returncode == 2 and "refused the token" in r.stderr and "RAY_AUTH_TOKEN" in r.stderr
    assert client("jobs").stdout == ""


def _alive(pids, within_s):
    deadline = time.monotonic() + within_s
    while True:
        alive = [pid for pid, p in process_table().items() if pid in pids and p.state != "Z"]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.3)
