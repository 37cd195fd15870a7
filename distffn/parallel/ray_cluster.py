"""What both Ray modes share: Ray itself (an embedded instance, or the cluster named by
``scaling.address`` or ``RAY_ADDRESS``), the placement group, the training arrays in the
object store, waiting on actors with the job's timeout and names, and the teardown.

The training arrays go into the object store once; every worker actor reads them zero-copy.
Without ``scaling.address`` or ``RAY_ADDRESS`` an embedded Ray instance starts on loopback.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import time

from ..errors import UserError, WorkerFailed
from ..xp import get_array_module
from . import watchdog
from .backend import Backend
from .devices import ray_gpu_share
from .resources import check_cores, note, ray_address
from .worker import FAULT_ENV

# scaling.placement -> Ray's placement-group strategy. Both are soft: SPREAD still places workers
# when there are more than nodes (two a node), PACK spills onto another node when one is full.
PLACEMENTS = {"spread": "SPREAD", "pack": "PACK"}


def actor_process() -> dict:
    """Where the calling actor runs: host, pid and Ray node id."""
    import ray
    return {"host": socket.gethostname(), "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}


def _fmt(resources: dict) -> str:
    """Ray's resources without its per-node and memory entries: ``8 CPU, 1 GPU``."""
    keep = {k: v for k, v in resources.items() if k in ("CPU", "GPU")}
    return ", ".join(f"{v:g} {k}" for k, v in keep.items()) or "none"


def _import_ray(local: bool):
    """Ray, set up for a Ray of the run's own or one on this machine's loopback (``local``):
    Ray otherwise rewrites 127.0.0.1 to this host's outward address, where a head started
    on loopback never answers, and retries for many minutes."""
    # a worker's failure reaches the user once, named, through RayBackend._get; the refs a
    # failed step leaves behind (never fetched) must not add Ray's "Unhandled error" traceback
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    if local:
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


def _host_port(address: str):
    """(host, port) of a Ray address (``HOST:PORT``, ``[V6]:PORT``, ``ray://HOST:PORT``), or None."""
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def is_loopback(address: str) -> bool:
    """Whether a Ray address names this machine's loopback (127.0.0.0/8, ::1, localhost)."""
    hp = _host_port(address)
    return hp is not None and (hp[0].startswith("127.") or hp[0] in ("::1", "localhost"))


