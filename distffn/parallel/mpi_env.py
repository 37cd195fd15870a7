"""The MPI runtime as distffn finds it: mpi4py, whether this process runs under mpiexec,
which mpiexec to start, and the network it may use.

On one node distffn starts MPICH's ``mpiexec.gforker`` (it forks the ranks; hydra's control
port binds 0.0.0.0 whatever ``-iface`` says) and restricts UCX to shared memory
(``UCX_TLS=self,sm``): measured here, a 2-rank run then opens no TCP listener at all.
Between nodes MPI needs a network, which the user names (``scaling.interface``).
"""
from __future__ import annotations

import glob
import importlib.util
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


SINGLE_NODE_ENV = {"UCX_TLS": "self,sm"}          # shared memory only: nothing listens
# Where rank 0 of distffn's own mpiexec writes its exit code for the launcher.
MPI_RESULT_ENV = "DISTFFN_MPI_RESULT"


def network_env(interface: str | None) -> dict:
    """UCX settings for MPI traffic: shared memory only without an interface, else shared
    memory within a node and TCP on ``interface`` between nodes. Settings the user exported
    win (``UCX_TLS``, ``UCX_NET_DEVICES``)."""
    wanted = dict(SINGLE_NODE_ENV) if interface is None else {"UCX_TLS": "self,sm,tcp",
                                                             "UCX_NET_DEVICES": interface}
    return {k: os.environ.get(k, v) for k, v in wanted.items()}


def check_mpi4py():
    """A clear error without mpi4py, without initialising MPI (which opens listeners)."""
    if importlib.util.find_spec("mpi4py") is None:
        raise UserError("scaling.backend: 'mpi' needs mpi4py; install it with pip install -e \".[mpi]\"")


def world():
    """mpi4py's ``MPI`` module (initialises MPI), or a clear error without mpi4py."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise UserError("scaling.backend: 'mpi' needs mpi4py; install it with pip install -e \".[mpi]\"") from None
    return MPI


def find_mpiexec(single_node: bool = False) -> str:
    """mpiexec beside this Python first (the `mpich` wheel installs it there), then on PATH;
    for ``single_node`` runs MPICH's ``mpiexec.gforker`` where there is one."""
    names = ("mpiexec.gforker", "mpiexec") if single_node else ("mpiexec",)
    found = None
    for name in names:
        here = os.path.join(os.path.dirname(sys.executable), name)
        found = here if os.access(here, os.X_OK) else shutil.which(name)
        if found:
            break
    if not found:
        raise UserError("scaling.backend: 'mpi' needs mpiexec; install the embedded MPI with "
                        "pip install -e \".[mpi]\" or put your cluster's mpiexec on PATH")
    return found


SHM_SEGMENTS = "/dev/shm/mpich_shm_*"      # MPICH's shared-memory segments on a node


def shared_memory_segments() -> set[str]:
    return set(glob.glob(SHM_SEGMENTS))


def remove_orphaned_segments(before: set[str]) -> list[str]:
    """MPICH leaves its ``/dev/shm`` segments behind when a rank is killed; remove those that
    appeared since ``before`` and that no live process maps (another job's stay). The removed
    paths."""
    new = shared_memory_segments() - before
    if not new:
        return []
    mapped = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                mapped.update(line.split(None, 5)[-1].strip() for line in f if "/dev/shm/" in line)
        except OSError:
            continue
    removed = []
    for path in sorted(new - mapped):
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed
