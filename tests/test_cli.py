"""The command line end to end: run, eval, plot, exit codes and help."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from distffn.cli import main
from distffn.training import checkpoint as ckpt

from helpers import run_cli, write_job


def test_run_writes_the_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(write_job(tmp_path), "--out", str(out)) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert yaml.safe_load((out / "job.yaml").read_text())["model"]["layers"] == [64, 32, 10]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [x for x in lines if x["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    for key in ("epoch", "step", "lr", "train_loss", "test_loss", "test_accuracy",
                "samples_per_s", "elapsed_s", "time_compute_s", "time_update_s"):
        assert epochs[-1][key] is not None, key
    # exact counts: accuracy is correct / total over the whole test split
    assert epochs[-1]["test_accuracy"] == epochs[-1]["test_correct"] / epochs[-1]["test_count"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] == epochs[-1]["test_accuracy"] > 0.85
    # the run's per-step time breakdown: the epochs' phases summed, and per step
    assert summary["time_steps"] == summary["step"] == sum(e["time_steps"] for e in epochs)
    for phase in ("compute", "communication", "update", "waiting"):
        total = sum(e[f"time_{phase}_s"] for e in epochs)
        assert summary[f"time_{phase}_s"] == pytest.approx(total, abs=1e-5)
        assert summary["ms_per_step"][phase] == pytest.approx(1e3 * total / summary["step"], abs=1e-3)
    assert summary["ms_per_step"]["compute"] > 0
    steps = [s for s, _ in ckpt.list_checkpoints(str(out / "checkpoints"))]
    assert steps[0] == 0 and steps[-1] == summary["step"]


def test_plot_writes_pngs(tmp_path, capsys):
    out = tmp_path / "run"
    run_cli(write_job(tmp_path), "--out", str(out))
    capsys.readouterr()
    assert main(["plot", str(out)]) == 0
    written = capsys.readouterr().out.split()
    assert {os.path.basename(p) for p in written} == {"curves.png", "weights.png"}
    for p in written:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_console_script_exit_code_and_no_traceback(tmp_path):
    job = write_job(tmp_path, training={"epochs": "many"})
    r = subprocess.run([sys.executable, "-m", "distffn.cli", "run", job], capture_output=True, text=True)
    assert r.returncode == 2
    assert "training.epochs" in r.stderr and "Traceback" not in r.stderr


def test_help_explains_every_command():
    r = subprocess.run([sys.executable, "-m", "distffn.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("run", "eval", "plot"):
        assert cmd in r.stdout


def test_version():
    from distffn import __version__
    r = subprocess.run([sys.executable, "-m", "distffn", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"distffn {__version__}"
