"""Starting the processes a backend needs before the trainer runs: ``scaling.backend: mpi``
outside mpiexec runs the same command under ``mpiexec -n N``."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading

from ..data.prepare import prepare_data
from ..optim import OPTIMIZERS
from ..xp import get_array_module
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
    model = prepare_data(job)[2]                    # bad data: one message here, not N (the
                                                    # arrays are dropped: the ranks load their own)
    check_memory(job, model, len(OPTIMIZERS.get(job.optimizer.name).buffers), job.scaling.num_workers)
    for check in checks:                            # the caller's (the run folder)
        check()
    # one node: the ranks talk through shared memory and nothing listens (module doc of mpi_env)
    env = dict(os.environ, **network_env(None), **(env or {}), **{RESTARTED_BY_LAUNCHER: "1"})
    failures, limit = 0, job.failure.max_failures
    while True:
        cmd = [find_mpiexec(single_node=True), "-n", str(job.scaling.num_workers),
               sys.executable, "-m", "distffn.cli", *argv]
        fd, result = tempfile.mkstemp(prefix="distffn-mpi-result-")
        os.close(fd)
        segments = shared_memory_segments()
        try:
            code, signalled, ended = _run_mpiexec(cmd, dict(env, **{MPI_RESULT_ENV: result}))
            with open(result) as f:
                written = f.read().strip()
        finally:
            os.unlink(result)
            remove_orphaned_segments(segments)      # what killed ranks could not remove
        lost = None
        if not written and not signalled:
            # gforker reports 0 when it ended the ranks itself after one was killed
            lost = _lost_rank(ended) or f"a rank was lost (mpiexec exit code {code})"
            code = 1
        elif written:
            code = int(written)
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


# gforker's line for each rank that ended: "[0]1:Return code = 0, signaled with Killed"
_RANK_ENDED = re.compile(r"^\[\d+\](\d+):Return code = (-?\d+)(?:, signaled with (\w+))?\s*$")
_GFORKER_OWN = {"Quit", "Interrupt", "Terminated"}       # how gforker ends the survivors itself
_SIGNAL_WORDS = {"Killed": "SIGKILL", "Aborted": "SIGABRT", "Segmentation": "SIGSEGV", "Bus": "SIGBUS",
                 "Hangup": "SIGHUP", "Illegal": "SIGILL", "Floating": "SIGFPE"}   # strsignal()'s first word


def _lost_rank(ended: dict) -> str | None:
    """``worker 1 (MPI rank 1 on HOST) was killed by SIGKILL`` from gforker's report of how each
    rank ended, for the rank that ended first on its own (not by gforker's clean-up)."""
    for rank, how in sorted(ended.items()):
        if how not in _GFORKER_OWN and how != "0":
            cause = (f"exited with code {how}" if how.lstrip("-").isdigit()
                     else f"was killed by {_SIGNAL_WORDS.get(how, f'a signal ({how})')}")
            return f"worker {rank} (MPI rank {rank} on {socket.gethostname()}) {cause}"
    return None


def _run_mpiexec(cmd, env) -> tuple[int, bool, dict]:
    """Run ``cmd``; (its exit code, whether this launcher was asked to stop meanwhile, how each
    rank ended as gforker reports it: {rank: signal name or exit code})."""
    # gforker's output passes through here, so its per-rank report can name a lost rank
    proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent,         # no orphans if we die
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ended: dict = {}
    pumps = [threading.Thread(target=_pump, args=(pipe, out, ended), daemon=True)
             for pipe, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
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
    return (*result, ended)


def _pump(pipe, out, ended: dict):
    """Copy the ranks' output through, line by line, keeping gforker's per-rank reports aside."""
    for raw in iter(pipe.readline, b""):
        line = raw.decode(errors="replace")
        m = _RANK_ENDED.match(line)
        if m:
            ended[int(m.group(1))] = m.group(3) or m.group(2)
            continue
        out.write(line)
        out.flush()
    pipe.close()
