"""End to end through the command line: run, eval, plot, resume, and every user error."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import yaml

from distffn import checkpoint as ckpt
from distffn.cli import main

SMALL = {
    "name": "small",
    "data": {"dataset": "digits"},
    "model": {"layers": [64, 32, 10], "activation": "relu"},
    "optimizer": {"lr": 0.05, "momentum": 0.9},
    "training": {"epochs": 2, "batch_size": 50, "seed": 3},
}


def write_job(tmp_path, job=None, name="job.yaml", **sections):
    job = json.loads(json.dumps(job or SMALL))
    for sec, values in sections.items():
        job.setdefault(sec, {}).update(values)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(job))
    return str(path)


def run_cli(*argv):
    return main(["run", *argv, "--no-progress"])


def user_error(capsys, argv, *needles):
    """Run the CLI, expect exit 2 and one message on stderr that names the problem."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("distffn: error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


# ---------------------------------------------------------------- the happy path

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


def test_eval_reproduces_the_final_accuracy(tmp_path, capsys):
    out = tmp_path / "run"
    run_cli(write_job(tmp_path), "--out", str(out))
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    _, last = ckpt.list_checkpoints(str(out / "checkpoints"))[-1]
    assert main(["eval", last]) == 0
    printed = capsys.readouterr().out
    assert f"{100 * summary['test_accuracy']:.2f}%" in printed


def test_plot_writes_pngs(tmp_path, capsys):
    out = tmp_path / "run"
    run_cli(write_job(tmp_path), "--out", str(out))
    capsys.readouterr()
    assert main(["plot", str(out)]) == 0
    written = capsys.readouterr().out.split()
    assert {os.path.basename(p) for p in written} == {"curves.png", "weights.png"}
    for p in written:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_set_overrides_fields(tmp_path):
    out = tmp_path / "run"
    run_cli(write_job(tmp_path), "--out", str(out), "--set", "training.epochs=1",
            "--set", "model.layers=[64, 16, 10]")
    job = yaml.safe_load((out / "job.yaml").read_text())
    assert job["training"]["epochs"] == 1 and job["model"]["layers"] == [64, 16, 10]


def test_num_to_keep_prunes_but_keeps_step_zero(tmp_path):
    out = tmp_path / "run"
    run_cli(write_job(tmp_path, checkpoint={"every_steps": 4, "num_to_keep": 2}), "--out", str(out))
    steps = [s for s, _ in ckpt.list_checkpoints(str(out / "checkpoints"))]
    assert steps[0] == 0 and len(steps) == 3


# ---------------------------------------------------------------- resume

def final_params(run_dir):
    _, path = ckpt.list_checkpoints(os.path.join(run_dir, "checkpoints"))[-1]
    arrays, meta = ckpt.load_checkpoint(path)
    return arrays, meta


def interrupted_copy(full, cut, last_step):
    """A run directory as if the run had stopped after checkpoint ``last_step``."""
    os.makedirs(cut / "checkpoints")
    for step, path in ckpt.list_checkpoints(str(full / "checkpoints")):
        if step <= last_step:
            shutil.copy(path, cut / "checkpoints")


def test_resume_from_mid_epoch_equals_uninterrupted_run(tmp_path):
    job = write_job(tmp_path, checkpoint={"every_steps": 7, "num_to_keep": 100},
                    training={"epochs": 3})
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


def test_resume_with_another_model_is_refused(tmp_path, capsys):
    job = write_job(tmp_path)
    out = str(tmp_path / "run")
    run_cli(job, "--out", out)
    capsys.readouterr()
    user_error(capsys, ["run", job, "--out", out, "--resume", "--set", "model.layers=[64,16,10]"],
               "another model")


# ---------------------------------------------------------------- divergence

def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    job = write_job(tmp_path, optimizer={"lr": 1e6, "momentum": 0.9}, model={"activation": "linear"},
                    training={"epochs": 5})
    out = tmp_path / "run"
    user_error(capsys, ["run", job, "--out", str(out), "--no-progress"], "diverged")
    found = ckpt.newest_valid_checkpoint(str(out / "checkpoints"))
    assert found is not None
    arrays, _ = found[1], found[2]
    assert all(np.isfinite(a).all() for a in arrays.values())


# ---------------------------------------------------------------- user errors

