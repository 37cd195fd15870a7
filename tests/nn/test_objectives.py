"""Output/loss pairs: numerical stability and targets."""
from __future__ import annotations

import math

import numpy as np
import pytest

from distffn.errors import UserError

from helpers import objective


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_cross_entropy_stable_at_large_logits(dtype):
    obj = objective("softmax", "cross_entropy", 3)
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
    obj = objective("softmax", loss, 3)
    z = np.array([[1000.0, -1000.0, 0.0], [-1000.0, 1000.0, 0.0]])
    dz = np.empty_like(z)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        value = float(obj.loss_and_grad(np, z, np.array([2, 1]), dz))
    # row 0: p = (1,0,0) with T = 2: 1 - p_T = 1 and sum p_j (j-2)^2 = 4; row 1 is exactly right
    assert value == pytest.approx(1.0 if loss == "one_minus_true_prob" else 4.0, abs=1e-12)
    assert np.isfinite(dz).all()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bce_uses_stable_softplus_form(dtype):
    obj = objective("sigmoid", "binary_cross_entropy", 1)
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


@pytest.mark.parametrize("labels,text", [([0, 1, 3], "0..3"), ([-1, 0, 2], "-1..2")])
def test_prepare_targets_labels_out_of_range(labels, text):
    obj = objective("softmax", "cross_entropy", 3)
    with pytest.raises(UserError, match=r"labels range over") as info:
        obj.prepare_targets(np.array(labels, np.int64), "train")
    assert text in str(info.value) and "3 output units" in str(info.value)


def test_prepare_targets_softmax_ids_kept():
    out = objective("softmax", "cross_entropy", 3).prepare_targets(np.array([2, 0, 1], np.int32))
    assert np.issubdtype(out.dtype, np.integer)
    np.testing.assert_array_equal(out, [2, 0, 1])


def test_prepare_targets_single_sigmoid_makes_column_of_floats():
    out = objective("sigmoid", "binary_cross_entropy", 1).prepare_targets(np.array([0, 1, 1, 0]))
    assert out.shape == (4, 1)
    assert np.issubdtype(out.dtype, np.floating)
    np.testing.assert_array_equal(out[:, 0], [0.0, 1.0, 1.0, 0.0])


def test_prepare_targets_single_sigmoid_refuses_non_binary_labels():
    with pytest.raises(UserError, match="0/1"):
        objective("sigmoid", "binary_cross_entropy", 1).prepare_targets(np.array([0, 1, 2]))


def test_prepare_targets_one_vs_rest_is_one_hot():
    out = objective("sigmoid", "binary_cross_entropy", 3).prepare_targets(np.array([2, 0, 1]))
    np.testing.assert_array_equal(out, np.eye(3)[[2, 0, 1]])


def test_prepare_targets_sigmoid_float_targets_out_of_unit_interval():
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        objective("sigmoid", "mse", 1).prepare_targets(np.array([0.5, 1.5]))


def test_prepare_targets_width_mismatch():
    with pytest.raises(UserError, match="2 columns"):
        objective("linear", "mse", 3).prepare_targets(np.zeros((4, 2), np.float32))
