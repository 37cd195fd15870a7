"""One copy of the dataset per node for MPI ranks: an MPI shared-memory window.

Every rank loads the job's data (that is how an MPI run starts), then the ranks of a node
move their arrays into one window (``MPI.Win.Allocate_shared``) allocated by the node's first
rank: it copies its arrays in, the others drop theirs and read the same pages. A second rank
on a node then costs its interpreter, not another copy of the data (BENCHMARKS.md, memory).
"""
from __future__ import annotations

import numpy as np

from ..data.byte_images import ByteImages

_ALIGN = 64                     # bytes: every array starts on a cache line
_windows: list = []             # kept until exit: the arrays point into them


def share_on_node(comm, arrays: dict) -> dict:
    """Read-only arrays with the contents of ``arrays`` (name → array, ``ByteImages`` or None)
    as the first rank of each node of ``comm`` holds them, backed by one shared window per node.

    Collective over ``comm``. Every rank must pass the same names, shapes and dtypes (they
    loaded the same job's data); the node's first rank's values win. The window lives until
    the process exits (``MPI_Finalize`` frees it), since the arrays point into it.
    """
    parts = {}
    for name, a in arrays.items():
        if isinstance(a, ByteImages):       # its codes; mean and std are two numbers
            parts[name + ".codes"] = a.codes
        else:
            parts[name] = a
    shared = _share_arrays(comm, parts)
    return {name: ByteImages(shared[name + ".codes"], a.mean, a.std)
            if isinstance(a, ByteImages) else shared[name] for name, a in arrays.items()}


def _share_arrays(comm, arrays: dict) -> dict:
    from mpi4py import MPI
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    leader = node.Get_rank() == 0
    layout, offset = {}, 0
    for name, a in arrays.items():
        if a is None:
            continue
        layout[name] = (offset, a.shape, a.dtype.str)
        offset += -(-a.nbytes // _ALIGN) * _ALIGN
    win = MPI.Win.Allocate_shared(offset if leader else 0, 1, comm=node)
    _windows.append(win)
    buf, _ = win.Shared_query(0)
    memory = np.frombuffer(buf, np.uint8, count=offset)
    out = {}
    for name, (start, shape, dtype) in layout.items():
        view = memory[start:start + int(np.prod(shape)) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)
        if leader:
            view[...] = arrays[name]
        out[name] = view
    node.Barrier()                  # the leader's copies are in place before anyone reads
    _windows.append(node)
    for view in out.values():
        view.flags.writeable = False
    return {name: out.get(name) for name in arrays}
