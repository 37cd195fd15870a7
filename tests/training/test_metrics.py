"""The run's reports: metrics.jsonl, summary.json and the divergence guard."""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import yaml

from distffn.jobspec import from_dict
from distffn.training import Extension, Trainer
from distffn.training import checkpoint as ckpt
from distffn.training import trainer as trainer_module
from distffn.training.metrics import iter_records

from helpers import interrupted_copy, user_error, write_job


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    job = write_job(tmp_path, optimizer={"lr": 1e6, "momentum": 0.9}, model={"activation": "linear"},
                    training={"epochs": 5})
    out = tmp_path / "run"
    user_error(capsys, ["run", job, "--out", str(out), "--no-progress"], "diverged")
    found = ckpt.newest_valid_checkpoint(str(out / "checkpoints"))
    assert found is not None
    arrays, _ = found[1], found[2]
    assert all(np.isfinite(a).all() for a in arrays.values())


class StepClock:
    """The trainer's clock, advanced only by training steps: 1 s a step, and ``startup`` s more
    on the first step of every backend's life (kernels loading, buffers allocated)."""

    def __init__(self, monkeypatch, startup: float):
        self.now, self.startup = 0.0, startup
        real = trainer_module.make_backend

        def make_backend(job, data):
            backend = real(job, data)
            step, first = backend.train_step, [True]

            def timed_step(*args):
                self.now += 1.0 + (self.startup if first[0] else 0.0)
                first[0] = False
                return step(*args)
            backend.train_step = timed_step
            return backend
        monkeypatch.setattr(trainer_module, "make_backend", make_backend)
        monkeypatch.setattr(trainer_module, "time", SimpleNamespace(perf_counter=lambda: self.now,
                                                                    monotonic=time.monotonic))


def test_samples_per_s_leaves_out_the_start_up_of_a_resumed_partial_epoch(tmp_path, monkeypatch):
    """Resumed 3 steps before an epoch's end, the first epoch line used to divide those 3
    steps' samples by their time plus the backend's start-up: a fraction of the real rate."""
    StepClock(monkeypatch, startup=100.0)
    job = from_dict(yaml.safe_load(open(write_job(
        tmp_path, training={"epochs": 2, "batch_size": 10, "drop_last": True},
        checkpoint={"every_steps": 5, "num_to_keep": 100}))))
    spe = 1438 // 10
    quiet = dict(progress=False, echo=lambda s: None)
    Trainer(job, str(tmp_path / "full"), **quiet).run()
    interrupted_copy(tmp_path / "full", tmp_path / "cut", 140)         # 3 steps left in epoch 1
    summary = Trainer(job, str(tmp_path / "cut"), resume=True, **quiet).run()
    for run in ("full", "cut"):
        epochs = [r for r in iter_records(str(tmp_path / run / "metrics.jsonl")) if r["event"] == "epoch"]
        assert [r["samples_per_s"] for r in epochs] == [10.0, 10.0], run      # 10 samples a second
    assert summary["samples_per_s"] == 10.0 and summary["startup_s"] == 101.0
    assert summary["train_time_s"] == 100.0 + 3 + spe                   # the start-up is training time


class SamplesSeen(Extension):
    """Records ``trainer.samples_seen()`` after every step."""
    training_time = True

    def __init__(self):
        self.trigger = lambda trainer: True
        self.seen = {}

    def __call__(self, trainer):
        self.seen[trainer.state.step] = trainer.samples_seen()


def test_samples_seen_counts_the_steps_before_a_resume(tmp_path):
    """What a target reached after a resume was reached at (EarlyStop's samples): the samples
    of every step, not only this life's."""
    job = from_dict(yaml.safe_load(open(write_job(
        tmp_path, training={"epochs": 2, "batch_size": 100}, checkpoint={"every_steps": 5, "num_to_keep": 100}))))
    quiet = dict(progress=False, echo=lambda s: None)
    full, cut = SamplesSeen(), SamplesSeen()
    Trainer(job, str(tmp_path / "full"), extensions=[full], **quiet).run()
    interrupted_copy(tmp_path / "full", tmp_path / "cut", 20)
    Trainer(job, str(tmp_path / "cut"), resume=True, extensions=[cut], **quiet).run()
    n = 1438                        # 15 steps an epoch, the last of 38 samples
    assert full.seen[14] == 1400 and full.seen[15] == n and full.seen[21] == n + 600 and full.seen[30] == 2 * n
    assert cut.seen == {s: v for s, v in full.seen.items() if s > 20}
