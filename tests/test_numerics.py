"""Numerical correctness of distffn: gradients, losses, stability, optimizer, schedules.

Every expected value here is derived by hand or from an independent NumPy computation
(a reference forward pass / loss written from the formulas), never copied from a run.
"""
import glob
import math
import os

import numpy as np
import pytest

from distffn import optimizer as optimizer_module
from distffn.activations import make_activation
from distffn.checkpoint import load_checkpoint
from distffn.config import (ACTIVATIONS, LOSSES, LOSSES_FOR_OUTPUT, DataConfig, ModelConfig,
                            OptimizerConfig, from_dict)
from distffn.errors import UserError
from distffn.losses import P_CLIP, Objective
from distffn.model import MLP
from distffn.optimizer import MomentumSGD, momentum_update_numpy
from distffn.schedules import learning_rate

PAIRS = [(o, l) for o, losses in LOSSES_FOR_OUTPUT.items() for l in losses]
KINKED = {"relu", "leaky_relu", "prelu", "abs"}
MARGIN = 1e-3                  # no pre-activation (maxout gap, l1 residual) this close to a kink
LAYERS = [5, 7, 6, 4]          # two hidden layers: the chain rule through hidden layers is exercised
N_ROWS = 8


# ---------------------------------------------------------------- an independent reference

def ref_hidden(name, z, alpha=None, slope=0.01, pieces=2):
    """The hidden activations written from their textbook definitions."""
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    if name == "tanh":
        return np.tanh(z)
    if name == "relu":
        return np.where(z > 0, z, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, z, slope * z)
    if name == "prelu":
        return np.where(z > 0, z, alpha[None, :] * z)
    if name == "abs":
        return np.abs(z)
    if name == "softplus":
        return np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0.0)
    if name == "maxout":                       # unit j = max over columns j*k .. j*k+k-1
        n = z.shape[0]
        return z.reshape(n, -1, pieces).max(axis=2)
    if name == "linear":
        return z.copy()
    raise AssertionError(name)


def ref_forward(p, x, cfg: ModelConfig):
    """Pre-activations of every layer (last = logits), from copies of the parameters."""
    zs, a = [], x
    n_layers = len(cfg.layers) - 1
    for i in range(n_layers):
        z = a @ p[f"W{i}"] + p[f"b{i}"]
        zs.append(z)
        if i < n_layers - 1:
            a = ref_hidden(cfg.activation, z, p.get(f"alpha{i}"), cfg.leaky_slope, cfg.maxout_pieces)
    return zs


def ref_loss(output, loss, z, t):
    """Summed-over-rows loss written from the formulas (mse/l1 averaged over the K outputs)."""
    k = z.shape[1]
    if output == "softmax":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        pt = p[np.arange(len(t)), t]
        if loss == "cross_entropy":
            return float(-np.log(np.clip(pt, *P_CLIP)).sum())
        if loss == "one_minus_true_prob":
            return float((1.0 - pt).sum())
        if loss == "expected_squared_error":
            c = (np.arange(k)[None, :] - t[:, None]) ** 2
            return float((p * c).sum())
    if output == "sigmoid":
        if loss == "binary_cross_entropy":       # -[y log s + (1-y) log(1-s)] = log(1+e^z) - y z
            return float((np.logaddexp(0.0, z) - t * z).sum())
        if loss == "mse":
            s = 1.0 / (1.0 + np.exp(-z))
            return float(((s - t) ** 2).sum() / k)
    if output == "linear":
        if loss == "mse":
            return float(((z - t) ** 2).sum() / k)
        if loss == "l1":
            return float(np.abs(z - t).sum() / k)
    raise AssertionError((output, loss))


def make_targets(output, loss, rng, n, k):
    if output == "softmax":
        return rng.integers(0, k, n)
    if output == "sigmoid":
        if loss == "binary_cross_entropy":
            return rng.integers(0, 2, (n, k)).astype(np.float64)
        return rng.uniform(0.0, 1.0, (n, k))
    return rng.normal(0.0, 1.0, (n, k))


