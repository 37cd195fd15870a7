"""The CUDA layer kernels and the 8-bit gather on a GPU, against float64 NumPy references.

Tolerances are derived, not tuned. ``U = 2**-24`` is float32's unit roundoff: one IEEE
operation returns ``x(1 + δ)`` with ``|δ| ≤ U``; a sum of m terms in any order is within
``γ_m = mU / (1 − mU)`` times the sum of their magnitudes (Higham, Accuracy and Stability of
Numerical Algorithms, §3.1). ``exp``/``log`` are not IEEE operations: the kernels round a
double-precision value once (≤ 0.5 ulp), CUDA's ``expf``/``logf`` are within 2 and 1 ulp and
NumPy's SIMD float32 ``exp``/``log`` within a few; :data:`EXP_U`/:data:`LOG_U` allow 4 ulp
(8 U) for either library. A float64 reference's own error (≤ 2**-53 an operation) is
counted where it is not negligible. The test data hold no subnormals, where the GPU's
float32 arithmetic (flushing them) and NumPy's part.
"""
from __future__ import annotations

import numpy as np
import pytest

from distffn.data.byte_images import ByteImages
from distffn.jobspec import ModelConfig
from distffn.nn.model import MLP
from distffn.nn.objectives import P_CLIP

pytestmark = pytest.mark.gpu

U = 2.0 ** -24                  # float32 unit roundoff
U64 = 2.0 ** -53                # float64 unit roundoff
# CuPy compiles with -ftz=true (distffn.cuda.CUPY_OPTIONS): a float32 result under 2**-126 may
# be flushed to zero, so that is every float32 result's absolute floor (NumPy's is 2**-150)
FLUSH = 2.0 ** -126
EXP_U = LOG_U = 8               # exp/log in units of U: 4 ulp (an ulp is at most 2 U)
LO, HI = np.float32(P_CLIP[0]), np.float32(P_CLIP[1])


def gamma(m):
    """Bound on the relative error of an m-term float32 sum (or dot product), any order."""
    return m * U / (1 - m * U)


# ---------------------------------------------------------------------------- helpers
def feature_major(rng, shape, scale=1.0):
    """A host F-ordered float32 array like the model's work buffers, with exact ±0."""
    a = np.asfortranarray((scale * rng.standard_normal(shape)).astype(np.float32))
    a.flat[::17] = 0.0
    a.flat[5::23] = -0.0
    return a


def to_device_f(cupy, a):
    d = cupy.asfortranarray(cupy.asarray(a))
    assert d.flags.f_contiguous
    return d


