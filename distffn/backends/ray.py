"""Ray actors as workers; the embedded Ray instance; what both aggregation modes share.

``aggregation: central`` (here): each step the worker actors' ΔΘ go to a parameter-aggregator
actor, which sums them, applies momentum SGD and returns Θ — one object per step in the object
store, read zero-copy by every worker. ``allreduce`` (:mod:`.ray_allreduce`): the worker
actors join one MPI communicator and run the MPI backend's step.

The training arrays go into the object store once; every worker actor reads them zero-copy.
Without ``scaling.address`` or ``RAY_ADDRESS`` an embedded Ray instance starts on loopback.
"""
from __future__ import annotations

import os
import time

import numpy as np

from ..aggregator import Aggregator
from ..errors import UserError, WorkerFailed
from ..sharding import shard_bounds
from ..worker import FAULT_ENV, Worker
from ..xp import get_array_module, limit_blas_threads, to_numpy
from .base import Backend, Data, StepTimes, Totals

def _import_ray(local: bool):
    # a worker's failure reaches the user once, named, through RayBackend._get; the refs a
    # failed step leaves behind (never fetched) must not add Ray's "Unhandled error" traceback
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    if local:
        # Ray rewrites 127.0.0.1 to this host's outward address unless told it runs a
        # single-machine instance; keep the embedded instance on loopback only.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise UserError("scaling.backend: 'ray' needs Ray; install it with pip install -e \".[ray]\"") from None
    if local and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
        import ray._private.ray_constants as constants
        constants.ENABLE_RAY_CLUSTER = False    # if ray was imported before the variable was set
    return ray


