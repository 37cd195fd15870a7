"""Where the workers run: in this process, on Ray actors, or on MPI ranks.

Every backend gives the trainer the same interface (:class:`~.base.Backend`), so a job
spec runs unchanged on 1 worker or N, and gives the same model.
"""
from __future__ import annotations

from ..errors import UserError


def make_backend(job, data):
    """The backend named by ``job.scaling.backend``."""
    name = job.scaling.backend
    if name == "local":
        from .local import LocalBackend
        return LocalBackend(job, data)
    if name == "ray" and job.scaling.aggregation == "allreduce":
        from .ray_allreduce import RayAllreduceBackend
        return RayAllreduceBackend(job, data)
    if name == "ray":
        from .ray import RayCentralBackend
        return RayCentralBackend(job, data)
    if name == "mpi":
        from .mpi import MPIBackend
        return MPIBackend(job, data)
    raise UserError(f"scaling.backend: unknown backend {name!r}")
