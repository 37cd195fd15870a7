"""The training loop end to end: learning, exact resume, worker-count changes, refusals."""
from __future__ import annotations

import glob
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from distffn.jobspec import from_dict
from distffn.training import Extension, IntervalTrigger, Trainer
from distffn.training import checkpoint as ckpt
from distffn.training.checkpoint import load_checkpoint

from helpers import (
    StopAt,
    final_params,
    interrupted_copy,
    job_dict,
    kill_a_worker_mid_run,
    run_cli,
    train_job,
    user_error,
    write_equiv_job,
    write_job,
)


@pytest.mark.parametrize("optimizer", [{"name": "momentum"}, {"name": "nesterov"},
                                       {"name": "adam", "lr": 0.002, "weight_decay": 1e-4}])
def test_resume_from_mid_epoch_equals_uninterrupted_run(tmp_path, optimizer):
    """Θ and the optimizer's whole state (velocity; Adam's moments and step count) survive a
    checkpoint: the resumed run ends bit for bit where the uninterrupted one does."""
    job = write_job(tmp_path, checkpoint={"every_steps": 7, "num_to_keep": 100},
                    training={"epochs": 3}, optimizer=optimizer)
    full = tmp_path / "full"
    run_cli(job, "--out", str(full))
    # an interrupted copy: only the checkpoints up to step 14 (mid-epoch 1) survive, and the
    # newest file left behind is damaged, so --resume must fall back to step 14
    cut = tmp_path / "cut"
    interrupted_copy(full, cut, 21)
    damaged = cut / "checkpoints" / ckpt.checkpoint_name(21)
    damaged.write_bytes(damaged.read_bytes()[:1000])
    assert run_cli(job, "--out", str(cut), "--resume") == 0
    a, meta_a = final_params(full)
    b, meta_b = final_params(cut)
    assert meta_a["step"] == meta_b["step"]
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def test_resume_with_a_different_worker_count_matches(tmp_path):
    job = write_job(tmp_path, checkpoint={"every_steps": 10, "num_to_keep": 100})
    full = tmp_path / "full"
    run_cli(job, "--out", str(full))
    cut = tmp_path / "cut"
    interrupted_copy(full, cut, 20)
    run_cli(job, "--out", str(cut), "--resume", "--set", "scaling.num_workers=3")
    a, _ = final_params(full)
    b, _ = final_params(cut)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_rerun_into_an_existing_run_is_refused(tmp_path, capsys):
    job = write_job(tmp_path)
    out = str(tmp_path / "run")
    run_cli(job, "--out", out)
    capsys.readouterr()
    user_error(capsys, ["run", job, "--out", out], "--resume")


def test_resume_of_a_finished_run_reports_and_changes_nothing(tmp_path, capsys):
    job = write_job(tmp_path)
    out = tmp_path / "run"
    run_cli(job, "--out", str(out))
    before = ckpt.list_checkpoints(str(out / "checkpoints"))
    capsys.readouterr()
    assert run_cli(job, "--out", str(out), "--resume") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert ckpt.list_checkpoints(str(out / "checkpoints")) == before


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_training_learns_xor(tmp_path, seed):
    summary, _ = train_job(tmp_path, {
        "name": "xor", "data": {"dataset": "xor"},
        "model": {"layers": [2, 8, 2], "activation": "tanh", "output": "softmax",
                  "loss": "cross_entropy", "init": "xavier"},
        "optimizer": {"lr": 0.2, "momentum": 0.9},
        "training": {"epochs": 200, "batch_size": 4, "seed": seed}})
    assert summary["test_accuracy"] == 1.0
    assert summary["test_loss"] < 0.05
    assert summary["step"] == 200                 # 4 samples, batch 4: one update per epoch


