"""The checkpoint file format: atomic, checksummed, no pickle, versioned."""
from __future__ import annotations

import os

import numpy as np

from helpers import checkpoint_of_a_run, user_error, write_job


def test_truncated_checkpoint(tmp_path, capsys):
    path = checkpoint_of_a_run(tmp_path)
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) // 2])
    capsys.readouterr()
    user_error(capsys, ["eval", path], os.path.basename(path))


def test_tampered_checkpoint(tmp_path, capsys):
    path = checkpoint_of_a_run(tmp_path)
    arrays = dict(np.load(path, allow_pickle=False))
    arrays["W0"] = arrays["W0"] + 0.01           # valid zip, altered weights, stale checksum
    np.savez(path, **arrays)
    capsys.readouterr()
    user_error(capsys, ["eval", path], "checksum")


def test_checkpoint_of_another_architecture(tmp_path, capsys):
    path = checkpoint_of_a_run(tmp_path)
    other = write_job(tmp_path, name="other.yaml", model={"layers": [64, 48, 10]})
    capsys.readouterr()
    user_error(capsys, ["eval", path, "--job", other], "W0", "another architecture")
