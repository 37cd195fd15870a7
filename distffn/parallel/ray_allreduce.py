"""``aggregation: allreduce`` on Ray: the worker actors join one MPI communicator.

Ray places and supervises the worker processes (placement group, failures, teardown); the
gradients move by MPI ``Allreduce`` between the actors, and each actor runs the MPI backend's
step on that communicator, so both backends share one step. Why: a Ray task per step costs
about 5 ms of scheduling and object-store traffic on a 2-core machine, where an MPI
allreduce of the same 3.2 MB takes 0.5 ms. Ray Train splits the work the same way (Ray for
the processes, a collective library for the gradients).

Each actor's process starts under ``mpiexec -n 1`` (Ray's ``py_executable``), which gives it
a process manager; the actors then connect through an MPI port (``MPI_Comm_accept`` /
``MPI_Comm_connect``, the port name passed through Ray) and merge into one
intracommunicator whose ranks follow the workers' order. The driver sends the steps in
chunks, one call per actor up to the trainer's next pull of the totals, so no Ray round trip
sits between two steps. A stalled or dead rank is caught inside by the MPI backend's timed
handshake (its peers name it within ``scaling.timeout_s``) or by Ray (an actor that dies).
"""
from __future__ import annotations

import shlex
import sys

from ..data.prepare import PreparedData
from ..errors import UserError, WorkerFailed
from ..xp import to_numpy
from .mpi import MPIBackend
from .mpi_env import check_mpi4py, find_mpiexec, network_env, world
from .ray_cluster import RayBackend, actor_process
from .resources import ray_address

MAX_CHUNK = 256         # steps per call at most, when nobody pulls totals in between


class _RankActor:
    """One MPI rank in a Ray actor: joins the communicator, then runs an MPIBackend on it."""

    def __init__(self):
        self.MPI = world()
        self.comm = self.MPI.COMM_SELF
        self.port = None
        self.backend = None

    def process(self) -> dict:
        return actor_process()

    # joining: worker 0 opens a port; each newcomer connects while the members accept, and
    # the two sides merge, the newcomer's rank after theirs
    def open_port(self) -> str:
        self.port = self.MPI.Open_port()
        return self.port

    def accept(self, port: str) -> int:
        return self._merge(self.comm.Accept(port, root=0), high=False)

    def connect(self, port: str) -> int:
        return self._merge(self.MPI.COMM_SELF.Connect(port, root=0), high=True)

    def _merge(self, inter, high: bool) -> int:
        merged = inter.Merge(high=high)
        inter.Free()
        if self.comm != self.MPI.COMM_SELF:
            self.comm.Free()
        self.comm = merged
        return merged.Get_rank()

    def create(self, job, x, t, labels, threads) -> int:
        """The worker's MPIBackend; the arrays arrive zero-copy from the object store."""
        if self.port is not None:           # everyone has joined
            self.MPI.Close_port(self.port)
            self.port = None
        data = PreparedData(x, t, labels, None, None, None)
        self.backend = MPIBackend(job, data, comm=self.comm, blas_threads=threads)
        return self.backend.rank

    def start(self, theta, optimizer_state, step):
        self.backend.start(theta, optimizer_state, step)

    def run(self, steps):
        """Consecutive steps, each (batch, lr)."""
        for batch, lr in steps:
            self.backend.train_step(batch, lr)

    def call(self, method: str):
        """A backend method with no arguments: train_totals, pop_times, grad_norms (collectives), state."""
        return getattr(self.backend, method)()

    def params(self):
        return to_numpy(self.backend.params())

    def leave(self):
        """Disconnect from the others (collective) and finalize MPI: the actor is killed next,
        and only MPI_Finalize removes the shared-memory segments MPICH made in /dev/shm."""
        self.backend = None
        self.comm.Disconnect()
        self.comm = self.MPI.COMM_SELF
        self.MPI.Finalize()


