"""Starting the processes a backend needs before the trainer runs: ``scaling.backend: mpi``
outside mpiexec runs the same command under ``mpiexec -n N``."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading

from ..data.prepare import prepare_data
from ..errors import UserError
from ..optim import OPTIMIZERS
from ..xp import get_array_module
from .devices import check_gpu_fits
from .mpi_env import (
    MPI_RESULT_ENV,
    check_mpi4py,
    find_mpiexec,
    network_env,
    remove_orphaned_segments,
    shared_memory_segments,
    under_mpi,
    world,
)
from .mpi_reports import MpiexecReport
from .resources import check_cores, check_memory, note
from .watchdog import die_with_parent

# Set for the ranks of the mpiexec that distffn starts: this launcher restarts them after a failure.
RESTARTED_BY_LAUNCHER = "DISTFFN_MPI_LAUNCHER"


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
        if job.scaling.interface and not os.environ.get(RESTARTED_BY_LAUNCHER):
            # under the user's mpiexec (a host file: several nodes) MPI keeps to the named
            # network, as distffn's own launchers do; UCX reads these when MPI starts, just below
            os.environ.update(network_env(job.scaling.interface))
        adopt_mpi_world(job)
        return None
    if job.scaling.backend != "mpi":
        return None
    check_mpi4py()                                  # mpi4py missing: say so before launching
    get_array_module(job.scaling.use_gpu)           # use_gpu without CuPy or a GPU: likewise
    check_cores(job)
    _, data, model = prepare_data(job)              # bad data: one message here, not N
    buffers = len(OPTIMIZERS.get(job.optimizer.name).buffers)
    if job.scaling.use_gpu:                         # before any rank takes a GPU
        check_gpu_fits(job, model, buffers, data, job.scaling.num_workers)
    del data                                        # the ranks load their own
    check_memory(job, model, buffers, job.scaling.num_workers)
    for check in checks:                            # the caller's (the run folder)
        check()
    # one node: the ranks talk through shared memory and nothing listens (module doc of mpi_env)
    env = dict(os.environ, **network_env(None), **(env or {}), **{RESTARTED_BY_LAUNCHER: "1"})
    failures, limit = 0, job.failure.max_failures
    while True:
        mpiexec = find_mpiexec(single_node=True)
        cmd = [mpiexec, "-n", str(job.scaling.num_workers), sys.executable, "-m", "distffn.cli", *argv]
        fd, result = tempfile.mkstemp(prefix="distffn-mpi-result-")
        os.close(fd)
        segments = shared_memory_segments()
        try:
            code, signalled, report = _run_mpiexec(cmd, dict(env, **{MPI_RESULT_ENV: result}))
            with open(result) as f:
                written = f.read().strip()
        finally:
            os.unlink(result)
            remove_orphaned_segments(segments)      # what killed ranks could not remove
        refused = None if written else report.refusal(mpiexec)
        if refused:
            # no rank ran: the user's environment (e.g. root under Open MPI), which the same
            # command would meet on every restart, so failure.max_failures does not apply: exit 2
            raise UserError(refused)
        lost = None
        if not written and not signalled:
            # mpiexec's own report names the rank; gforker reports 0 when it ended the ranks itself
            # after one was killed, so without a report its last words are all there is
            lost = report.lost_rank() or report.unexplained(code)
            code = 1
        elif written:
            code = int(written)
            if not signalled and code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
                # rank 0 was stopped, and not through this launcher: mpiexec ending the survivors
                # of a lost rank (gforker with SIGINT, Open MPI with SIGTERM), which it names
                lost = report.lost_rank()
                code = 1 if lost else code
        # success, a user error, or a stop this launcher was asked for end here; anything else is a
        # lost rank (gforker ends the survivors with SIGINT, so their 130 is not the user's)
        if signalled or code in (0, 2) or (limit != -1 and failures >= limit):
            if lost:
                print(f"distffn: error: {lost} before the run finished", file=sys.stderr, flush=True)
            return code
        failures += 1
        note(f"{lost or f'the MPI ranks ended with exit code {code}'}; restart {failures} of "
             f"{'unlimited' if limit == -1 else limit} (failure.max_failures) from the newest checkpoint")
        if "--resume" not in argv:
            argv = [*argv, "--resume"]


def _run_mpiexec(cmd, env) -> tuple[int, bool, MpiexecReport]:
    """Run ``cmd``; (its exit code, whether this launcher was asked to stop meanwhile, what
    mpiexec itself said about how the ranks ended or why it would not start them)."""
    # mpiexec's output passes through here, so its own reports can name a lost rank
    proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent,         # no orphans if we die
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    report = MpiexecReport()
    pumps = [threading.Thread(target=_pump, args=(pipe, out, report.stream(is_stderr)), daemon=True)
             for pipe, out, is_stderr in ((proc.stdout, sys.stdout, False), (proc.stderr, sys.stderr, True))]
    for t in pumps:
        t.start()
    signalled = []

    def forward(sig, frame):            # a scheduler's SIGTERM reaches mpiexec, which stops its ranks
        signalled.append(sig)
        proc.send_signal(sig)
    previous = signal.signal(signal.SIGTERM, forward)
    try:
        code = proc.wait()
        result = code, bool(signalled)
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait()
        result = 130, True
    finally:
        signal.signal(signal.SIGTERM, previous)
        for t in pumps:
            t.join(timeout=5)
    return (*result, report)


def _pump(pipe, out, stream):
    """Copy the ranks' output through, line by line, keeping mpiexec's own reports aside."""
    for raw in iter(pipe.readline, b""):
        _write(out, stream.feed(raw.decode(errors="replace")))
    _write(out, stream.close())
    pipe.close()


def _write(out, lines):
    if lines:
        out.write("".join(lines))
        out.flush()