def near_kink(cfg, zs, t, output, loss):
    hidden = zs[:-1]
    if cfg.activation in KINKED and any(np.abs(z).min() < MARGIN for z in hidden):
        return True
    if cfg.activation == "maxout":
        for z in hidden:
            s = np.sort(z.reshape(z.shape[0], -1, cfg.maxout_pieces), axis=2)
            if (s[:, :, -1] - s[:, :, -2]).min() < MARGIN:
                return True
    if output == "linear" and loss == "l1" and np.abs(zs[-1] - t).min() < MARGIN:
        return True
    if output == "softmax" and loss == "cross_entropy":   # the probability clip is a kink too
        z = zs[-1]
        e = np.exp(z - z.max(axis=1, keepdims=True))
        pt = (e / e.sum(axis=1, keepdims=True))[np.arange(len(t)), t]
        if pt.min() < 1e3 * P_CLIP[0] or pt.max() > 1 - 1e3 * (1 - P_CLIP[1]):
            return True
    return False


def setup_net(activation, output, loss, seed, layers=LAYERS, n=N_ROWS):
    """A float64 net with random parameters and data, re-drawn until nothing sits near a kink."""
    cfg = ModelConfig(layers=list(layers), activation=activation, output=output, loss=loss)
    model = MLP(cfg, np, dtype=np.float64)
    rng = np.random.default_rng(seed)
    for _ in range(200):
        flat = rng.normal(0.0, 0.7, model.num_params)
        views = model.layout.views(flat)
        for name in views:
            if name.startswith("alpha"):
                views[name][...] = rng.uniform(0.1, 0.5, views[name].shape)
        x = rng.normal(0.0, 1.0, (n, layers[0]))
        t = make_targets(output, loss, rng, n, layers[-1])
        p = {k: np.array(v) for k, v in views.items()}
        if not near_kink(cfg, ref_forward(p, x, cfg), t, output, loss):
            return model, flat, x, t
    raise AssertionError("could not draw parameters away from the kinks")


def grads_of(model, flat, x, t, labels=None):
    g = np.full(model.num_params, np.nan)          # every entry must be written
    loss, correct = model.loss_and_grad(model.layout.views(flat), model.layout.views(g), x, t, labels)
    return float(loss), g, correct


def loss_of(model, flat, x, t):
    return float(model.evaluate(model.layout.views(flat), x, t)[0])


# ---------------------------------------------------------------- 1. gradient check

