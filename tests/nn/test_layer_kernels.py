"""The numba twins of the network's elementwise work, kernel by kernel against NumPy."""
from __future__ import annotations

import numpy as np
import pytest

from distffn.jobspec import ModelConfig
from distffn.nn.activations import ReLU, Tanh
from distffn.nn.model import MLP
from distffn.nn.objectives import SoftmaxCrossEntropy, SoftmaxOneMinusTrueProb

pytest.importorskip("numba")
from distffn.nn import layer_kernels as fused  # noqa: E402  (imports numba)


def feature_major(rng, shape, scale=1.0):
    """An F-ordered float32 buffer like the model's work buffers, with exact zeros and ±0."""
    a = np.asfortranarray((scale * rng.standard_normal(shape)).astype(np.float32))
    a.flat[::17] = 0.0
    a.flat[5::23] = -0.0
    return a


@pytest.mark.parametrize("n", [1, 7, 128])
def test_bias_relu_equals_numpy(n):
    rng = np.random.default_rng(n)
    z, b = feature_major(rng, (n, 33)), rng.standard_normal(33).astype(np.float32)
    z[0, 0] = np.nan
    want = np.empty_like(z)
    ReLU().forward(np, z + b, want)
    a = np.empty_like(z)
    z_before = z.copy()
    fused.bias_relu(z, b, a)
    np.testing.assert_array_equal(a, want)          # NaN where NaN, bit for bit elsewhere
    np.testing.assert_array_equal(z, z_before)      # z is not written


@pytest.mark.parametrize("n", [1, 7, 128])
def test_relu_backward_equals_numpy(n):
    rng = np.random.default_rng(n)
    z, da = feature_major(rng, (n, 33)), feature_major(rng, (n, 33))
    a = np.maximum(z, 0)
    want = np.empty_like(z, order="F")
    ReLU().backward(np, z, a, da, want)
    dz, db = np.empty_like(z, order="F"), np.empty(33, np.float32)
    fused.relu_backward(a, da, dz, db)
    np.testing.assert_array_equal(dz, want)
    np.testing.assert_allclose(db, want.astype(np.float64).sum(axis=0), rtol=1e-6, atol=1e-6)


def test_bias_add_and_column_sums_equal_numpy():
    rng = np.random.default_rng(0)
    z, b = feature_major(rng, (50, 9)), rng.standard_normal(9).astype(np.float32)
    want = z + b
    fused.bias_add(z, b)
    np.testing.assert_array_equal(z, want)
    db = np.empty(9, np.float32)
    fused.column_sums(z, db)
    np.testing.assert_allclose(db, z.astype(np.float64).sum(axis=0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 1000.0])      # ±1000: no overflow, probabilities clipped
def test_softmax_xent_equals_numpy(scale):
    rng = np.random.default_rng(1)
    n, k = 200, 10
    z = feature_major(rng, (n, k), scale)
    t = rng.integers(0, k, n)
    labels = rng.integers(0, k, n)
    obj = SoftmaxCrossEntropy(k)
    want_dz = np.empty_like(z)
    want_loss = obj.loss_and_grad(np, z, t, want_dz)
    want_correct = obj.correct(np, z, labels)
    dz = np.empty_like(z)
    loss, correct = fused.softmax_xent(z, t, dz, labels, True, True)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(dz, want_dz, rtol=1e-5, atol=1e-7)
    assert correct == want_correct
    loss2, correct2 = fused.softmax_xent(z, t, np.empty_like(z), t, False, False)
    assert loss2 == loss and correct2 == 0


def test_twins_are_found_by_exact_class_only():
    assert fused.hidden_twin(ReLU()) == (fused.bias_relu, fused.relu_backward)
    assert fused.hidden_twin(Tanh()) is None
    assert fused.loss_twin(SoftmaxCrossEntropy(10)) is fused.softmax_xent
    assert fused.loss_twin(SoftmaxOneMinusTrueProb(10)) is None


@pytest.mark.parametrize("activation,loss", [("relu", "cross_entropy"), ("tanh", "cross_entropy"),
                                             ("relu", "one_minus_true_prob")])
def test_model_step_with_numba_kernels_equals_numpy(activation, loss):
    """Fused where a twin exists, NumPy otherwise: the same loss, accuracy and gradients."""
    cfg = ModelConfig(layers=[12, 16, 16, 5], activation=activation, loss=loss)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 12)).astype(np.float32)
    t = rng.integers(0, 5, 40)
    out = {}
    for kernels in ("numpy", "numba"):
        model = MLP(cfg, kernels=kernels)
        theta = np.empty(model.num_params, np.float32)
        model.init_params(theta, 0)
        theta += np.float32(0.05)            # nonzero biases
        grad = np.zeros_like(theta)
        loss_sum, correct = model.loss_and_grad(model.layout.views(theta), model.layout.views(grad), x, t, t)
        ev = model.evaluate(model.layout.views(theta), x, t, t, chunk=16)
        out[kernels] = float(loss_sum), int(correct), grad, ev
    (l0, c0, g0, e0), (l1, c1, g1, e1) = out["numpy"], out["numba"]
    assert c0 == c1 and e0[1] == e1[1]
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    np.testing.assert_allclose(e1[0], e0[0], rtol=1e-5)
    np.testing.assert_allclose(g1, g0, rtol=1e-4, atol=1e-6)
