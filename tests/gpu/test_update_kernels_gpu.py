"""The optimizers' CUDA updates (``optim/cuda_update_kernels.py``) against the NumPy updates.

On a GPU (``pytest -m gpu``): for each optimizer, with and without weight decay, over steps
with a changing learning rate, Θ and the buffers equal the NumPy float32 update's bit for bit,
eagerly, replayed from a CUDA graph, and while the GPU runs behind the host. Both are also held
to a float64 reference within a bound derived from float32 rounding (:class:`Bounded`); the
one test without the ``gpu`` mark checks that bound against the NumPy update on every run, so
a GPU run can only fail it where it differs from NumPy.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from distffn.cuda import kernel
from distffn.jobspec import OptimizerConfig
from distffn.optim import make_optimizer

U = 2.0 ** -24          # float32's unit roundoff: round to nearest is within U·|x| of x ...
ETA = 2.0 ** -150       # ... or, in the subnormal range, within half the smallest subnormal


class Bounded:
    """A float64 reference value and a bound on how far float32 arithmetic, doing the same
    operations in the same order on the same float32 inputs, can end up from it.

    Each operation's bound follows from the operands' bounds ``ea``, ``eb`` (the computed
    operands are ``a + δa``, ``|δa| ≤ ea``) plus the operation's own rounding, at most
    ``U·|computed result| + ETA``, with ``|computed| ≤ |exact| + propagated error``:

    - ``a ± b``: ``ea + eb``
    - ``a · b``: ``|a|·eb + |b|·ea + ea·eb``
    - ``a / b``: ``(ea·|b| + |a|·eb) / (|b|·(|b| − eb))``   (needs ``eb < |b|``)
    - ``√a``: ``min(ea / √a, √ea)``

    So the bound is U × (the number of roundings on each path) × the magnitudes met on it,
    carried through the steps. A scalar the kernel reads (:meth:`const`) starts with its own
    float32 rounding error; the float32 inputs (Θ₀, ΔΘ) start exact.
    """

    def __init__(self, value, err=0.0):
        self.value = np.asarray(value, np.float64)
        self.err = np.broadcast_to(np.asarray(err, np.float64), self.value.shape)

    @classmethod
    def const(cls, c: float) -> Bounded:
        return cls(c, abs(float(np.float32(c)) - c))

    @classmethod
    def _rounded(cls, value, err) -> Bounded:
        return cls(value, err + U * (np.abs(value) + err) + ETA)

    def __add__(self, o):
        return Bounded._rounded(self.value + o.value, self.err + o.err)

    def __sub__(self, o):
        return Bounded._rounded(self.value - o.value, self.err + o.err)

    def __mul__(self, o):
        a, b, ea, eb = self.value, o.value, self.err, o.err
        return Bounded._rounded(a * b, np.abs(a) * eb + np.abs(b) * ea + ea * eb)

    def __truediv__(self, o):
        a, b, ea, eb = self.value, o.value, self.err, o.err
        assert np.all(eb < np.abs(b)), "denominator not bounded away from 0"
        return Bounded._rounded(a / b, (ea * np.abs(b) + np.abs(a) * eb) / (np.abs(b) * (np.abs(b) - eb)))

    def sqrt(self):
        root = np.sqrt(self.value)
        err = np.sqrt(self.err)
        pos = root > 0
        err[pos] = np.minimum(err[pos], self.err[pos] / root[pos])
        return Bounded._rounded(root, err)


def reference(cfg, theta0, grads, steps) -> dict:
    """Θ and the buffers after ``steps`` ((lr, grad_scale) per step), as :class:`Bounded`,
    written from the formulas in the kernels' order of operations."""
    c = Bounded.const
    theta = Bounded(theta0)
    zeros = Bounded(np.zeros(theta0.shape))
    if cfg.name in ("momentum", "nesterov"):
        v, mu = zeros, c(cfg.momentum)
        for g, (lr, gs) in zip(grads, steps):
            g, sc, decay = Bounded(g), c(-lr * gs), lr * cfg.weight_decay
            if cfg.name == "momentum":          # v = μv + (sg − dΘ); Θ += v
                v = v * mu + (g * sc - c(decay) * theta) if decay else v * mu + g * sc
                theta = theta + v
            else:                               # g' = sg − dΘ; v = μv + g'; Θ = (Θ + g') + μv
                g = g * sc - theta * c(decay) if decay else g * sc
                v = v * mu + g
                theta = (theta + g) + v * mu
        return {"theta": theta, "velocity": v}
    b1, b2 = cfg.betas
    m = v = zeros
    for t, (g, (lr, gs)) in enumerate(zip(grads, steps), start=1):
        g = Bounded(g) * c(gs)
        if cfg.weight_decay:
            g = g + theta * c(cfg.weight_decay)
        m = m + (g - m) * c(1.0 - b1)
        v = v * c(b2) + (g * c(1.0 - b2)) * g
        denom = v.sqrt() / c(math.sqrt(1.0 - b2 ** t)) + c(cfg.eps)
        theta = theta + (m * c(-lr / (1.0 - b1 ** t))) / denom
    return {"theta": theta, "exp_avg": m, "exp_avg_sq": v}