def test_sine_fit_reaches_low_test_mse(tmp_path):
    from distffn.data import load_dataset
    raw = {"name": "sine", "data": {"dataset": "sine"},
           "model": {"layers": [1, 32, 1], "activation": "tanh", "output": "linear", "loss": "mse",
                     "init": "xavier"},
           "optimizer": {"lr": 0.05, "momentum": 0.9},
           "training": {"epochs": 30, "batch_size": 32, "seed": 0}}
    summary, out = train_job(tmp_path, raw)
    assert summary["test_accuracy"] is None
    assert summary["test_loss"] < 0.01

    # the reported test MSE, recomputed independently from the final checkpoint against sin(x)
    job = from_dict(raw)
    ds = load_dataset(job.data, job.training.seed)
    x = ds.x_test.astype(np.float64)
    mean, std = np.asarray(ds.normalization["x_mean"]), np.asarray(ds.normalization["x_std"])
    x_raw = x * std + mean
    assert x_raw.min() >= -1e-4 and x_raw.max() <= 2 * math.pi + 1e-4
    newest = sorted(glob.glob(os.path.join(out, "checkpoints", "step-*.npz")))[-1]
    arrays, meta = load_checkpoint(newest)
    assert meta["step"] == summary["step"]
    h = np.tanh(x @ arrays["W0"].astype(np.float64) + arrays["b0"])
    pred = h @ arrays["W1"].astype(np.float64) + arrays["b1"]
    mse = float(((pred - np.sin(x_raw)) ** 2).mean())
    assert mse < 0.01
    assert summary["test_loss"] == pytest.approx(mse, rel=1e-3, abs=1e-6)


class Recorder(Extension):
    """Writes down when it fires and what the trainer shows it."""

    def __init__(self, log, name, trigger, priority, training_time=False):
        self.log, self.label, self.trigger, self.priority = log, name, trigger, priority
        self.training_time = training_time

    def initialize(self, trainer):
        self.log.append((self.label, "initialize", trainer.state.step))

    def __call__(self, trainer):
        self.log.append((self.label, trainer.state.step, trainer.epoch_ended, "test" in trainer.observation))

    def finalize(self, trainer):
        self.log.append((self.label, "finalize", trainer.state.step))


def test_extensions_fire_by_trigger_in_priority_order(tmp_path):
    """A user's extensions join the default ones: fired when their trigger holds, higher
    priority first, so one that reads the evaluation (priority below it) sees it."""
    log = []
    exts = [Recorder(log, "late", IntervalTrigger(1, "epoch"), priority=150),
            Recorder(log, "early", IntervalTrigger(2, "step"), priority=400)]
    job = from_dict(job_dict(training={"epochs": 2}))
    summary = Trainer(job, str(tmp_path / "run"), progress=False, echo=lambda s: None, extensions=exts).run()
    assert summary["step"] == 6
    assert log == [("early", "initialize", 0), ("late", "initialize", 0),
                   ("early", 2, False, False),
                   ("late", 3, True, True),                      # after the epoch's evaluation
                   ("early", 4, False, True),
                   ("early", 6, True, True), ("late", 6, True, True),
                   ("early", "finalize", 6), ("late", "finalize", 6)]


def test_an_extension_can_stop_the_run_early(tmp_path):
    out = tmp_path / "run"
    job = from_dict(job_dict(training={"epochs": 5}))
    summary = Trainer(job, str(out), progress=False, echo=lambda s: None, extensions=[StopAt(5)]).run()
    assert summary["step"] == 5 and summary["stopped"] == "step 5 reached"
    assert summary["test_loss"] is not None                       # the final model is evaluated
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "eval"] == [3, 5]
    assert json.loads((out / "summary.json").read_text())["stopped"] == "step 5 reached"


LATE_SIGUSR1 = """
import os, signal, sys
sys.path.insert(0, sys.argv[2])
from distffn.errors import Interrupted
from distffn.jobspec import from_dict
from distffn.training import Extension, Trainer
from helpers import job_dict

class TermAt(Extension):          # the stop request (scancel's SIGTERM) at step 5
    def __init__(self):
        self.trigger = lambda trainer: trainer.state.step == 5
    def __call__(self, trainer):
        os.kill(os.getpid(), signal.SIGTERM)

try:
    Trainer(from_dict(job_dict(training={"epochs": 100})), sys.argv[1], progress=False, echo=lambda s: None,
            extensions=[TermAt()]).run()
except Interrupted:
    os.kill(os.getpid(), signal.SIGUSR1)     # the same request again, as srun forwards it, late
    print("stopped and alive")
"""


