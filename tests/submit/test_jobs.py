"""What `status` and `jobs` print about submitted jobs: epochs as a user counts them, Ray's
message for a failed job in one line, and a `jobs` table that never waits on a cluster that
does not answer (no cluster is started here)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from distffn.cli import _status_lines
from distffn.submit.ray_jobs import _message


def status(tmp_path, epoch, step, **extra):
    return {"id": "j-1", "state": "RUNNING", "detail": "x", "run_dir": str(tmp_path), "step": step,
            "epoch": epoch, "epochs": 20, "steps_per_epoch": 100, "metrics": {}, **extra}


def test_an_epoch_shows_whole_at_its_end_and_cut_to_two_decimals_within(tmp_path):
    assert "  step 197/2000  epoch 1.97/20" in _status_lines(status(tmp_path, 1.9744, 197))[1]
    assert "  step 200/2000  epoch 2/20" in _status_lines(status(tmp_path, 2.0, 200))[1]
    assert "epoch 1.99/20" in _status_lines(status(tmp_path, 1.9999, 199))[1]     # not yet 2


def test_a_failed_ray_job_says_its_last_line_rather_than_announcing_logs():
    message = ("Job entrypoint command failed with exit code 2, last available logs (truncated to 20,000 chars):\n"
               "distffn: note: something\n"
               "distffn: error: data.path: /data/x.npz: no such file\n")
    assert _message(message) == ("Job entrypoint command failed with exit code 2; its last line: "
                                 "distffn: error: data.path: /data/x.npz: no such file")
    assert _message("Job entrypoint command failed with exit code 1, last available logs (truncated to "
                    "20,000 chars):\n") == "Job entrypoint command failed with exit code 1 (it printed nothing)"
    assert _message("Job finished successfully.") == "Job finished successfully."


def test_jobs_lists_every_job_and_marks_a_silent_cluster_unknown(tmp_path):
    silent = socket.create_server(("127.0.0.1", 0))      # accepts connections, never answers
    try:
        port = silent.getsockname()[1]
        jobs = tmp_path / "home" / "jobs"
        jobs.mkdir(parents=True)
        for job_id, kind, profile, native in (
                ("ray-job-1", "ray", {"kind": "ray", "address": f"http://127.0.0.1:{port}"}, "ray-job-1"),
                ("slurm-job-1", "slurm", {"kind": "slurm"}, "12")):
            (jobs / f"{job_id}.json").write_text(json.dumps({
                "id": job_id, "kind": kind, "profile_path": str(tmp_path / "p.yaml"), "profile": profile,
                "run_dir": str(tmp_path / job_id), "job_path": "j.yaml", "native_id": native,
                "submitted": f"2026-12-04T00:00:0{len(kind)}+00:00"}))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RAY_"))}
        env.update(DISTFFN_HOME=str(tmp_path / "home"), SLURM_CONF=str(tmp_path / "no-slurm.conf"),
                   RAY_AUTH_TOKEN="t")
        r = subprocess.run([sys.executable, "-m", "distffn", "jobs"], capture_output=True, text=True,
                           env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].split() == ["ID", "STATE", "CLUSTER", "SUBMITTED", "RUN", "DIR"]
        rows = [ln.split() for ln in lines[1:]]
        assert [row[:3] for row in rows] == [["slurm-job-1", "UNKNOWN", "slurm"],
                                             ["ray-job-1", "UNKNOWN", f"ray:127.0.0.1:{port}"]]
        r = subprocess.run([sys.executable, "-m", "distffn", "jobs", "--json"], capture_output=True, text=True,
                           env=env, timeout=60)
        listed = {j["id"]: j for j in json.loads(r.stdout)}
        assert listed["slurm-job-1"]["detail"].startswith(f"SLURM_CONF={tmp_path / 'no-slurm.conf'}: no such file")
        assert listed["ray-job-1"]["detail"].startswith(f"job server unreachable at http://127.0.0.1:{port}")
    finally:
        silent.close()
