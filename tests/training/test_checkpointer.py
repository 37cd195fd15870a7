"""Saving and restoring runs: pruning, resume refusals, older formats."""
from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest

from distffn.jobspec import from_dict
from distffn.training import Trainer
from distffn.training import checkpoint as ckpt

from helpers import StopAt, job_dict, run_cli, run_group, user_error, write_equiv_job, write_job


def test_num_to_keep_prunes_but_keeps_step_zero(tmp_path):
    out = tmp_path / "run"
    run_cli(write_job(tmp_path, checkpoint={"every_steps": 4, "num_to_keep": 2}), "--out", str(out))
    steps = [s for s, _ in ckpt.list_checkpoints(str(out / "checkpoints"))]
    assert steps[0] == 0 and len(steps) == 3


def test_resume_with_another_model_is_refused(tmp_path, capsys):
    job = write_job(tmp_path)
    out = str(tmp_path / "run")
    run_cli(job, "--out", out)
    capsys.readouterr()
    user_error(capsys, ["run", job, "--out", out, "--resume", "--set", "model.layers=[64,16,10]"],
               "would change the run's trajectory", "model.layers ([64, 32, 10] → [64, 16, 10])")


def test_resume_with_another_optimizer_is_refused(tmp_path, capsys):
    job = write_job(tmp_path)
    out = str(tmp_path / "run")
    run_cli(job, "--out", out)
    capsys.readouterr()
    user_error(capsys, ["run", job, "--out", out, "--resume", "--set", "optimizer.name=adam"],
               "optimizer.name", "'momentum'", "'adam'")


def test_an_early_stop_saves_the_final_state(tmp_path):
    """The run's last Θ is always on disk, whether the schedule ended or an extension stopped it."""
    job = from_dict(job_dict(checkpoint={"every_steps": 0, "num_to_keep": 10}))
    summary = Trainer(job, str(tmp_path / "run"), progress=False, echo=lambda s: None,
                      extensions=[StopAt(4)]).run()
    assert summary["step"] == 4 and summary["stopped"] == "step 4 reached"
    steps = [s for s, _ in ckpt.list_checkpoints(str(tmp_path / "run" / "checkpoints"))]
    assert steps == [0, 3, 4]


def test_resume_names_every_change_of_trajectory(tmp_path, capsys):
    job = write_job(tmp_path, training={"epochs": 1})
    out = str(tmp_path / "run")
    run_cli(job, "--out", out)
    capsys.readouterr()
    err = user_error(capsys, ["run", job, "--out", out, "--resume", "--set", "training.batch_size=64",
                              "--set", "optimizer.lr=0.1", "--set", "training.seed=4",
                              "--set", "data.normalize=false"],
                     "training.batch_size (50 → 64)", "optimizer.lr (0.05 → 0.1)", "training.seed (3 → 4)",
                     "data.normalize (True → False)")
    assert "scaling" not in err


def test_resume_may_change_workers_evaluation_and_more_epochs_of_a_constant_schedule(tmp_path, capsys):
    job = write_job(tmp_path, training={"epochs": 1})
    out = str(tmp_path / "run")
    run_cli(job, "--out", out)
    one_epoch = ckpt.list_checkpoints(str(tmp_path / "run" / "checkpoints"))[-1][0]
    assert run_cli(job, "--out", out, "--resume", "--set", "training.epochs=2", "--set", "scaling.num_workers=2",
                   "--set", "training.eval_every=5", "--set", "checkpoint.num_to_keep=5") == 0
    assert ckpt.list_checkpoints(str(tmp_path / "run" / "checkpoints"))[-1][0] == 2 * one_epoch


def test_more_epochs_of_a_cosine_schedule_is_a_new_trajectory(tmp_path, capsys):
    job = write_job(tmp_path, training={"epochs": 1}, optimizer={"schedule": "cosine"})
    out = str(tmp_path / "run")
    run_cli(job, "--out", out)
    capsys.readouterr()
    user_error(capsys, ["run", job, "--out", out, "--resume", "--set", "training.epochs=2"],
               "training.epochs (1 → 2)")


BACKENDS = {"local": [], "mpi": ["--set", "scaling.backend=mpi", "--set", "scaling.num_workers=2"],
            "ray": ["--set", "scaling.backend=ray", "--set", "scaling.num_workers=2"]}


