"""Ray actors as workers, with a parameter-aggregator actor.

The training arrays go into the object store once; every worker actor reads them zero-copy.
``aggregation: central``: each step the workers' ΔΘ go to the aggregator actor, which sums
them, applies momentum SGD and returns Θ — one object per step, read zero-copy by every
worker. ``allreduce``: every worker reads all ΔΘ from the object store, sums them in rank
order and applies the same update to its own Θ (identical on every worker).

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
from ..xp import get_array_module, to_numpy
from .base import Backend, Data, StepTimes, Totals

def _import_ray(local: bool):
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


class _WorkerActor:
    """A :class:`Worker` in a Ray actor; ``x``/``t``/``labels`` arrive zero-copy from the store."""

    def __init__(self, job, x, t, labels, x_test, t_test, labels_test, rank, num_workers, threads):
        try:
            from threadpoolctl import threadpool_limits
            self._limits = threadpool_limits(threads, user_api="blas")
        except ImportError:
            self._limits = None
        xp = get_array_module(job.scaling.use_gpu)
        self.worker = Worker(job, x, t, labels, rank, num_workers, xp)
        self.xp, self.job, self.rank = xp, job, rank
        lo, hi = shard_bounds(x_test.shape[0], num_workers, rank)
        self.test = (xp.asarray(x_test[lo:hi]), xp.asarray(t_test[lo:hi]),
                     None if labels_test is None else xp.asarray(labels_test[lo:hi]))
        self.aggregator = None
        self.compute_times: list[float] = []
        self.update_times: list[float] = []

    def where(self) -> str:
        """The Ray node this worker runs on (its node id)."""
        import ray
        return ray.get_runtime_context().get_node_id()

    def init_state(self, theta, velocity, step):
        """allreduce mode: this worker holds its own Θ and velocity."""
        self.aggregator = Aggregator(self.xp.asarray(theta).copy(), self.job.optimizer.momentum, self.xp)
        self._sum = self.xp.empty_like(self.aggregator.theta)
        self.aggregator.velocity[...] = self.xp.asarray(velocity)
        self.aggregator.step = step

    def compute(self, theta, epoch, batch_index):
        t0 = time.perf_counter()
        if theta is None:
            theta = self.aggregator.theta
        elif self.xp is not np:
            theta = self.xp.asarray(theta)
        grad = to_numpy(self.worker.compute(theta, epoch, batch_index))
        self.compute_times.append(time.perf_counter() - t0)
        return grad

    def step(self, previous, epoch, batch_index, *grads):
        """allreduce mode, one call per step: finish the previous update, compute the next ΔΘ.

        ``previous`` is (lr, count) of the last step, whose ΔΘ from every worker are ``grads``
        (resolved by Ray from the object store). One call instead of two per step halves
        Ray's per-task overhead, which dominates on small machines (11.5 → 9.1 ms a step).
        """
        if previous is not None:
            self.apply(*previous, *grads)
        return self.compute(None, epoch, batch_index), True    # ΔΘ for the others, flag for the driver

    def apply(self, lr, count, *grads):
        """allreduce mode: sum every worker's ΔΘ in rank order, then the common update."""
        t0 = time.perf_counter()
        _sum_into(self.xp, self._sum, grads)
        self.aggregator.apply(self._sum, count, lr)
        self.update_times.append(time.perf_counter() - t0)
        return True

    def pop_stats(self):
        return self.worker.pop_stats()

    def pop_times(self):
        out = (self.compute_times, self.update_times)
        self.compute_times, self.update_times = [], []
        return out

    def evaluate(self, theta):
        theta = self.aggregator.theta if theta is None else self.xp.asarray(theta)
        x, t, labels = self.test
        model = self.worker.model
        loss, correct = model.evaluate(model.layout.views(theta), x, t, labels,
                                       self.job.training.eval_batch_size)
        return loss, correct, x.shape[0]

    def state(self):
        return to_numpy(self.aggregator.theta), to_numpy(self.aggregator.velocity)


