"""Output units and their losses, fused so the backward pass starts from ``dL/dz`` directly.

All losses are per sample and summed over the batch rows (the aggregator divides by the
global batch size), so shards of any size combine into the exact global mean.
"""
from __future__ import annotations

import numpy as np

from .errors import UserError

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


class Objective:
    """An output activation with its loss: ``loss_and_grad`` and ``correct`` on logits ``z``."""

    def __init__(self, output: str, loss: str, num_outputs: int):
        self.output, self.loss, self.k = output, loss, num_outputs

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
        n = z.shape[0]
        o, name = self.output, self.loss
        if o == "softmax":
            p = softmax(xp, z.copy())
            rows = xp.arange(n)
            pt = p[rows, t]
            if name == "cross_entropy":
                loss = -xp.log(xp.clip(pt, *P_CLIP)).sum()
                if dz is not None:
                    dz[...] = p
                    dz[rows, t] -= 1.0
            elif name == "one_minus_true_prob":            # E = 1 - k[T]
                loss = (1.0 - pt).sum()
                if dz is not None:                          # dE/dz_j = k_T (k_j - [j = T])
                    dz[...] = p
                    dz[rows, t] -= 1.0
                    dz *= pt[:, None]
            else:                                           # E = sum_j k[j] (j - T)^2
                c = (xp.arange(self.k, dtype=z.dtype)[None, :] - t[:, None].astype(z.dtype)) ** 2
                e = (p * c).sum(axis=1, keepdims=True)
                loss = e.sum()
                if dz is not None:                          # dE/dz_j = k_j (c_j - E)
                    xp.multiply(p, c - e, out=dz)
        elif o == "sigmoid":
            if name == "binary_cross_entropy":             # zeta((1 - 2y) z), the stable form
                loss = softplus(xp, (1.0 - 2.0 * t) * z).sum()
                if dz is not None:
                    xp.subtract(sigmoid(xp, z), t, out=dz)
            else:                                           # mse on the sigmoid's output
                a = sigmoid(xp, z)
                loss = ((a - t) ** 2).sum() / self.k
                if dz is not None:
                    xp.multiply((2.0 / self.k) * (a - t), a * (1.0 - a), out=dz)
        else:
            diff = z - t
            if name == "mse":
                loss = (diff * diff).sum() / self.k
                if dz is not None:
                    xp.multiply(diff, 2.0 / self.k, out=dz)
            else:                                           # l1
                loss = xp.abs(diff).sum() / self.k
                if dz is not None:
                    xp.multiply(xp.sign(diff), 1.0 / self.k, out=dz)
        return loss

    def correct(self, xp, z, labels):
        """How many rows are classified right (labels are class ids), as a device scalar."""
        if self.k == 1:                                     # one sigmoid/linear unit: threshold
            cut = 0.0 if self.output == "sigmoid" else 0.5
            return ((z[:, 0] > cut) == (labels > 0)).sum()
        return (z.argmax(axis=1) == labels).sum()
