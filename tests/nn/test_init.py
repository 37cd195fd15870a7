"""Weight initialisers: the spread each promises, drawn from the job's seed."""
from __future__ import annotations

import math

import numpy as np
import pytest

from distffn.jobspec import ModelConfig
from distffn.nn.model import MLP


def first_layer(init, fan_in=400, fan_out=300, seed=0, **kw):
    model = MLP(ModelConfig(layers=[fan_in, fan_out, 10], init=init, **kw))
    flat = np.empty(model.num_params, np.float32)
    model.init_params(flat, seed)
    return model.layout.views(flat)


@pytest.mark.parametrize("init,std", [("he", math.sqrt(2 / 400)), ("xavier", math.sqrt(2 / 700)),
                                      ("normal", 0.05)])
def test_spread_matches_the_formula(init, std):
    views = first_layer(init, init_std=0.05)
    w = views["W0"]
    assert w.shape == (400, 300)
    assert abs(w.mean()) < 4 * std / math.sqrt(w.size)
    assert w.std() == pytest.approx(std, rel=0.01)
    if init == "xavier":                                 # uniform on ±√(6/(fan_in+fan_out))
        assert np.abs(w).max() <= math.sqrt(6 / 700)
    assert (views["b0"] == 0).all()


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = first_layer("he"), first_layer("he"), first_layer("he", seed=1)
    np.testing.assert_array_equal(a["W0"], b["W0"])
    assert not np.array_equal(a["W0"], c["W0"])
