"""numba twins of a step's elementwise work in the network (``scaling.kernels: numba``).

Each kernel does in one pass what the NumPy reference does in several:

- ``bias_<act>``: ``a = act(z + b)``, forward of a hidden layer after its product;
- ``<act>_backward``: ``dz = act'(·) · da`` with ``db`` = the column sums of ``dz``, the bias
  gradient, in the same pass (the mask is read off the stored output ``a``);
- ``softmax_xent``: softmax, cross-entropy summed over rows, ``dz = p − onehot`` and the count
  of rows classified right, one row at a time.

Work buffers are feature-major (column ``j`` of an ``(n, units)`` F-ordered buffer is
contiguous), so the hidden-layer kernels run down one column at a time.
Arithmetic is float32 in NumPy's order (no fast-math), so results match the NumPy twins
exactly, except the sums (loss, ``db``), which numba adds up in float64.

Importing this module imports numba (``distffn.kernels.import_numba``); the model does so only
when the numba kernels were chosen. Tests: ``tests/nn/test_layer_kernels.py``, kernel by kernel
against the NumPy twins.
"""
from __future__ import annotations

import math

import numpy as np

from ..kernels import jit
from .activations import Activation, ReLU
from .objectives import P_CLIP, Objective, SoftmaxCrossEntropy

_LO, _HI = np.float32(P_CLIP[0]), np.float32(P_CLIP[1])


@jit()
def bias_relu(z, b, a):
    """``a = max(z + b, 0)`` (NaN passes through, as ``np.maximum``); ``z`` is left as is."""
    n, m = z.shape
    zero = np.float32(0)
    for j in range(m):
        bj = b[j]
        for i in range(n):
            v = z[i, j] + bj
            a[i, j] = zero if v <= zero else v


@jit(reassociate=True)
def relu_backward(a, da, dz, db):
    """``dz = da · [a > 0]`` and ``db = Σ_rows dz`` (``a > 0`` exactly where ``z > 0``)."""
    n, m = a.shape
    zero, one = np.float32(0), np.float32(1)
    for j in range(m):
        s = 0.0
        for i in range(n):
            v = da[i, j] * (one if a[i, j] > zero else zero)
            dz[i, j] = v
            s += v
        db[j] = s


@jit()
def bias_add(z, b):
    """``z += b`` on every row (an activation without a fused twin, the output layer)."""
    n, m = z.shape
    for j in range(m):
        bj = b[j]
        for i in range(n):
            z[i, j] += bj


@jit(reassociate=True)
def column_sums(dz, db):
    """``db = Σ_rows dz``: the bias gradient where the activation has no fused backward."""
    n, m = dz.shape
    for j in range(m):
        s = 0.0
        for i in range(n):
            s += dz[i, j]
        db[j] = s


@jit()
def softmax_xent(z, t, dz, labels, want_grad, want_correct):
    """Cross-entropy of ``softmax(z)`` against class ids ``t`` summed over rows (float64);
    ``dz = p − onehot(t)`` when ``want_grad``; the number of rows whose arg-max equals
    ``labels`` when ``want_correct`` (else 0). One row at a time: K is small (10)."""
    n, k = z.shape
    loss = 0.0
    correct = 0
    for i in range(n):
        zmax = z[i, 0]
        best = 0
        for j in range(1, k):
            if z[i, j] > zmax:
                zmax = z[i, j]
                best = j
        total = np.float32(0)
        for j in range(k):
            e = np.float32(math.exp(z[i, j] - zmax))
            dz[i, j] = e            # with want_grad False, dz is a scratch row buffer
            total += e
        ti = t[i]
        pt = dz[i, ti] / total
        loss -= math.log(min(max(pt, _LO), _HI))
        if want_grad:
            for j in range(k):
                dz[i, j] = dz[i, j] / total
            dz[i, ti] -= np.float32(1)
        if want_correct and best == labels[i]:
            correct += 1
    return loss, correct


# The registered activations and output/loss pairs that have twins here (exact classes: a
# subclass may compute something else). Adding one: its kernels above and an entry below.
_HIDDEN = {ReLU: (bias_relu, relu_backward)}
_LOSS = {SoftmaxCrossEntropy: softmax_xent}


def hidden_twin(activation: Activation):
    """``(bias_forward(z, b, a), backward(a, da, dz, db))`` for ``activation``, or None."""
    return _HIDDEN.get(type(activation))


def loss_twin(objective: Objective):
    """``(z, t, dz, labels, want_grad, want_correct) -> (loss, correct)`` for ``objective``,
    or None."""
    return _LOSS.get(type(objective))
