"""CUDA twins of the optimizers' updates over the flat float32 buffers (the CuPy path).

One kernel per optimizer, one pass over Θ, its buffers and ΔΘ, doing the numba twins'
(``optim/update_kernels.py``) float32 operations in the same order. Compiled without
fused multiply-adds (``distffn.cuda.DEFAULT_OPTIONS``), with IEEE division and ``sqrtf``
(NVRTC's defaults), every operation rounds as NumPy's, so Θ and the buffers come out bit for
bit equal to the NumPy and numba updates (``tests/gpu/test_update_kernels_gpu.py``).

Every scalar of an update (learning rate, scales, Adam's bias corrections, whether the decay
term is on) is read from ``hyper``, a small float32 array in device memory, not passed by
value: a CUDA graph that captured a launch reads whatever the host wrote into ``hyper`` before
each replay (:class:`DeviceScalars`). Like the numba twins the kernels leave ``grad`` intact.
Importing this module registers the source and imports no CuPy.
"""
from __future__ import annotations

import numpy as np

from ..cuda import blocks, kernel, register

# The slots of ``hyper``, in order: the numba twin's scalar arguments (as float32), then 1 or
# 0 for whether the decay branch runs (decided on the host from the float64 value, as the
# twins decide it, so that a decay too small for float32 still takes the same branch).
MOMENTUM_SLOTS = ("momentum", "scale", "decay", "decay_on")
NESTEROV_SLOTS = MOMENTUM_SLOTS
ADAM_SLOTS = ("grad_scale", "weight_decay", "one_minus_b1", "b2", "one_minus_b2", "bc2_sqrt",
              "eps", "neg_step_size", "decay_on")
SLOTS = {"momentum_update": MOMENTUM_SLOTS, "nesterov_update": NESTEROV_SLOTS,
         "adam_update": ADAM_SLOTS}

SOURCE = r"""
// Grid-stride loops over n elements; the operation order of each line is the numba twin's.
#define DISTFFN_FOR_EACH(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)gridDim.x * blockDim.x)

extern "C" {

// v = mu*v + scale*g - decay*theta; theta += v.  hyper: mu, scale, decay, decay_on
__global__ void momentum_update(float* __restrict__ theta, float* __restrict__ velocity,
                                const float* __restrict__ grad, const float* __restrict__ hyper,
                                long long n) {
    const float mu = hyper[0], sc = hyper[1], dc = hyper[2];
    if (hyper[3] != 0.0f) {
        DISTFFN_FOR_EACH(i, n) {
            const float v = velocity[i] * mu + (grad[i] * sc - dc * theta[i]);
            velocity[i] = v;
            theta[i] = theta[i] + v;
        }
    } else {
        DISTFFN_FOR_EACH(i, n) {
            const float v = velocity[i] * mu + grad[i] * sc;
            velocity[i] = v;
            theta[i] = theta[i] + v;
        }
    }
}

// g' = scale*g - decay*theta; v = mu*v + g'; theta += g' + mu*v.  hyper: as momentum_update
__global__ void nesterov_update(float* __restrict__ theta, float* __restrict__ velocity,
                                const float* __restrict__ grad, const float* __restrict__ hyper,
                                long long n) {
    const float mu = hyper[0], sc = hyper[1], dc = hyper[2];
    if (hyper[3] != 0.0f) {
        DISTFFN_FOR_EACH(i, n) {
            const float g = grad[i] * sc - theta[i] * dc;
            const float v = velocity[i] * mu + g;
            velocity[i] = v;
            theta[i] = (theta[i] + g) + v * mu;
        }
    } else {
        DISTFFN_FOR_EACH(i, n) {
            const float g = grad[i] * sc;
            const float v = velocity[i] * mu + g;
            velocity[i] = v;
            theta[i] = (theta[i] + g) + v * mu;
        }
    }
}

// PyTorch's Adam step.  hyper: grad_scale, weight_decay, 1-b1, b2, 1-b2, sqrt(1-b2^t), eps,
// -lr/(1-b1^t), decay_on
__global__ void adam_update(float* __restrict__ theta, float* __restrict__ exp_avg,
                            float* __restrict__ exp_avg_sq, const float* __restrict__ grad,
                            const float* __restrict__ hyper, long long n) {
    const float gs = hyper[0], wd = hyper[1], omb1 = hyper[2], b2 = hyper[3], omb2 = hyper[4];
    const float bc2 = hyper[5], eps = hyper[6], nss = hyper[7];
    const bool decay = hyper[8] != 0.0f;
    DISTFFN_FOR_EACH(i, n) {
        const float p = theta[i];
        const float g = decay ? grad[i] * gs + p * wd : grad[i] * gs;
        const float m = exp_avg[i] + (g - exp_avg[i]) * omb1;
        exp_avg[i] = m;
        const float v = exp_avg_sq[i] * b2 + (g * omb2) * g;
        exp_avg_sq[i] = v;
        theta[i] = p + (m * nss) / (sqrtf(v) / bc2 + eps);
    }
}

}  // extern "C"
"""

