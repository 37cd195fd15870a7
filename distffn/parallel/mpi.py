"""MPI ranks as workers (mpi4py). Every rank runs the trainer; rank 0 writes the files.

``aggregation: allreduce`` sums the flat ΔΘ with one ``Allreduce`` and every rank applies the
same update; ``central`` reduces ΔΘ to rank 0, the aggregator, which updates Θ (and holds
the optimizer's state) and broadcasts Θ. One flat buffer per message, never one message per layer.

Blocking collectives are used because MPICH's non-blocking ones, polled, measured 15× slower
here. So that nothing hangs, every collective starts with a handshake of small messages,
numbered alike on every rank, that rank 0 waits on with a deadline: a rank that does not
arrive in time (stalled, dead, or out of step) is named and the job aborted.
"""
from __future__ import annotations

import os
import socket
import time

import numpy as np

from .. import kernels
from ..errors import WorkerFailed
from ..xp import array_module_for, limit_blas_threads, to_numpy
from .aggregator import Aggregator
from .backend import Backend, GradNorms, StepTimes, Totals, noise_every
from .devices import mpi_node_rank, place, sharing_note, use_device
from .host_staging import HostStaging
from .mpi_env import world
from .node_shared import share_on_node
from .resources import note
from .worker import Worker

_ARRIVE, _GO = 11, 12


POLLS_BEFORE_YIELD = 1000      # as MPICH's own busy-wait (MPIR_CVAR_POLLS_BEFORE_YIELD)


def _poll(polls: int) -> int:
    """One more poll of a busy wait: spin first (the others are usually microseconds
    away), then yield the core, so that with more ranks than cores the late ones can run."""
    if polls >= POLLS_BEFORE_YIELD:
        os.sched_yield()
    return polls + 1