def assert_within(got, want, tol, what):
    """``|got − want| ≤ tol`` elementwise (NaN where ``want`` is NaN)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaN positions")
    ok = np.isnan(want) | (np.abs(got - want) <= tol)
    if not ok.all():
        i = np.flatnonzero(~ok.ravel())[:5]
        raise AssertionError(f"{what}: {(~ok).sum()} of {ok.size} entries off by more than the bound; "
                             f"got {got.ravel()[i]}, want {want.ravel()[i]}, bound {np.broadcast_to(tol, ok.shape).ravel()[i]}")


def column_sum_bound(dz64):
    """db = Σ dz in double (any fixed order), then stored as float32: one float32 rounding of the
    sum (U·|S|) plus the double sums' error, ours and the reference's (n·2**-53·Σ|dz| each)."""
    n = dz64.shape[0]
    return U * np.abs(dz64.sum(axis=0)) + 2 * n * U64 * np.abs(dz64).sum(axis=0)


SHAPES = [(1, 33), (257, 40), (3, 70000)]     # one row; several blocks a column; >65535 columns


# ---------------------------------------------------------------------------- hidden layers
@pytest.mark.parametrize("shape", SHAPES)
def test_bias_relu_and_bias_add(cupy, shape):
    from distffn.nn import cuda_layer_kernels as k
    rng = np.random.default_rng(shape[0])
    z, b = feature_major(rng, shape), rng.standard_normal(shape[1]).astype(np.float32)
    z[0, 0] = np.nan
    ref = z.astype(np.float64) + b                   # exact: two float32 fit in a double's sum
    tol = U * np.abs(ref)                            # one rounding of the sum; max(·, 0) is exact
    dz, db = to_device_f(cupy, z), cupy.asarray(b)
    da = cupy.empty(shape, np.float32, order="F")
    k.bias_relu(dz, db, da)
    a = da.get()
    assert_within(a, np.where(ref <= 0, 0.0, ref), tol, "bias_relu")
    np.testing.assert_array_equal(a, np.maximum(z + b, np.float32(0)))   # NumPy's bits (no FMA)
    np.testing.assert_array_equal(dz.get(), z)                          # z is not written
    k.bias_add(dz, db)
    assert_within(dz.get(), ref, tol, "bias_add")
    np.testing.assert_array_equal(dz.get(), z + b)


@pytest.mark.parametrize("shape", SHAPES)
def test_relu_backward_and_column_sums(cupy, shape):
    from distffn.nn import cuda_layer_kernels as k
    rng = np.random.default_rng(shape[0] + 1)
    a = np.maximum(feature_major(rng, shape), np.float32(0))
    da = feature_major(rng, shape)
    ref = da.astype(np.float64) * (a > 0)            # a product by 1 or 0 is exact: no tolerance
    dev = [to_device_f(cupy, x) for x in (a, da)]
    ddz = cupy.empty(shape, np.float32, order="F")
    ddb = cupy.full(shape[1], np.nan, np.float32)
    k.relu_backward(*dev, ddz, ddb)
    np.testing.assert_array_equal(ddz.get(), ref.astype(np.float32))
    assert_within(ddb.get(), ref.sum(axis=0), column_sum_bound(ref), "relu_backward db")
    first = ddb.get()
    k.relu_backward(*dev, ddz, ddb)                  # deterministic: the same bits again
    np.testing.assert_array_equal(ddb.get().view(np.uint32), first.view(np.uint32))
    sums = cupy.full(shape[1], np.nan, np.float32)
    k.column_sums(to_device_f(cupy, da), sums)
    d64 = da.astype(np.float64)
    assert_within(sums.get(), d64.sum(axis=0), column_sum_bound(d64), "column_sums")


# ---------------------------------------------------------------------------- softmax + xent
def softmax_case(n=1000, k=10, seed=0):
    """Logits with rows of every scale, one at ±1000, one tied, one whose true class has a
    probability under the clip; targets and labels that agree with the arg-max on about half."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.1, 8.0, (n, 1))
    z = (scale * rng.standard_normal((n, k))).astype(np.float32)
    t = rng.integers(0, k, n).astype(np.int64)
    z[0] = -1000.0
    z[0, 3] = 1000.0
    z[1] = 0.5                                        # tie: the first column wins
    z[2] = 0.0
    z[2, (t[2] + 1) % k] = 40.0                       # p[t] ≈ e^-40 < 1e-7: clipped
    labels = np.where(rng.random(n) < 0.5, z.argmax(axis=1), t).astype(np.int64)
    labels[1] = 0                                     # counted only if the tie goes to the first
    return np.asfortranarray(z), t, labels


def softmax_reference(z):
    """p in float64 and, per row, the bound on the kernel's relative error of every p_j.

    With D = max_j |z_j − max z| of the row: d_j = fl(z_j − zmax) is off by ≤ D·U, which
    exp turns into a relative D·U; exp's own error EXP_U·U; the k-term float32 sum of
    positives adds γ_(k−1) ≈ (k−1)U; the division one U. e_j and the total both carry the first
    two, so p_j = e_j / total is within (2D + 2·EXP_U + k)U, +1 U for second-order terms."""
    z64 = z.astype(np.float64)
    d = z64 - z64.max(axis=1, keepdims=True)
    e = np.exp(d)
    p = e / e.sum(axis=1, keepdims=True)
    rel = (2 * -d.min(axis=1) + 2 * EXP_U + z.shape[1] + 1) * U
    return p, rel


@pytest.mark.parametrize("want_grad,want_correct,label_type",
                         [(True, True, np.int64), (False, True, np.uint8), (True, False, np.int64)])
def test_softmax_xent(cupy, want_grad, want_correct, label_type):
    from distffn.nn import cuda_layer_kernels as k
    z, t, labels = softmax_case()
    n = len(t)
    p, rel = softmax_reference(z)
    rows = np.arange(n)
    # The clip is monotone, so it does not grow an error; −log turns p_t's relative error into
    # an absolute one (d log p = dp/p), and log's own rounding is LOG_U·U of the result. The
    # rows add up in double: n·2**-53 of the sum, twice (ours and the reference's).
    loss_rows = -np.log(np.clip(p[rows, t], LO, HI))
    loss_tol = (rel + LOG_U * U * loss_rows).sum() + 2 * n * U64 * loss_rows.sum()
    start = np.array([3.5, 2.0])                      # the kernel adds into totals
    totals = cupy.asarray(start)
    dzd = cupy.full(z.shape, np.nan, np.float32, order="F")
    dt, dl = cupy.asarray(t), cupy.asarray(labels.astype(label_type))   # a dataset's own labels
    k.softmax_xent(to_device_f(cupy, z), dt, dzd, dl if want_correct else dt, want_grad, want_correct, totals)
    got = totals.get()
    assert_within(got[0] - start[0], loss_rows.sum(), loss_tol, "loss sum")
    right = int((z.argmax(axis=1) == labels).sum()) if want_correct else 0
    assert got[1] - start[1] == right
    if want_grad:
        # dz_j = p_j − [j = t]: p_j's relative error, one more rounding for the subtraction
        want = p.copy()
        want[rows, t] -= 1.0
        assert_within(dzd.get(), want, rel[:, None] * p + U * np.abs(want) + FLUSH, "dz")


