"""Output units and their losses, fused so the backward pass starts from ``dL/dz`` directly.

Each output/loss pair with a defined gradient is one registered class; anything else is
refused when the job spec is read.

All losses are per sample and summed over the batch rows (the aggregator divides by the
global batch size), so shards of any size combine into the exact global mean.
"""
from __future__ import annotations

import numpy as np

from ..errors import UserError
from ..registry import Registry

P_CLIP = (1e-7, 1.0 - 1e-7)     # probabilities are clipped wherever a log is taken


def softmax(xp, z):
    """Row-wise softmax computed as softmax(z - max z), so logits of +-1000 do not overflow."""
    e = z - z.max(axis=1, keepdims=True)
    xp.exp(e, out=e)
    e /= e.sum(axis=1, keepdims=True)
    return e


def sigmoid(xp, z):
    return 0.5 * (1.0 + xp.tanh(0.5 * z))


def softplus(xp, z):
    return xp.logaddexp(0, z)


OBJECTIVES = Registry("output/loss pair", "model.loss")


def _register(output: str, loss: str):
    def add(cls):
        cls.output, cls.loss = output, loss
        return OBJECTIVES.register(f"{output}/{loss}", cls)
    return add


def outputs() -> list[str]:
    """Every output unit some registered loss goes with, in registration order."""
    return list(dict.fromkeys(OBJECTIVES.get(n).output for n in OBJECTIVES))


def losses() -> list[str]:
    return list(dict.fromkeys(OBJECTIVES.get(n).loss for n in OBJECTIVES))


def losses_for(output: str) -> list[str]:
    return [OBJECTIVES.get(n).loss for n in OBJECTIVES if OBJECTIVES.get(n).output == output]


def make_objective(cfg) -> "Objective":
    """The output/loss pair of the model section ``cfg`` (``cfg.output``, ``cfg.loss``)."""
    return OBJECTIVES.get(f"{cfg.output}/{cfg.loss}")(cfg.layers[-1])


class Objective:
    """An output unit with its loss: ``loss_and_grad`` and ``correct`` on logits ``z``."""

    output = loss = "base"

    def __init__(self, num_outputs: int):
        self.k = num_outputs

    # ---------------------------------------------------------------- targets
    def prepare_targets(self, y: np.ndarray, where: str = "data") -> np.ndarray:
        """Turn dataset labels/values into this objective's target array, or explain the mismatch.

        softmax: int class ids in [0, K). sigmoid: 0/1 targets of shape (n, K); K > 1 with
        class ids means one-vs-rest. linear: float (n, K); class ids become one-hot (or the
        id itself when K == 1, as in the XOR net).
        """
        k = self.k
        is_int = np.issubdtype(y.dtype, np.integer)
        if is_int:
            if y.ndim != 1:
                raise UserError(f"{where}: integer labels must be one-dimensional, got shape {y.shape}")
            hi = int(y.max()) if len(y) else 0
            lo = int(y.min()) if len(y) else 0
            if self.output == "softmax" or k > 1:
                if lo < 0 or hi >= k:
                    raise UserError(f"{where}: labels range over {lo}..{hi} but model.layers ends in "
                                    f"{k} output units; the last layer needs at least {hi + 1}")
            elif lo < 0 or hi > 1:
                raise UserError(f"{where}: a single {self.output} output needs 0/1 labels, got {lo}..{hi}")
            if self.output == "softmax":
                return y.astype(np.int64)
            if k == 1:
                return y.astype(np.float32).reshape(-1, 1)
            return np.eye(k, dtype=np.float32)[y]
        if self.output == "softmax":
            raise UserError(f"{where}: a softmax output needs integer class labels, got {y.dtype} values")
        y = y.reshape(len(y), -1).astype(np.float32)
        if y.shape[1] != k:
            raise UserError(f"{where}: targets have {y.shape[1]} columns but model.layers ends in {k} units")
        if self.output == "sigmoid" and (y.min() < 0 or y.max() > 1):
            raise UserError(f"{where}: a sigmoid output needs targets in [0, 1]")
        return y

    # ---------------------------------------------------------------- forward/backward
    def predict(self, xp, z):
        """The network's output a = g(z): probabilities or values."""
        if self.output == "softmax":
            return softmax(xp, z.copy())
        if self.output == "sigmoid":
            return sigmoid(xp, z)
        return z

    def loss_and_grad(self, xp, z, t, dz=None):
        """Summed loss over rows; writes the per-sample ``dL/dz`` into ``dz`` when given."""
        raise NotImplementedError

    def correct(self, xp, z, labels):
        """How many rows are classified right (labels are class ids), as a device scalar."""
        if self.k == 1:                                     # one sigmoid/linear unit: threshold
            cut = 0.0 if self.output == "sigmoid" else 0.5
            return ((z[:, 0] > cut) == (labels > 0)).sum()
        return (z.argmax(axis=1) == labels).sum()


