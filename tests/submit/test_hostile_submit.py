"""Hostile and mistaken input to `distffn submit`, through the CLI: each is exit 2 with one line
naming the field, and nothing is created (no record, no stage folder, no run directory, no
file a value tried to create). Cases that need no cluster start none; the others use the
session's SLURM (`slurm_client`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import free_port, run_group, write_job

DIGITS = {"name": "digits", "data": {"dataset": "digits"}, "model": {"layers": [64, 16, 10]},
          "training": {"epochs": 1, "batch_size": 64}}
MPI_2 = {**DIGITS, "scaling": {"backend": "mpi", "num_workers": 2}}     # what slurm_client's profile runs


def distffn(tmp_path, *args, env=None):
    """`python -m distffn ARGS` in tmp_path with a $DISTFFN_HOME of its own, no SLURM or Ray
    configured unless ``env`` says so."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RAY_"))}
    e.update({"DISTFFN_HOME": str(tmp_path / "home"), **(env or {})})
    return subprocess.run([sys.executable, "-m", "distffn", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=e, cwd=tmp_path)


def refused(r, message: str):
    """Exit 2 and exactly the one line ``distffn: error: MESSAGE...``."""
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"distffn: error: {message}"), lines[0]
    assert r.stdout == ""
    return lines[0]


def nothing_left(home, *paths):
    jobs = home / "jobs"
    assert not jobs.exists() or not any(jobs.iterdir()), list(jobs.iterdir())
    for p in paths:
        assert not os.path.lexists(p), p


def slurm_profile(tmp_path, text="", name="slurm.yaml"):
    path = tmp_path / name
    path.write_text(f"kind: slurm\npartition: debug\ncommand: {sys.executable} -m distffn\n"
                    f"runs: {tmp_path / 'runs'}\n{text}")
    return path


# ---------------------------------------------------------------- no cluster needed

def test_a_newline_in_out_is_refused_and_runs_nothing(tmp_path):
    pwned = tmp_path / "PWNED"
    out = f"{tmp_path}/o\ntouch {pwned} #"
    r = distffn(tmp_path, "submit", write_job(tmp_path, DIGITS), "--cluster", slurm_profile(tmp_path), "--out", out)
    refused(r, f"--out: {out!r} holds a control character ('\\n'); expected a path on one line")
    nothing_left(tmp_path / "home", pwned, f"{tmp_path}/o\ntouch {pwned} #", tmp_path / "o")


@pytest.mark.parametrize("line, key, expected", [
    ("runs: \"/tmp/r\\ntouch /tmp/PWNED #\"\n", "runs", "runs: '/tmp/r\\ntouch /tmp/PWNED #' holds a control"),
    ("setup: [\"echo hi\\r\\n#SBATCH --uid=0\"]\n", "setup", "setup: 'echo hi\\r\\n#SBATCH --uid=0' holds a control"),
    ("template: \"my\\njob.sbatch\"\n", "template", "template: "),
    ("command: \"python -m 'distffn\"\n", "command", "command: \"python -m 'distffn\": no closing quotation;"),
    ("command: \"distffn\\ntouch /tmp/PWNED\"\n", "command", "command: 'distffn\\ntouch /tmp/PWNED' holds a control"),
])
def test_a_profile_value_that_would_reach_the_script_badly_is_refused(tmp_path, line, key, expected):
    (tmp_path / "my\njob.sbatch").write_text("#!/bin/bash\n")
    profile = tmp_path / "p.yaml"
    base = slurm_profile(tmp_path).read_text()
    profile.write_text("".join(ln + "\n" for ln in base.splitlines() if not ln.startswith(f"{key}:")) + line)
    r = distffn(tmp_path, "submit", write_job(tmp_path, DIGITS), "--cluster", "p.yaml")
    refused(r, f"p.yaml: {expected}")
    nothing_left(tmp_path / "home", "/tmp/PWNED")


