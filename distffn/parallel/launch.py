"""Starting the processes a backend needs before the trainer runs: ``scaling.backend: mpi``
outside mpiexec runs the same command under ``mpiexec -n N``."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from ..data.prepare import prepare_data
from ..optim import OPTIMIZERS
from ..xp import get_array_module
from .mpi_env import check_mpi4py, find_mpiexec, network_env, under_mpi, world
from .resources import check_cores, check_memory


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


def maybe_relaunch_under_mpi(job, argv: list[str], checks=(), env=None) -> int | None:
    """For ``scaling.backend: mpi`` outside mpiexec, run this same command under mpiexec,
    after every check that needs no MPI (the data, memory, cores, GPU, and ``checks``), with
    ``env`` added to the ranks' environment.

    Returns the exit code of ``mpiexec -n N``, or None when this process should train.
    """
    if under_mpi():
        adopt_mpi_world(job)
        return None
    if job.scaling.backend != "mpi":
        return None
    check_mpi4py()                                  # mpi4py missing: say so before launching
    get_array_module(job.scaling.use_gpu)           # use_gpu without CuPy or a GPU: likewise
    check_cores(job)
    _, _, model = prepare_data(job)                 # bad data: one message here, not N
    check_memory(job, model, len(OPTIMIZERS.get(job.optimizer.name).buffers), job.scaling.num_workers)
    for check in checks:                            # the caller's (the run folder)
        check()
    # one node: the ranks talk through shared memory and nothing listens (module doc of mpi_env)
    cmd = [find_mpiexec(single_node=True), "-n", str(job.scaling.num_workers),
           sys.executable, "-m", "distffn.cli", *argv]
    proc = subprocess.Popen(cmd, env=dict(os.environ, **network_env(None), **(env or {})))
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