def test_softmax_xent_is_deterministic(cupy):
    from distffn.nn import cuda_layer_kernels as k
    z, t, labels = softmax_case(n=20000, seed=1)      # many blocks of rows, one reduction
    dz_, dt, dl = to_device_f(cupy, z), cupy.asarray(t), cupy.asarray(labels)
    out = []
    for _ in range(2):
        totals = cupy.zeros(2, np.float64)
        grad = cupy.empty(z.shape, np.float32, order="F")
        k.softmax_xent(dz_, dt, grad, dl, True, True, totals)
        out.append((totals.get().tobytes(), grad.get().tobytes()))
    assert out[0] == out[1]


# ---------------------------------------------------------------------------- 8-bit gather
def test_take_rows_gives_byte_images_take_bit_for_bit(cupy):
    from distffn.data.cuda_gather_kernels import take_rows
    rng = np.random.default_rng(5)
    images = ByteImages(rng.integers(0, 256, (500, 784), dtype=np.uint8))
    images.standardize(np.float32(0.2860), np.float32(0.3530))
    idx = np.concatenate([rng.integers(0, 500, 300), [0, 499, 499, -3, 505]]).astype(np.int64)
    want = images.take(idx, np.empty((len(idx), 784), np.float32))      # clips -3 and 505 as NumPy does
    out = cupy.full((len(idx), 784), np.nan, np.float32)
    take_rows(cupy.asarray(images.codes), cupy.asarray(images.table), cupy.asarray(idx), out)
    np.testing.assert_array_equal(out.get().view(np.uint32), want.view(np.uint32))


# ---------------------------------------------------------------------------- the model
def model_bounds(p, x, t, labels):
    """A 64-128-10 ReLU softmax net's float64 loss sum and gradients, with bounds on how far a
    float32 computation of them may be (the GPU's or NumPy's).

    Forward error analysis elementwise, carried through the layers (magnitude products in
    float64): Z = A·W + b has ``|ΔZ| ≤ |ΔA|·|W| + γ_(K+1)(|A| + |ΔA|)·|W| + γ_(K+1)|b|``;
    ReLU is 1-Lipschitz. Logits off by at most δ in a row move every p_j by a factor within
    e^(±2δ) and −log p_t by at most 2δ; the softmax kernel's own rounding is as in
    :func:`softmax_reference`. A product Aᵀ·B of perturbed factors is off by
    ``|ΔA|ᵀ|B| + |A|ᵀ|ΔB| + |ΔA|ᵀ|ΔB| + γ_m(|A| + |ΔA|)ᵀ(|B| + |ΔB|)``. Where a hidden
    pre-activation is within its bound of 0 the two sides may take different ReLU branches:
    there dZ may be either value, so its bound is the whole |dA| plus dA's error.
    A final 1 % covers the second-order terms the first-order bounds leave out."""
    w0, b0, w1, b1 = (p[k].astype(np.float64) for k in ("W0", "b0", "W1", "b1"))
    x = x.astype(np.float64)
    n, k0 = x.shape
    k1, c = w1.shape
    z0 = x @ w0 + b0
    ez0 = gamma(k0 + 1) * (np.abs(x) @ np.abs(w0) + np.abs(b0))
    a0 = np.maximum(z0, 0)
    ea0 = ez0
    z1 = a0 @ w1 + b1
    ez1 = ea0 @ np.abs(w1) + gamma(k1 + 1) * ((np.abs(a0) + ea0) @ np.abs(w1) + np.abs(b1))
    delta = ez1.max(axis=1)
    # the softmax kernel sees logits whose row range is at most 2δ wider
    d = z1 - z1.max(axis=1, keepdims=True)
    rel = (2 * (-d.min(axis=1) + 2 * delta) + 2 * EXP_U + c + 1) * U
    e = np.exp(d)
    prob = e / e.sum(axis=1, keepdims=True)
    rows = np.arange(n)
    loss_rows = -np.log(np.clip(prob[rows, t], LO, HI))
    loss_tol = (2 * delta + rel + LOG_U * U * loss_rows).sum() + gamma(n) * loss_rows.sum()
    dz1 = prob.copy()
    dz1[rows, t] -= 1.0
    grow = (1 + rel[:, None]) * np.exp(2 * delta[:, None]) - 1
    edz1 = grow * prob + U * np.abs(dz1) + FLUSH

    def product_bound(a, ea, b, eb, m):
        aa, bb = np.abs(a), np.abs(b)
        return ea.T @ bb + aa.T @ eb + ea.T @ eb + gamma(m) * (aa + ea).T @ (bb + eb)

    def sum_bound(dz, edz):
        return edz.sum(axis=0) + gamma(dz.shape[0]) * (np.abs(dz) + edz).sum(axis=0)

    dw1 = a0.T @ dz1
    edw1 = product_bound(a0, ea0, dz1, edz1, n)
    da0 = dz1 @ w1.T
    eda0 = edz1 @ np.abs(w1).T + gamma(c) * (np.abs(dz1) + edz1) @ np.abs(w1).T
    sure = np.abs(z0) > ez0                          # the ReLU branch both sides take
    dz0 = da0 * (z0 > 0)
    edz0 = np.where(sure, eda0 * (z0 > 0), np.abs(da0) + eda0)
    dw0 = x.T @ dz0
    edw0 = product_bound(x, np.zeros_like(x), dz0, edz0, n)
    slack = 1.01
    want = {"loss": (loss_rows.sum(), slack * loss_tol),
            "W0": (dw0, slack * edw0), "b0": (dz0.sum(axis=0), slack * sum_bound(dz0, edz0)),
            "W1": (dw1, slack * edw1), "b1": (dz1.sum(axis=0), slack * sum_bound(dz1, edz1))}
    # rows whose top two logits are within 2δ may be classified either way
    top = np.sort(z1, axis=1)
    unsure = int((top[:, -1] - top[:, -2] <= 2 * delta).sum())
    right = int((z1.argmax(axis=1) == labels).sum())
    return want, right, unsure