class _Without(logging.Filter):
    """Drops log records whose message contains ``text``."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record) -> bool:
        return self.text not in record.getMessage()


def connect_to_ray(ray, address: str, timeout_s: float, **init_kwargs):
    """``ray.init(address=...)`` within ``timeout_s`` (``scaling.connect_timeout_s``), or a
    :class:`UserError` naming the address and the likely fix. The address is used as given."""
    where = f"the Ray cluster at {address}"
    hint = ("is it up (`ray start --head`, or cluster/ray-head.sh up) and reachable from here, and is "
            "RAY_AUTH_TOKEN set to its token when it requires one?")
    hp = _host_port(address)
    if hp is not None:               # nothing listening: say so at once, not after Ray's retries
        try:
            socket.create_connection(hp, timeout=min(timeout_s, 10.0)).close()
        except OSError as e:
            raise UserError(f"scaling.address: cannot reach {where}: {e.strerror or e}; {hint}") from None
    outcome: dict = {}

    def init():
        try:
            ray.init(address=address, **init_kwargs)
        except BaseException as e:          # handed to the caller's thread
            outcome["error"] = e
    # Ray's own connect retries for many minutes where the address answers but never finishes the
    # handshake; a daemon thread lets this process give up and exit. (Ray then leaves SIGTERM to
    # the run, which handles it itself: its warning about that is not news.)
    quiet = _Without("SIGTERM handler is not set")
    logging.getLogger("ray._private.worker").addFilter(quiet)
    thread = threading.Thread(target=init, name="ray-connect", daemon=True)
    thread.start()
    thread.join(timeout_s)
    logging.getLogger("ray._private.worker").removeFilter(quiet)
    if thread.is_alive():
        raise UserError(f"scaling.address: {where} did not finish connecting within {timeout_s:g} s "
                        f"(scaling.connect_timeout_s); {hint}")
    if "error" in outcome:
        raise outcome["error"]


def start_own_ray(ray, num_cpus: int, log_to_driver: bool = True):
    """A Ray instance of this process's own (``address="local"``: never another one found on
    the machine), in a temp folder of its own, on loopback, without a dashboard. Returns
    (temp folder, watchdog); :func:`stop_own_ray` ends both."""
    # Ray's unix sockets live ~85 characters below this folder and may not exceed
    # 107: a long $TMPDIR falls back to /tmp
    base = tempfile.gettempdir()
    temp_dir = tempfile.mkdtemp(prefix="distffn-ray-",
                                dir=base if len(base) <= 20 or not os.path.isdir("/tmp") else "/tmp")
    # Ray's processes and this folder end with this process, even on a SIGKILL
    guard = watchdog.start(temp_dir)
    try:
        ray.init(address="local", _temp_dir=temp_dir, include_dashboard=False,
                 logging_level="warning", log_to_driver=log_to_driver, num_cpus=num_cpus)
    except BaseException:
        stop_own_ray(None, temp_dir, guard)
        raise
    return temp_dir, guard


def stop_own_ray(ray, temp_dir, guard):
    """Shut down what :func:`start_own_ray` started (``ray`` None: Ray never came up)."""
    if ray is not None:
        ray.shutdown()
    if temp_dir is not None:
        shutil.rmtree(temp_dir, ignore_errors=True)
    if guard is not None:
        guard.terminate()
        guard.wait()


class RayBackend(Backend):
    """What both modes share: Ray itself, the placement group, the data in the object store,
    waiting on actors with the job's timeout, and the teardown."""

    def __init__(self, job, data):
        self.job = job
        self.num_workers = job.scaling.num_workers
        self.timeout = job.scaling.timeout_s
        address = self.address = ray_address(job)
        self.temp_dir = self.watchdog = None
        if address is None:                      # checks that need no engine, before one starts
            check_cores(job)
            get_array_module(job.scaling.use_gpu)
        ray = self.ray = _import_ray(local=address is None or is_loopback(address))
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            self._init_ray(ray, address)
        self.pg, self.workers = None, []
        try:
            self._place()
            self.data_refs = [ray.put(a) for a in (data.x_train, data.t_train, data.labels_train)]
            # the driver reads the store's copies too (zero-copy): its own go with the last reference
            data.x_train, data.t_train, data.labels_train = ray.get(self.data_refs)
            self._start()
        except BaseException:
            self.close()
            raise

    def _init_ray(self, ray, address):
        """Without an address, a Ray of this run's own: ``address="local"`` starts a new
        instance even where another one's address file lies in /tmp/ray, in a temp folder
        of its own (removed at the end), on loopback. With one, connect there and say so."""
        try:
            if address is None:
                self.temp_dir, self.watchdog = start_own_ray(ray, max(os.cpu_count() or 1, self.num_workers))
            else:
                note(f"connecting to the Ray cluster at {address}")
                connect_to_ray(ray, address, self.job.scaling.connect_timeout_s,
                               logging_level="warning", log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            self._remove_local()
            why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            hint = "" if address is None else (" (is it up and reachable from here, and is RAY_AUTH_TOKEN "
                                               "set to its token when it requires one?)")
            raise UserError(f"scaling.address: cannot connect to the Ray cluster at {address}: {why}{hint}") from None

    def _place(self):
        ray, job, n = self.ray, self.job, self.num_workers
        from ray.util.placement_group import placement_group

        total = ray.cluster_resources()
        node_cpus = [int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")]
        node_cpus = [c for c in node_cpus if c >= 1] or [int(total.get("CPU", 1))]
        if job.scaling.placement not in PLACEMENTS:       # auto: spread when there is more than one node
            job.scaling.placement = "spread" if len(node_cpus) > 1 else "pack"     # recorded in job.yaml
        # each worker's share of the cores: spread, of the smallest node it shares with the fewest
        # others; pack, of the largest node, so that all fit there where they can (one node: both
        # are the node's cores over the workers). Chosen once and recorded in the job: the workers
        # a restart places after a failure are the same size (the same BLAS threads, the same
        # sums), so they wait for room rather than squeeze onto the nodes left.
        if not job.scaling.cpus_per_worker:
            if job.scaling.placement == "spread":
                job.scaling.cpus_per_worker = max(1, min(node_cpus) // -(-n // len(node_cpus)))
            else:
                job.scaling.cpus_per_worker = max(1, max(node_cpus) // n)
        self.cpus = job.scaling.cpus_per_worker
        # more workers than the cluster's GPUs share them (a fraction each), as MPI ranks do
        self.gpus = ray_gpu_share(n, int(total.get("GPU", 0))) if job.scaling.use_gpu else 0
        if 0 < self.gpus < 1:
            gpus = int(total.get("GPU", 0))
            note(f"warning: {n} workers share the cluster's {gpus} GPU{'s' if gpus != 1 else ''} "
                 f"({self.gpus:.4g} of a GPU each); each runs slower than on a GPU of its own")
        bundle = {"CPU": self.cpus, **({"GPU": self.gpus} if job.scaling.use_gpu else {})}
        missing = {k: v * n - total.get(k, 0) for k, v in bundle.items() if v * n > total.get(k, 0)}
        # more than the whole Ray has: waiting cannot help on a Ray of this run's own; a cluster
        # may get nodes (back) within scaling.timeout_s, after a failure or by autoscaling
        if missing and self.address is None:
            field = "scaling.use_gpu" if "GPU" in missing else "scaling.num_workers"
            raise UserError(f"{field}: the Ray cluster cannot place {n} worker{'s' if n != 1 else ''} with "
                            f"{bundle} each: it lacks " + ", ".join(f"{v:g} {k}" for k, v in missing.items())
                            + f" (cluster resources: {_fmt(total)})")
        self.pg = placement_group([bundle] * n, strategy=PLACEMENTS[job.scaling.placement])
        deadline = time.monotonic() + self.timeout
        while True:                     # others' work may hold the resources: say what we wait for
            ready, _ = ray.wait([self.pg.ready()], timeout=min(5.0, max(0.0, deadline - time.monotonic())))
            if ready:
                return
            if time.monotonic() >= deadline:
                raise UserError(f"scaling.num_workers: the Ray cluster did not place {n} workers with "
                                f"{bundle} each within scaling.timeout_s={self.timeout:g} s "
                                f"(available now: {_fmt(ray.available_resources())})")
            note(f"waiting for the Ray cluster to place {n} workers with {bundle} each "
                 f"(available now: {_fmt(ray.available_resources())})")

    def _actor_options(self, rank: int, runtime_env: dict | None = None) -> dict:
        """Worker ``rank`` in bundle ``rank`` of the placement group."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        runtime_env = dict(runtime_env or {})
        env = dict(runtime_env.get("env_vars", {}), **{k: os.environ[k] for k in (FAULT_ENV,) if k in os.environ})
        if env:
            runtime_env["env_vars"] = env
        return dict(num_cpus=self.cpus, num_gpus=self.gpus,
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
        names = names or [self.name(i) for i in range(len(refs))]
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

    hosts: list = []                            # each worker's host, once known
    nodes: list = []                            # and its Ray node id

    def name(self, rank: int) -> str:
        """``worker 1 on HOST``: how messages name a worker."""
        return f"worker {rank}" + (f" on {self.hosts[rank]}" if rank < len(self.hosts) else "")

    def worker_processes(self) -> list[dict]:
        found = self._get([w.process.remote() for w in self.workers], "start-up")
        self.hosts = [p["host"] for p in found]
        self.nodes = [p["node"] for p in found]
        return [dict(rank=r, **p) for r, p in enumerate(found)]

    def live_workers(self) -> int:
        """After a failure: how many workers still answer within ``scaling.timeout_s``. Where
        the lost ones' nodes are gone (a lost host), wait (as long again at most) until Ray has
        noticed, so that placing the survivors counts only the nodes that are there."""
        ray = self.ray
        refs = [w.process.remote() for w in self.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout, fetch_local=True)
        live = []
        for rank, ref in enumerate(refs):
            try:
                if ref in ready:
                    ray.get(ref, timeout=0)
                    live.append(rank)
            except ray.exceptions.RayError:
                pass
        if len(self.nodes) == len(refs):
            gone = {self.nodes[r] for r in range(len(refs)) if r not in live} - {self.nodes[r] for r in live}
            deadline = time.monotonic() + self.timeout
            while gone and time.monotonic() < deadline:
                if not gone & {node["NodeID"] for node in ray.nodes() if node.get("Alive")}:
                    break
                time.sleep(0.5)
        return len(live)

    def close(self):
        ray = self.ray
        for actor in self._actors():
            ray.kill(actor)
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(self.pg)
        self.workers, self.pg = [], None
        if self.owns_ray:               # Ray, its temp folder and watchdog go together
            ray.shutdown()
            self._remove_local()

    def _remove_local(self):
        """The embedded Ray's temp folder and watchdog (after ``ray.shutdown``)."""
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None
        if self.watchdog is not None:
            self.watchdog.terminate()
            self.watchdog.wait()
            self.watchdog = None

    def _actors(self) -> list:
        return list(self.workers)


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