class _AggregatorActor:
    """central mode: holds Θ and the velocity, sums ΔΘ, applies the update, returns Θ."""

    def __init__(self, theta, velocity, momentum, step):
        self.aggregator = Aggregator(np.array(theta, np.float32), momentum)
        self.aggregator.velocity[...] = velocity
        self.aggregator.step = step
        self._sum = np.empty_like(self.aggregator.theta)
        self.update_times: list[float] = []

    def apply(self, lr, count, *grads):
        """Returns (Θ, True): Θ for the workers, the flag for the driver to wait on."""
        t0 = time.perf_counter()
        _sum_into(np, self._sum, grads)
        theta = self.aggregator.apply(self._sum, count, lr)
        self.update_times.append(time.perf_counter() - t0)
        return theta, True

    def pop_times(self):
        out, self.update_times = self.update_times, []
        return out

    def state(self):
        return self.aggregator.theta, self.aggregator.velocity


def _sum_into(xp, out, grads):
    """ΔΘ summed in rank order (so every allreduce worker computes the identical sum)."""
    if len(grads) == 1:
        out[...] = xp.asarray(grads[0])
        return
    xp.add(xp.asarray(grads[0]), xp.asarray(grads[1]), out=out)
    for g in grads[2:]:
        out += xp.asarray(g)


