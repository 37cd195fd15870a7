"""A feed-forward network whose parameters live in one flat buffer.

Layer i computes ``Z = X·W_i + b_i`` (``W_i`` shaped fan_in × fan_out) and then the hidden
activation, or the output unit on the last layer. Parameters and gradients are each one
contiguous vector with per-layer views, so aggregation is one message and the update is one
kernel.
"""
from __future__ import annotations

import numpy as np

from ..errors import UserError
from .activations import Activation, make_activation
from .init import INITIALIZERS
from .layout import ParamLayout
from .objectives import make_objective

# Work buffers (activations and their gradients) are feature-major: column-major (rows, units).
# NumPy then issues every product as Zᵀ = Wᵀ·Xᵀ against W's row-major (fan_out, fan_in)
# storage; with OpenBLAS that made the 784-1024-10 step 7–10% faster than row-major buffers.
ORDER = "F"


def _fused_module(xp, kernels: str, dtype):
    """The module of fused twins for this array module and dtype, or None (generic xp code)."""
    if dtype != np.float32:
        return None
    if xp is not np:
        from . import cuda_layer_kernels  # CUDA C twins; CuPy itself is imported on first launch
        return cuda_layer_kernels
    if kernels == "numba":
        from . import layer_kernels  # imports numba: only when the numba kernels were chosen
        return layer_kernels
    return None


def _matmul(xp, a, b, out):
    """``out = a·b``. CuPy writes a product only into a C-ordered ``out`` (an F-ordered one gets
    a temporary and a copy), so on a GPU an F-ordered ``out`` is written as its C-ordered
    transpose, ``outᵀ = bᵀ·aᵀ``: one cuBLAS call on the same buffers, no copy."""
    if xp is not np and out.flags.f_contiguous and not out.flags.c_contiguous:
        xp.matmul(b.T, a.T, out=out.T)
    else:
        xp.matmul(a, b, out=out)


