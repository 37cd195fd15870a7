"""Starting the processes a backend needs before the trainer runs."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

from .backends.mpi import under_mpi, world
from .errors import UserError


def find_mpiexec() -> str:
    """mpiexec beside this Python first (the `mpich` wheel installs it there), then on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = here if os.access(here, os.X_OK) else shutil.which("mpiexec")
    if not found:
        raise UserError("scaling.backend: 'mpi' needs mpiexec; install the embedded MPI with "
                        "pip install -e \".[mpi]\" or put your cluster's mpiexec on PATH")
    return found


def adopt_mpi_world(job, echo=print):
    """Under mpiexec, the MPI world decides the worker count (and the backend)."""
    size = world().COMM_WORLD.Get_size()
    rank = world().COMM_WORLD.Get_rank()
    if size > 1 and job.scaling.backend != "mpi":
        if rank == 0:
            echo(f"running under mpiexec with {size} ranks: using scaling.backend=mpi")
        job.scaling.backend = "mpi"
    if job.scaling.backend == "mpi" and job.scaling.num_workers != size:
        if rank == 0 and job.scaling.num_workers != 1:
            echo(f"scaling.num_workers: using the {size} MPI ranks (the job asked for "
                 f"{job.scaling.num_workers})")
        job.scaling.num_workers = size


def maybe_relaunch_under_mpi(job, argv: list[str]) -> int | None:
    """For ``scaling.backend: mpi`` outside mpiexec, run this same command under mpiexec.

    Returns the exit code of ``mpiexec -n N``, or None when this process should train.
    """
    if under_mpi():
        adopt_mpi_world(job)
        return None
    if job.scaling.backend != "mpi":
        return None
    world()                                         # mpi4py missing: say so before launching
    from .trainer import prepare_data
    prepare_data(job)                               # bad data: one message here, not N
    cmd = [find_mpiexec(), "-n", str(job.scaling.num_workers),
           sys.executable, "-m", "distffn.cli", *argv]
    proc = subprocess.Popen(cmd)
    # a scheduler's SIGTERM to this launcher reaches mpiexec, which stops its ranks: none is
    # left running on its own
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: proc.send_signal(sig))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait()
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
