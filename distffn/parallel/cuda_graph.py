"""The local GPU step as one CUDA graph: captured once per batch size, replayed every step.

A step of a small network is a few dozen kernels and products. Launched one by one from
Python, each costs microseconds of host time, more than the GPU needs for its work; captured
once into a CUDA graph, the whole step is one launch. What changes between steps lives in
device memory the graph reads: the batch's sample indices (copied on the device from the
epoch's permutation into a fixed buffer) and the optimizer's per-step scalars (learning rate,
1/B: ``Optimizer.prepare``). The products go through a cuBLAS handle of our own
(:mod:`distffn.nn.cublas`) in eager steps too, so a replay computes what an eager step does.

Validity is checked, not assumed. Nothing may allocate device memory while the step is
captured (a pool block baked into the graph could later be handed to another array), so
capture runs with an allocator that refuses; and the first replay of every graph is compared
bit for bit with the same step run eagerly. With ``scaling.cuda_graph: auto`` a failed check
means eager steps and one line saying why; with ``true`` it is an error. Steps that are not
the graph's run eagerly: the gradient-norm steps of ``metrics.noise_scale``, a worker with an
injected fault, and a batch size past the last few captured.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ..errors import RunFailed
from ..nn.cublas import Cublas
from .resources import note

MAX_GRAPHS = 4          # batch sizes kept captured: the full batch, a short last one, adaptive sizes


def wanted(job) -> bool:
    """Whether ``job`` asks for graphed steps (``auto`` on any local GPU run)."""
    s = job.scaling
    return bool(s.use_gpu and s.backend == "local" and s.cuda_graph in (True, "auto"))


@dataclass
class _Graph:
    idx: object             # the batch's sample indices, device int64, refilled before each replay
    graph: object = None    # cupy.cuda.graph.Graph


@contextlib.contextmanager
def _no_allocations(cupy):
    """Every device allocation in the block raises (the default pool is restored after)."""
    def refuse(size):
        raise RuntimeError(f"the step allocated {size} bytes of device memory while it was captured")
    cupy.cuda.set_allocator(refuse)
    try:
        yield
    finally:
        cupy.cuda.set_allocator(cupy.get_default_memory_pool().malloc)


class GraphedSteps:
    """Runs a :class:`~distffn.parallel.local.LocalBackend`'s steps as CUDA graph replays."""

    def __init__(self, backend, job):
        import cupy
        self.cp, self.backend, self.strict = cupy, backend, job.scaling.cuda_graph is True
        # one stream for the run: capture needs a stream other than the legacy default, and
        # eager steps, replays and evaluation then run in order on it
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.stream.use()
        self.blas = Cublas(cupy, self.stream, tf32=job.scaling.tf32)
        for w in backend.workers:
            w.model.matmul = self.blas.matmul
        self.graphs: dict[int, _Graph] = {}
        self.off: str | None = None            # why graphs are off (auto, after a failed check)

    # ---------------------------------------------------------------- one step
    def step(self, batch, lr) -> bool:
        """Run ``batch`` as a replay (capturing and checking it first for a new size); False
        when this step must run eagerly instead."""
        workers = self.backend.workers
        if self.off or any(w.measures(batch.step) or w.faulty for w in workers):
            return False
        n = len(batch)
        g = self.graphs.get(n)
        if g is None:
            if len(self.graphs) >= MAX_GRAPHS:
                return False
            return self._capture(batch, lr)
        self._load(g, batch, lr)
        g.graph.launch(self.stream)
        self._account(batch)
        return True

    def _load(self, g: _Graph, batch, lr):
        """What the replay reads: this batch's indices and this step's scalars."""
        w = self.backend.workers[0]
        g.idx[...] = w.batch_indices(batch)         # a copy on the device, on the stream
        self.backend.aggregator.optimizer.prepare(lr, 1.0 / len(batch))

    def _body(self, g: _Graph):
        """The step's device work, all of it (what is captured)."""
        be = self.backend
        theta = be.aggregator.theta
        if len(be.workers) == 1:
            grad = be.workers[0].compute_rows(theta, g.idx)
        else:
            grad = be._sum
            grad.fill(0)
            for w in be.workers:
                lo, hi = w.shard_range(len(g.idx))
                if hi > lo:                 # a batch smaller than the workers leaves some none
                    grad += w.compute_rows(theta, g.idx[lo:hi])
        be.aggregator.optimizer.launch(theta, grad)

    def _account(self, batch):
        """The host's bookkeeping of a step (the graph does none)."""
        for w in self.backend.workers:
            w.count += len(w.shard_indices(batch))
        self.backend.aggregator.optimizer.t += 1

    # ---------------------------------------------------------------- capture and check
    def _state(self):
        """Copies of everything a step changes on the device."""
        be = self.backend
        arrays = [be.aggregator.theta, *be.aggregator.optimizer.state.values()]
        for w in be.workers:
            arrays.extend(w.device_totals())
        return [a.copy() for a in arrays], arrays

    def _capture(self, batch, lr) -> bool:
        cp, n = self.cp, len(batch)
        g = _Graph(idx=cp.empty(n, cp.int64))
        before, live = self._state()
        # the eager step first: the reference the graph must reproduce, and a warm-up (every
        # buffer of this batch size allocated, every kernel loaded) before capture
        self._load(g, batch, lr)
        self._body(g)
        eager = [a.copy() for a in live]
        for a, b in zip(live, before):
            a[...] = b
        why = None
        try:
            with _no_allocations(cp):
                self.stream.begin_capture()
                try:
                    self._body(g)
                finally:
                    g.graph = self.stream.end_capture()
            g.graph.launch(self.stream)
            diff = [i for i, (a, b) in enumerate(zip(live, eager)) if not bool(cp.array_equal(a, b))]
            if diff:
                why = "a replay differed from the eager step bit for bit"
        except Exception as e:                      # capture refused: an allocation, an API call
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if why is not None:
            for a, b in zip(live, eager):           # the step as the eager run made it
                a[...] = b
            if self.strict:
                raise RunFailed(f"scaling.cuda_graph: true, but the step at batch {n} cannot run "
                                f"as a CUDA graph: {why}; use auto or false")
            self.off = why
            note(f"CUDA graph off (scaling.cuda_graph: auto): {why}; steps run eagerly")
        else:
            self.graphs[n] = g
        self._account(batch)
        return True

    def close(self):
        self.graphs.clear()
        self.blas.close()