class MLP:
    """The network: layer sizes, activations and output/loss, with forward and backward passes.

    Work buffers are kept per batch size, so a step allocates nothing after the first.
    """

    def __init__(self, cfg, xp=np, dtype=np.float32, kernels: str = "numpy"):
        """``cfg`` is the job spec's model section (:class:`distffn.jobspec.ModelConfig`);
        ``kernels``: ``numpy`` or ``numba`` (the fused twins of ``nn/layer_kernels.py``, NumPy only);
        with CuPy and float32 the CUDA twins of ``nn/cuda_layer_kernels.py`` run regardless."""
        self.cfg, self.xp, self.dtype = cfg, xp, dtype
        self.sizes = list(cfg.layers)
        self.hidden: Activation = make_activation(cfg)
        self.objective = make_objective(cfg)
        self.kernels = kernels if xp is np else "numpy"
        # the fused twins (bias + activation, its backward with db; the loss) where they exist
        self._fused = _fused_module(xp, self.kernels, dtype)
        self._fused_hidden = self._fused and self._fused.hidden_twin(self.hidden)
        self._fused_loss = self._fused and self._fused.loss_twin(self.objective)
        shapes = []
        last = len(self.sizes) - 2
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            cols = fan_out * (self.hidden.pieces if i < last else 1)
            shapes.append((f"W{i}", (fan_in, cols), True))
            shapes.append((f"b{i}", (cols,), False))
            if i < last and self.hidden.learnable:
                shapes.append((f"alpha{i}", (fan_out,), False))
        self.layout = ParamLayout(shapes)
        self._keys = [(f"W{i}", f"b{i}", f"alpha{i}") for i in range(len(self.sizes) - 1)]
        self._buffers: dict[int, dict] = {}
        self._totals = None     # CuPy: the device (loss sum, correct) the loss twin adds into

    @property
    def num_layers(self) -> int:
        return len(self.sizes) - 1

    @property
    def num_params(self) -> int:
        return self.layout.size

    # ---------------------------------------------------------------- initialization
    def init_params(self, flat, seed: int):
        """Fill ``flat`` with initial weights drawn from a seeded NumPy generator.

        Drawn on the host in float64 so every backend and worker count starts identical.
        """
        rng = np.random.default_rng(seed)
        cfg = self.cfg
        draw = INITIALIZERS.get(cfg.init)
        host = np.empty(self.layout.size, np.float64)
        views = self.layout.views(host)
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            w = views[f"W{i}"]
            w[...] = draw(rng, w.shape, fan_in, fan_out, cfg)
            views[f"b{i}"][...] = cfg.bias_init
            if f"alpha{i}" in views:
                views[f"alpha{i}"][...] = cfg.prelu_init
        flat[...] = self.xp.asarray(host.astype(self.dtype))

    # ---------------------------------------------------------------- buffers
    def _work(self, n: int) -> dict:
        buf = self._buffers.get(n)
        if buf is None:
            xp, dt, last = self.xp, self.dtype, self.num_layers - 1
            buf = {"z": [], "a": [], "dz": [], "da": []}
            for i, fan_out in enumerate(self.sizes[1:]):
                cols = fan_out * (self.hidden.pieces if i < last else 1)
                hidden = i < last
                buf["z"].append(xp.empty((n, cols), dt, order=ORDER))
                buf["dz"].append(xp.empty((n, cols), dt, order=ORDER))
                buf["a"].append(xp.empty((n, fan_out), dt, order=ORDER) if hidden else None)
                buf["da"].append(xp.empty((n, fan_out), dt, order=ORDER) if hidden else None)
            if len(self._buffers) > 4:     # eval chunks + the train batch + a short last batch
                self._buffers.clear()
            self._buffers[n] = buf
        return buf

    # ---------------------------------------------------------------- passes
    def matmul(self, a, b, out):
        """``out = a·b``: every product of the passes. A GPU step captured as a CUDA graph
        replaces it on the instance with its own cuBLAS call (``Cublas.matmul``, same signature)."""
        _matmul(self.xp, a, b, out)
        return out

    def forward(self, params: dict, x):
        """Logits of the last layer for inputs ``x`` (rows are samples)."""
        xp, buf = self.xp, self._work(x.shape[0])
        a, last = x, self.num_layers - 1
        for i, (w, b, alpha) in enumerate(self._keys):
            z = buf["z"][i]
            self.matmul(a, params[w], z)
            if i < last and self._fused_hidden is not None:
                self._fused_hidden[0](z, params[b], buf["a"][i])      # z keeps no bias
            else:
                if self._fused is not None:
                    self._fused.bias_add(z, params[b])
                else:
                    z += params[b]
                if i < last:
                    self.hidden.forward(xp, z, buf["a"][i], params.get(alpha))
            if i < last:
                a = buf["a"][i]
        return buf["z"][-1]

    def _loss(self, logits, t, dz, labels):
        """(loss sum, correct or None) of the output layer; ``dz`` gets dL/dz unless None."""
        if self._fused_loss is not None:
            want_grad, want_correct = dz is not None, labels is not None
            args = (logits, t, dz if want_grad else self._buffers[logits.shape[0]]["dz"][-1],
                    labels if want_correct else t, want_grad, want_correct)
            if self.xp is np:
                loss, correct = self._fused_loss(*args)
                return np.float64(loss), (correct if want_correct else None)
            # on the device, without a sync: views of one buffer, valid until the next call
            if self._totals is None:
                self._totals = self.xp.zeros(2, np.float64)
            self._totals.fill(0)
            self._fused_loss(*args, self._totals)
            return self._totals[0], (self._totals[1] if want_correct else None)
        xp = self.xp
        loss = self.objective.loss_and_grad(xp, logits, t, dz)
        return loss, (self.objective.correct(xp, logits, labels) if labels is not None else None)

    def loss_and_grad(self, params: dict, grads: dict, x, t, labels=None):
        """Forward and backward on one shard.

        Writes ``dL/dθ`` summed over the rows of ``x`` into ``grads`` (views of the flat
        gradient buffer) and returns ``(loss_sum, correct)`` as device scalars
        (``correct`` is None without labels). With CuPy's float32 twins they are float64 0-d
        views of one device buffer that the next call overwrites (in stream order): use or
        copy them before calling again.
        """
        xp = self.xp
        n = x.shape[0]
        logits = self.forward(params, x)
        buf = self._buffers[n]
        dz = buf["dz"][-1]
        loss, correct = self._loss(logits, t, dz, labels)
        keys, fused_db = self._keys, False
        for i in reversed(range(self.num_layers)):
            w, b, _ = keys[i]
            a_prev = x if i == 0 else buf["a"][i - 1]
            # dW = Xᵀ·dZ, db = column sums of dZ: sums over the shard's samples
            self.matmul(a_prev.T, dz, grads[w])
            if fused_db:
                pass                       # the fused backward summed db already
            elif self._fused is not None:
                self._fused.column_sums(dz, grads[b])
            else:
                xp.sum(dz, axis=0, out=grads[b])
            if i == 0:
                break                      # no dX for the input layer
            da = buf["da"][i - 1]
            self.matmul(dz, params[w].T, da)                  # dX = dZ·Wᵀ
            alpha = keys[i - 1][2]
            if alpha in grads:
                grads[alpha][...] = 0
            dz = buf["dz"][i - 1]
            if self._fused_hidden is not None:
                self._fused_hidden[1](a_prev, da, dz, grads[keys[i - 1][1]])
                fused_db = True
            else:
                self.hidden.backward(xp, buf["z"][i - 1], a_prev, da, dz,
                                     params.get(alpha), grads.get(alpha))
        return loss, correct

    def evaluate(self, params: dict, x, t, labels=None, chunk: int = 1024):
        """``(loss_sum, correct)`` over all rows of ``x``, in chunks to bound memory."""
        loss, correct = 0.0, 0
        for s in range(0, x.shape[0], chunk):
            rows = x[s:s + chunk]
            # rows that are not an array (8-bit ByteImages) decode through __array__
            logits = self.forward(params, rows if isinstance(rows, self.xp.ndarray) else self.xp.asarray(rows))
            part, right = self._loss(logits, t[s:s + chunk], None,
                                     None if labels is None else labels[s:s + chunk])
            loss += float(part)
            if labels is not None:
                correct += int(right)
        return loss, (correct if labels is not None else None)

    def check_data(self, num_features: int, dataset: str):
        if num_features != self.sizes[0]:
            raise UserError(f"model.layers: the first entry is the input width; dataset {dataset!r} "
                            f"has {num_features} features, but model.layers starts with {self.sizes[0]}")