class RayBackend(Backend):
    def __init__(self, job, data: Data):
        self.job, self.mode = job, job.scaling.aggregation
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
        self.pg = self.workers = self.aggregator = None
        try:
            self._start(data)
        except BaseException:
            self.close()
            raise

    def _start(self, data: Data):
        ray, job, n = self.ray, self.job, self.num_workers
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // n)
        bundle = {"CPU": cpus, **({"GPU": 1} if job.scaling.use_gpu else {})}
        # SPREAD: on a cluster, workers land on different nodes where they can
        self.pg = placement_group([bundle] * n, strategy="SPREAD")
        ready, _ = ray.wait([self.pg.ready()], timeout=self.timeout)
        if not ready:
            raise UserError(f"scaling.num_workers: the Ray cluster cannot place {n} workers with "
                            f"{bundle} each within {self.timeout:g} s "
                            f"(cluster resources: {ray.cluster_resources()})")
        refs = [ray.put(a) for a in (data.x_train, data.t_train, data.labels_train,
                                     data.x_test, data.t_test, data.labels_test)]   # once, shared
        env = {k: os.environ[k] for k in (FAULT_ENV,) if k in os.environ}
        Actor = ray.remote(_WorkerActor)
        self.workers = [
            Actor.options(num_cpus=cpus, num_gpus=1 if job.scaling.use_gpu else 0,
                          runtime_env={"env_vars": env} if env else None,
                          scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, r)
                          ).remote(job, *refs, r, n, cpus)
            for r in range(n)]
        self.times = StepTimes()
        self._wall = 0.0
        self._pending = None
        self._unapplied, self._last_grads = None, []      # allreduce: ΔΘ not yet applied

    # ---------------------------------------------------------------- waiting with names
    def _get(self, refs, what: str, fetch: bool = True):
        """Wait for ``refs`` with the job's timeout; name the workers that failed or never answered.

        ``fetch=False`` is for a step: ``refs`` are the workers' ΔΘ followed by small flags, and
        only the flags are read; ΔΘ and Θ stay in the object store (read only to name a failure).
        """
        ray = self.ray
        ready, not_ready = ray.wait(list(refs), num_returns=len(refs), timeout=self.timeout,
                                    fetch_local=fetch)
        if not_ready:
            missing = [self._who(refs.index(r), len(refs)) for r in not_ready]
            raise WorkerFailed(f"{', '.join(missing)} did not finish {what} within "
                               f"scaling.timeout_s={self.timeout:g} s")
        try:
            return ray.get(list(refs) if fetch else list(refs[self.num_workers:]))
        except ray.exceptions.RayError:
            for i, ref in enumerate(refs):          # the first ref that holds an error names it
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as e:
                    raise WorkerFailed(f"{self._who(i, len(refs))} failed during {what}: "
                                       f"{_root_cause(e)}") from None
            raise

    def _who(self, i: int, total: int) -> str:
        """Name of the i-th ref of a step: workers' ΔΘ first, then the aggregator or the applies."""
        if i < self.num_workers:
            return f"worker {i}"
        return "the aggregator" if self.mode == "central" else f"worker {i - self.num_workers}"

    def placement(self) -> list[str]:
        return self._get([w.where.remote() for w in self.workers], "start-up")

    # ---------------------------------------------------------------- state
    def init_state(self, theta, velocity, step):
        theta = np.ascontiguousarray(theta, np.float32)
        velocity = np.ascontiguousarray(velocity, np.float32)
        if self.mode == "central":
            Agg = self.ray.remote(_AggregatorActor)
            self.aggregator = Agg.options(num_cpus=0).remote(theta, velocity, self.job.optimizer.momentum, step)
            self.theta_ref = self.ray.put(theta)
        else:
            t_ref, v_ref = self.ray.put(theta), self.ray.put(velocity)
            self._get([w.init_state.remote(t_ref, v_ref, step) for w in self.workers], "start-up")
            self.theta_ref = None

    def train_step(self, epoch, batch_index, batch_len, lr):
        t0 = time.perf_counter()
        what = f"step {batch_index + 1} of epoch {epoch + 1}"
        if self.mode == "central":
            grads = [w.compute.remote(self.theta_ref, epoch, batch_index) for w in self.workers]
            self.theta_ref, ok = self.aggregator.apply.options(num_returns=2).remote(lr, batch_len, *grads)
            pending = (grads + [ok], what)
        else:
            pairs = [w.step.options(num_returns=2).remote(self._unapplied, epoch, batch_index,
                                                          *self._last_grads) for w in self.workers]
            grads, flags = [g for g, _ in pairs], [ok for _, ok in pairs]
            self._unapplied, self._last_grads = (lr, batch_len), grads
            pending = (grads + flags, what)
        # one step in flight: submitting step s+1 overlaps the tail of step s
        if self._pending is not None:
            self._get(*self._pending, fetch=False)
        self._pending = pending
        self._wall += time.perf_counter() - t0

    def _drain(self):
        """Finish everything submitted, including an allreduce update still owed."""
        t0 = time.perf_counter()
        if self._pending is not None:
            self._get(*self._pending, fetch=False)
            self._pending = None
        if self._unapplied is not None:
            done = [w.apply.remote(*self._unapplied, *self._last_grads) for w in self.workers]
            self._get(done, "the last update")
            self._unapplied, self._last_grads = None, []
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
        source = self.aggregator if self.mode == "central" else self.workers[0]
        theta, velocity = self._get([source.state.remote()], "checkpointing")[0]
        return np.array(theta), np.array(velocity)

    def pop_times(self):
        self._drain()
        per_worker = self._get([w.pop_times.remote() for w in self.workers], "reporting times")
        compute = np.array([c for c, _ in per_worker])          # workers × steps
        if self.mode == "central":
            update = np.array(self._get([self.aggregator.pop_times.remote()], "reporting times")[0])
        else:
            update = np.array([u for _, u in per_worker]).mean(axis=0)
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

    def close(self):
        ray = self.ray
        for actor in (self.workers or []) + ([self.aggregator] if self.aggregator else []):
            ray.kill(actor)
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(self.pg)
        self.workers = self.aggregator = self.pg = None
        if self.owns_ray:
            ray.shutdown()


def _root_cause(e) -> str:
    """The worker's own exception text, without Ray's wrapping and remote traceback."""
    cause = getattr(e, "cause", None)
    if cause is not None and not isinstance(cause, type(e)):
        return f"{type(cause).__name__}: {cause}"
    return str(e).strip().splitlines()[-1]
