"""Which kernels run a CPU step's elementwise work: ``numpy`` (the reference) or ``numba``.

``scaling.kernels`` names one of :data:`KERNELS`, or ``auto``: numba where it can be
imported, else NumPy. The numba twins (``nn/layer_kernels.py``, ``optim/update_kernels.py``) fuse what NumPy
does in several passes (bias + activation, the activation's backward with the column sums of
the bias gradient, softmax + cross-entropy + accuracy, each optimizer's update) into one pass
in one pass. They are compiled on first use and cached on disk, so a machine compiles them
once; numba itself is imported only then, which keeps ``distffn --help`` fast. The GPU path
(CuPy) has kernels of its own and ignores this choice.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile

from .errors import UserError
from .registry import Registry

AUTO = "auto"
KERNELS = Registry("kernel set", "scaling.kernels")
KERNELS.register("numpy", "numpy", doc="NumPy ufuncs, one pass per operation: the reference")
KERNELS.register("numba", "numba", doc="numba kernels: one fused pass for each piece of the step "
                                       "(compiled once per machine, cached)")


def numba_available() -> bool:
    """Whether numba can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("numba") is not None
    except (ImportError, ValueError):        # ValueError: sys.modules["numba"] is None
        return False


def choices() -> list[str]:
    """Every value ``scaling.kernels`` may take: ``auto`` and each kernel set."""
    return [AUTO, *KERNELS.names()]


def check(name: str, use_gpu: bool = False) -> None:
    """Raise :class:`UserError` unless ``name`` is a kernel set this machine can run."""
    if name == AUTO:
        return
    KERNELS.get(name)
    if name == "numba" and use_gpu:
        raise UserError("scaling.kernels: numba kernels run on the CPU; with scaling.use_gpu: true "
                        "use auto or numpy (CuPy brings its own kernels)")
    if name == "numba" and not numba_available():
        raise UserError("scaling.kernels: numba is not installed; pip install numba, or use "
                        "auto or numpy")


def resolve(name: str, use_gpu: bool = False) -> str:
    """``auto`` → ``numba`` where it is importable and the step runs on the CPU, else ``numpy``."""
    if name != AUTO:
        return name
    return "numba" if not use_gpu and numba_available() else "numpy"


# ---------------------------------------------------------------- numba's cache and threads

def _writable(folder: str) -> bool:
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _cache_dir() -> str | None:
    """Where numba should cache, when neither its default place is writable: ``__pycache__``
    beside this package (a user's checkout) or ``$XDG_CACHE_HOME``/``~/.cache/numba`` (numba's
    own fallback for installed packages). None: numba's defaults work."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return None
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")
    home = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "numba")
    if _writable(here) or _writable(home):
        return None
    return os.path.join(tempfile.gettempdir(), f"distffn-numba-cache-{os.getuid()}")


def import_numba():
    """numba, imported with a usable cache folder (see :func:`_cache_dir`)."""
    if "numba" not in sys.modules:
        folder = _cache_dir()
        if folder is not None:      # read when numba's config is first read
            os.environ["NUMBA_CACHE_DIR"] = folder
    import numba
    return numba


def jit(reassociate: bool = False):
    """``numba.njit`` as every distffn kernel uses it: cached on disk, compiled lazily on the
    first call (the types come from the arguments), without fast-math, so a kernel rounds as
    its NumPy twin does; ``reassociate`` lets LLVM reorder a kernel's sums so they vectorize
    (for kernels whose only reorderable operations are those sums).

    Serial, not ``parallel=True``: on the 2-core machine of BENCHMARKS.md every parallel
    variant made the step slower, since NumPy's OpenBLAS keeps its own threads on the cores
    between products. numba's ``workqueue`` pool costs ~100 µs a launch; OpenMP's spinning
    threads and OpenBLAS's take turns stealing each other's core (a 2.1 ms step became 5.5 ms);
    a passive OpenMP pool costs ~60 µs a launch. A serial fused pass is already 3–6× faster
    than NumPy's passes for these sizes, and leaves the second core to OpenBLAS.
    """
    numba = import_numba()
    return numba.njit(cache=True, nogil=True, error_model="numpy",
                      fastmath={"reassoc"} if reassociate else False)
