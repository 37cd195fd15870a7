"""Central-difference gradient check: the analytic dL/dθ of a model against
(L(θ+h) − L(θ−h)) / 2h for every entry of the flat parameter buffer, in float64."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .model import MLP


@dataclass
class GradCheck:
    analytic: np.ndarray
    numeric: np.ndarray
    rel_error: np.ndarray       # |a − n| / max(|a| + |n|, floor): 0 where both vanish
    worst_param: str            # the parameter holding the worst entry

    @property
    def max_error(self) -> float:
        return float(self.rel_error.max())


def check_gradients(model: MLP, flat: np.ndarray, x, t, labels=None, h: float = 1e-5) -> GradCheck:
    """Compare the backward pass of ``model`` at ``flat`` on rows ``x``/``t`` with central
    differences of its summed loss.

    Use a float64 model (``MLP(cfg, dtype=np.float64)``): with h = 1e-5 the truncation error
    (~h²) and the rounding noise (~eps·L/h) both stay near 1e-10 for losses of order 10.
    ``flat`` is perturbed in place and restored.
    """
    views = model.layout.views(flat)
    analytic = np.zeros_like(flat)
    model.loss_and_grad(views, model.layout.views(analytic), x, t, labels)

    def loss():
        return float(model.evaluate(views, x, t)[0])

    numeric = np.empty_like(flat)
    for i in range(flat.shape[0]):
        keep = flat[i]
        flat[i] = keep + h
        up = loss()
        flat[i] = keep - h
        down = loss()
        flat[i] = keep
        numeric[i] = (up - down) / (2 * h)
    scale = max(float(np.abs(numeric).max()), 1.0)
    rel = np.abs(analytic - numeric) / np.maximum(np.abs(analytic) + np.abs(numeric), 1e-4 * scale)
    worst = int(np.argmax(rel))
    name = next(s.name for s in model.layout.specs if s.offset <= worst < s.offset + s.size)
    return GradCheck(analytic, numeric, rel, name)
