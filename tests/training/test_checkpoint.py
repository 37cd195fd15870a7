"""The checkpoint file format: atomic, checksummed, no pickle, versioned."""
from __future__ import annotations

import os
import shutil

import numpy as np

from distffn.jobspec import from_dict
from distffn.training import Trainer
from distffn.training import checkpoint as ckpt

from helpers import checkpoint_of_a_run, final_params, user_error, write_job


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


FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "format-v1-step-00000008.npz")


def test_format_1_loads_with_its_velocity_as_momentums_buffer():
    """A checkpoint written before optimizers owned their state (format 1, ``v_<name>``;
    tests/fixtures holds one written by that code)."""
    arrays, meta = ckpt.load_checkpoint(FIXTURE)
    assert meta["upgraded_from"] == 1 and meta["format_version"] == ckpt.FORMAT_VERSION == 2
    assert meta["optimizer"] == {"name": "momentum", "buffers": ["velocity"]}
    assert {"W0", "b0", "W1", "b1", "velocity.W0", "velocity.b0", "velocity.W1", "velocity.b1"} == set(arrays)
    assert np.abs(arrays["velocity.W0"]).max() > 0


def test_resume_from_format_1_equals_the_uninterrupted_run(tmp_path):
    """Θ and the velocity of the old checkpoint, continued by this code, end bit for bit where
    this code ends when it trains the same spec from step 0 (with the NumPy kernels that
    wrote it: the numba kernels agree with them to float32 rounding, not bit for bit)."""
    _, meta = ckpt.load_checkpoint(FIXTURE)
    meta["job"].setdefault("scaling", {})["kernels"] = "numpy"
    job = from_dict(meta["job"])
    full, cut = tmp_path / "full", tmp_path / "cut"
    Trainer(job, str(full), progress=False, echo=lambda s: None).run()
    os.makedirs(cut / "checkpoints")
    shutil.copy(FIXTURE, cut / "checkpoints" / ckpt.checkpoint_name(meta["step"]))
    Trainer(from_dict(meta["job"]), str(cut), resume=True, progress=False, echo=lambda s: None).run()
    a, b = final_params(full)[0], final_params(cut)[0]
    assert final_params(full)[1]["step"] == final_params(cut)[1]["step"] == 12
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_a_newer_format_is_refused_naming_its_version(tmp_path, capsys, monkeypatch):
    path = str(tmp_path / "step-00000001.npz")
    monkeypatch.setattr(ckpt, "FORMAT_VERSION", 3)
    ckpt.save_checkpoint(path, {"W0": np.zeros((2, 2), np.float32)}, {"step": 1})
    monkeypatch.undo()
    user_error(capsys, ["eval", path], "format version 3", "reads versions 1, 2")
