"""The network's forward and backward pass against an independent NumPy reference."""
from __future__ import annotations

import numpy as np
import pytest

from distffn.errors import UserError
from distffn.jobspec import ModelConfig
from distffn.nn.model import MLP

from helpers import PAIRS, TRAINABLE, grads_of, loss_of, ref_forward, ref_loss, setup_net


@pytest.mark.parametrize("output,loss", PAIRS)
@pytest.mark.parametrize("activation", TRAINABLE)
def test_forward_loss_matches_reference(activation, output, loss):
    """The model's summed loss equals the loss of an independent forward pass."""
    model, flat, x, t = setup_net(activation, output, loss, seed=7)
    p = {k: np.array(v) for k, v in model.layout.views(flat).items()}
    zs = ref_forward(p, x, model.cfg)
    np.testing.assert_allclose(model.forward(model.layout.views(flat), x), zs[-1], rtol=1e-12, atol=1e-12)
    expected = ref_loss(output, loss, zs[-1], t)
    assert loss_of(model, flat, x, t) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert grads_of(model, flat, x, t)[0] == pytest.approx(expected, rel=1e-10, abs=1e-12)


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
