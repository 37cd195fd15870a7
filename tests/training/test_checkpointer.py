"""Saving and restoring runs: pruning, resume refusals, older formats."""
from __future__ import annotations

from distffn.jobspec import from_dict
from distffn.training import Trainer
from distffn.training import checkpoint as ckpt

from helpers import StopAt, job_dict, run_cli, user_error, write_job


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
