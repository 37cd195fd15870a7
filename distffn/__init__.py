"""distffn: data-parallel mini-batch SGD for feed-forward networks.

Workers compute ΔΘ on their shard of every global mini-batch (NumPy on a CPU, CuPy on a GPU);
an aggregator applies the momentum SGD update; backends run the workers in-process, on Ray
actors or on MPI ranks.
"""
from .config import JobConfig, load_job
from .errors import UserError
from .model import MLP

__all__ = ["JobConfig", "MLP", "UserError", "load_job", "__version__"]
__version__ = "0.1.0"
