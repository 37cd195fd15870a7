"""Where the workers run and how ΔΘ is aggregated: in this process, on MPI ranks, or on Ray
actors; launching mpiexec. One registry, :data:`BACKENDS`, maps ``scaling.backend`` and
``scaling.aggregation`` to a :class:`~.backend.Backend` class, so a job spec runs unchanged
on 1 worker or N, and gives the same model."""
from __future__ import annotations

from .. import kernels
from ..errors import UserError
from ..registry import Registry
from .backend import Backend
from .local import LocalBackend
from .mpi import MPIBackend
from .mpi_env import check_mpi4py, find_mpiexec
from .ray_allreduce import RayAllreduceBackend
from .ray_central import RayCentralBackend
from .ray_cluster import PLACEMENTS
from .resources import ray_address

# backend name -> {aggregation: Backend class}
BACKENDS = Registry("backend", "scaling.backend")
BACKENDS.register("local", {"central": LocalBackend, "allreduce": LocalBackend},
                  doc="every worker in this process, one after another: the reference")
BACKENDS.register("mpi", {"central": MPIBackend, "allreduce": MPIBackend},
                  doc="one MPI rank per worker (mpi4py; distffn starts mpiexec, or runs under yours)")
BACKENDS.register("ray", {"central": RayCentralBackend, "allreduce": RayAllreduceBackend},
                  doc="one Ray actor per worker (an embedded Ray, or the cluster at scaling.address)")


AUTO = "auto"


def aggregations() -> list[str]:
    """Every ``scaling.aggregation`` a job may name: ``auto`` and each mode some backend offers."""
    return [AUTO, *dict.fromkeys(mode for _, modes in BACKENDS.items() for mode in modes)]


def resolve_aggregation(job) -> str:
    """``auto``: allreduce where MPI can carry the gradients (MPI; Ray with mpi4py and mpiexec,
    on its own Ray or over a named ``scaling.interface``), else central, the mode that runs on
    any Ray cluster. Measured here (BENCHMARKS.md, 2026-12-02, idle), allreduce is 4.4× / 2.4×
    central's samples/s on Ray (batch 128 / 512) and 1.2× / 1.1× on MPI."""
    s = job.scaling
    if s.aggregation != AUTO:
        return s.aggregation
    if s.backend != "ray":
        return "allreduce"
    try:
        check_mpi4py()
        find_mpiexec(single_node=True)
    except UserError:
        return "central"
    return "allreduce" if ray_address(job) is None or s.interface else "central"


def make_backend(job, data) -> Backend:
    """The backend ``job.scaling`` names, holding the training arrays of ``data``; an ``auto``
    aggregation and ``auto`` kernels are resolved (and recorded in the job spec)."""
    job.scaling.aggregation = resolve_aggregation(job)
    job.scaling.kernels = kernels.resolve(job.scaling.kernels, job.scaling.use_gpu)
    return BACKENDS.get(job.scaling.backend)[job.scaling.aggregation](job, data)


__all__ = ["AUTO", "BACKENDS", "PLACEMENTS", "Backend", "aggregations", "make_backend", "resolve_aggregation"]
