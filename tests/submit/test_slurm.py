"""`distffn submit/status/logs/stop` against a real single-node SLURM (Debian's slurm-wlm and
munge: munged, slurmctld, slurmd as root), started by `cluster/slurm/local-cluster.sh up` in a
folder of this module's own and stopped by the pids in its pid files."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import (
    EQUIV_JOB,
    assert_same_as_uninterrupted_mpi_run,
    free_port,
    processes_naming,
    run_group,
    running_past,
    wait_for_status,
    write_job,
)

DIGITS_2 = {"name": "digits2", "data": {"dataset": "digits"}, "model": {"layers": [64, 32, 10]},
            "training": {"epochs": 3, "batch_size": 64}}


@pytest.fixture
def client(slurm_client):
    return slurm_client


def status_of(distffn, job_id) -> dict:
    r = distffn("status", job_id, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def submit(distffn, job, *args):
    r = distffn("submit", job, "--cluster", distffn.profile, *args)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def test_a_two_worker_job_succeeds_and_leaves_its_run_directory(client, tmp_path):
    # quotes, a comment sign, a space and a $ in the run directory: one argument all the way
    out = tmp_path / "run #1 'it\"s' $HOME"
    r = client("submit", write_job(tmp_path, DIGITS_2), "--cluster", client.profile, "--out", out)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().splitlines()[-1]
    status = wait_for_status(client, job_id, lambda s: s["state"] in {"SUCCEEDED", "FAILED", "STOPPED"})
    assert status["state"] == "SUCCEEDED", (status, client("logs", job_id).stdout)
    assert f" as SLURM job {status['native_id']}; run directory {out}" in r.stderr
    assert "COMPLETED" in status["detail"] and "0:0" in status["detail"]
    run_dir = status["run_dir"]
    assert run_dir == str(out)
    assert status["num_workers"] == 2 and status["epoch"] == 3 and status["metrics"]["test_accuracy"] > 0.5
    assert os.listdir(os.path.join(run_dir, "checkpoints"))
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["num_workers"] == 2 and summary["backend"] == "mpi"
    logs = client("logs", job_id).stdout
    assert logs.count("epoch ") >= 3 and "  1/3  step" in logs and "done:" in logs
    assert os.path.isfile(os.path.join(run_dir, f"slurm-{status['native_id']}.out"))
    assert client("status", job_id).stdout.startswith("SUCCEEDED ")
    header, row = client("jobs").stdout.splitlines()
    assert header.split() == ["ID", "STATE", "CLUSTER", "SUBMITTED", "RUN", "DIR"]
    assert row.split()[:3] == [job_id, "SUCCEEDED", "slurm:debug"] and row.endswith(f"  {run_dir}")
    assert header.index("RUN DIR") == row.index(run_dir)              # aligned columns
    listed = json.loads(client("jobs", "--json").stdout)
    assert [(j["id"], j["state"], j["run_dir"]) for j in listed] == [(job_id, "SUCCEEDED", run_dir)]
    # what the submitter keeps of the job is the user's alone
    home = os.path.join(client.env["DISTFFN_HOME"], "jobs")
    modes = {os.path.relpath(os.path.join(d, n), home): os.stat(os.path.join(d, n)).st_mode & 0o777
             for d, dirs, files in os.walk(home) for n in dirs + files}
    assert modes == {f"{job_id}.json": 0o600, job_id: 0o700, f"{job_id}/job.yaml": 0o600,
                     f"{job_id}/job.sbatch": 0o600}
    assert os.stat(home).st_mode & 0o777 == 0o700


def test_stop_checkpoints_the_current_step_and_leaves_no_process(client, tmp_path):
    job = write_job(tmp_path, {**DIGITS_2, "training": {"epochs": 100000, "batch_size": 64},
                               "checkpoint": {"every_steps": 1000000}})
    job_id = submit(client, job)
    status = wait_for_status(client, job_id, running_past(30))
    assert status["state"] == "RUNNING", status
    r = client("stop", job_id)
    assert r.returncode == 0 and r.stdout.startswith("STOPPED "), r.stdout + r.stderr
    status = status_of(client, job_id)
    assert status["state"] == "STOPPED" and "CANCELLED" in status["detail"]
    assert "exit code 143" in status["detail"]                  # the run ended itself, not SIGKILL
    run_dir = status["run_dir"]
    steps = sorted(int(n[5:13]) for n in os.listdir(os.path.join(run_dir, "checkpoints")))
    assert steps[-1] >= 30 and steps[-1] == json.load(open(os.path.join(run_dir, "summary.json")))["step"]
    logs = client("logs", job_id).stdout
    assert f"stopped by SIGTERM after step {steps[-1]}" in logs
    assert f"distffn submit {job} --cluster {client.profile} --out {run_dir}" in logs   # how to go on
    assert processes_naming(run_dir, within_s=15) == []


def test_a_requeued_job_resumes_by_itself_and_ends_bit_for_bit(client, tmp_path):
    """`scontrol requeue` (what preemption with PreemptMode=REQUEUE does): SIGTERM, the run
    checkpoints; the job runs again with SLURM_RESTART_COUNT=1 and --resume; its final model
    equals an uninterrupted run's."""
    job = write_job(tmp_path, EQUIV_JOB, training={"epochs": 3000}, checkpoint={"every_steps": 1000000})
    job_id = submit(client, job)
    status = wait_for_status(client, job_id, running_past(300))
    assert status["state"] == "RUNNING", status
    requeue = subprocess.run(["scontrol", "requeue", status["native_id"]], capture_output=True, text=True,
                             env=client.env, timeout=30)
    assert requeue.returncode == 0, requeue.stderr
    status = wait_for_status(client, job_id, lambda s: s["state"] in {"SUCCEEDED", "FAILED", "STOPPED"}, timeout=300)
    logs = client("logs", job_id).stdout
    assert status["state"] == "SUCCEEDED", (status, logs)
    assert "requeued (restart 1)" in logs and "resuming from" in logs
    assert_same_as_uninterrupted_mpi_run(job, status["run_dir"], tmp_path)


