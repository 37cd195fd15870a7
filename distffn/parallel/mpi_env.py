"""The MPI runtime as distffn finds it: mpi4py, whether this process runs under mpiexec,
and which mpiexec to start."""
from __future__ import annotations

import os
import shutil
import sys

from ..errors import UserError

_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")   # MPICH/Slurm, Open MPI, PMIx


def under_mpi() -> bool:
    """True when this process was started by mpiexec (MPICH, Open MPI, Slurm's PMI)."""
    return launcher_rank() is not None or any(k in os.environ for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))


def launcher_rank():
    """This process's rank as mpiexec announced it, without initialising MPI (None outside)."""
    return next((os.environ[k] for k in _RANK_VARS if k in os.environ), None)


def world():
    """mpi4py's ``MPI`` module (initialises MPI), or a clear error without mpi4py."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise UserError("scaling.backend: 'mpi' needs mpi4py; install it with pip install -e \".[mpi]\"") from None
    return MPI


def find_mpiexec() -> str:
    """mpiexec beside this Python first (the `mpich` wheel installs it there), then on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = here if os.access(here, os.X_OK) else shutil.which("mpiexec")
    if not found:
        raise UserError("scaling.backend: 'mpi' needs mpiexec; install the embedded MPI with "
                        "pip install -e \".[mpi]\" or put your cluster's mpiexec on PATH")
    return found