def test_an_unclosed_quote_in_a_ray_command_is_refused(tmp_path):
    (tmp_path / "ray.yaml").write_text("kind: ray\naddress: http://127.0.0.1:1\ncommand: \"distffn '\"\n")
    r = distffn(tmp_path, "submit", write_job(tmp_path, DIGITS), "--cluster", "ray.yaml")
    refused(r, "ray.yaml: command: \"distffn '\": no closing quotation;")
    nothing_left(tmp_path / "home")


def test_a_set_with_a_newline_is_refused(tmp_path):
    r = distffn(tmp_path, "submit", write_job(tmp_path, DIGITS), "--cluster", slurm_profile(tmp_path),
                "--set", "name=x\ntouch /tmp/PWNED")
    refused(r, "--set: 'name=x\\ntouch /tmp/PWNED' holds a control character")
    nothing_left(tmp_path / "home")


@pytest.mark.parametrize("out, bad", [("run-100%", "%"), ("run\\x", "\\\\")])
def test_a_slurm_run_directory_with_a_pattern_character_is_refused(tmp_path, out, bad):
    r = distffn(tmp_path, "submit", write_job(tmp_path, DIGITS), "--cluster", slurm_profile(tmp_path), "--out", out)
    refused(r, f"--out: {tmp_path / out}: SLURM reads '{bad}' in its output file name as a pattern character")
    nothing_left(tmp_path / "home", tmp_path / out)


def test_a_missing_data_path_is_refused_before_anything_is_staged(tmp_path):
    job = write_job(tmp_path, {**DIGITS, "data": {"dataset": "npz", "path": "data/none.npz"}})
    r = distffn(tmp_path, "submit", job, "--cluster", slurm_profile(tmp_path))
    refused(r, f"data.path: {tmp_path / 'data/none.npz'}: no such file or folder (the cluster reads this path")
    nothing_left(tmp_path / "home", tmp_path / "runs")


def test_a_ray_data_path_is_looked_for_in_the_working_dir_the_cluster_receives(tmp_path):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "d.npz").write_bytes(b"")        # beside the submitter: not what travels
    job = write_job(project, {**DIGITS, "data": {"dataset": "npz", "path": "data/d.npz"}})
    (tmp_path / "ray.yaml").write_text("kind: ray\naddress: http://127.0.0.1:1\n"
                                       "runtime_env:\n  working_dir: project\n")
    r = distffn(tmp_path, "submit", job, "--cluster", "ray.yaml")
    refused(r, f"data.path: {project / 'data/d.npz'}: no such file or folder (relative to "
               f"runtime_env.working_dir {project}, the folder the cluster receives)")
    nothing_left(tmp_path / "home")


@pytest.mark.skipif(os.path.exists("/etc/slurm/slurm.conf"), reason="this machine has a SLURM configured")
def test_submit_without_slurm_conf_names_the_fix_and_leaves_nothing(tmp_path):
    r = distffn(tmp_path, "submit", write_job(tmp_path, DIGITS), "--cluster", slurm_profile(tmp_path))
    refused(r, "submit: no SLURM cluster configured here: SLURM_CONF is unset and there is no "
               "/etc/slurm/slurm.conf; export SLURM_CONF=")
    nothing_left(tmp_path / "home", tmp_path / "runs")


@pytest.mark.skipif(os.path.exists("/etc/slurm/slurm.conf"), reason="this machine has a SLURM configured")
def test_an_out_that_a_job_may_still_write_is_refused(tmp_path):
    """A job whose controller cannot say (UNKNOWN) may still be writing its run directory."""
    run_dir = tmp_path / "shared-run"
    jobs = tmp_path / "home" / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "other-123abc.json").write_text(json.dumps({
        "id": "other-123abc", "kind": "slurm", "profile_path": str(tmp_path / "slurm.yaml"),
        "profile": {"kind": "slurm"}, "run_dir": str(run_dir), "job_path": "j.yaml",
        "submitted": "2026-12-04T00:00:00+00:00", "native_id": "7"}))
    r = distffn(tmp_path, "submit", write_job(tmp_path, DIGITS), "--cluster", slurm_profile(tmp_path),
                "--out", run_dir)
    refused(r, f"--out: {run_dir} is the run directory of job other-123abc, which is UNKNOWN; stop it first "
               f"(distffn stop other-123abc) or choose another run directory")
    assert sorted(os.listdir(jobs)) == ["other-123abc.json"]
    assert not run_dir.exists()


