"""Which GPU a worker takes, and whether a model fits in its memory.

Workers on one node take one GPU each while there are enough: under MPI by their node-local
rank, on Ray the GPU Ray assigned to the actor (Ray sets ``CUDA_VISIBLE_DEVICES``, so that
GPU is device 0 in the actor). With more workers than GPUs they share, round robin, and the
run says so in one line: sharing works (each worker has its own CUDA context) but runs each
worker slower. Nothing here needs a GPU to be tested; the CUDA calls are at the edges.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class Placement:
    """Device ``device`` for the worker with node-local rank ``local_rank`` of ``local_size``."""

    device: int
    local_rank: int
    local_size: int
    num_devices: int

    @property
    def shared(self) -> bool:
        return self.local_size > self.num_devices


def place(local_rank: int, local_size: int, num_devices: int) -> Placement:
    """Node-local rank → device, round robin over the node's ``num_devices`` GPUs."""
    if num_devices < 1:
        raise UserError("scaling.use_gpu: true, but no CUDA GPU is visible on this node")
    if not 0 <= local_rank < local_size:
        raise ValueError(f"local rank {local_rank} of {local_size}")
    return Placement(local_rank % num_devices, local_rank, local_size, num_devices)


def sharing_note(p: Placement) -> str | None:
    """The one line a node's first worker prints when its workers share GPUs, else None."""
    if not p.shared:
        return None
    most = -(-p.local_size // p.num_devices)
    return (f"warning: {p.local_size} workers share {p.num_devices} GPU{'s' if p.num_devices != 1 else ''} "
            f"on this node (up to {most} a GPU); each runs slower than on a GPU of its own")


def ray_gpu_share(num_workers: int, num_gpus: int) -> float:
    """The GPU fraction each Ray worker asks for: a whole one while there are enough, else
    ``1/k`` with k = ⌈workers / GPUs⌉, so Ray packs k workers on each GPU and all fit (an
    even ``GPUs/workers`` would leave slivers no worker fits into: 3 workers × 0.67 on 2)."""
    if num_gpus >= num_workers or num_gpus < 1:
        return 1.0
    return 1.0 / -(-num_workers // num_gpus)


def mpi_node_rank(comm, mpi) -> tuple[int, int]:
    """(node-local rank, ranks on this node) of ``comm``'s calling rank: MPI's shared-memory
    split groups exactly the ranks of one node."""
    node = comm.Split_type(mpi.COMM_TYPE_SHARED, comm.Get_rank())
    try:
        return node.Get_rank(), node.Get_size()
    finally:
        node.Free()


def use_device(xp, p: Placement) -> None:
    """Make ``p.device`` current for this process's CuPy work."""
    xp.cuda.Device(p.device).use()


# ---------------------------------------------------------------- device memory

def device_bytes(job, model, num_buffers: int, data_bytes: int) -> int:
    """What one worker holds on its GPU: the training split (8-bit images stay 8-bit there)
    and the model's share as on the host (:func:`~distffn.parallel.resources.worker_bytes`),
    plus the gathered batch."""
    from .resources import worker_bytes
    batch = job.training.largest_batch * model.sizes[0] * 4
    return data_bytes + worker_bytes(job, model, num_buffers) + batch


def check_device_memory(job, model, num_buffers: int, data_bytes: int, workers_here: int,
                        free: int, total: int) -> None:
    """Refuse, before training, a run whose workers on one GPU cannot fit in what is free."""
    need = device_bytes(job, model, num_buffers, data_bytes) * workers_here
    if need > free:
        per = f", × {workers_here} workers sharing it" if workers_here > 1 else ""
        raise UserError(f"model.layers: {model.sizes} needs about {need / 2**30:,.1f} GiB of GPU memory "
                        f"({model.num_params:,} parameters, their gradient and optimizer state, one batch's "
                        f"activations and the {data_bytes / 2**20:,.0f} MiB training split{per}); "
                        f"{free / 2**30:,.1f} GiB of the GPU's {total / 2**30:,.1f} GiB is free")


def check_gpu_fits(job, model, num_buffers: int, data, workers_on_node: int) -> None:
    """:func:`check_device_memory` for this node's first GPU (the worst case: it holds the
    most workers when they share), with the driver's free memory, before anything is put there."""
    from ..xp import get_array_module
    xp = get_array_module(True)
    count = max(1, xp.cuda.runtime.getDeviceCount())
    free, total = free_device_memory(xp)
    data_bytes = sum(getattr(a, "nbytes", 0) for a in (data.x_train, data.t_train, data.labels_train)
                     if a is not None)
    check_device_memory(job, model, num_buffers, data_bytes, -(-workers_on_node // count), free, total)


def free_device_memory(xp) -> tuple[int, int]:
    """(free, total) bytes of the current GPU, as the driver reports them."""
    return xp.cuda.runtime.memGetInfo()