def test_a_stop_request_arriving_again_after_the_checkpoint_does_not_kill_the_run(tmp_path):
    """scancel signals the batch script, srun and every rank; srun's forwarded SIGUSR1 may reach
    a rank after it stopped and checkpointed: it must not kill it (exit 138) as it closes."""
    r = subprocess.run([sys.executable, "-c", LATE_SIGUSR1, str(tmp_path / "run"), os.path.dirname(__file__) + "/.."],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "stopped and alive" in r.stdout, (r.returncode, r.stderr[-2000:])
    assert ckpt.list_checkpoints(str(tmp_path / "run" / "checkpoints"))[-1][0] == 5


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
@pytest.mark.parametrize("scaling", [[], ["--set", "scaling.backend=ray", "--set", "scaling.num_workers=2"],
                                     ["--set", "scaling.backend=mpi", "--set", "scaling.num_workers=2"]],
                         ids=["local", "ray", "mpi"])
def test_a_signal_checkpoints_and_resume_continues_bit_for_bit(tmp_path, sig, code, scaling):
    """SIGTERM (preemption, scancel, ray job stop) or SIGINT: a checkpoint at the current step,
    exit 128 + signal with the command that continues; that command ends where an uninterrupted
    run ends. On MPI the launcher passes the signal to the ranks, which agree on one step."""
    job = write_equiv_job(tmp_path, training={"epochs": 150})
    cut, full = tmp_path / "cut", tmp_path / "full"
    cmd = [sys.executable, "-m", "distffn", "run", job, "--no-progress", *scaling]
    p = subprocess.Popen(cmd + ["--out", str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while len(ckpt.list_checkpoints(str(cut / "checkpoints"))) < 3:     # training is under way
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()
            time.sleep(0.05)
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == code, err
    step = ckpt.list_checkpoints(str(cut / "checkpoints"))[-1][0]
    assert f"stopped by {signal.Signals(sig).name} after step {step}" in err and "Traceback" not in err
    assert 0 < step < 450                                          # mid-run, not the end
    resume = err.split("continue with: ")[1].strip()
    assert resume.startswith("distffn run ") and resume.endswith(" --resume") and str(cut) in resume
    r = subprocess.run([sys.executable, "-m", *resume.split()[0:1], *resume.split()[1:], "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert subprocess.run(cmd + ["--out", str(full)], capture_output=True, timeout=300).returncode == 0
    a, b = final_params(full)[0], final_params(cut)[0]
    assert final_params(full)[1]["step"] == final_params(cut)[1]["step"] == 450
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("mode", ["central", "allreduce"])
def test_a_killed_ray_worker_is_replaced_and_the_run_ends_bit_for_bit(tmp_path, mode):
    """failure.max_failures: 1: SIGKILL worker 1 (its pid from workers.json) mid-run; new actors
    continue from the newest checkpoint and the final model equals an uninterrupted run's."""
    job = write_equiv_job(tmp_path, training={"epochs": 100}, checkpoint={"every_steps": 30, "num_to_keep": 2},
                          failure={"max_failures": 1}, scaling={"backend": "ray", "num_workers": 2,
                                                               "aggregation": mode, "timeout_s": 20})
    cut, full = tmp_path / "cut", tmp_path / "full"
    cmd = [sys.executable, "-m", "distffn", "run", job, "--no-progress"]
    r, victim = kill_a_worker_mid_run(cmd + ["--out", str(cut)], str(cut))
    assert r.returncode == 0, r.stderr
    assert "restart 1 of 1 (failure.max_failures) from the newest checkpoint" in r.stderr
    workers = json.loads((cut / "workers.json").read_text())
    assert len(workers) == 2 and victim not in [w["pid"] for w in workers]       # rewritten
    assert subprocess.run(cmd + ["--out", str(full)], capture_output=True, timeout=300).returncode == 0
    a, b = final_params(full)[0], final_params(cut)[0]
    assert final_params(full)[1]["step"] == final_params(cut)[1]["step"] == 300
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_without_max_failures_a_killed_ray_worker_fails_fast_naming_it(tmp_path):
    job = write_equiv_job(tmp_path, training={"epochs": 300}, scaling={"backend": "ray", "num_workers": 2})
    out = tmp_path / "run"
    r, _ = kill_a_worker_mid_run([sys.executable, "-m", "distffn", "run", job, "--no-progress", "--out", str(out)],
                                 str(out), after_checkpoints=2)
    assert r.returncode == 1 and f"worker 1 on {socket.gethostname()}" in r.stderr and "restart" not in r.stderr, r.stderr
    # one line naming the worker: no Python traceback, no SIGABRT dump of the surviving actors
    for noise in ("Traceback", "SIGABRT", "Fatal Python error", "*** "):
        assert noise not in r.stderr, r.stderr