register("updates", SOURCE, ("momentum_update", "nesterov_update", "adam_update"))


def _launch(entry: str, arrays, hyper) -> None:
    # only launches (on the current stream): a CUDA graph that captures this replays it whole
    n = arrays[0].size
    for a in (*arrays, hyper):
        if a.dtype != np.float32 or not a.flags.c_contiguous:
            raise TypeError(f"{entry}: expected contiguous float32 arrays, got {a.dtype}")
    if any(a.size != n for a in arrays):
        raise ValueError(f"{entry}: buffers of different lengths {[a.size for a in arrays]}")
    grid, block = blocks(n)
    kernel("updates", entry)(grid, block, (*arrays, hyper, np.int64(n)))


def momentum_update(theta, velocity, grad, hyper) -> None:
    """Momentum SGD in place on CuPy float32 vectors; ``hyper`` holds :data:`MOMENTUM_SLOTS`."""
    _launch("momentum_update", (theta, velocity, grad), hyper)


def nesterov_update(theta, velocity, grad, hyper) -> None:
    """Nesterov momentum in place; ``hyper`` holds :data:`NESTEROV_SLOTS`."""
    _launch("nesterov_update", (theta, velocity, grad), hyper)


def adam_update(theta, exp_avg, exp_avg_sq, grad, hyper) -> None:
    """Adam in place on CuPy float32 vectors; ``hyper`` holds :data:`ADAM_SLOTS`."""
    _launch("adam_update", (theta, exp_avg, exp_avg_sq, grad), hyper)


class DeviceScalars:
    """A float32 vector in device memory (:attr:`device`) that the host rewrites every step
    without waiting for the GPU.

    :meth:`write` copies the values from pinned host memory on the current stream, so the copy
    is ordered after the kernels already queued there and before the next launch. Each write
    uses the next of ``slots`` pinned buffers and first waits for that buffer's previous copy
    (an event), so the host never overwrites a buffer the GPU has not read yet; it blocks only
    when the GPU falls ``slots`` steps behind. ``device`` is allocated once and never moves,
    which a captured CUDA graph relies on.
    """

    def __init__(self, size: int, slots: int = 16):
        import cupy
        self._cupy = cupy
        self.device = cupy.zeros(size, np.float32)
        mem = cupy.cuda.alloc_pinned_memory(slots * size * 4)
        self._host = np.frombuffer(mem, np.float32, slots * size).reshape(slots, size)  # holds mem
        self._events = [cupy.cuda.Event(block=False, disable_timing=True) for _ in range(slots)]
        self._next = 0

    def write(self, values) -> None:
        """Queue ``values`` (cast to float32) into :attr:`device` on the current stream."""
        i = self._next
        self._next = (i + 1) % len(self._events)
        self._events[i].synchronize()   # that buffer's last copy has been read
        host = self._host[i]
        host[:] = values
        stream = self._cupy.cuda.get_current_stream()
        self.device.set(host, stream=stream)
        self._events[i].record(stream)
