"""Hidden activations: stability and the untrainable threshold units."""
from __future__ import annotations

import math

import numpy as np
import pytest

from distffn.errors import UserError
from distffn.nn.activations import ACTIVATIONS


def test_softplus_hidden_stable_at_large_inputs():
    act = ACTIVATIONS.get("softplus")()
    z = np.array([[1000.0, -1000.0, 0.0, 40.0, -40.0]])
    a, dz = np.empty_like(z), np.empty_like(z)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        act.forward(np, z, a)
        act.backward(np, z, a, np.ones_like(z), dz)
    np.testing.assert_allclose(a, [[1000.0, 0.0, math.log(2.0), 40.0, math.exp(-40.0)]], rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(dz, [[1.0, 0.0, 0.5, 1.0, 0.0]], atol=1e-15)


def test_hidden_sigmoid_stable_at_large_inputs():
    act = ACTIVATIONS.get("sigmoid")()
    z = np.array([[1000.0, -1000.0, 0.0]], np.float32)
    a, dz = np.empty_like(z), np.empty_like(z)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        act.forward(np, z, a)
        act.backward(np, z, a, np.ones_like(z), dz)
    np.testing.assert_allclose(a, [[1.0, 0.0, 0.5]], atol=1e-7)
    np.testing.assert_allclose(dz, [[0.0, 0.0, 0.25]], atol=1e-7)


def test_sign_and_step_forward_for_inference():
    z = np.array([[-2.0, 0.0, 3.0, -0.5]])
    a = np.empty_like(z)
    ACTIVATIONS.get("sign")().forward(np, z, a)
    np.testing.assert_array_equal(a, [[-1.0, 0.0, 1.0, -1.0]])
    ACTIVATIONS.get("step")().forward(np, z, a)
    np.testing.assert_array_equal(a, [[0.0, 0.0, 1.0, 0.0]])
    with pytest.raises(UserError, match="zero gradient"):
        ACTIVATIONS.get("sign")().backward(np, z, a, np.ones_like(z), np.empty_like(z))