def run_on_tmpfs(tmp_path, size, args, ro=False, timeout=120):
    """`distffn run` whose run folder is a tmpfs of ``size`` (read-only with ``ro``), mounted in a
    private mount namespace (``unshare --mount``, root) that disappears with the run."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts = f"size={size}" + (",ro" if ro else "")
    script = (f'mount -t tmpfs -o {opts} tmpfs "{mnt}" && exec "$@"')
    cmd = ["unshare", "--mount", "sh", "-c", script, "sh", sys.executable, "-m", "distffn", "run", *args,
           "--out", str(mnt / "run"), "--no-progress"]
    t0 = time.monotonic()
    r = run_group(cmd, timeout)
    return r, time.monotonic() - t0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_full_disk_ends_the_run_naming_the_path(tmp_path, backend):
    """Checkpoints every step into a 192 KiB tmpfs: the write that no longer fits ends the run
    with exit 1 and one line naming the file (no traceback, no wait for a timeout)."""
    job = write_equiv_job(tmp_path, training={"epochs": 400}, checkpoint={"every_steps": 1, "num_to_keep": 10_000})
    r, seconds = run_on_tmpfs(tmp_path, "192k", [job, *BACKENDS[backend]])
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("distffn: error")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in r.stderr, r.stderr
    assert "/mnt/run/" in errors[0]
    assert seconds < 60


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_read_only_run_folder_is_refused_at_once(tmp_path, backend):
    job = write_equiv_job(tmp_path)
    r, seconds = run_on_tmpfs(tmp_path, "1m", [job, *BACKENDS[backend]], ro=True)
    assert r.returncode == 1, r.stderr
    assert "Read-only file system" in r.stderr and "/mnt/run" in r.stderr and "Traceback" not in r.stderr
    assert seconds < 30


def test_a_failed_write_leaves_the_older_checkpoints_intact(tmp_path, monkeypatch, capsys):
    """The file write itself fails (ENOSPC from the filesystem, faked here so the test can read
    the folder afterwards): the newest complete checkpoint still loads and no temp file is left."""
    out = tmp_path / "run"
    real = np.savez

    def full_after_step_6(f, **arrays):
        if json.loads(str(arrays["meta"]))["step"] > 6:
            raise OSError(28, "No space left on device")
        return real(f, **arrays)
    monkeypatch.setattr(np, "savez", full_after_step_6)
    job = write_job(tmp_path, checkpoint={"every_steps": 3, "num_to_keep": 100})
    assert run_cli(job, "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert "cannot write the checkpoint" in err and "step-00000009.npz" in err and "are intact" in err
    steps = [s for s, _ in ckpt.list_checkpoints(str(out / "checkpoints"))]
    assert steps == [0, 3, 6]
    assert ckpt.load_checkpoint(str(out / "checkpoints" / ckpt.checkpoint_name(6)))[1]["step"] == 6
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_resume_skips_a_damaged_newest_checkpoint_with_a_warning_and_cleans_leftovers(tmp_path, capsys):
    out = tmp_path / "run"
    job = write_job(tmp_path, training={"epochs": 1}, checkpoint={"every_steps": 7, "num_to_keep": 100})
    run_cli(job, "--out", str(out))
    newest = ckpt.list_checkpoints(str(out / "checkpoints"))[-1][1]
    open(newest, "wb").write(b"PK\x03\x04 half a file")
    leftover = out / "checkpoints" / ".tmp-abc123.npz"
    leftover.write_bytes(b"partial")
    capsys.readouterr()
    assert run_cli(job, "--out", str(out), "--resume") == 0
    err = capsys.readouterr().err
    assert f"skipping a damaged checkpoint: {newest}" in err
    assert "removed 1 temporary checkpoint file" in err and not leftover.exists()


def test_resume_refuses_to_start_over_when_no_checkpoint_is_readable(tmp_path, capsys):
    out = tmp_path / "run"
    job = write_job(tmp_path, training={"epochs": 1})
    run_cli(job, "--out", str(out))
    paths = [p for _, p in ckpt.list_checkpoints(str(out / "checkpoints"))]
    for p in paths:
        open(p, "wb").write(b"garbage")
    capsys.readouterr()
    user_error(capsys, ["run", job, "--out", str(out), "--resume"], f"none of its {len(paths)} checkpoints is readable")