def outside_bound(result: dict, ref: dict) -> list[str]:
    """Names of the arrays of ``result`` not within their reference's bound (plus 2⁻⁴⁰
    relative: the float64 reference's own roundings)."""
    bad = []
    for name, r in ref.items():
        diff = np.abs(np.asarray(result[name], np.float64) - r.value)
        if not np.all(diff <= r.err + 2.0 ** -40 * np.abs(r.value)):
            bad.append(f"{name} (worst {np.max(diff / (r.err + 1e-300)):.3g}× its bound)")
    return bad


CASES = [
    ("momentum", {}), ("momentum", {"weight_decay": 1e-3}),
    ("nesterov", {}), ("nesterov", {"weight_decay": 1e-3}),
    ("adam", {}), ("adam", {"weight_decay": 1e-2, "betas": [0.8, 0.99], "eps": 1e-7}),
]
IDS = [f"{name}-wd" if extra.get("weight_decay") else name for name, extra in CASES]
# a changing rate, as schedules give: a warm-up's ε = 0 (the decay term off), a grad_scale of 1
# (Adam's NumPy update skips that multiply)
STEPS = [(0.0, 1 / 128), (0.05, 1 / 128), (0.04, 1.0), (0.02, 1 / 96), (0.01, 1 / 128)]


def draw(n, steps, seed=0):
    """Θ₀ and ΔΘ per step in float32, ΔΘ's entries of very different sizes (so that Adam's eps
    and bias corrections matter), some exactly zero."""
    rng = np.random.default_rng(seed)
    theta0 = rng.standard_normal(n).astype(np.float32)
    grads = [(rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 1, n)).astype(np.float32)
             for _ in range(steps)]
    grads[0][:10] = 0.0
    return theta0, grads


def numpy_run(cfg, theta0, grads, steps) -> dict:
    """The NumPy float32 update's Θ and buffers after ``steps``."""
    opt = make_optimizer(cfg, theta0.shape[0], np)
    theta = theta0.copy()
    for g, (lr, gs) in zip(grads, steps):
        opt.update(theta, g.copy(), lr, gs)
    return {"theta": theta, **opt.state_dict()}


def assert_same_bits(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name, strict=True)


@pytest.mark.parametrize("name,extra", CASES, ids=IDS)
def test_numpy_update_within_the_derived_bound(name, extra):
    """The bound the GPU tests use holds for the NumPy update, which the GPU must equal bit
    for bit, and is tight enough to catch a learning rate off by one part in 1000."""
    cfg = OptimizerConfig(name=name, **extra)
    theta0, grads = draw(20_011, len(STEPS))
    ref = reference(cfg, theta0, grads, STEPS)
    assert outside_bound(numpy_run(cfg, theta0, grads, STEPS), ref) == []
    off = [(lr * (1 + 1e-3), gs) for lr, gs in STEPS]
    assert outside_bound(numpy_run(cfg, theta0, grads, off), ref) != []


