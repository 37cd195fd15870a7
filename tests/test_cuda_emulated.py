"""distffn's GPU code on every CI run, without a GPU: the CUDA kernels compiled for the host and
CuPy faked with NumPy (``tests/cuda_emulator.py``).

- the GPU kernel tests (``tests/gpu/test_layer_kernels_gpu.py``, ``test_update_kernels_gpu.py``)
  against the emulator, on shapes small enough for it;
- training end to end on the emulated GPU against the CPU: the worker's device data and the
  8-bit gather, the model's CUDA twins, the optimizers' device scalars, evaluation;
- the MPI backend's host staging of device buffers, in this process on ``MPI.COMM_SELF``.

What the emulator cannot show: speed, real concurrency between streams, cuBLAS (products are
NumPy's), and CUDA graphs of whole steps (capture records kernel launches only). A real GPU
runs ``pytest -m gpu``.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from cuda_emulator import LAUNCHES, installed

from distffn.data import idx
from distffn.data.sharding import Batch
from distffn.jobspec import from_dict
from distffn.training.trainer import Trainer

from helpers import final_model

GPU_TESTS = os.path.join(os.path.dirname(__file__), "gpu")


def _load(name):
    # imported as modules, not their test functions, so pytest does not collect them here
    spec = importlib.util.spec_from_file_location(f"emulated_{name}", os.path.join(GPU_TESTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LAYERS = _load("test_layer_kernels_gpu")
UPDATES = _load("test_update_kernels_gpu")


@pytest.fixture(scope="module")
def cp(request):
    """The fake CuPy, installed for this module; built kernels kept in pytest's cache (or,
    with the cache plugin off, in ``$XDG_CACHE_HOME``)."""
    cache = getattr(request.config, "cache", None)
    with installed(str(cache.mkdir("cuda-emulator")) if cache else None) as fake:
        yield fake


# ---------------------------------------------------------------------------- the GPU kernel tests

@pytest.fixture
def small_grid(monkeypatch):
    """A grid limit of 64 blocks instead of 65,535: the GPU tests' 70,000 columns make the
    grid-stride loops go round; 300 columns do the same here (one fiber per GPU thread)."""
    from distffn.nn import cuda_layer_kernels
    monkeypatch.setattr(cuda_layer_kernels, "MAX_GRID", 64)


SHAPES = [(1, 33), (257, 40), (3, 300)]      # one row; several blocks a column; grid-stride


@pytest.mark.parametrize("shape", SHAPES)
def test_bias_relu_and_bias_add(cp, small_grid, shape):
    LAYERS.test_bias_relu_and_bias_add(cp, shape)


@pytest.mark.parametrize("shape", SHAPES)
def test_relu_backward_and_column_sums(cp, small_grid, shape):
    LAYERS.test_relu_backward_and_column_sums(cp, shape)


@pytest.mark.parametrize("want_grad,want_correct,label_type",
                         [(True, True, np.int64), (False, True, np.uint8), (True, False, np.int64)])
def test_softmax_xent(cp, want_grad, want_correct, label_type):
    LAYERS.test_softmax_xent(cp, want_grad, want_correct, label_type)


def test_softmax_xent_is_deterministic(cp):
    LAYERS.test_softmax_xent_is_deterministic(cp)


def test_take_rows_gives_byte_images_take_bit_for_bit(cp):
    LAYERS.test_take_rows_gives_byte_images_take_bit_for_bit(cp)


def test_model_loss_and_grad_matches_numpy(cp):
    LAYERS.test_model_loss_and_grad_on_the_gpu_matches_numpy(cp)


@pytest.mark.parametrize("name,extra", UPDATES.CASES, ids=UPDATES.IDS)
def test_update_equals_numpy_bit_for_bit(cp, name, extra):
    UPDATES.test_gpu_update_equals_numpy_bit_for_bit(cp, name, extra)


@pytest.mark.parametrize("name,extra", UPDATES.CASES, ids=UPDATES.IDS)
def test_graph_replays_read_the_scalars_prepared_before_each(cp, name, extra):
    # the emulator's capture records the update's launch, and the replays read ``hyper`` when
    # they run: scalars baked into the capture would give the first step's rate every step
    UPDATES.test_graph_replays_read_the_scalars_prepared_before_each(cp, name, extra)


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_host_runs_ahead_of_the_device(cp, name):
    # the emulated device runs its queue only when the host waits, so 40 queued updates
    # read their scalars from pinned buffers long after the host wrote them: a buffer
    # rewritten before its copy ran gives a wrong update (DeviceScalars' events prevent it)
    UPDATES.test_host_runs_ahead_of_the_gpu(cp, name)


# ---------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def fashion_small(tmp_path_factory):
    """The first 512 training and 256 test images of Fashion-MNIST as an IDX folder: 8-bit
    images (the device gather runs), 8 steps an epoch at batch 64."""
    src = os.path.join(idx.SYSTEM_DATA_DIR, "fashion-mnist")
    out = tmp_path_factory.mktemp("fashion-small")
    for split, n in (("train", 512), ("test", 256)):
        for base in idx.IDX_FILES[split]:
            arr = idx.read_idx(os.path.join(src, base + ".gz"))[:n]
            header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
            (out / base).write_bytes(header + arr.tobytes())
    return str(out)


def job_raw(data, optimizer, use_gpu, **scaling):
    """A short run: 2 epochs of a 784-32-10 net (digits: 64-32-10), checkpoint at the end."""
    dataset = {"dataset": "digits"} if data == "digits" else {"dataset": "fashion-mnist", "path": data}
    return {"name": "emulated", "data": dataset,
            "model": {"layers": [64 if data == "digits" else 784, 32, 10], "activation": "relu"},
            "optimizer": optimizer, "training": {"epochs": 2, "batch_size": 64},
            "checkpoint": {"every_steps": 0, "num_to_keep": 2},
            "scaling": {"use_gpu": True, "cuda_graph": False, **scaling} if use_gpu else dict(scaling)}


OPTIMIZERS = {"momentum": {"name": "momentum", "lr": 0.05, "momentum": 0.9},
              "nesterov": {"name": "nesterov", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
              "adam": {"name": "adam", "lr": 0.003, "weight_decay": 1e-3}}


def train(tmp_path, name, raw):
    out = str(tmp_path / name)
    return Trainer(from_dict(raw), out, progress=False, echo=lambda s: None).run(), out


# digits: dense float images (CuPy's take gathers them), with the gradient-noise measurement
# (each batch in two halves); nesterov with 2 workers (shards of the batch on one device)
CASES = [("fashion", "momentum", {}), ("fashion", "nesterov", {"num_workers": 2}),
         ("fashion", "adam", {}), ("digits", "momentum", {})]


@pytest.mark.parametrize("dataset,optimizer,scaling", CASES, ids=[f"{d}-{o}" for d, o, _ in CASES])
def test_training_on_the_emulated_gpu_matches_the_cpu(cp, fashion_small, tmp_path, dataset, optimizer, scaling):
    """The same steps, and the same model up to the order of float32 sums: accuracy within a
    point, Θ and the optimizer's buffers within the tolerance of tests/gpu/test_gpu_training.py
    (rtol 1e-3, atol 1e-3 of the largest entry) after 16 or 46 steps."""
    data = fashion_small if dataset == "fashion" else "digits"
    raws = [job_raw(data, OPTIMIZERS[optimizer], gpu, **scaling) for gpu in (True, False)]
    if dataset == "digits":
        for raw in raws:
            raw["metrics"] = {"noise_scale": True, "noise_every": 5}
    LAUNCHES.clear()
    gpu, gpu_out = train(tmp_path, "gpu", raws[0])
    ran = set(LAUNCHES)
    cpu, cpu_out = train(tmp_path, "cpu", raws[1])
    # every kernel of the step ran on the emulated device (the 8-bit gather with 8-bit data)
    step = {"bias_relu", "relu_backward", "column_sums", "softmax_xent_rows", "softmax_xent_total",
            f"{optimizer}_update"} | ({"take_rows"} if dataset == "fashion" else set())
    assert step <= ran, step - ran
    assert set(LAUNCHES) == ran                           # and none on the CPU run
    (a, meta_a), (b, meta_b) = final_model(gpu_out), final_model(cpu_out)
    assert meta_a["step"] == meta_b["step"] == gpu["step"] > 0
    assert gpu["samples"] == cpu["samples"]
    assert cpu["test_accuracy"] > 0.5                     # it learned: the comparison means something
    for split in ("train", "test"):                       # train: the device's running totals
        assert abs(gpu[f"{split}_accuracy"] - cpu[f"{split}_accuracy"]) <= 0.01, split
        assert abs(gpu[f"{split}_loss"] - cpu[f"{split}_loss"]) <= 1e-3 * abs(cpu[f"{split}_loss"]), split
    assert a.keys() == b.keys()
    for name in b:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-3, atol=1e-3 * np.abs(b[name]).max(), err_msg=name)


def test_a_resumed_run_on_the_emulated_gpu_is_bit_for_bit_the_whole_run(cp, fashion_small, tmp_path):
    """One epoch, then the second resumed from its checkpoint (Θ, Adam's moments and step
    count back onto the device), against both epochs at once: the device's sums are in a
    fixed order, so the same bits."""
    raw = job_raw(fashion_small, OPTIMIZERS["adam"], True)
    whole, whole_out = train(tmp_path, "whole", raw)
    first = dict(raw, training=dict(raw["training"], epochs=1))
    train(tmp_path, "split", first)
    out = str(tmp_path / "split")
    Trainer(from_dict(raw), out, progress=False, echo=lambda s: None, resume=True).run()
    (a, meta_a), (b, meta_b) = final_model(out), final_model(whole_out)
    assert meta_a["step"] == meta_b["step"] == whole["step"]
    for name in b:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# ---------------------------------------------------------------------------- MPI's host staging

class ZeroSumComm:
    """MPI.COMM_SELF whose float32 reductions come back as zeros, as if the other ranks' ΔΘ
    cancelled this one's: a step then changes no Θ (plain momentum from rest), unless the
    reduced values fail to reach the device. It also checks that MPI sees host memory only."""

    def __init__(self, comm):
        self._comm = comm

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def _zero(self, buf):
        assert isinstance(buf, np.ndarray), f"MPI was handed {type(buf)}, not host memory"
        if buf.dtype == np.float32:
            buf[...] = 0

    def Allreduce(self, send, recv, op=None):
        self._comm.Allreduce(send, recv, op=op)
        self._zero(recv)

    def Reduce(self, send, recv, op=None, root=0):
        self._comm.Reduce(send, recv, op=op, root=root)
        self._zero(recv)

    def Bcast(self, buf, root=0):
        assert isinstance(buf, np.ndarray), f"MPI was handed {type(buf)}, not host memory"
        self._comm.Bcast(buf, root=root)


def _mpi_theta(raw, steps=5, comm=None):
    """Θ after ``steps`` steps of an MPIBackend of one rank (this process): on MPI's world, or
    on ``comm(MPI.COMM_SELF)``."""
    from distffn.data.prepare import prepare_data
    from distffn.parallel.mpi import MPIBackend
    from distffn.parallel.mpi_env import world
    job = from_dict(raw)
    _, data, model = prepare_data(job)
    theta = np.empty(model.num_params, np.float32)
    model.init_params(theta, job.training.seed)
    # no comm: MPI's world (this process alone), so the rank picks its GPU as under mpiexec
    be = MPIBackend(job, data, comm=None if comm is None else comm(world().COMM_SELF))
    try:
        be.start(theta, None, 0)
        for step in range(steps):
            be.train_step(Batch(0, 64 * step, 64 * (step + 1), step), 0.05)
        return be.state()
    finally:
        be.close()


def _local_theta(raw, steps=5):
    """The same steps on a LocalBackend (the reference an MPI rank must reproduce)."""
    from distffn.data.prepare import prepare_data
    from distffn.parallel.local import LocalBackend
    job = from_dict(raw)
    _, data, model = prepare_data(job)
    theta = np.empty(model.num_params, np.float32)
    model.init_params(theta, job.training.seed)
    be = LocalBackend(job, data)
    try:
        be.start(theta, None, 0)
        for step in range(steps):
            be.train_step(Batch(0, 64 * step, 64 * (step + 1), step), 0.05)
        return be.state()
    finally:
        be.close()


@pytest.mark.parametrize("mode", ["allreduce", "central"])
def test_mpi_rank_stages_device_buffers_through_the_host(cp, fashion_small, mode):
    """One MPI rank on the emulated GPU: ΔΘ and Θ go through page-locked host twins around
    each collective (get(out=), set). Bit for bit the local GPU backend's Θ and buffers
    (one rank's collectives change nothing), and the CPU rank's within rounding."""
    raw = job_raw(fashion_small, OPTIMIZERS["adam"], True, backend="mpi", aggregation=mode)
    theta, state = _mpi_theta(raw)
    local_raw = job_raw(fashion_small, OPTIMIZERS["adam"], True)
    ref_theta, ref_state = _local_theta(local_raw)
    np.testing.assert_array_equal(theta, ref_theta)
    assert state.keys() == ref_state.keys()
    for name in ref_state:
        np.testing.assert_array_equal(state[name], ref_state[name], err_msg=name)
    cpu_theta, _ = _mpi_theta(job_raw(fashion_small, OPTIMIZERS["adam"], False, backend="mpi", aggregation=mode))
    np.testing.assert_allclose(theta, cpu_theta, rtol=1e-3, atol=1e-3 * np.abs(cpu_theta).max())


@pytest.mark.parametrize("mode", ["allreduce", "central"])
def test_mpi_collectives_results_reach_the_device(cp, fashion_small, mode):
    """The reduced ΔΘ comes back from the host twin to the device before the update: with
    reductions that return zeros, plain momentum from rest leaves Θ exactly where it was."""
    from distffn.data.prepare import prepare_data
    momentum = {"name": "momentum", "lr": 0.05, "momentum": 0.9}
    raw = job_raw(fashion_small, momentum, True, backend="mpi", aggregation=mode)
    theta, state = _mpi_theta(raw, comm=ZeroSumComm)
    _, _, model = prepare_data(from_dict(raw))
    theta0 = np.empty(model.num_params, np.float32)
    model.init_params(theta0, from_dict(raw).training.seed)
    np.testing.assert_array_equal(theta, theta0)
    assert not np.any(state["velocity"])


# ---------------------------------------------------------------------------- the emulator itself

BARRIER_AFTER_EXIT = r"""
extern "C" __global__ void early_exit(float* out) {
    __shared__ float s[256];
    if (threadIdx.x >= 200) return;          // these threads never reach the barrier
    s[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = s[255 - threadIdx.x];
}
extern "C" __global__ void tiny(float* out, float x) { out[threadIdx.x] = x * 1e-30f; }
"""


def test_the_emulator_refuses_what_a_gpu_would_not_do(cp):
    """What makes a passing emulated run mean something: host and device memory kept apart,
    argument types as the kernel declares them, barriers all threads reach, CuPy's flushing
    of float32 subnormals."""
    dev = cp.zeros(256, np.float32)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(dev)
    with pytest.raises(TypeError, match="Unsupported type"):
        dev + np.ones(256, np.float32)
    with pytest.raises(ValueError, match="non-scalar"):
        dev[...] = np.ones(256, np.float32)
    early = cp.RawKernel(BARRIER_AFTER_EXIT, "early_exit")
    with pytest.raises(TypeError, match="float32"):
        early((1,), (256,), (cp.zeros(256, np.float64),))
    early((1,), (256,), (dev,))
    with pytest.raises(RuntimeError, match="not reached by every thread"):
        dev.get()                                # the queue runs when the host waits
    tiny = cp.RawKernel(BARRIER_AFTER_EXIT, "tiny")
    with pytest.raises(TypeError, match="expected a NumPy float32"):
        tiny((1,), (1,), (dev, 1e-10))
    tiny((1,), (2,), (dev, np.float32(1e-10)))
    assert not dev[:2].get().any()               # 1e-40 is subnormal: flushed (-ftz=true)
