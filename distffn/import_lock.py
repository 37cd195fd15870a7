"""One lock for heavy imports made off the main thread.

Python raises ``_DeadlockError`` in one of two threads that import overlapping module graphs in
different orders: numba's first compile imports ``scipy.linalg.cython_blas`` while scikit-learn's
import of ``scipy.linalg`` holds its parent's lock, and the run dies at start-up. The kernel
warm-up thread holds this lock while it loads numba's kernels; a loader that imports a library
sharing modules with numba (scikit-learn, through SciPy) takes it around that import.
"""
from __future__ import annotations

import threading

HEAVY_IMPORTS = threading.Lock()