def test_bad_input_exits_2_before_anything_reaches_the_queue(client, tmp_path):
    r = client("status", "no-such-job-123456")
    assert r.returncode == 2 and "no such job" in r.stderr and "Traceback" not in r.stderr
    bad = write_job(tmp_path, {**DIGITS_2, "training": {"epochs": 0}})
    r = client("submit", bad, "--cluster", client.profile)
    assert r.returncode == 2 and "training.epochs" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    profile = tmp_path / "bad.yaml"
    for text, field in (("kind: slurm\ntime: soon\n", "time"), ("kind: slurm\nnodes: 0\n", "nodes"),
                        ("kind: slurm\npartitions: debug\n", "partitions"), ("kind: pbs\n", "kind")):
        profile.write_text(text)
        r = client("submit", write_job(tmp_path, DIGITS_2), "--cluster", profile)
        assert r.returncode == 2 and f"{profile}: {field}" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    profile.write_text("kind: slurm\npartition: nosuchpartition\n")
    r = client("submit", write_job(tmp_path, DIGITS_2), "--cluster", profile)
    assert r.returncode == 2 and "sbatch refused" in r.stderr and "partition" in r.stderr.lower(), r.stderr
    assert client("jobs").stdout == ""                        # nothing was submitted
    queue = subprocess.run(["squeue", "-h"], capture_output=True, text=True, env=client.env, timeout=30)
    assert queue.stdout.strip() == ""


def fake_record(distffn, tmp_path, name, native_id, summary=None):
    """A record of a SLURM job that SLURM does not list (as after MinJobAge), whose run
    directory holds ``summary`` (or none)."""
    run_dir = tmp_path / name
    run_dir.mkdir()
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    jobs = os.path.join(distffn.env["DISTFFN_HOME"], "jobs")
    os.makedirs(jobs, exist_ok=True)
    record = {"id": name, "kind": "slurm", "profile_path": str(distffn.profile),
              "profile": {"kind": "slurm", "partition": "debug"}, "run_dir": str(run_dir),
              "job_path": "job.yaml", "submitted": "2026-12-04T00:00:00+00:00", "native_id": native_id}
    with open(os.path.join(jobs, f"{name}.json"), "w") as f:
        json.dump(record, f)
    return name


def test_a_job_slurm_no_longer_lists_is_read_from_its_summary(client, tmp_path):
    forgotten = "999999"                       # no job of this cluster has such an id
    stopped = fake_record(client, tmp_path, "stopped-1", forgotten, {"step": 30, "stopped": "SIGTERM received"})
    done = fake_record(client, tmp_path, "done-1", forgotten, {"step": 46, "stopped": None})
    early = fake_record(client, tmp_path, "early-1", forgotten, {"step": 9, "stopped": "training.max_steps=9 reached"})
    failed = fake_record(client, tmp_path, "failed-1", forgotten)
    for job_id, state, why in ((stopped, "STOPPED", "stopped (SIGTERM received)"), (done, "SUCCEEDED", "finished"),
                               (early, "SUCCEEDED", "finished (training.max_steps=9 reached)"),
                               (failed, "FAILED", "no summary.json")):
        status = status_of(client, job_id)
        assert status["state"] == state and "no longer listed" in status["detail"], status
        assert why in status["detail"], status


def test_a_controller_that_does_not_answer_is_unknown_not_an_ending(client, tmp_path):
    """status, jobs, stop and logs --follow each end in bounded time and name the controller."""
    text = open(client.env["SLURM_CONF"]).read()
    port = free_port()
    conf = tmp_path / "down.conf"
    conf.write_text("\n".join([ln for ln in text.splitlines() if not ln.startswith(("SlurmctldPort=", "MessageTimeout="))]
                              + [f"SlurmctldPort={port}", "MessageTimeout=2"]) + "\n")
    job_id = fake_record(client, tmp_path, "running-1", "1", None)
    down = {**client.env, "SLURM_CONF": str(conf)}

    def cli(*args):
        return run_group([sys.executable, "-m", "distffn", *args], timeout=120, env=down)
    r = cli("status", job_id)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"UNKNOWN  {job_id}  (controller unreachable at 127.0.0.1:{port} ("), r.stdout
    assert "start slurmctld" in r.stdout and "SLURM_CONF" in r.stdout
    header, row = cli("jobs").stdout.splitlines()
    assert row.split()[:2] == [job_id, "UNKNOWN"]
    for verb in (("stop", job_id), ("logs", job_id, "--follow")):
        r = cli(*verb)
        assert r.returncode == 2 and f"controller unreachable at 127.0.0.1:{port}" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
