"""distffn: data-parallel mini-batch SGD for feed-forward networks.

The data path, package by package: a job spec (:mod:`distffn.jobspec`) → the data and each
worker's shard (:mod:`distffn.data`) → the network's forward and backward pass
(:mod:`distffn.nn`) on workers that aggregate ΔΘ locally, on MPI ranks or on Ray actors
(:mod:`distffn.parallel`) → the optimizer's update (:mod:`distffn.optim`) → the loop with its
evaluation, checkpoints and metrics (:mod:`distffn.training`), under the command line
(:mod:`distffn.cli`).
"""
__version__ = "0.2.0"

from .errors import UserError  # noqa: E402
from .jobspec import JobConfig, load_job  # noqa: E402
from .nn import MLP  # noqa: E402

__all__ = ["JobConfig", "MLP", "UserError", "load_job", "__version__"]