class RayAllreduceBackend(RayBackend):
    """``aggregation: allreduce`` on Ray: see the module doc."""

    _healthy = False        # True while no chunk of steps is out: close() may then leave MPI politely

    def __init__(self, job, data):
        self.launcher = _mpi_launcher()         # before Ray starts: a missing MPI is a user error
        self.mpi_env = _mpi_network(job)
        super().__init__(job, data)

    def _start(self):
        ray, n = self.ray, self.num_workers
        launcher = self.launcher
        Actor = ray.remote(_RankActor)
        runtime_env = {"py_executable": launcher, "env_vars": self.mpi_env}
        self.workers = [Actor.options(**self._actor_options(r, runtime_env)).remote()
                        for r in range(n)]
        try:
            port = self._get([self.workers[0].open_port.remote()], "start-up")[0]
        except WorkerFailed as e:
            raise WorkerFailed(f"{e}; its process starts as `{launcher}` (Ray's py_executable), "
                               f"which must run on every Ray node") from None
        for r in range(1, n):
            joined = [w.accept.remote(port) for w in self.workers[:r]] + [self.workers[r].connect.remote(port)]
            try:
                ranks = self._get(joined, "joining the MPI communicator (MPI_Comm_accept / MPI_Comm_connect)")
            except WorkerFailed as e:
                raise WorkerFailed(f"{e}; if MPI cannot connect between these Ray nodes, use "
                                   f"scaling.aggregation=central (Ray only)") from None
            if ranks != list(range(r + 1)):
                raise UserError(f"scaling.backend: the Ray workers joined MPI with ranks {ranks}, "
                                f"not {list(range(r + 1))}")
        self._get([w.create.remote(self.job, *self.data_refs, self.cpus) for w in self.workers], "start-up")
        self._steps: list[tuple] = []
        self._healthy = True

    def start(self, theta, optimizer_state, step):
        theta, state = self.ray.put(theta), self.ray.put(optimizer_state)     # once, for every actor
        self._get([w.start.remote(theta, state, step) for w in self.workers], "start-up")

    def train_step(self, batch, lr):
        self._steps.append((batch, lr))
        if len(self._steps) >= MAX_CHUNK:
            self._run_steps()

    def _run_steps(self):
        steps, self._steps = self._steps, []
        if not steps:
            return
        first, last = steps[0][0], steps[-1][0]
        what = first.describe() if len(steps) == 1 else f"steps {first.step + 1}–{last.step + 1}"
        self._healthy = False            # until the chunk is back: close() then only kills
        # each collective inside has the job's timeout; this one only backs them up
        self._get([w.run.remote(steps) for w in self.workers], what,
                  timeout=self.timeout * (len(steps) + 1))
        self._healthy = True

    def _collective(self, method: str, what: str) -> list:
        self._run_steps()
        return self._get([w.call.remote(method) for w in self.workers], what, timeout=2 * self.timeout)

    def train_totals(self):
        return self._collective("train_totals", "reporting totals")[0]

    def sync(self):
        self._run_steps()

    def params(self):
        self._run_steps()
        return self._get([self.workers[0].params.remote()], "evaluation")[0]

    def pop_times(self):
        return self._collective("pop_times", "reporting times")[0]

    def grad_norms(self):
        return self._collective("grad_norms", "reporting gradient norms")[0]

    def state(self):
        self._run_steps()
        return self._get([self.workers[0].call.remote("state")], "checkpointing")[0]

    def close(self):
        if self.workers and self._healthy:
            try:    # leave MPI together, so no rank's mpiexec reports the others' kill
                self._get([w.leave.remote() for w in self.workers], "shutting down", timeout=10)
            except Exception:
                pass
        super().close()


def _mpi_launcher() -> str:
    """The command that starts a worker's Python as a one-process MPI job (Ray's py_executable):
    ``mpiexec.gforker -n 1``, which forks it right here, on the node Ray chose, and listens on
    no port. The paths are the driver's: cluster nodes share its environment's layout."""
    try:
        check_mpi4py()
        mpiexec = find_mpiexec(single_node=True)
    except UserError:
        raise UserError("scaling.aggregation: 'allreduce' on Ray moves the gradients with MPI and "
                        "needs mpi4py and mpiexec; install them with pip install -e \".[ray]\", "
                        "or use scaling.aggregation=central") from None
    return f"{shlex.quote(mpiexec)} -n 1 {shlex.quote(sys.executable)}"


def _mpi_network(job) -> dict:
    """Where MPI may talk: shared memory only on an embedded Ray (one node); on a named
    cluster over the interface the user names, never a guessed one."""
    embedded = ray_address(job) is None
    if not embedded and job.scaling.interface is None:
        raise UserError("scaling.interface: 'allreduce' on a Ray cluster moves the gradients by MPI "
                        "between the nodes; name the network interface it may use (e.g. eth0, or lo "
                        "for a cluster on one machine), or use scaling.aggregation=central")
    return network_env(None if embedded else job.scaling.interface)