def usable_cores() -> frozenset:
    """The cores this process may run on: its CPU affinity, which mpiexec's binding
    (``-bind-to core``), SLURM's task binding or a cpuset narrow; ``os.cpu_count()`` would
    count every core of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))


def exported_threads() -> int | None:
    """The BLAS threads the user asked every rank for (``mpiexec -genv OMP_NUM_THREADS 1``:
    OPENBLAS_NUM_THREADS, else OMP_NUM_THREADS, a positive integer), else None."""
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def blas_threads_per_rank(mine: frozenset, node: list) -> int:
    """BLAS threads for a rank that may run on the cores ``mine``, among ranks on its node that
    may run on ``node`` (its own included): its cores shared with the ranks whose cores overlap
    them (all of them when nobody binds; none but itself when each rank has cores of its own)."""
    sharing = sum(1 for theirs in node if theirs & mine)
    return max(1, len(mine) // max(1, sharing))


class WorkerTimeout(WorkerFailed):
    """Some ranks did not reach a step within ``scaling.timeout_s``."""


class MPIBackend(Backend):
    """Every rank of ``comm`` (the MPI world unless given) holds one worker.

    ``blas_threads``: BLAS threads for this rank; by default the node's cores shared among
    the ranks on it. The Ray backend passes its own communicator and its actors' CPUs.
    """

    aggregator = None                   # until start(); only rank 0 has one in central mode

    def __init__(self, job, data, comm=None, blas_threads: int | None = None, share_data: bool | None = None):
        """``share_data`` (default: when ``comm`` is the world, i.e. ranks that each loaded
        the data): move ``data``'s arrays into one shared window per node, in place."""
        MPI = world()
        self.MPI, self.comm = MPI, MPI.COMM_WORLD if comm is None else comm
        self.rank, self.num_workers = self.comm.Get_rank(), self.comm.Get_size()
        self.process_index, self.process_count = self.rank, self.num_workers
        self.is_root = self.rank == 0
        self.job, self.mode = job, job.scaling.aggregation
        self.timeout = job.scaling.timeout_s
        self._limit_blas_threads(blas_threads)
        self.hosts = self.comm.allgather(socket.gethostname())     # for messages that name a rank
        self.array_module = xp = array_module_for(job)
        # on MPI's world the node's ranks share its GPUs; in a Ray actor (a communicator of its
        # own) Ray already chose the GPU and made it the only one visible
        self.device = None if xp is np else (self._take_device(xp) if comm is None else 0)
        if (comm is None if share_data is None else share_data) and self.num_workers > 1:
            fields = ("x_train", "t_train", "labels_train", "x_test", "t_test", "labels_test")
            for name, array in share_on_node(self.comm, {f: getattr(data, f) for f in fields}).items():
                setattr(data, name, array)      # the private copies go with the last reference
        self.worker = Worker(job, data.x_train, data.t_train, data.labels_train,
                             self.rank, self.num_workers, xp)
        self.times, self._compute = StepTimes(), []
        self._seq = 0                      # collectives so far: the handshake's tag
        self._wanted_stop = 0              # a signal this rank received, not yet agreed on

    def _take_device(self, xp):
        """This rank's GPU: its own while the node has enough, shared round robin otherwise."""
        placement = place(*mpi_node_rank(self.comm, self.MPI), xp.cuda.runtime.getDeviceCount())
        use_device(xp, placement)
        if placement.local_rank == 0 and sharing_note(placement):
            note(sharing_note(placement))
        return placement.device

    def request_stop(self, signum: int):
        # a signal reaches the ranks at different steps; the next handshake tells every rank
        # at once, so all of them finish that same step and checkpoint it
        self._wanted_stop = signum

    def _limit_blas_threads(self, per_rank: int | None):
        """One BLAS thread per core: the ranks on a node share the cores they may run on, unless
        the user exported a thread count (as for any MPI program)."""
        if per_rank is None:
            local = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED)
            mine = usable_cores()
            per_rank = exported_threads() or blas_threads_per_rank(mine, local.allgather(mine))
            local.Free()
        self._threads = limit_blas_threads(per_rank)

    def _on(self, ranks) -> str:
        """`` on HOST[, HOST]`` for messages."""
        return " on " + ", ".join(dict.fromkeys(self.hosts[r] for r in ranks))

    def worker_processes(self) -> list[dict]:
        self._handshake("start-up")
        found = self.comm.allgather((socket.gethostname(), os.getpid()))
        return [{"rank": r, "host": h, "pid": pid} for r, (h, pid) in enumerate(found)]

    # ---------------------------------------------------------------- state
    def broadcast(self, obj):
        self._handshake("start-up")
        return self.comm.bcast(obj, root=0)

    def sum_over_processes(self, values):
        values = np.array(values, np.float64)
        self._handshake("summing totals")
        self.comm.Allreduce(self.MPI.IN_PLACE, values, op=self.MPI.SUM)
        return values

    def start(self, theta, optimizer_state, step):
        xp = self.array_module
        self._handshake("start-up")
        # rank 0's copy wins, so a resume read on rank 0 alone reaches every rank
        theta, optimizer_state = self.comm.bcast((np.ascontiguousarray(theta, np.float32), optimizer_state)
                                                 if self.is_root else None, root=0)
        if self.mode == "allreduce" or self.is_root:     # who applies the update holds the optimizer
            self.aggregator = Aggregator(self.job.optimizer, theta, optimizer_state, step, xp,
                                         kernels=kernels.resolve(self.job.scaling.kernels, self.job.scaling.use_gpu),
                                         noise_every=noise_every(self.job))
            self.theta = self.aggregator.theta
        else:
            self.theta = xp.array(theta, dtype=np.float32)
        self._sum = xp.empty_like(self.theta) if self.mode == "central" and self.is_root else None
        # MPI sees host memory only: an MPI that is not CUDA-aware crashes on a device
        # pointer, so gradients and Θ pass through page-locked twins on a GPU run
        self._host = HostStaging(xp, self.theta)
        self._host_sum = HostStaging(xp, self._sum) if self._sum is not None else None

    # ---------------------------------------------------------------- one step
    def _handshake(self, what: str):
        """Every rank reaches this collective before any enters it, or we fail loudly."""
        self._seq += 1
        if self.num_workers == 1:
            return
        comm, tag = self.comm, self._seq % 32768          # MPI guarantees tags up to 32767
        deadline = time.monotonic() + self.timeout
        polls = 0
        stop = self._wanted_stop
        if self.is_root:
            pending = {r: comm.irecv(source=r, tag=_ARRIVE) for r in range(1, self.num_workers)}
            while pending:
                for r, q in list(pending.items()):
                    done, message = q.test()          # lowercase: also returns the message
                    if not done:
                        continue
                    del pending[r]
                    theirs, wanted = message
                    stop = max(stop, wanted)
                    if theirs != tag:
                        raise WorkerTimeout(f"worker {r} (MPI rank{self._on([r])}) is out of step: rank 0 is at "
                                            f"collective {tag} ({what}), worker {r} at {theirs}")
                if pending and time.monotonic() > deadline:
                    raise WorkerTimeout(f"worker(s) {sorted(pending)} (MPI ranks{self._on(sorted(pending))}) did not reach "
                                        f"{what} within scaling.timeout_s={self.timeout:g} s")
                polls = _poll(polls)
            for r in range(1, self.num_workers):
                comm.send(stop, dest=r, tag=_GO)
        else:
            comm.send((tag, stop), dest=0, tag=_ARRIVE)
            req = comm.irecv(source=0, tag=_GO)
            while True:
                done, stop = req.test()
                if done:
                    break
                if time.monotonic() > deadline:
                    raise WorkerTimeout(f"worker 0 (MPI rank 0{self._on([0])}) did not answer at {what} "
                                        f"within scaling.timeout_s={self.timeout:g} s")
                polls = _poll(polls)
        self.stop_signal = self.stop_signal or stop

    def train_step(self, batch, lr):
        MPI, comm = self.MPI, self.comm
        t0 = time.perf_counter()
        grad = self.worker.compute(self.theta, batch)
        t1 = time.perf_counter()
        self._handshake(batch.describe())
        host = self._host
        if self.mode == "allreduce":
            comm.Allreduce(MPI.IN_PLACE, host.down(grad), op=MPI.SUM)
            host.up(grad)
            t2 = time.perf_counter()
            self.aggregator.apply(grad, len(batch), lr)
            t3 = time.perf_counter()
            t4 = t3
        else:
            comm.Reduce(host.down(grad), self._host_sum.host if self.is_root else None, op=MPI.SUM, root=0)
            t2 = time.perf_counter()
            if self.is_root:
                self.aggregator.apply(self._host_sum.up(self._sum), len(batch), lr)
            t3 = time.perf_counter()
            comm.Bcast(host.down(self.theta) if self.is_root else host.host, root=0)
            if not self.is_root:
                host.up(self.theta)
            t4 = time.perf_counter()
        self._compute.append(t1 - t0)
        self.times.compute += t1 - t0
        self.times.communication += (t2 - t1) + (t4 - t3)      # handshake, collectives
        self.times.update += t3 - t2
        self.times.steps += 1

    # ---------------------------------------------------------------- totals
    def train_totals(self):
        loss, correct, count = self.sum_over_processes(np.array(self.worker.pop_stats(), np.float64))
        tot = Totals()
        tot.add(loss, int(round(correct)), int(round(count)))
        return tot

    def grad_norms(self):
        """Every rank's shard norms; the global batch's from rank 0 only (in allreduce mode
        every rank has the same sum)."""
        mine = self.worker.pop_norms()
        if self.aggregator is not None:
            big = self.aggregator.pop_norms()
            if self.is_root:
                mine.add(GradNorms(big_sq=big.big_sq, big_inv=big.big_inv, steps=big.steps))
        return GradNorms.from_array(self.sum_over_processes(mine.as_array()))

    def params(self):
        return self.theta

    def state(self):
        """Θ, and the optimizer's buffers where this rank holds them (every rank in allreduce
        mode, rank 0 in central mode; the checkpoint is rank 0's)."""
        if self.aggregator is None:
            return to_numpy(self.theta).copy(), None
        return self.aggregator.state()

    def pop_times(self):
        """Rank 0's breakdown; waiting is the slowest rank's lead in compute, step by step."""
        mine = np.array(self._compute, np.float64)
        all_compute = np.empty((self.num_workers, len(mine)), np.float64)
        self._handshake("reporting times")
        self.comm.Allgather(mine, all_compute)
        waiting = float((all_compute.max(axis=0) - mine).sum())
        out, self.times, self._compute = self.times, StepTimes(), []
        out.waiting = waiting
        out.communication = max(0.0, out.communication - waiting)
        return out

    def close(self):
        if self._threads is not None:
            self._threads.restore_original_limits()
