"""Evaluation on the held-out split, during training and of a saved checkpoint."""
from __future__ import annotations

import json

from distffn.cli import main
from distffn.training import checkpoint as ckpt

from helpers import run_cli, write_job


def test_eval_reproduces_the_final_accuracy(tmp_path, capsys):
    out = tmp_path / "run"
    run_cli(write_job(tmp_path), "--out", str(out))
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    _, last = ckpt.list_checkpoints(str(out / "checkpoints"))[-1]
    assert main(["eval", last]) == 0
    printed = capsys.readouterr().out
    assert f"{100 * summary['test_accuracy']:.2f}%" in printed
