"""CUDA twin of :meth:`ByteImages.take <distffn.data.byte_images.ByteImages.take>` (the CuPy
path): gather rows of 8-bit codes and decode each through the 256-entry float32 table in one
pass. The kernel only copies table entries, so the batch is the host's values bit for bit by
construction; row indices are clipped into range as ``np.take(..., mode="clip")`` clips them.

Importing this module registers the source and imports no CuPy (it is imported on first
launch). Tests: ``tests/test_cuda_sources.py`` and ``tests/gpu/test_layer_kernels_gpu.py``.
"""
from __future__ import annotations

import numpy as np

from ..cuda import kernel, register

THREADS = 256            # the block; it also loads the 256-entry table into shared memory
MAX_GRID = 65535

SOURCE = r"""
extern "C" {

// out[r, j] = table[codes[clip(idx[r]), j]]; codes (n, d) uint8 and out (rows, d) float32, both
// C-ordered. One block a row of out (grid-stride), its threads across the row's d columns.
__global__ void take_rows(const unsigned char* __restrict__ codes, const float* __restrict__ table,
                          const long long* __restrict__ idx, float* __restrict__ out,
                          long long n, long long d, long long rows) {
    __shared__ float lut[256];
    for (int c = threadIdx.x; c < 256; c += blockDim.x) lut[c] = table[c];
    __syncthreads();
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        long long src = idx[r];
        src = src < 0 ? 0 : (src >= n ? n - 1 : src);       // np.take's mode="clip"
        const unsigned char* row = codes + src * d;
        float* dst = out + r * d;
        for (long long j = threadIdx.x; j < d; j += blockDim.x) dst[j] = lut[row[j]];
    }
}

}  // extern "C"
"""

register("gather", SOURCE, ("take_rows",))


def take_rows(codes, table, idx, out) -> None:
    """``out[r, j] = table[codes[idx[r], j]]`` on the device, one launch: ``codes`` uint8
    (n, d) C-ordered, ``table`` float32 (256,), ``idx`` int64 (rows,), ``out`` float32
    (rows, d) C-ordered, all CuPy arrays; indices outside [0, n) are clipped as NumPy's
    ``mode="clip"`` does."""
    n, d = codes.shape
    rows = idx.shape[0]
    if codes.dtype != np.uint8 or codes.ndim != 2 or not codes.flags.c_contiguous:
        raise TypeError(f"take_rows: codes must be C-ordered 2-D uint8, got {codes.dtype} {codes.shape}")
    if table.dtype != np.float32 or table.shape != (256,) or not table.flags.c_contiguous:
        raise TypeError(f"take_rows: table must be a contiguous float32 (256,), got {table.dtype} {table.shape}")
    if idx.dtype != np.int64 or idx.ndim != 1 or not idx.flags.c_contiguous:
        raise TypeError(f"take_rows: idx must be a contiguous int64 vector, got {idx.dtype} {idx.shape}")
    if out.dtype != np.float32 or out.shape != (rows, d) or not out.flags.c_contiguous:
        raise TypeError(f"take_rows: out must be C-ordered float32 {(rows, d)}, got {out.dtype} {out.shape}")
    if rows == 0:
        return
    if n == 0:
        raise ValueError("take_rows: no rows to take from")
    kernel("gather", "take_rows")((min(rows, MAX_GRID),), (THREADS,),
                                  (codes, table, idx, out, np.int64(n), np.int64(d), np.int64(rows)))