N = 3 * 65536 + 11      # not a multiple of the kernels' blocks


@pytest.mark.gpu
@pytest.mark.parametrize("name,extra", CASES, ids=IDS)
def test_gpu_update_equals_numpy_bit_for_bit(cupy, name, extra):
    cfg = OptimizerConfig(name=name, **extra)
    theta0, grads = draw(N, len(STEPS))
    want = numpy_run(cfg, theta0, grads, STEPS)
    opt = make_optimizer(cfg, N, cupy)
    theta = cupy.asarray(theta0)
    for g, (lr, gs) in zip(grads, STEPS):
        dg = cupy.asarray(g)
        opt.update(theta, dg, lr, gs)
        np.testing.assert_array_equal(dg.get(), g)          # ΔΘ left intact
    assert opt.t == len(STEPS)
    got = {"theta": theta.get(), **opt.state_dict()}
    assert_same_bits(got, want)
    assert outside_bound(got, reference(cfg, theta0, grads, STEPS)) == []


@pytest.mark.gpu
@pytest.mark.parametrize("name,extra", CASES, ids=IDS)
def test_graph_replays_read_the_scalars_prepared_before_each(cupy, name, extra):
    """A CUDA graph that captured ``launch`` once, replayed after ``prepare`` with each step's
    rate: the scalars come from device memory, not from the capture."""
    cfg = OptimizerConfig(name=name, **extra)
    theta0, grads = draw(N, len(STEPS))
    want = numpy_run(cfg, theta0, grads, STEPS)
    stream = cupy.cuda.Stream(non_blocking=True)        # capture needs a non-default stream
    with stream:
        opt = make_optimizer(cfg, N, cupy)
        theta, dg = cupy.asarray(theta0), cupy.empty(N, cupy.float32)
        kernel("updates", opt.gpu_kernel)                # compiled and loaded before capture
        hyper_ptr = opt.hyper.data.ptr
        stream.begin_capture()
        opt.launch(theta, dg)
        graph = stream.end_capture()
        for g, (lr, gs) in zip(grads, STEPS):
            dg.set(g, stream=stream)
            opt.prepare(lr, gs)
            graph.launch(stream)
            opt.t += 1
        stream.synchronize()
    assert opt.hyper.data.ptr == hyper_ptr
    assert_same_bits({"theta": theta.get(), **opt.state_dict()}, want)


SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
    const long long t0 = clock64();
    while (clock64() - t0 < cycles) {}
}
"""


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_host_runs_ahead_of_the_gpu(cupy, name):
    """Forty updates queued behind a kernel that keeps the GPU busy ~50 ms: the host writes
    each step's scalars while the earlier copies still wait, more steps than the pinned
    buffers, which it must not overwrite before the GPU has read them."""
    steps = [(0.01 * (1 + k % 7), 1 / (64 + k)) for k in range(40)]
    cfg = OptimizerConfig(name=name, weight_decay=1e-3)
    theta0, grads = draw(4099, len(steps), seed=1)
    want = numpy_run(cfg, theta0, grads, steps)
    opt = make_optimizer(cfg, theta0.shape[0], cupy)
    theta = cupy.asarray(theta0)
    dgs = [cupy.asarray(g) for g in grads]
    kernel("updates", opt.gpu_kernel)                        # compiled and loaded beforehand
    spin = cupy.RawKernel(SPIN, "spin")
    spin((1,), (1,), (np.int64(1),))
    cupy.cuda.get_current_stream().synchronize()
    spin((1,), (1,), (np.int64(100_000_000),))
    for dg, (lr, gs) in zip(dgs, steps):
        opt.update(theta, dg, lr, gs)
    assert_same_bits({"theta": theta.get(), **opt.state_dict()}, want)
