"""The flat parameter buffer and its per-layer views."""
from __future__ import annotations

import numpy as np

from distffn.jobspec import ModelConfig
from distffn.nn.model import MLP


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