# ---------------------------------------------------------------- a real SLURM

def unreachable_conf(slurm_env, tmp_path):
    """The session cluster's slurm.conf with the controller on a port where nothing listens."""
    text = open(slurm_env["SLURM_CONF"]).read()
    lines = [ln for ln in text.splitlines() if not ln.startswith(("SlurmctldPort=", "MessageTimeout="))]
    port = free_port()
    conf = tmp_path / "down.conf"
    conf.write_text("\n".join(lines + [f"SlurmctldPort={port}", "MessageTimeout=2"]) + "\n")
    return conf, port


def test_submit_to_a_controller_that_is_down_names_it_and_leaves_nothing(slurm_client, tmp_path):
    conf, port = unreachable_conf(slurm_client.env, tmp_path)
    r = distffn(tmp_path, "submit", write_job(tmp_path, MPI_2), "--cluster", slurm_client.profile,
                env={"SLURM_CONF": str(conf)})
    line = refused(r, f"submit: controller unreachable at 127.0.0.1:{port} (sbatch: ")
    assert "Unable to contact slurm controller" in line and "set SLURM_CONF" in line
    nothing_left(tmp_path / "home", tmp_path / "runs")


def test_a_job_sbatch_refuses_leaves_no_record_stage_folder_or_run_directory(slurm_client, tmp_path):
    profile = slurm_profile(tmp_path, name="nopart.yaml")
    profile.write_text(profile.read_text().replace("partition: debug", "partition: nosuchpartition"))
    out = tmp_path / "refused-run"
    r = slurm_client("submit", write_job(tmp_path, MPI_2), "--cluster", profile, "--out", out)
    refused(r, f"{profile}: sbatch refused the job: ")
    assert "partition" in r.stderr.lower()
    nothing_left(tmp_path / "home", out)


def test_a_second_submit_to_a_live_jobs_out_is_refused_naming_it(slurm_client, tmp_path):
    out = tmp_path / "one-run"
    job = write_job(tmp_path, {**MPI_2, "training": {"epochs": 100000, "batch_size": 64}})
    first = slurm_client("submit", job, "--cluster", slurm_client.profile, "--out", out)
    assert first.returncode == 0, first.stderr
    job_id = first.stdout.strip().splitlines()[-1]
    try:
        r = slurm_client("submit", job, "--cluster", slurm_client.profile, "--out", out)
        line = refused(r, f"--out: {out} is the run directory of job {job_id}, which is ")
        assert line.split("which is ")[1].split(";")[0] in ("PENDING", "RUNNING"), line
        assert sorted(os.listdir(tmp_path / "home" / "jobs")) == sorted([job_id, f"{job_id}.json"])
    finally:
        stop = run_group([sys.executable, "-m", "distffn", "stop", job_id], timeout=150, env=slurm_client.env)
        assert stop.returncode == 0, stop.stderr


def test_a_distffn_home_that_is_not_a_folder_is_named(tmp_path):
    (tmp_path / "home").write_text("a file, not a folder")
    r = distffn(tmp_path, "submit", write_job(tmp_path, DIGITS), "--cluster", slurm_profile(tmp_path))
    refused(r, f"$DISTFFN_HOME: cannot read {tmp_path / 'home' / 'jobs'} (Not a directory); set DISTFFN_HOME")
    assert (tmp_path / "home").read_text() == "a file, not a folder" and not (tmp_path / "runs").exists()
