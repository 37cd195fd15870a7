"""Host twins of device buffers, for collectives that must see host memory.

MPI built without CUDA support takes a CuPy array's device pointer as a host address and
crashes (``aggregation: central`` did, with a segmentation fault in the reducing rank). So a
GPU rank copies ΔΘ and Θ through a page-locked host twin around each collective: a copy of
the flat buffer each way, at the PCIe link's full speed because the memory is pinned. On a
CPU run the twin is the buffer itself and nothing is copied.
"""
from __future__ import annotations

import numpy as np


class HostStaging:
    """The host side of device buffers shaped like ``like``. On NumPy there is none: ``host``
    is ``like`` itself, and ``down``/``up`` hand back the buffer they are given."""

    def __init__(self, xp, like):
        self.xp = xp
        if xp is np:
            self.host = like
        else:
            # pinned: the copies are DMA transfers, not staged again by the driver
            self._memory = xp.cuda.alloc_pinned_memory(like.nbytes)
            self.host = np.frombuffer(self._memory, like.dtype, like.size).reshape(like.shape)

    def down(self, device):
        """``device``'s values in the host twin (waits for the copy); the twin (NumPy:
        ``device`` itself)."""
        if self.xp is np:
            return device
        device.get(out=self.host)
        return self.host

    def up(self, device):
        """The host twin's values into ``device``; ``device``."""
        if self.xp is not np:
            device.set(self.host)
        return device
