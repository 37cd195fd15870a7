"""Resources checked before anything is allocated or placed: memory for the model, its
optimizer and one batch; workers against cores on one node; GPUs. Each refusal is one line
with the numbers (exit 2), within seconds, before an engine starts."""
from __future__ import annotations

import os
import sys

from ..errors import UserError
from .mpi_env import under_mpi

OVERSUBSCRIBE_LIMIT = 4         # workers per core on one node before scaling.oversubscribe is needed


def available_memory() -> int | None:
    """Bytes the kernel says a new process can use without swapping (MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def worker_bytes(job, model, num_buffers: int) -> int:
    """What one worker and its share of the aggregator hold, float32: Θ, ΔΘ, the sum ΔΘ is
    reduced into, the optimizer's ``num_buffers`` flat buffers, and four activation buffers
    (z, a, dz, da) per unit for a batch shard and for an evaluation chunk."""
    params = model.num_params * (3 + num_buffers)
    units = sum(model.sizes[1:]) * model.hidden.pieces
    rows = job.training.largest_batch + job.training.eval_batch_size
    return 4 * (params + 4 * units * rows)


def check_memory(job, model, num_buffers: int, workers_here: int, free: int | None = None):
    """Refuse a model whose workers on this node cannot fit in the memory available."""
    free = available_memory() if free is None else free
    need = worker_bytes(job, model, num_buffers) * workers_here
    if free is not None and need > free:
        raise UserError(f"model.layers: {model.sizes} needs about {need / 2**30:,.1f} GiB "
                        f"({model.num_params:,} parameters, their gradient and optimizer state, and "
                        f"one batch's activations, × {workers_here} worker{'s' if workers_here != 1 else ''} "
                        f"on this node); "
                        f"{free / 2**30:,.1f} GiB is available")


def note(message: str):
    """A one-line notice on stderr (warnings, what a wait is waiting for)."""
    print(f"distffn: {message}", file=sys.stderr, flush=True)


def check_cores(job, cores: int | None = None, echo=note):
    """Workers on one node against its cores: a warning up to 4 per core, a refusal beyond
    that unless ``scaling.oversubscribe`` says the user means it."""
    cores = cores or os.cpu_count() or 1
    n = job.scaling.num_workers
    if n <= cores:
        return
    if n > OVERSUBSCRIBE_LIMIT * cores and not job.scaling.oversubscribe:
        raise UserError(f"scaling.num_workers: {n} workers on {cores} cores is more than "
                        f"{OVERSUBSCRIBE_LIMIT} per core; use fewer, or set scaling.oversubscribe: true")
    echo(f"warning: {n} workers share {cores} cores on this node; they will run slower than "
         f"{cores} would")


def workers_on_this_node(job) -> int:
    """How many of the job's workers this machine will hold: all of them for the local
    backend, for the mpiexec distffn starts and for an embedded Ray; one per process under
    someone else's mpiexec or on a named Ray cluster (where placement decides)."""
    s = job.scaling
    if s.backend == "local":
        return s.num_workers
    if s.backend == "mpi":
        return 1 if under_mpi() else s.num_workers
    return 1 if ray_address(job) else s.num_workers


def ray_address(job):
    """The Ray cluster the user named (``scaling.address``, else ``$RAY_ADDRESS``), or None
    for a Ray of the run's own ("local" means that too)."""
    address = job.scaling.address or os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address
