"""CUDA twins of the network's elementwise work (the CuPy path), mirroring ``nn/layer_kernels.py``.

The same fused passes as the numba twins, over the same feature-major (F-ordered) work
buffers, where column ``j`` of an ``(n, units)`` buffer is contiguous:

- ``bias_relu``: ``a = max(z + b, 0)`` (NaN passes through);
- ``relu_backward``: ``dz = da · [a > 0]`` and ``db`` = the column sums of ``dz``, one launch;
- ``bias_add``, ``column_sums``: the output layer's bias and its gradient;
- ``softmax_xent``: softmax, cross-entropy with :data:`~distffn.nn.objectives.P_CLIP`,
  ``dz = p − onehot(t)`` and the count of rows classified right, added into a device buffer.

float32 ``+ − * /`` are compiled without contraction (``distffn.cuda.DEFAULT_OPTIONS``), in the
twins' order, so ``a`` and ``dz`` of the hidden layers are the twins' bits (for normal floats:
CuPy flushes subnormals, ``distffn.cuda.CUPY_OPTIONS``). ``exp`` and ``log``
are evaluated in double and rounded once to float32 — the correctly rounded value in all but
astronomically rare cases, which glibc's ``expf``/``logf`` (the twins') also return nearly
always, where CUDA's ``expf`` is off by up to 2 ulp.

Sums (``db``, the loss, the count) are deterministic: float64 partials in a fixed order and a
fixed-shape shared-memory tree, no atomics, so the same inputs give the same bits on every run
(a CUDA graph's replays and a resumed run depend on it). Nothing is read back to the host.

Importing this module registers the source and imports no CuPy (it is imported on first
launch). Tests: ``tests/test_cuda_sources.py`` (compiles on any machine) and
``tests/gpu/test_layer_kernels_gpu.py``.
"""
from __future__ import annotations

import numpy as np

from ..cuda import kernel, register
from .activations import Activation, ReLU
from .objectives import P_CLIP, Objective, SoftmaxCrossEntropy

THREADS = 256            # every launch's block; the reductions' tree is shaped for it
MAX_GRID = 65535         # grid-stride loops cover the rest


def _f32_literal(x: float) -> str:
    # nine significant digits give a float32 back exactly
    return f"{float(np.float32(x)):.9g}f"