def test_model_loss_and_grad_on_the_gpu_matches_numpy(cupy):
    from distffn.xp import set_tf32
    set_tf32(cupy, False)                            # plain float32 products: the bounds assume them
    cfg = ModelConfig(layers=[64, 128, 10], activation="relu", output="softmax", loss="cross_entropy")
    rng = np.random.default_rng(7)
    cpu = MLP(cfg, np, dtype=np.float32)
    gpu = MLP(cfg, cupy, dtype=np.float32)
    flat = np.empty(cpu.num_params, np.float32)
    cpu.init_params(flat, seed=3)
    views = cpu.layout.views(flat)
    views["b0"][...] = rng.normal(0, 0.1, views["b0"].shape)     # biases exercised too
    views["b1"][...] = rng.normal(0, 0.1, views["b1"].shape)
    n = 256
    x = rng.standard_normal((n, 64)).astype(np.float32)
    t = rng.integers(0, 10, n).astype(np.int64)
    want, right, unsure = model_bounds(views, x, t, t)

    g_cpu = np.full(cpu.num_params, np.nan, np.float32)
    loss_cpu, correct_cpu = cpu.loss_and_grad(views, cpu.layout.views(g_cpu), x, t, t)
    g_dev = cupy.full(gpu.num_params, np.nan, np.float32)
    loss_dev, correct_dev = gpu.loss_and_grad(gpu.layout.views(cupy.asarray(flat)), gpu.layout.views(g_dev),
                                              cupy.asarray(x), cupy.asarray(t), cupy.asarray(t))
    # device scalars: nothing was read back inside loss_and_grad
    assert isinstance(loss_dev, cupy.ndarray) and loss_dev.shape == ()
    assert isinstance(correct_dev, cupy.ndarray) and correct_dev.shape == ()
    got_gpu = {"loss": float(loss_dev), **gpu.layout.views(g_dev.get())}
    got_cpu = {"loss": float(loss_cpu), **cpu.layout.views(g_cpu)}
    again, _ = gpu.loss_and_grad(gpu.layout.views(cupy.asarray(flat)), gpu.layout.views(g_dev),
                                 cupy.asarray(x), cupy.asarray(t), cupy.asarray(t))
    assert float(again) == got_gpu["loss"]           # the sum restarts each call, same bits
    for name, (ref, bound) in want.items():
        assert_within(got_cpu[name], ref, bound, f"NumPy {name}")       # the bound holds for NumPy
        assert_within(got_gpu[name], ref, bound, f"GPU {name}")
        assert_within(got_gpu[name], got_cpu[name], 2 * bound, f"GPU vs NumPy {name}")
    assert abs(float(correct_dev) - right) <= unsure
    assert abs(int(correct_cpu) - right) <= unsure
