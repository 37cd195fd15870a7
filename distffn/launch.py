"""Starting the processes a backend needs before the trainer runs."""
from __future__ import annotations

from .errors import UserError


def maybe_relaunch_under_mpi(job, argv) -> int | None:
    """For ``scaling.backend: mpi`` outside mpiexec, run the same command under mpiexec.

    Returns the child's exit code, or None when this process should train itself.
    """
    if job.scaling.backend != "mpi":
        return None
    raise UserError("scaling.backend: 'mpi' is not available in this version; use local")