SOURCE = r"""
#define THREADS @THREADS@
#define P_LO @P_LO@
#define P_HI @P_HI@

// Sum of one double per thread of the block, in a fixed order (deterministic); every thread
// of the block must call it; the result is valid in every thread.
__device__ __forceinline__ double block_sum(double s, double* shared) {
    const int t = threadIdx.x;
    shared[t] = s;
    __syncthreads();
    for (int h = THREADS / 2; h > 0; h >>= 1) {
        if (t < h) shared[t] += shared[t + h];
        __syncthreads();
    }
    const double total = shared[0];
    __syncthreads();   // shared is reused by the caller's next round
    return total;
}

// float32 exp/log rounded once from double (see the module docstring)
__device__ __forceinline__ float exp_f32(float x) { return (float)exp((double)x); }
__device__ __forceinline__ float log_f32(float x) { return (float)log((double)x); }

extern "C" {

// a = max(z + b, 0) on F-ordered (n, m); NaN passes through. grid.x: rows, grid.y: columns
__global__ void bias_relu(const float* __restrict__ z, const float* __restrict__ b,
                          float* __restrict__ a, long long n, long long m) {
    for (long long j = blockIdx.y; j < m; j += gridDim.y) {
        const float bj = b[j];
        const long long col = j * n;
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
             i += (long long)gridDim.x * blockDim.x) {
            const float v = z[col + i] + bj;
            a[col + i] = v <= 0.0f ? 0.0f : v;
        }
    }
}

// z += b on every row of F-ordered (n, m). grid.x: rows, grid.y: columns
__global__ void bias_add(float* __restrict__ z, const float* __restrict__ b,
                         long long n, long long m) {
    for (long long j = blockIdx.y; j < m; j += gridDim.y) {
        const float bj = b[j];
        const long long col = j * n;
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
             i += (long long)gridDim.x * blockDim.x)
            z[col + i] = z[col + i] + bj;
    }
}

// dz = da * [a > 0] and db[j] = sum over rows of dz[:, j]. One block per column (grid-stride)
__global__ void relu_backward(const float* __restrict__ a, const float* __restrict__ da,
                              float* __restrict__ dz, float* __restrict__ db,
                              long long n, long long m) {
    __shared__ double partial[THREADS];
    for (long long j = blockIdx.x; j < m; j += gridDim.x) {
        const long long col = j * n;
        double s = 0.0;
        for (long long i = threadIdx.x; i < n; i += THREADS) {
            const float v = da[col + i] * (a[col + i] > 0.0f ? 1.0f : 0.0f);
            dz[col + i] = v;
            s += (double)v;
        }
        const double total = block_sum(s, partial);
        if (threadIdx.x == 0) db[j] = (float)total;
    }
}

// db[j] = sum over rows of dz[:, j]. One block per column (grid-stride)
__global__ void column_sums(const float* __restrict__ dz, float* __restrict__ db,
                            long long n, long long m) {
    __shared__ double partial[THREADS];
    for (long long j = blockIdx.x; j < m; j += gridDim.x) {
        const long long col = j * n;
        double s = 0.0;
        for (long long i = threadIdx.x; i < n; i += THREADS) s += (double)dz[col + i];
        const double total = block_sum(s, partial);
        if (threadIdx.x == 0) db[j] = (float)total;
    }
}

// One thread a row of F-ordered (n, k) logits: softmax, -log of the clipped true-class
// probability into rows[i], 1 or 0 (arg-max == labels[i]) into rows[n + i]; dz = p - onehot(t)
// when want_grad, else dz only holds exp(z - max) (scratch). The twin's operation order.
__global__ void softmax_xent_rows(const float* __restrict__ z, const long long* __restrict__ t,
                                  float* __restrict__ dz, const long long* __restrict__ labels,
                                  double* __restrict__ rows, long long n, long long k,
                                  int want_grad, int want_correct) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float zmax = z[i];
        long long best = 0;
        for (long long j = 1; j < k; ++j) {
            const float v = z[j * n + i];
            if (v > zmax) { zmax = v; best = j; }
        }
        float total = 0.0f;
        for (long long j = 0; j < k; ++j) {
            const float e = exp_f32(z[j * n + i] - zmax);
            dz[j * n + i] = e;
            total = total + e;
        }
        const long long ti = t[i];
        if (ti < 0 || ti >= k) {          // never for checked targets: no write out of bounds
            rows[i] = __longlong_as_double(0x7ff8000000000000LL);   // NaN
            rows[n + i] = 0.0;
            continue;
        }
        const float pt = dz[ti * n + i] / total;
        const float clipped = pt < P_LO ? P_LO : (pt > P_HI ? P_HI : pt);   // NaN stays (np.clip)
        rows[i] = -(double)log_f32(clipped);
        if (want_grad) {
            for (long long j = 0; j < k; ++j) dz[j * n + i] = dz[j * n + i] / total;
            dz[ti * n + i] = dz[ti * n + i] - 1.0f;
        }
        rows[n + i] = (want_correct && best == labels[i]) ? 1.0 : 0.0;
    }
}

// totals[0] += sum of rows[0:n], totals[1] += sum of rows[n:2n]; one block of THREADS, fixed order
__global__ void softmax_xent_total(const double* __restrict__ rows, double* __restrict__ totals,
                                   long long n) {
    __shared__ double partial[THREADS];
    double loss = 0.0, right = 0.0;
    for (long long i = threadIdx.x; i < n; i += THREADS) {
        loss += rows[i];
        right += rows[n + i];
    }
    loss = block_sum(loss, partial);
    right = block_sum(right, partial);
    if (threadIdx.x == 0) {
        totals[0] = totals[0] + loss;
        totals[1] = totals[1] + right;
    }
}

}  // extern "C"
""".replace("@THREADS@", str(THREADS)).replace("@P_LO@", _f32_literal(P_CLIP[0])) \
   .replace("@P_HI@", _f32_literal(P_CLIP[1]))

ENTRIES = ("bias_relu", "bias_add", "relu_backward", "column_sums", "softmax_xent_rows",
           "softmax_xent_total")
register("layers", SOURCE, ENTRIES)


def _feature_major(name: str, x, shape=None):
    # the kernels index column-major: anything else would be read wrongly, so refuse it
    if x.dtype != np.float32 or x.ndim != 2 or not x.flags.f_contiguous:
        raise TypeError(f"{name}: expected an F-ordered 2-D float32 array, got {x.dtype} "
                        f"{x.shape} ({'F' if x.flags.f_contiguous else 'not F'}-contiguous)")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {x.shape}")


def _vector(name: str, x, size: int, dtype=np.float32):
    if x.dtype != dtype or x.ndim != 1 or x.size != size or not x.flags.c_contiguous:
        raise TypeError(f"{name}: expected a contiguous {np.dtype(dtype)} vector of {size}, "
                        f"got {x.dtype} {x.shape}")