def test_malformed_yaml(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("model: [unclosed\n")
    user_error(capsys, ["run", str(p)], "bad.yaml", "malformed YAML", "line")


def test_missing_job_file(tmp_path, capsys):
    user_error(capsys, ["run", str(tmp_path / "nope.yaml")], "nope.yaml")


def test_unknown_key(tmp_path, capsys):
    user_error(capsys, ["run", write_job(tmp_path, model={"layer": [1, 2]})], "model.layer", "unknown key")


def test_unknown_section(tmp_path, capsys):
    job = dict(SMALL, modle={})
    user_error(capsys, ["run", write_job(tmp_path, job=job)], "modle")


def test_wrong_type(tmp_path, capsys):
    user_error(capsys, ["run", write_job(tmp_path, training={"epochs": "ten"})], "training.epochs", "integer")


def test_bad_choice(tmp_path, capsys):
    user_error(capsys, ["run", write_job(tmp_path, model={"activation": "swish"})], "model.activation")


def test_bad_override(tmp_path, capsys):
    user_error(capsys, ["run", write_job(tmp_path), "--set", "epochs=3"], "section.key=value")


def test_sign_activation_is_refused_for_training(tmp_path, capsys):
    user_error(capsys, ["run", write_job(tmp_path, model={"activation": "sign"})], "zero gradient")


def test_layers_that_do_not_fit_the_input_width(tmp_path, capsys):
    user_error(capsys, ["run", write_job(tmp_path, model={"layers": [784, 32, 10]})],
               "model.layers", "64 features")


def test_layers_that_do_not_fit_the_class_count(tmp_path, capsys):
    user_error(capsys, ["run", write_job(tmp_path, model={"layers": [64, 32, 5]})], "0..9", "5 output units")


def npz_job(tmp_path, **arrays):
    rng = np.random.default_rng(0)
    base = {"x_train": rng.standard_normal((40, 3)).astype(np.float32),
            "y_train": rng.integers(0, 2, 40), "x_test": rng.standard_normal((10, 3)).astype(np.float32),
            "y_test": rng.integers(0, 2, 10)}
    base.update(arrays)
    path = tmp_path / "data.npz"
    np.savez(path, **base)
    return write_job(tmp_path, data={"dataset": "npz", "path": str(path)}, model={"layers": [3, 4, 2]},
                     training={"batch_size": 8})


def test_labels_out_of_range(tmp_path, capsys):
    user_error(capsys, ["run", npz_job(tmp_path, y_test=np.full(10, 7))], "7..7", "2 output units")


def test_nan_in_the_data(tmp_path, capsys):
    x = np.ones((40, 3), np.float32)
    x[3, 1] = np.nan
    user_error(capsys, ["run", npz_job(tmp_path, x_train=x)], "x_train", "NaN")


def idx_bytes(magic, dims, payload):
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + payload


def test_missing_idx_files(tmp_path, capsys, monkeypatch):
    from distffn import data
    monkeypatch.setattr(data, "SYSTEM_DATA_DIR", str(tmp_path / "system"))
    monkeypatch.setenv("DISTFFN_DATA", str(tmp_path / "env"))
    job = write_job(tmp_path, data={"dataset": "mnist", "path": str(tmp_path / "nowhere")},
                    model={"layers": [784, 16, 10]})
    user_error(capsys, ["run", job], "nowhere", "https://")


def test_truncated_idx_file(tmp_path, capsys, monkeypatch):
    from distffn import data
    monkeypatch.setattr(data, "SYSTEM_DATA_DIR", str(tmp_path / "system"))
    folder = tmp_path / "mnist"
    folder.mkdir()
    n = 20
    files = {
        "train-images-idx3-ubyte": idx_bytes(0x803, (n, 28, 28), bytes(n * 784)),
        "train-labels-idx1-ubyte": idx_bytes(0x801, (n,), bytes(n)),
        "t10k-images-idx3-ubyte": idx_bytes(0x803, (n, 28, 28), bytes(n * 784 - 100)),  # truncated
        "t10k-labels-idx1-ubyte": idx_bytes(0x801, (n,), bytes(n)),
    }
    for name, blob in files.items():
        with gzip.open(folder / (name + ".gz"), "wb") as f:
            f.write(blob)
    job = write_job(tmp_path, data={"dataset": "mnist", "path": str(folder)}, model={"layers": [784, 16, 10]})
    user_error(capsys, ["run", job], "t10k-images-idx3-ubyte")


def checkpoint_of_a_run(tmp_path):
    out = tmp_path / "run"
    run_cli(write_job(tmp_path), "--out", str(out))
    return ckpt.list_checkpoints(str(out / "checkpoints"))[-1][1]


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


def test_use_gpu_without_cupy_is_a_clear_error(tmp_path, capsys):
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here")
    except ImportError:
        pass
    user_error(capsys, ["run", write_job(tmp_path, scaling={"use_gpu": True})], "scaling.use_gpu", "CuPy")


def test_resume_of_a_finished_run_reports_and_changes_nothing(tmp_path, capsys):
    job = write_job(tmp_path)
    out = tmp_path / "run"
    run_cli(job, "--out", str(out))
    before = ckpt.list_checkpoints(str(out / "checkpoints"))
    capsys.readouterr()
    assert run_cli(job, "--out", str(out), "--resume") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert ckpt.list_checkpoints(str(out / "checkpoints")) == before


def test_ray_allreduce_without_mpi4py_is_a_clear_error(tmp_path, capsys, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setitem(sys.modules, "mpi4py", None)          # as if the package were missing
    job = write_job(tmp_path, scaling={"backend": "ray", "num_workers": 2, "aggregation": "allreduce"})
    user_error(capsys, ["run", job, "--out", str(tmp_path / "run")],
               "scaling.aggregation", "mpi4py", "central")
    assert not (tmp_path / "run" / "checkpoints").exists() or not os.listdir(tmp_path / "run" / "checkpoints")
