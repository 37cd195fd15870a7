"""The gradient noise scale: the checkpoint estimator against an exact computation from
per-example gradients, and the estimate logged during training (metrics.noise_scale) against
the same exact figures at a parameter vector that does not move."""
from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from distffn.cli import main
from distffn.data.byte_images import ByteImages, dense
from distffn.data.prepare import prepare_data
from distffn.errors import UserError
from distffn.jobspec import from_dict
from distffn.nn.model import MLP
from distffn.training import Trainer
from distffn.training.noise_scale import estimate_noise_scale, two_size_estimates

from helpers import MPIEXEC, job_dict, needs_mpi, run_group, user_error, write_job, write_mnist

LAYERS = [6, 16, 3]


def synthetic(n, seed=0):
    """A classification problem whose labels depend on the inputs, plus label noise."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, LAYERS[0])).astype(np.float32)
    w = rng.standard_normal((LAYERS[0], LAYERS[-1]))
    y = np.argmax(x @ w + rng.gumbel(size=(n, LAYERS[-1])), axis=1).astype(np.int64)
    return x, y


def exact(job, theta, x, y):
    """|G|² and tr(Σ) from every per-example gradient (float64): G the mean gradient, Σ the
    covariance of the per-example gradients over the n samples (normalised by n)."""
    model = MLP(job.model, np, dtype=np.float64)
    params = model.layout.views(np.asarray(theta, np.float64))
    g = np.empty((len(x), model.num_params))
    for i in range(len(x)):
        model.loss_and_grad(params, model.layout.views(g[i]), x[i:i + 1].astype(np.float64), y[i:i + 1])
    mean = g.mean(axis=0)
    return float(mean @ mean), float(((g - mean) ** 2).sum(axis=1).mean())


def small_job(**extra):
    raw = {"name": "noise", "data": {"dataset": "digits"},
           "model": {"layers": LAYERS, "activation": "tanh"}, "training": {"batch_size": 8}}
    for k, v in extra.items():
        raw.setdefault(k, {}).update(v)
    return from_dict(raw)


def test_two_size_estimates_invert_the_expectations():
    g2, tr = 0.7, 12.0
    for b_small, b_big in ((4, 32), (16.5, 33)):
        small, big = g2 + tr / b_small, g2 + tr / b_big          # E|G_B|² = |G|² + tr(Σ)/B
        assert two_size_estimates(small, big, b_small, b_big) == pytest.approx((g2, tr))


def test_the_checkpoint_estimator_agrees_with_per_example_gradients():
    job = small_job()
    x, y = synthetic(300)
    model = MLP(job.model)
    theta = np.empty(model.num_params, np.float32)
    model.init_params(theta, seed=1)
    g2, tr = exact(job, theta, x, y)
    data = SimpleNamespace(x_train=x, t_train=y)
    est = estimate_noise_scale(job, theta, data, batches=3000, small=4, big=32, seed=2)
    for key, truth in (("grad_norm_sq", g2), ("trace_sigma", tr), ("b_simple", tr / g2)):
        se = est[f"{key}_se"]
        assert se < 0.15 * truth, (key, est)                   # precise enough to mean something
        assert abs(est[key] - truth) < 4 * se, (key, est[key], truth, se)


def test_the_checkpoint_estimator_reads_8_bit_images_as_their_decoded_values(tmp_path, capsys):
    """IDX images are kept as bytes (ByteImages): the estimate from them is the estimate from
    the float32 values they decode to, and `distffn noise-scale` runs on such a checkpoint."""
    write_mnist(tmp_path / "idx", n_train=120, n_test=20, seed=5)
    job_file = write_job(tmp_path, data={"dataset": "mnist", "path": str(tmp_path / "idx")},
                         model={"layers": [784, 16, 10]}, training={"epochs": 1, "batch_size": 20})
    out = tmp_path / "run"
    assert main(["run", job_file, "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["noise-scale", str(out), "--batches", "4", "--small", "5", "--big", "40", "--json"]) == 0
    from_cli = json.loads(capsys.readouterr().out)
    assert from_cli["b_small"] == 5 and from_cli["b_big"] == 40 and from_cli["trace_sigma"] > 0

    job = from_dict(yaml.safe_load(open(job_file)))
    _, data, model = prepare_data(job)
    assert isinstance(data.x_train, ByteImages)
    theta = np.empty(model.num_params, np.float32)
    model.init_params(theta, seed=1)
    est = estimate_noise_scale(job, theta, data, batches=4, small=5, big=40, seed=2)
    dense_data = SimpleNamespace(x_train=dense(data.x_train), t_train=data.t_train)
    assert est == estimate_noise_scale(job, theta, dense_data, batches=4, small=5, big=40, seed=2)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_training_log_estimates_the_same_at_a_fixed_theta(tmp_path, workers):
    """lr ≈ 0 keeps Θ at its initial value; with noise_window 1 (a decay of e^-10 or less
    between log points, 10 or more steps apart) every noise record is the plain estimate of its
    interval, and their mean must match the exact figures (sampled without
    replacement within an epoch: tr(Σ)·n/(n−1) and |G|² − tr(Σ)/(n−1) are the expectations)."""
    n, batch = 640, 32
    x, y = synthetic(n, seed=3)
    xt, yt = synthetic(64, seed=4)
    path = tmp_path / "data.npz"
    np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt)
    job = small_job(data={"dataset": "npz", "path": str(path), "normalize": False},
                    optimizer={"lr": 1e-12, "momentum": 0.0},
                    training={"batch_size": batch, "epochs": 150, "eval_every": 0},
                    scaling={"num_workers": workers},
                    metrics={"noise_scale": True, "noise_every": 1, "noise_window": 1})
    out = tmp_path / "run"
    Trainer(job, str(out), progress=False, echo=lambda s: None).run()
    records = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    noise = [r for r in records if r["event"] == "noise"]
    assert len(noise) > 50
    assert {r["b_small"] for r in noise} == {batch / 2} and {r["b_big"] for r in noise} == {batch}
    theta = np.empty(MLP(job.model).num_params, np.float32)
    MLP(job.model).init_params(theta, seed=job.training.seed)
    g2, tr = exact(job, theta, x, y)
    for key, truth in (("grad_norm_sq", g2 - tr / (n - 1)), ("trace_sigma", tr * n / (n - 1))):
        values = np.array([r[key] for r in noise])
        se = values.std(ddof=1) / np.sqrt(len(values))
        assert abs(values.mean() - truth) < 4 * se, (key, values.mean(), truth, se)
        assert se < 0.2 * abs(truth)


def test_noise_scale_is_logged_with_smoothing_and_changes_no_figure_of_the_run(tmp_path):
    plain = tmp_path / "plain"
    measured = tmp_path / "measured"
    job_file = write_job(tmp_path, training={"epochs": 2, "batch_size": 50, "seed": 3})
    assert main(["run", job_file, "--out", str(plain), "--no-progress"]) == 0
    assert main(["run", job_file, "--out", str(measured), "--no-progress", "--set", "metrics.noise_scale=true",
                 "--set", "metrics.noise_every=5"]) == 0
    records = [json.loads(s) for s in (measured / "metrics.jsonl").read_text().splitlines()]
    noise = [r for r in records if r["event"] == "noise"]
    epochs = [r["step"] for r in records if r["event"] == "epoch"]
    assert [r["step"] for r in noise] == sorted(set(epochs) | set(range(50, epochs[-1] + 1, 50)))   # log points
    assert all(r["b_simple"] > 0 and r["trace_sigma"] > 0 for r in noise)
    a = json.loads((plain / "summary.json").read_text())
    b = json.loads((measured / "summary.json").read_text())
    # two half-batch passes instead of one: the same model up to float32 rounding
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)


def test_noise_scale_command_prints_json_and_refuses_bad_options(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", write_job(tmp_path), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["noise-scale", str(out), "--batches", "20", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("b_simple", "trace_sigma", "grad_norm_sq", "b_simple_se", "trace_sigma_se", "grad_norm_sq_se"):
        assert key in r
    assert r["trace_sigma"] > 0 and r["b_small"] == 50 and r["b_big"] == 400
    assert main(["noise-scale", str(out), "--batches", "5"]) == 0
    assert "B_simple" in capsys.readouterr().out
    user_error(capsys, ["noise-scale", str(out), "--batches", "1"], "--batches")
    user_error(capsys, ["noise-scale", str(out), "--small", "64", "--big", "32"], "--small/--big")
    user_error(capsys, ["noise-scale", str(tmp_path / "nothing")], "nothing")


@needs_mpi
def test_noise_scale_on_mpi_uses_the_shards_and_the_global_batch(tmp_path):
    job = write_job(tmp_path, training={"epochs": 1, "batch_size": 50, "seed": 3, "drop_last": True})
    out = tmp_path / "run"
    r = run_group([sys.executable, "-m", "distffn", "run", job, "--out", str(out), "--no-progress",
                   "--set", "scaling.backend=mpi", "--set", "scaling.num_workers=2",
                   "--set", "metrics.noise_scale=true", "--set", "metrics.noise_every=2"], 120)
    assert r.returncode == 0, r.stderr
    noise = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines() if '"noise"' in s]
    assert noise and noise[0]["b_small"] == 25 and noise[0]["b_big"] == 50
    assert all(n["trace_sigma"] > 0 for n in noise)


@pytest.mark.parametrize("mode", ["central", "allreduce"])
def test_noise_scale_on_ray_in_both_modes(tmp_path, ray_instance, mode):
    if mode == "allreduce" and not os.access(MPIEXEC, os.X_OK):
        pytest.skip("the mpi extra is not installed")
    raw = {"name": "noise", "data": {"dataset": "digits"}, "model": {"layers": [64, 16, 10]},
           "training": {"epochs": 1, "batch_size": 50, "drop_last": True},
           "scaling": {"backend": "ray", "num_workers": 2, "aggregation": mode},
           "metrics": {"noise_scale": True, "noise_every": 2}}
    out = tmp_path / "run"
    Trainer(from_dict(raw), str(out), progress=False, echo=lambda s: None).run()
    noise = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines() if '"noise"' in s]
    assert noise and {(n["b_small"], n["b_big"]) for n in noise} == {(25, 50)}
    assert all(n["trace_sigma"] > 0 for n in noise)


@pytest.mark.parametrize("metrics,expected", [
    ({"noise_window": 0}, "metrics.noise_window: expected a positive value, got 0"),
    ({"noise_ema": 0.9}, "metrics.noise_ema: no longer a key; use metrics.noise_window (steps: the time constant "
                         "of the same EMA)"),
])
def test_a_window_that_cannot_average_is_refused_naming_the_field(metrics, expected):
    with pytest.raises(UserError) as e:
        from_dict(job_dict(metrics=metrics))
    assert str(e.value) == expected
    if "noise_ema" in metrics:          # a checkpoint of an older run keeps the key: it still loads
        from distffn.jobspec import from_stored
        assert from_stored(job_dict(metrics=metrics), "checkpoint").metrics.noise_window == 100