class RayBackend(Backend):
    """What both modes share: Ray itself, the placement group, the data in the object store,
    waiting on actors with the job's timeout, and the teardown."""

    def __init__(self, job, data: Data):
        self.job = job
        self.num_workers = n = job.scaling.num_workers
        self.timeout = job.scaling.timeout_s
        address = job.scaling.address or os.environ.get("RAY_ADDRESS")
        ray = self.ray = _import_ray(local=address is None)
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            cpus = os.cpu_count() or 1
            try:
                ray.init(address=address, include_dashboard=False, logging_level="warning",
                         num_cpus=None if address else max(cpus, n), log_to_driver=True)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise UserError(f"scaling.address: cannot connect to the Ray cluster at {address}: {e}") from None
        self.pg, self.workers = None, []
        try:
            self._place()
            self.data_refs = [ray.put(a) for a in (data.x_train, data.t_train, data.labels_train,
                                                   data.x_test, data.t_test, data.labels_test)]
            self._start()
        except BaseException:
            self.close()
            raise

    def _place(self):
        ray, job, n = self.ray, self.job, self.num_workers
        from ray.util.placement_group import placement_group

        self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // n)
        bundle = {"CPU": self.cpus, **({"GPU": 1} if job.scaling.use_gpu else {})}
        # SPREAD: on a cluster, workers land on different nodes where they can
        self.pg = placement_group([bundle] * n, strategy="SPREAD")
        ready, _ = ray.wait([self.pg.ready()], timeout=self.timeout)
        if not ready:
            raise UserError(f"scaling.num_workers: the Ray cluster cannot place {n} workers with "
                            f"{bundle} each within {self.timeout:g} s "
                            f"(cluster resources: {ray.cluster_resources()})")

    def _actor_options(self, rank: int, runtime_env: dict | None = None) -> dict:
        """Worker ``rank`` in bundle ``rank`` of the placement group."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        env = {k: os.environ[k] for k in (FAULT_ENV,) if k in os.environ}
        runtime_env = dict(runtime_env or {}, **({"env_vars": env} if env else {}))
        return dict(num_cpus=self.cpus, num_gpus=1 if self.job.scaling.use_gpu else 0,
                    runtime_env=runtime_env or None,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, rank))

    def _start(self):
        raise NotImplementedError

    # ---------------------------------------------------------------- waiting with names
    def _get(self, refs, what: str, names=None, timeout=None):
        """The values of ``refs``, waiting at most ``timeout`` (the job's by default).

        ``names[i]`` names whoever computes ``refs[i]`` (worker i by default). The first
        ref to fail ends the wait at once with its owner's error; the ones still missing
        at the deadline are named.
        """
        ray, refs = self.ray, list(refs)
        names = names or [f"worker {i}" for i in range(len(refs))]
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if len(refs) == 1:                  # the per-step wait of central mode: one call
            try:
                return [ray.get(refs[0], timeout=timeout)]
            except ray.exceptions.GetTimeoutError:
                pass                        # named below
            except ray.exceptions.RayError as e:
                raise _named_failure(e, names[0], what) from None
        pending = refs
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, fetch_local=False,
                                      timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                missing = ", ".join(names[refs.index(r)] for r in pending)
                limit = (f"scaling.timeout_s={self.timeout:g} s" if timeout == self.timeout else
                         f"{timeout:g} s (scaling.timeout_s={self.timeout:g} s each step)")
                raise WorkerFailed(f"{missing} did not finish {what} within {limit}")
            try:
                ray.get(ready[0])
            except ray.exceptions.RayError as e:
                raise _named_failure(e, names[refs.index(ready[0])], what) from None
        return ray.get(refs)

    def placement(self) -> list[str]:
        return self._get([w.where.remote() for w in self.workers], "start-up")

    def close(self):
        ray = self.ray
        for actor in self._actors():
            ray.kill(actor)
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(self.pg)
        self.workers, self.pg = [], None
        if self.owns_ray:
            ray.shutdown()

    def _actors(self) -> list:
        return list(self.workers)


class _WorkerActor:
    """A :class:`Worker` in a Ray actor; ``x``/``t``/``labels`` arrive zero-copy from the store."""

    def __init__(self, job, x, t, labels, x_test, t_test, labels_test, rank, num_workers, threads):
        self._limits = limit_blas_threads(threads)
        xp = get_array_module(job.scaling.use_gpu)
        self.worker = Worker(job, x, t, labels, rank, num_workers, xp)
        self.xp, self.job = xp, job
        lo, hi = shard_bounds(x_test.shape[0], num_workers, rank)
        self.test = (xp.asarray(x_test[lo:hi]), xp.asarray(t_test[lo:hi]),
                     None if labels_test is None else xp.asarray(labels_test[lo:hi]))
        self.compute_times: list[float] = []

    def where(self) -> str:
        """The Ray node this worker runs on (its node id)."""
        import ray
        return ray.get_runtime_context().get_node_id()

    def compute(self, theta, epoch, batch_index):
        t0 = time.perf_counter()
        theta = self.xp.asarray(theta)
        grad = to_numpy(self.worker.compute(theta, epoch, batch_index))
        self.compute_times.append(time.perf_counter() - t0)
        return grad

    def pop_stats(self):
        return self.worker.pop_stats()

    def pop_times(self):
        out, self.compute_times = self.compute_times, []
        return out

    def evaluate(self, theta):
        x, t, labels = self.test
        model = self.worker.model
        loss, correct = model.evaluate(model.layout.views(self.xp.asarray(theta)), x, t, labels,
                                       self.job.training.eval_batch_size)
        return loss, correct, x.shape[0]


class _AggregatorActor:
    """Holds Θ and the velocity, sums ΔΘ in rank order, applies the update, returns Θ."""

    def __init__(self, theta, velocity, momentum, step):
        self.aggregator = Aggregator(np.array(theta, np.float32), momentum)
        self.aggregator.velocity[...] = velocity
        self.aggregator.step = step
        self._sum = np.empty_like(self.aggregator.theta)
        self.update_times: list[float] = []

    def apply(self, lr, count, *grads):
        """Returns (Θ, True): Θ for the workers, the flag for the driver to wait on."""
        t0 = time.perf_counter()
        _sum_into(self._sum, grads)
        theta = self.aggregator.apply(self._sum, count, lr)
        self.update_times.append(time.perf_counter() - t0)
        return theta, True

    def pop_times(self):
        out, self.update_times = self.update_times, []
        return out

    def state(self):
        return self.aggregator.theta, self.aggregator.velocity


class RayCentralBackend(RayBackend):
    """``aggregation: central``: worker actors compute ΔΘ, an aggregator actor updates Θ."""

    aggregator = None                   # until init_state

    def _start(self):
        Actor = self.ray.remote(_WorkerActor)
        n = self.num_workers
        self.workers = [Actor.options(**self._actor_options(r)).remote(self.job, *self.data_refs, r, n, self.cpus)
                        for r in range(n)]
        self.times = StepTimes()
        self._wall = 0.0
        self._pending = None

    def _actors(self) -> list:
        return list(self.workers) + ([self.aggregator] if self.aggregator is not None else [])

    def init_state(self, theta, velocity, step):
        theta = np.ascontiguousarray(theta, np.float32)
        velocity = np.ascontiguousarray(velocity, np.float32)
        Agg = self.ray.remote(_AggregatorActor)
        self.aggregator = Agg.options(num_cpus=0).remote(theta, velocity, self.job.optimizer.momentum, step)
        self.theta_ref = self.ray.put(theta)

    def train_step(self, epoch, batch_index, batch_len, lr):
        t0 = time.perf_counter()
        grads = [w.compute.remote(self.theta_ref, epoch, batch_index) for w in self.workers]
        self.theta_ref, ok = self.aggregator.apply.options(num_returns=2).remote(lr, batch_len, *grads)
        # one step in flight: submitting step s+1 overlaps the tail of step s
        if self._pending is not None:
            self._wait_step(*self._pending)
        self._pending = (grads, ok, f"step {batch_index + 1} of epoch {epoch + 1}")
        self._wall += time.perf_counter() - t0

    def _wait_step(self, grads, ok, what):
        """Wait for the aggregator's flag only (ΔΘ and Θ stay in the object store); if it
        fails or is late, name the worker whose ΔΘ failed or is missing, else the aggregator."""
        try:
            self._get([ok], what, names=["the aggregator"])
        except WorkerFailed:
            done, late = self.ray.wait(grads, num_returns=len(grads), timeout=0, fetch_local=False)
            self._get(done, what, names=[f"worker {grads.index(g)}" for g in done], timeout=0)
            if late:
                raise WorkerFailed(f"{', '.join(f'worker {grads.index(g)}' for g in late)} did not "
                                   f"finish {what} within scaling.timeout_s={self.timeout:g} s") from None
            raise

    def _drain(self):
        t0 = time.perf_counter()
        if self._pending is not None:
            self._wait_step(*self._pending)
            self._pending = None
        self._wall += time.perf_counter() - t0

    def train_totals(self):
        self._drain()
        tot = Totals()
        for stats in self._get([w.pop_stats.remote() for w in self.workers], "reporting totals"):
            tot.add(*stats)
        return tot

    def evaluate(self):
        self._drain()
        tot = Totals()
        for r in self._get([w.evaluate.remote(self.theta_ref) for w in self.workers], "evaluation"):
            tot.add(*r)
        return tot

    def state(self):
        self._drain()
        theta, velocity = self._get([self.aggregator.state.remote()], "checkpointing",
                                    names=["the aggregator"])[0]
        return np.array(theta), np.array(velocity)

    def pop_times(self):
        self._drain()
        compute = np.array(self._get([w.pop_times.remote() for w in self.workers], "reporting times"))
        update = np.array(self._get([self.aggregator.pop_times.remote()], "reporting times",
                                    names=["the aggregator"])[0])
        out, self.times = self.times, StepTimes()
        if compute.size:
            slowest = compute.max(axis=0)
            out.compute = float(compute.mean(axis=0).sum())
            out.waiting = float((slowest - compute.mean(axis=0)).sum())
            out.update = float(update.sum())
            out.communication = max(0.0, self._wall - float(slowest.sum()) - out.update)
            out.steps = compute.shape[1]
        self._wall = 0.0
        return out


def _sum_into(out, grads):
    """ΔΘ summed in rank order."""
    if len(grads) == 1:
        np.copyto(out, grads[0])
        return
    np.add(grads[0], grads[1], out=out)
    for g in grads[2:]:
        out += g


def _named_failure(e, who: str, what: str) -> WorkerFailed:
    """A worker's error as one line. A worker that found another one missing (a timeout in a
    collective) says so itself: its message already names the missing one."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, WorkerFailed):
        return WorkerFailed(str(cause))
    return WorkerFailed(f"{who} failed during {what}: {_root_cause(e)}")


def _root_cause(e) -> str:
    """The worker's own exception text, without Ray's wrapping and remote traceback."""
    cause = getattr(e, "cause", None)
    if cause is not None and not isinstance(cause, type(e)):
        return f"{type(cause).__name__}: {cause}"
    return str(e).strip().splitlines()[-1]
