"""Every activation with every output/loss pair: analytic gradients against central differences (float64)."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import PAIRS, TRAINABLE, grads_of, loss_of, setup_net


@pytest.mark.parametrize("output,loss", PAIRS)
@pytest.mark.parametrize("activation", TRAINABLE)
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
