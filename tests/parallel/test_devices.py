"""GPU placement, device memory and host staging: the parts that need no GPU.

Which GPU a worker takes (node-local rank → device, round robin when workers outnumber GPUs,
one warning line then), the share of a GPU each Ray worker asks for, the refusal of a model
that cannot fit in device memory, host staging around MPI's collectives, and the job fields
that shape a GPU step refused on the CPU.
"""
import numpy as np
import pytest

from distffn.errors import UserError
from distffn.jobspec import from_dict
from distffn.nn.model import MLP
from distffn.parallel.devices import (
    check_device_memory,
    device_bytes,
    place,
    ray_gpu_share,
    sharing_note,
)
from distffn.parallel.host_staging import HostStaging

from helpers import user_error, write_job


@pytest.mark.parametrize("ranks, gpus, expect", [
    (4, 4, [0, 1, 2, 3]),           # a GPU each
    (2, 8, [0, 1]),                 # fewer ranks than GPUs: the first ones
    (5, 2, [0, 1, 0, 1, 0]),        # sharing, round robin
    (3, 1, [0, 0, 0]),
])
def test_node_local_rank_takes_its_own_gpu_while_there_are_enough(ranks, gpus, expect):
    placements = [place(r, ranks, gpus) for r in range(ranks)]
    assert [p.device for p in placements] == expect
    assert all(p.shared == (ranks > gpus) for p in placements)
    # as many workers on the busiest GPU as the note says
    busiest = max(expect.count(d) for d in set(expect))
    note = sharing_note(placements[0])
    if ranks > gpus:
        assert note == (f"warning: {ranks} workers share {gpus} GPU{'s' if gpus != 1 else ''} on this node "
                        f"(up to {busiest} a GPU); each runs slower than on a GPU of its own")
    else:
        assert note is None


def test_no_gpu_on_the_node_is_a_clear_error():
    with pytest.raises(UserError, match="no CUDA GPU is visible"):
        place(0, 2, 0)


@pytest.mark.parametrize("workers, gpus", [(1, 1), (3, 2), (4, 1), (5, 2), (8, 3), (2, 4)])
def test_ray_gpu_shares_pack_every_worker_onto_the_gpus(workers, gpus):
    """Ray packs fractional requests first-fit; every worker must fit, and no GPU holds more
    workers than it must."""
    share = ray_gpu_share(workers, gpus)
    free = [1.0] * gpus
    placed = [0] * gpus
    for _ in range(workers):
        g = next(i for i in range(gpus) if free[i] + 1e-9 >= share)       # StopIteration: no room
        free[g] -= share
        placed[g] += 1
    assert max(placed) == -(-workers // gpus)
    assert share == 1.0 if gpus >= workers else share < 1.0


def test_a_model_too_large_for_the_gpu_is_refused_with_the_numbers():
    job = from_dict({"model": {"layers": [784, 8192, 8192, 10]}, "training": {"batch_size": 4096},
                     "scaling": {"use_gpu": False}})
    model = MLP(job.model)
    need = device_bytes(job, model, 1, 47_040_000)
    # fits: nothing raised with exactly enough free
    check_device_memory(job, model, 1, 47_040_000, 1, free=need, total=need)
    with pytest.raises(UserError) as e:
        check_device_memory(job, model, 1, 47_040_000, 2, free=need, total=80 * 2**30)
    msg = str(e.value)
    assert msg.startswith("model.layers: [784, 8192, 8192, 10] needs about")
    assert f"{2 * need / 2**30:,.1f} GiB of GPU memory" in msg
    params = sum(i * o + o for i, o in zip(model.sizes[:-1], model.sizes[1:]))
    assert f"{params:,} parameters" in msg and "× 2 workers sharing it" in msg
    assert f"{need / 2**30:,.1f} GiB of the GPU's 80.0 GiB is free" in msg


def test_host_staging_is_the_buffer_itself_on_the_cpu():
    """No copies on a CPU run: MPI gets the NumPy buffer itself."""
    a, b = np.arange(5, dtype=np.float32), np.ones(5, np.float32)
    s = HostStaging(np, a)
    assert s.host is a
    assert s.down(b) is b and s.up(b) is b          # whichever buffer it is handed


@pytest.mark.parametrize("scaling, needles", [
    ({"cuda_graph": True}, ("scaling.cuda_graph", "scaling.use_gpu: true")),
    ({"cuda_graph": "sometimes"}, ("scaling.cuda_graph", "auto, true or false", "'sometimes'")),
    ({"tf32": True}, ("scaling.tf32", "scaling.use_gpu: true")),
])
def test_gpu_step_options_on_the_cpu_are_refused(tmp_path, capsys, scaling, needles):
    user_error(capsys, ["run", write_job(tmp_path, scaling=scaling)], *needles)


def test_a_cuda_graph_needs_the_local_backend():
    with pytest.raises(UserError, match="scaling.cuda_graph: true needs scaling.backend: local"):
        from_dict({"scaling": {"use_gpu": True, "cuda_graph": True, "backend": "mpi", "num_workers": 2}})