@_register("softmax", "cross_entropy")
class SoftmaxCrossEntropy(Objective):
    """−log k[T], with k = softmax(z − max z) clipped to [1e-7, 1−1e-7]"""

    def loss_and_grad(self, xp, z, t, dz=None):
        p = softmax(xp, z.copy())
        rows = xp.arange(z.shape[0])
        loss = -xp.log(xp.clip(p[rows, t], *P_CLIP)).sum()
        if dz is not None:
            dz[...] = p
            dz[rows, t] -= 1.0
        return loss


@_register("softmax", "one_minus_true_prob")
class SoftmaxOneMinusTrueProb(Objective):
    """E = 1 − k[T]"""

    def loss_and_grad(self, xp, z, t, dz=None):
        p = softmax(xp, z.copy())
        rows = xp.arange(z.shape[0])
        pt = p[rows, t]
        loss = (1.0 - pt).sum()
        if dz is not None:                                  # dE/dz_j = k_T (k_j - [j = T])
            dz[...] = p
            dz[rows, t] -= 1.0
            dz *= pt[:, None]
        return loss


@_register("softmax", "expected_squared_error")
class SoftmaxExpectedSquaredError(Objective):
    """E = Σⱼ k[j]·(j − T)²"""

    def loss_and_grad(self, xp, z, t, dz=None):
        p = softmax(xp, z.copy())
        c = (xp.arange(self.k, dtype=z.dtype)[None, :] - t[:, None].astype(z.dtype)) ** 2
        e = (p * c).sum(axis=1, keepdims=True)
        if dz is not None:                                  # dE/dz_j = k_j (c_j - E)
            xp.multiply(p, c - e, out=dz)
        return e.sum()


@_register("sigmoid", "binary_cross_entropy")
class SigmoidBinaryCrossEntropy(Objective):
    """Σ ζ((1 − 2y)·z), the stable softplus form"""

    def loss_and_grad(self, xp, z, t, dz=None):
        loss = softplus(xp, (1.0 - 2.0 * t) * z).sum()
        if dz is not None:
            xp.subtract(sigmoid(xp, z), t, out=dz)
        return loss


@_register("sigmoid", "mse")
class SigmoidMSE(Objective):
    """mean over outputs of (σ(z) − y)²"""

    def loss_and_grad(self, xp, z, t, dz=None):
        a = sigmoid(xp, z)
        if dz is not None:
            xp.multiply((2.0 / self.k) * (a - t), a * (1.0 - a), out=dz)
        return ((a - t) ** 2).sum() / self.k


@_register("linear", "mse")
class LinearMSE(Objective):
    """mean over outputs of (z − y)²"""

    def loss_and_grad(self, xp, z, t, dz=None):
        diff = z - t
        if dz is not None:
            xp.multiply(diff, 2.0 / self.k, out=dz)
        return (diff * diff).sum() / self.k


@_register("linear", "l1")
class LinearL1(Objective):
    """mean over outputs of |z − y|"""

    def loss_and_grad(self, xp, z, t, dz=None):
        diff = z - t
        if dz is not None:
            xp.multiply(xp.sign(diff), 1.0 / self.k, out=dz)
        return xp.abs(diff).sum() / self.k
