"""The mapping of ``out = a @ b`` onto cuBLAS's column-major ``sgemm`` arguments
(``distffn.nn.cublas.gemm_args``), checked on the CPU: a NumPy emulation of what sgemm does
with (transa, transb, m, n, k, A, lda, B, ldb, C, ldc) on the operands' raw memory must give
``a @ b`` for every memory order of a, b and out. A wrong leading dimension or transpose flag
reads the wrong elements and fails here, without a GPU."""
import itertools

import numpy as np
import pytest

from distffn.nn.cublas import OP_N, gemm_args


def column_major(flat, rows, cols, ld):
    """The rows×cols matrix cuBLAS sees at ``flat`` with leading dimension ``ld``."""
    assert ld >= rows
    idx = np.arange(rows)[:, None] + ld * np.arange(cols)[None, :]
    return flat[idx]


def emulate_sgemm(transa, transb, m, n, k, A, lda, B, ldb, C, ldc):
    """C = op(A)·op(B) on raw buffers, as cuBLAS defines it (alpha 1, beta 0)."""
    opa = column_major(A, m, k, lda) if transa == OP_N else column_major(A, k, m, lda).T
    opb = column_major(B, k, n, ldb) if transb == OP_N else column_major(B, n, k, ldb).T
    res = opa @ opb
    for j in range(n):
        C[j * ldc:j * ldc + m] = res[:, j]


def raw(x):
    """The memory of a contiguous array, in storage order."""
    return np.ravel(x, order="F" if x.flags.f_contiguous and not x.flags.c_contiguous else "C").copy()


@pytest.mark.parametrize("shapes", [(3, 4, 5), (1, 7, 2), (6, 1, 3), (5, 3, 1)])
@pytest.mark.parametrize("orders", list(itertools.product("CF", repeat=3)))
def test_gemm_args_give_a_times_b_in_every_memory_order(shapes, orders):
    r, k, c = shapes
    rng = np.random.default_rng(0)
    a = np.asarray(rng.standard_normal((r, k)), order=orders[0])
    b = np.asarray(rng.standard_normal((k, c)), order=orders[1])
    out_f = orders[2] == "F"
    fort = lambda x: x.flags.f_contiguous and not x.flags.c_contiguous  # noqa: E731 (as _order())
    ta, tb, m, n, kk, first, lda, second, ldb, ldc = gemm_args(a.shape, fort(a), b.shape, fort(b), out_f)
    ops = {"a": raw(a), "b": raw(b)}
    C = np.zeros(r * c)
    emulate_sgemm(ta, tb, m, n, kk, ops[first], lda, ops[second], ldb, C, ldc)
    out = C.reshape((r, c), order="F" if out_f else "C")
    np.testing.assert_allclose(out, a @ b, rtol=1e-12, atol=1e-12)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError):
        gemm_args((3, 4), False, (5, 2), False, False)