def _grid_2d(n: int, m: int) -> tuple[tuple[int, int], tuple[int]]:
    # grid.x covers the rows of a column, grid.y the columns (both grid-stride beyond MAX_GRID)
    return (min(max(1, -(-n // THREADS)), MAX_GRID), min(max(1, m), MAX_GRID)), (THREADS,)


def bias_relu(z, b, a) -> None:
    """``a = max(z + b, 0)`` (NaN passes through, as ``np.maximum``); ``z`` is left as is.
    ``z``, ``a``: F-ordered (n, m) float32 CuPy arrays; ``b``: float32 (m,)."""
    n, m = z.shape
    _feature_major("bias_relu z", z)
    _feature_major("bias_relu a", a, z.shape)
    _vector("bias_relu b", b, m)
    grid, block = _grid_2d(n, m)
    kernel("layers", "bias_relu")(grid, block, (z, b, a, np.int64(n), np.int64(m)))


def bias_add(z, b) -> None:
    """``z += b`` on every row (the output layer, an activation without a fused twin)."""
    n, m = z.shape
    _feature_major("bias_add z", z)
    _vector("bias_add b", b, m)
    grid, block = _grid_2d(n, m)
    kernel("layers", "bias_add")(grid, block, (z, b, np.int64(n), np.int64(m)))


def relu_backward(a, da, dz, db) -> None:
    """``dz = da · [a > 0]`` and ``db = Σ_rows dz`` (float64 sums, stored as float32) in one
    launch; deterministic. ``a``, ``da``, ``dz``: F-ordered (n, m); ``db``: (m,)."""
    n, m = a.shape
    for name, x in (("a", a), ("da", da), ("dz", dz)):
        _feature_major(f"relu_backward {name}", x, a.shape)
    _vector("relu_backward db", db, m)
    kernel("layers", "relu_backward")((min(max(1, m), MAX_GRID),), (THREADS,),
                                      (a, da, dz, db, np.int64(n), np.int64(m)))


def column_sums(dz, db) -> None:
    """``db = Σ_rows dz`` (float64 sums in a fixed order, stored as float32): the bias
    gradient where the activation has no fused backward."""
    n, m = dz.shape
    _feature_major("column_sums dz", dz)
    _vector("column_sums db", db, m)
    kernel("layers", "column_sums")((min(max(1, m), MAX_GRID),), (THREADS,),
                                    (dz, db, np.int64(n), np.int64(m)))


def _class_ids(ids):
    # int64 and contiguous pass as they are; other integer labels (a dataset's own) are copied
    if ids.dtype == np.int64 and ids.flags.c_contiguous:
        return ids
    if ids.dtype.kind not in "iu":
        raise TypeError(f"softmax_xent: class ids must be integers, got {ids.dtype}")
    import cupy
    return cupy.ascontiguousarray(ids.astype(np.int64))


_ROWS: dict = {}      # (device, n) -> float64 (2n,) per-row partials, kept: a graph may hold it


def _row_scratch(n: int):
    import cupy
    key = (cupy.cuda.Device().id, n)
    rows = _ROWS.get(key)
    if rows is None:
        rows = _ROWS[key] = cupy.empty(2 * n, np.float64)
    return rows


def softmax_xent(z, t, dz, labels, want_grad, want_correct, totals) -> None:
    """Cross-entropy of ``softmax(z)`` against class ids ``t``: ``totals[0] +=`` its sum over
    the rows (float64), ``totals[1] +=`` the number of rows whose arg-max equals ``labels``
    when ``want_correct`` (else 0); ``dz = p − onehot(t)`` when ``want_grad`` (else ``dz`` is
    scratch, overwritten). ``z``, ``dz``: F-ordered (n, k) float32; ``t``, ``labels``: int64
    (n,) (other integer types are copied first; pass ``t`` as ``labels`` when not counting);
    ``totals``: float64 (2,) on the device.
    Two launches, nothing read back; deterministic (per-row partials, a fixed-order sum)."""
    n, k = z.shape
    _feature_major("softmax_xent z", z)
    _feature_major("softmax_xent dz", dz, z.shape)
    t, labels = _class_ids(t), _class_ids(labels)
    _vector("softmax_xent t", t, n, np.int64)
    _vector("softmax_xent labels", labels, n, np.int64)
    _vector("softmax_xent totals", totals, 2, np.float64)
    if n == 0:
        return
    rows = _row_scratch(n)
    grid = (min(-(-n // THREADS), MAX_GRID),)
    kernel("layers", "softmax_xent_rows")(
        grid, (THREADS,), (z, t, dz, labels, rows, np.int64(n), np.int64(k),
                           np.int32(bool(want_grad)), np.int32(bool(want_correct))))
    kernel("layers", "softmax_xent_total")((1,), (THREADS,), (rows, totals, np.int64(n)))


# The activations and output/loss pairs with twins here (exact classes, as in layer_kernels).
_HIDDEN = {ReLU: (bias_relu, relu_backward)}
_LOSS = {SoftmaxCrossEntropy: softmax_xent}


def hidden_twin(activation: Activation):
    """``(bias_forward(z, b, a), backward(a, da, dz, db))`` for ``activation``, or None."""
    return _HIDDEN.get(type(activation))


def loss_twin(objective: Objective):
    """``(z, t, dz, labels, want_grad, want_correct, totals) -> None`` for ``objective``, or None."""
    return _LOSS.get(type(objective))
