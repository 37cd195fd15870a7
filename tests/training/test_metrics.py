"""The run's reports: metrics.jsonl, summary.json and the divergence guard."""
from __future__ import annotations

import numpy as np

from distffn.training import checkpoint as ckpt

from helpers import user_error, write_job


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    job = write_job(tmp_path, optimizer={"lr": 1e6, "momentum": 0.9}, model={"activation": "linear"},
                    training={"epochs": 5})
    out = tmp_path / "run"
    user_error(capsys, ["run", job, "--out", str(out), "--no-progress"], "diverged")
    found = ckpt.newest_valid_checkpoint(str(out / "checkpoints"))
    assert found is not None
    arrays, _ = found[1], found[2]
    assert all(np.isfinite(a).all() for a in arrays.values())
