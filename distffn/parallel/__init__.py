"""Where the workers run and how ΔΘ is aggregated: in this process, on MPI ranks, or on Ray
actors; launching mpiexec. One registry, :data:`BACKENDS`, maps ``scaling.backend`` and
``scaling.aggregation`` to a :class:`~.backend.Backend` class, so a job spec runs unchanged
on 1 worker or N, and gives the same model."""
from __future__ import annotations

from ..registry import Registry
from .backend import Backend
from .local import LocalBackend
from .mpi import MPIBackend
from .ray_allreduce import RayAllreduceBackend
from .ray_central import RayCentralBackend

# backend name -> {aggregation: Backend class}
BACKENDS = Registry("backend", "scaling.backend")
BACKENDS.register("local", {"central": LocalBackend, "allreduce": LocalBackend},
                  doc="every worker in this process, one after another: the reference")
BACKENDS.register("mpi", {"central": MPIBackend, "allreduce": MPIBackend},
                  doc="one MPI rank per worker (mpi4py; distffn starts mpiexec, or runs under yours)")
BACKENDS.register("ray", {"central": RayCentralBackend, "allreduce": RayAllreduceBackend},
                  doc="one Ray actor per worker (an embedded Ray, or the cluster at scaling.address)")


def aggregations() -> list[str]:
    """Every ``scaling.aggregation`` some backend offers, in registration order."""
    return list(dict.fromkeys(mode for _, modes in BACKENDS.items() for mode in modes))


def make_backend(job, data) -> Backend:
    """The backend ``job.scaling`` names, holding the training arrays of ``data``."""
    return BACKENDS.get(job.scaling.backend)[job.scaling.aggregation](job, data)


__all__ = ["BACKENDS", "Backend", "aggregations", "make_backend"]
