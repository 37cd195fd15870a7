"""Hidden-layer activations: forward ``a = f(z)`` and backward ``dz = f'(z) * da``.

Each activation writes into buffers the caller owns, so a training step allocates nothing
after the first batch of a given size. ``xp`` is NumPy or CuPy.
"""
from __future__ import annotations

from ..errors import UserError
from ..registry import Registry

ACTIVATIONS = Registry("activation", "model.activation")


class Activation:
    """Elementwise activation. ``pieces`` > 1 means z has that many columns per unit (maxout)."""

    name = "base"
    pieces = 1
    learnable = False           # PReLU: one slope per unit, stored as parameter ``alpha<i>``
    trainable = True            # False: zero gradient almost everywhere (refused for training)

    @classmethod
    def from_config(cls, cfg) -> "Activation":
        """An instance for the model section ``cfg`` (its extra keys, e.g. ``leaky_slope``)."""
        return cls()

    def forward(self, xp, z, a, alpha=None):
        raise NotImplementedError

    def backward(self, xp, z, a, da, dz, alpha=None, dalpha=None):
        """Write ``dL/dz`` into ``dz`` (may alias ``da``); add ``dL/dalpha`` summed over rows."""
        raise NotImplementedError


@ACTIVATIONS.named("sigmoid")
class Sigmoid(Activation):
    """σ(z) = 1 / (1 + e^−z)"""

    def forward(self, xp, z, a, alpha=None):
        # 0.5 * (1 + tanh(z / 2)) equals 1 / (1 + exp(-z)) without overflow for large |z|
        xp.multiply(z, 0.5, out=a)
        xp.tanh(a, out=a)
        a += 1.0
        a *= 0.5

    def backward(self, xp, z, a, da, dz, alpha=None, dalpha=None):
        xp.multiply(da, a * (1.0 - a), out=dz)


@ACTIVATIONS.named("tanh")
class Tanh(Activation):
    """tanh(z)"""

    def forward(self, xp, z, a, alpha=None):
        xp.tanh(z, out=a)

    def backward(self, xp, z, a, da, dz, alpha=None, dalpha=None):
        xp.multiply(da, 1.0 - a * a, out=dz)


@ACTIVATIONS.named("relu")
class ReLU(Activation):
    """max(0, z)"""

    def __init__(self):
        self._masks = {}        # reused: a fresh mask each step costs page faults at these sizes

    def forward(self, xp, z, a, alpha=None):
        xp.maximum(z, 0, out=a)

    def backward(self, xp, z, a, da, dz, alpha=None, dalpha=None):
        mask = self._masks.get(z.shape)     # one activation per model, so one array module
        if mask is None:
            mask = self._masks[z.shape] = xp.empty(z.shape, bool, order="F")
        xp.greater(z, 0, out=mask)
        xp.multiply(da, mask, out=dz)


@ACTIVATIONS.named("leaky_relu")
class LeakyReLU(Activation):
    """z if z > 0 else leaky_slope·z"""

    def __init__(self, slope: float):
        self.slope = slope

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.leaky_slope)

    def forward(self, xp, z, a, alpha=None):
        xp.multiply(z, xp.where(z > 0, 1.0, self.slope).astype(z.dtype), out=a)

    def backward(self, xp, z, a, da, dz, alpha=None, dalpha=None):
        xp.multiply(da, xp.where(z > 0, 1.0, self.slope).astype(z.dtype), out=dz)


@ACTIVATIONS.named("prelu")
class PReLU(Activation):
    """z if z > 0 else α·z, one learned slope α per unit (initially prelu_init)"""

    learnable = True

    def forward(self, xp, z, a, alpha=None):
        xp.multiply(z, xp.where(z > 0, 1.0, alpha).astype(z.dtype), out=a)

    def backward(self, xp, z, a, da, dz, alpha=None, dalpha=None):
        # da/dalpha = z where z <= 0: gradient summed over the batch rows
        dalpha += (da * xp.minimum(z, 0)).sum(axis=0)
        xp.multiply(da, xp.where(z > 0, 1.0, alpha).astype(z.dtype), out=dz)


@ACTIVATIONS.named("abs")
class Abs(Activation):
    """|z| (absolute value)"""

    def forward(self, xp, z, a, alpha=None):
        xp.abs(z, out=a)

    def backward(self, xp, z, a, da, dz, alpha=None, dalpha=None):
        xp.multiply(da, xp.sign(z), out=dz)


@ACTIVATIONS.named("softplus")
class Softplus(Activation):
    """log(1 + e^z)"""

    def forward(self, xp, z, a, alpha=None):
        xp.logaddexp(0, z, out=a)        # log(1 + e^z) without overflow

    def backward(self, xp, z, a, da, dz, alpha=None, dalpha=None):
        # softplus'(z) = sigmoid(z) = 1 - exp(-a), read off the stored output
        xp.multiply(da, -xp.expm1(-a), out=dz)


@ACTIVATIONS.named("maxout")
class Maxout(Activation):
    """max of maxout_pieces linear pieces per unit (columns j·k … j·k+k−1 of z)"""

    def __init__(self, pieces: int):
        self.pieces = pieces

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.maxout_pieces)

    def forward(self, xp, z, a, alpha=None):
        n = z.shape[0]
        z.reshape(n, -1, self.pieces).max(axis=2, out=a)

    def backward(self, xp, z, a, da, dz, alpha=None, dalpha=None):
        n, k = z.shape[0], self.pieces
        winner = z.reshape(n, -1, k).argmax(axis=2)
        # the gradient flows only into the winning piece of each unit
        onehot = xp.arange(k) == winner[:, :, None]
        xp.multiply(onehot, da[:, :, None], out=dz.reshape(n, -1, k))


@ACTIVATIONS.named("linear")
class Linear(Activation):
    """z (identity)"""

    def forward(self, xp, z, a, alpha=None):
        a[...] = z

    def backward(self, xp, z, a, da, dz, alpha=None, dalpha=None):
        if dz is not da:
            dz[...] = da


class _ZeroGradient(Activation):
    """Threshold units from the lectures: fine for inference, impossible to train by backprop."""

    trainable = False

    def backward(self, xp, z, a, da, dz, alpha=None, dalpha=None):
        raise UserError(f"activation {self.name!r} has zero gradient almost everywhere and "
                        f"cannot be trained by backpropagation")


@ACTIVATIONS.named("sign")
class Sign(_ZeroGradient):
    """sign(z): inference only, zero gradient"""

    def forward(self, xp, z, a, alpha=None):
        xp.sign(z, out=a)


@ACTIVATIONS.named("step")
class Step(_ZeroGradient):
    """[z > 0]: inference only, zero gradient"""

    def forward(self, xp, z, a, alpha=None):
        xp.greater(z, 0, out=a)


def make_activation(cfg) -> Activation:
    """The hidden activation the model section ``cfg`` names (``cfg.activation``)."""
    return ACTIVATIONS.get(cfg.activation).from_config(cfg)