@pytest.mark.parametrize("output,loss", PAIRS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_loss_matches_reference(activation, output, loss):
    """The model's summed loss equals the loss of an independent forward pass."""
    model, flat, x, t = setup_net(activation, output, loss, seed=7)
    p = {k: np.array(v) for k, v in model.layout.views(flat).items()}
    zs = ref_forward(p, x, model.cfg)
    np.testing.assert_allclose(model.forward(model.layout.views(flat), x), zs[-1], rtol=1e-12, atol=1e-12)
    expected = ref_loss(output, loss, zs[-1], t)
    assert loss_of(model, flat, x, t) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert grads_of(model, flat, x, t)[0] == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("output,loss", PAIRS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradient_central_difference(activation, output, loss):
    """Analytic dL/dθ for every entry of the flat buffer vs (L(θ+h) − L(θ−h)) / 2h in float64."""
    model, flat, x, t = setup_net(activation, output, loss, seed=1234)
    _, analytic, _ = grads_of(model, flat, x, t)
    assert np.isfinite(analytic).all()
    # h = 1e-5: truncation error ~h^2 is ~1e-10 while rounding noise eps*L/h stays ~1e-10 for
    # losses ~10; with h = 1e-6 the noise alone reaches ~5e-6 relative on small components.
    h = 1e-5
    numeric = np.empty_like(analytic)
    for i in range(model.num_params):
        keep = flat[i]
        flat[i] = keep + h
        up = loss_of(model, flat, x, t)
        flat[i] = keep - h
        down = loss_of(model, flat, x, t)
        flat[i] = keep
        numeric[i] = (up - down) / (2 * h)
    assert np.abs(numeric).max() > 1e-3          # the check is not vacuous
    scale = max(np.abs(numeric).max(), 1.0)
    err = np.abs(analytic - numeric) / np.maximum(np.abs(analytic) + np.abs(numeric), 1e-4 * scale)
    worst = int(np.argmax(err))
    name = next(s.name for s in model.layout.specs if s.offset <= worst < s.offset + s.size)
    assert err.max() < 1e-5, (f"{activation}/{output}/{loss}: worst relative error {err.max():.3g} "
                              f"in {name} (analytic {analytic[worst]:.9g}, numeric {numeric[worst]:.9g})")
    if activation == "prelu":                      # the learnable slopes are really checked
        for s in model.layout.specs:
            if s.name.startswith("alpha"):
                assert np.abs(numeric[s.offset:s.offset + s.size]).max() > 1e-4


@pytest.mark.parametrize("activation", ["relu", "prelu", "maxout", "sigmoid"])
def test_gradient_is_overwritten_not_accumulated(activation):
    """Two calls on the same batch give the same gradient (buffers are written, not added to)."""
    model, flat, x, t = setup_net(activation, "softmax", "cross_entropy", seed=3)
    _, g1, _ = grads_of(model, flat, x, t)
    g = np.full(model.num_params, 123.0)
    views, gviews = model.layout.views(flat), model.layout.views(g)
    model.loss_and_grad(views, gviews, x, t)
    model.loss_and_grad(views, gviews, x, t)
    np.testing.assert_allclose(g, g1, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- 2./3. stability

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_cross_entropy_stable_at_large_logits(dtype):
    obj = Objective("softmax", "cross_entropy", 3)
    z = np.array([[1000.0, -1000.0, 0.0], [-1000.0, 1000.0, 0.0], [1000.0, 1000.0, -1000.0]], dtype)
    z0 = z.copy()
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        p = obj.predict(np, z)
        assert np.isfinite(p).all()
        np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
        np.testing.assert_allclose(p, [[1, 0, 0], [0, 1, 0], [0.5, 0.5, 0]], atol=1e-6)

        # right with confidence: loss is only the clip's -log(1 - 1e-7) per row, about 1e-7
        dz = np.empty_like(z)
        right = float(obj.loss_and_grad(np, z, np.array([0, 1, 0]), dz))
        assert np.isfinite(right)
        assert right == pytest.approx(-2 * math.log(1 - 1e-7) + math.log(2), rel=1e-3)
        assert np.isfinite(dz).all()

        # wrong with confidence: p_true = e^-2000 underflows to 0 and is clipped to 1e-7
        wrong = float(obj.loss_and_grad(np, z, np.array([1, 0, 2]), dz))
        assert wrong == pytest.approx(-3 * math.log(1e-7), rel=1e-6)
        assert np.isfinite(dz).all()
        # dL/dz = p - onehot(T), computed by hand
        np.testing.assert_allclose(dz, [[1, -1, 0], [-1, 1, 0], [0.5, 0.5, -1]], atol=1e-6)
    np.testing.assert_array_equal(z, z0)          # the logits are not modified


@pytest.mark.parametrize("loss", ["one_minus_true_prob", "expected_squared_error"])
def test_other_softmax_losses_finite_at_large_logits(loss):
    obj = Objective("softmax", loss, 3)
    z = np.array([[1000.0, -1000.0, 0.0], [-1000.0, 1000.0, 0.0]])
    dz = np.empty_like(z)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        value = float(obj.loss_and_grad(np, z, np.array([2, 1]), dz))
    # row 0: p = (1,0,0) with T = 2: 1 - p_T = 1 and sum p_j (j-2)^2 = 4; row 1 is exactly right
    assert value == pytest.approx(1.0 if loss == "one_minus_true_prob" else 4.0, abs=1e-12)
    assert np.isfinite(dz).all()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bce_uses_stable_softplus_form(dtype):
    obj = Objective("sigmoid", "binary_cross_entropy", 1)
    z = np.array([[1000.0], [-1000.0], [1000.0], [-1000.0], [30.0], [-30.0], [0.5], [-2.0]], dtype)
    y = np.array([[0.0], [1.0], [1.0], [0.0], [0.0], [0.0], [1.0], [1.0]], dtype)
    dz = np.empty_like(z)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        value = float(obj.loss_and_grad(np, z, y, dz))
    z64, y64 = z.astype(np.float64), y.astype(np.float64)
    expected = np.logaddexp(0.0, (1.0 - 2.0 * y64) * z64).sum()   # softplus((1-2y) z)
    assert np.isfinite(value)
    assert value == pytest.approx(expected, rel=1e-6)
    assert value == pytest.approx(2000.0 + 30.0 + math.log1p(math.exp(-0.5)) + math.log1p(math.exp(2.0)),
                                  rel=1e-6)
    sig = 1.0 / (1.0 + np.exp(-np.clip(z64, -700, 700)))
    np.testing.assert_allclose(dz, sig - y64, atol=1e-6)


def test_softplus_hidden_stable_at_large_inputs():
    act = make_activation("softplus")
    z = np.array([[1000.0, -1000.0, 0.0, 40.0, -40.0]])
    a, dz = np.empty_like(z), np.empty_like(z)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        act.forward(np, z, a)
        act.backward(np, z, a, np.ones_like(z), dz)
    np.testing.assert_allclose(a, [[1000.0, 0.0, math.log(2.0), 40.0, math.exp(-40.0)]], rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(dz, [[1.0, 0.0, 0.5, 1.0, 0.0]], atol=1e-15)


def test_hidden_sigmoid_stable_at_large_inputs():
    act = make_activation("sigmoid")
    z = np.array([[1000.0, -1000.0, 0.0]], np.float32)
    a, dz = np.empty_like(z), np.empty_like(z)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        act.forward(np, z, a)
        act.backward(np, z, a, np.ones_like(z), dz)
    np.testing.assert_allclose(a, [[1.0, 0.0, 0.5]], atol=1e-7)
    np.testing.assert_allclose(dz, [[0.0, 0.0, 0.25]], atol=1e-7)


# ---------------------------------------------------------------- 4. parameter counts

@pytest.mark.parametrize("layers,activation,pieces,expected", [
    ([784, 10, 10], "relu", 2, 784 * 10 + 10 + 10 * 10 + 10),                     # 7,960
    ([784, 10, 10], "prelu", 2, 784 * 10 + 10 + 10 + 10 * 10 + 10),                # + 10 slopes
    ([784, 10, 10], "maxout", 2, 784 * 20 + 20 + 10 * 10 + 10),                    # 2 pieces per unit
    ([4, 5, 6, 3], "prelu", 2, (4 * 5 + 5 + 5) + (5 * 6 + 6 + 6) + (6 * 3 + 3)),    # 93
    ([4, 5, 6, 3], "maxout", 3, (4 * 15 + 15) + (5 * 18 + 18) + (6 * 3 + 3)),       # 204
])
def test_parameter_count(layers, activation, pieces, expected):
    model = MLP(ModelConfig(layers=layers, activation=activation, maxout_pieces=pieces))
    assert model.num_params == expected
    assert sum(s.size for s in model.layout.specs) == expected


def test_784_10_10_has_7960_parameters():
    assert MLP(ModelConfig(layers=[784, 10, 10])).num_params == 7960


def test_layout_views_cover_buffer_and_round_trip():
    model = MLP(ModelConfig(layers=[4, 5, 6, 3], activation="prelu"), dtype=np.float64)
    flat = np.arange(model.num_params, dtype=np.float64)
    views = model.layout.views(flat)
    assert views["W0"].shape == (4, 5) and views["W1"].shape == (5, 6) and views["W2"].shape == (6, 3)
    assert views["alpha0"].shape == (5,) and views["alpha1"].shape == (6,) and "alpha2" not in views
    seen = np.sort(np.concatenate([np.asarray(v).ravel() for v in views.values()]))
    np.testing.assert_array_equal(seen, flat)      # every entry in exactly one view
    arrays = model.layout.to_arrays(flat)
    other = np.zeros_like(flat)
    model.layout.from_arrays(arrays, other)
    np.testing.assert_array_equal(other, flat)


# ---------------------------------------------------------------- 5. XOR with the lecture's weights

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_xor_lecture_weights_exact(dtype):
    model = MLP(ModelConfig(layers=[2, 2, 1], activation="relu", output="linear", loss="mse"), np, dtype)
    flat = np.full(model.num_params, np.nan, dtype)
    v = model.layout.views(flat)
    v["W0"][...] = [[1, 1], [1, 1]]
    v["b0"][...] = [0, -1]
    v["W1"][...] = [[1], [-2]]
    v["b1"][...] = 0
    assert np.isfinite(flat).all()
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype)
    out = model.forward(model.layout.views(flat), x)
    np.testing.assert_array_equal(out, np.array([[0], [1], [1], [0]], dtype))
    y = np.array([0, 1, 1, 0])
    t = model.objective.prepare_targets(y).astype(dtype)
    loss, correct = model.loss_and_grad(model.layout.views(flat), model.layout.views(np.empty_like(flat)),
                                        x, t, y)
    assert float(loss) == 0.0 and int(correct) == 4


# ---------------------------------------------------------------- 6./7. end-to-end training

def _train(tmp_path, raw):
    from distffn.trainer import Trainer
    job = from_dict(raw)
    out = str(tmp_path / raw["name"])
    return Trainer(job, out, progress=False, echo=lambda s: None).run(), out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_training_learns_xor(tmp_path, seed):
    summary, _ = _train(tmp_path, {
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
    summary, out = _train(tmp_path, raw)
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


# ---------------------------------------------------------------- 8. momentum SGD

def test_momentum_one_and_two_steps_by_hand():
    theta = np.array([1.0, -2.0, 0.5])
    v = np.array([0.1, 0.2, -0.3])
    opt = MomentumSGD(0.9)
    # v' = 0.9 v - 0.1 * g/4 ; θ' = θ + v'
    opt.update(theta, v, np.array([4.0, -8.0, 2.0]), 4, 0.1)
    np.testing.assert_allclose(v, [-0.01, 0.38, -0.32], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(theta, [0.99, -1.62, 0.18], rtol=1e-12, atol=1e-15)
    # v'' = 0.9 v' - 0.05 * g2/2 ; θ'' = θ' + v''
    opt.update(theta, v, np.array([0.0, 4.0, -4.0]), 2, 0.05)
    np.testing.assert_allclose(v, [-0.009, 0.242, -0.188], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(theta, [0.981, -1.378, -0.008], rtol=1e-12, atol=1e-15)


def test_momentum_zero_is_plain_sgd():
    theta, v = np.array([1.0, 2.0]), np.array([5.0, -5.0])
    MomentumSGD(0.0).update(theta, v, np.array([2.0, 6.0]), 2, 0.5)
    np.testing.assert_allclose(v, [-0.5, -1.5], rtol=1e-15)
    np.testing.assert_allclose(theta, [0.5, 0.5], rtol=1e-15)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_momentum_update_numpy_chunked_equals_formula(dtype):
    n = 3 * 65536 + 17
    assert n > getattr(optimizer_module, "_CHUNK", 65536)
    rng = np.random.default_rng(0)
    theta, v, g = (rng.normal(size=n).astype(dtype) for _ in range(3))
    mu, scale = 0.9, -0.01 / 32
    t64, v64, g64 = (a.astype(np.float64) for a in (theta, v, g))
    v_exp = mu * v64 + scale * g64
    t_exp = t64 + v_exp
    momentum_update_numpy(theta, v, g, mu, scale)
    tol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(v, v_exp, rtol=tol, atol=tol)
    np.testing.assert_allclose(theta, t_exp, rtol=tol, atol=tol)


# ---------------------------------------------------------------- 9. schedules

@pytest.mark.parametrize("t", [0, 1, 2, 5, 10, 100, 12345])
def test_inverse_time_schedule(t):
    cfg = OptimizerConfig(lr=0.1, schedule="inverse_time", decay=0.5)
    assert learning_rate(cfg, t, 100000) == pytest.approx(0.1 / (1 + 0.5 * t), rel=1e-15)


def test_step_schedule():
    cfg = OptimizerConfig(lr=0.1, schedule="step", gamma=0.5, step_size=3)
    expected = [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025, 0.025, 0.0125]
    got = [learning_rate(cfg, t, 100) for t in range(10)]
    np.testing.assert_allclose(got, expected, rtol=1e-14)


def test_cosine_schedule():
    cfg = OptimizerConfig(lr=0.1, schedule="cosine", min_lr=0.01)
    total = 100
    assert learning_rate(cfg, 0, total) == pytest.approx(0.1, rel=1e-14)
    assert learning_rate(cfg, total // 2, total) == pytest.approx((0.1 + 0.01) / 2, rel=1e-14)
    assert learning_rate(cfg, total, total) == pytest.approx(0.01, rel=1e-14)
    # a quarter of the way: cos(pi/4) = sqrt(2)/2
    assert learning_rate(cfg, 25, total) == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.sqrt(0.5)), rel=1e-14)
    rates = [learning_rate(cfg, t, total) for t in range(total + 1)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))   # never increases
    assert min(rates) >= 0.01 - 1e-15


def test_constant_schedule_with_linear_warmup():
    cfg = OptimizerConfig(lr=0.1, schedule="constant", warmup_steps=4)
    got = [learning_rate(cfg, t, 100) for t in range(7)]
    np.testing.assert_allclose(got, [0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1], rtol=1e-14)


def test_warmup_multiplies_other_schedules():
    cfg = OptimizerConfig(lr=0.1, schedule="inverse_time", decay=0.5, warmup_steps=4)
    assert learning_rate(cfg, 1, 100) == pytest.approx(0.1 / 1.5 * 2 / 4, rel=1e-14)
    assert learning_rate(cfg, 4, 100) == pytest.approx(0.1 / 3.0, rel=1e-14)


def test_constant_schedule():
    cfg = OptimizerConfig(lr=0.03)
    assert all(learning_rate(cfg, t, 50) == 0.03 for t in (0, 1, 49, 50, 1000))


# ---------------------------------------------------------------- 10. mini-batch semantics

@pytest.mark.parametrize("activation,output,loss", [
    ("relu", "softmax", "cross_entropy"), ("prelu", "softmax", "expected_squared_error"),
    ("maxout", "sigmoid", "binary_cross_entropy"), ("tanh", "linear", "mse"),
    ("softplus", "sigmoid", "mse"),
])
def test_batch_gradient_is_sum_of_per_sample_gradients(activation, output, loss):
    model, flat, x, t = setup_net(activation, output, loss, seed=11, n=6)
    labels = t if output == "softmax" else None
    loss_all, g_all, correct_all = grads_of(model, flat, x, t, labels)
    g_sum, loss_sum, correct_sum = np.zeros(model.num_params), 0.0, 0
    for r in range(x.shape[0]):
        l_r, g_r, c_r = grads_of(model, flat, x[r:r + 1], t[r:r + 1], None if labels is None else labels[r:r + 1])
        g_sum += g_r
        loss_sum += l_r
        correct_sum += 0 if c_r is None else int(c_r)
    np.testing.assert_allclose(g_all, g_sum, rtol=1e-10, atol=1e-12)
    assert loss_all == pytest.approx(loss_sum, rel=1e-12)
    if labels is not None:
        assert int(correct_all) == correct_sum


def test_gradient_splits_over_shards():
    """Summed gradients of two shards equal the whole batch's (what the aggregator relies on)."""
    model, flat, x, t = setup_net("tanh", "softmax", "cross_entropy", seed=5, n=7)
    _, g_all, _ = grads_of(model, flat, x, t)
    _, g_a, _ = grads_of(model, flat, x[:4], t[:4])
    _, g_b, _ = grads_of(model, flat, x[4:], t[4:])
    np.testing.assert_allclose(g_all, g_a + g_b, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- 11. untrainable activations

@pytest.mark.parametrize("name", ["sign", "step"])
def test_zero_gradient_activations_refused_for_training(name):
    with pytest.raises(UserError, match="zero gradient") as info:
        from_dict({"name": "x", "model": {"layers": [2, 2, 1], "activation": name,
                                          "output": "linear", "loss": "mse"}})
    assert "model.activation" in str(info.value)


def test_sign_and_step_forward_for_inference():
    z = np.array([[-2.0, 0.0, 3.0, -0.5]])
    a = np.empty_like(z)
    make_activation("sign").forward(np, z, a)
    np.testing.assert_array_equal(a, [[-1.0, 0.0, 1.0, -1.0]])
    make_activation("step").forward(np, z, a)
    np.testing.assert_array_equal(a, [[0.0, 0.0, 1.0, 0.0]])
    with pytest.raises(UserError, match="zero gradient"):
        make_activation("sign").backward(np, z, a, np.ones_like(z), np.empty_like(z))


def test_sign_network_runs_inference_but_not_backprop():
    model = MLP(ModelConfig(layers=[2, 2, 1], activation="sign", output="linear", loss="mse"), np, np.float64)
    flat = np.zeros(model.num_params)
    v = model.layout.views(flat)
    v["W0"][...] = [[1, 1], [1, 1]]
    v["b0"][...] = [-0.5, -1.5]          # sign units: OR and AND
    v["W1"][...] = [[0.5], [-0.5]]       # XOR = (OR - AND) / 2 in ±1 units
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float64)
    np.testing.assert_array_equal(model.forward(v, x), [[0], [1], [1], [0]])
    with pytest.raises(UserError, match="zero gradient"):
        model.loss_and_grad(v, model.layout.views(np.empty_like(flat)), x, np.zeros((4, 1)))


# ---------------------------------------------------------------- 12. invalid output/loss pairs

@pytest.mark.parametrize("output,loss", [(o, l) for o in LOSSES_FOR_OUTPUT for l in LOSSES
                                         if l not in LOSSES_FOR_OUTPUT[o]])
def test_invalid_output_loss_pair_refused(output, loss):
    with pytest.raises(UserError) as info:
        from_dict({"name": "x", "model": {"layers": [2, 4, 2], "activation": "relu",
                                          "output": output, "loss": loss}})
    msg = str(info.value)
    assert msg.startswith("model.loss"), msg
    assert loss in msg and output in msg


def test_softmax_mse_refused():
    with pytest.raises(UserError, match=r"model\.loss"):
        from_dict({"model": {"layers": [4, 3], "output": "softmax", "loss": "mse"}})


@pytest.mark.parametrize("output,loss", PAIRS)
def test_valid_pairs_accepted(output, loss):
    job = from_dict({"model": {"layers": [2, 4, 2], "output": output, "loss": loss}})
    assert (job.model.output, job.model.loss) == (output, loss)


# ---------------------------------------------------------------- 13. prepare_targets

@pytest.mark.parametrize("labels,text", [([0, 1, 3], "0..3"), ([-1, 0, 2], "-1..2")])
def test_prepare_targets_labels_out_of_range(labels, text):
    obj = Objective("softmax", "cross_entropy", 3)
    with pytest.raises(UserError, match=r"labels range over") as info:
        obj.prepare_targets(np.array(labels, np.int64), "train")
    assert text in str(info.value) and "3 output units" in str(info.value)


def test_prepare_targets_softmax_ids_kept():
    out = Objective("softmax", "cross_entropy", 3).prepare_targets(np.array([2, 0, 1], np.int32))
    assert np.issubdtype(out.dtype, np.integer)
    np.testing.assert_array_equal(out, [2, 0, 1])


def test_prepare_targets_single_sigmoid_makes_column_of_floats():
    out = Objective("sigmoid", "binary_cross_entropy", 1).prepare_targets(np.array([0, 1, 1, 0]))
    assert out.shape == (4, 1)
    assert np.issubdtype(out.dtype, np.floating)
    np.testing.assert_array_equal(out[:, 0], [0.0, 1.0, 1.0, 0.0])


def test_prepare_targets_single_sigmoid_refuses_non_binary_labels():
    with pytest.raises(UserError, match="0/1"):
        Objective("sigmoid", "binary_cross_entropy", 1).prepare_targets(np.array([0, 1, 2]))


def test_prepare_targets_one_vs_rest_is_one_hot():
    out = Objective("sigmoid", "binary_cross_entropy", 3).prepare_targets(np.array([2, 0, 1]))
    np.testing.assert_array_equal(out, np.eye(3)[[2, 0, 1]])


def test_prepare_targets_sigmoid_float_targets_out_of_unit_interval():
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        Objective("sigmoid", "mse", 1).prepare_targets(np.array([0.5, 1.5]))


def test_prepare_targets_width_mismatch():
    with pytest.raises(UserError, match="2 columns"):
        Objective("linear", "mse", 3).prepare_targets(np.zeros((4, 2), np.float32))
