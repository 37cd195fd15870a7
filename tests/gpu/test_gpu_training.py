"""Training on a GPU against training on the CPU: a step, a short run, checkpoints crossing
devices both ways, evaluation, the CUDA-graph step, TF32, MPI ranks sharing a GPU, Ray with
``use_gpu``, and the refusal of a model that cannot fit. Run with ``pytest -m gpu`` on a
machine with CuPy and a CUDA GPU (skipped elsewhere: the ``cupy`` fixture).

Tolerances. float32 unit roundoff u = 2⁻²⁴ ≈ 6e-8. A product's entry summed over k terms is
within γ_k = k·u/(1 − k·u) of its terms' absolute sum, whatever order the GPU adds them in
(Higham, Accuracy and Stability, §3.5); NumPy's OpenBLAS and cuBLAS add in different orders,
so one step's gradients may differ by up to 2·γ_k of that scale between the devices, k the
longest sum (the batch, for ΔW). Over many steps these differences grow as training
amplifies them, so runs are compared by their results (accuracy, loss) with margins stated
at each test, and single steps entry by entry.
"""
import os
import sys

import numpy as np
import pytest

from distffn.jobspec import from_dict
from distffn.training.trainer import Trainer

from helpers import assert_model_of_one, final_model, run_group, run_mpi, write_job

pytestmark = pytest.mark.gpu

U = 2.0 ** -24
# Fashion-MNIST (8-bit images: the device gather runs) cut to 2,048 training samples; no
# scikit-learn needed on the GPU machine
SMALL_FM = {"name": "gpu", "data": {"dataset": "fashion-mnist", "limit_train": 2048},
          "model": {"layers": [784, 128, 10], "activation": "relu"},
          "optimizer": {"lr": 0.05, "momentum": 0.9}, "training": {"epochs": 3, "batch_size": 64},
          "checkpoint": {"every_steps": 0, "num_to_keep": 10}}


def job_with(**scaling):
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in SMALL_FM.items()}
    raw["scaling"] = scaling
    return raw


def train(tmp_path, name, raw, resume=False):
    job = from_dict(raw)
    out = str(tmp_path / name)
    return Trainer(job, out, progress=False, echo=lambda s: None, resume=resume).run(), out


def test_one_step_on_the_gpu_matches_the_cpu(cupy):
    """Θ after one momentum step from the same start, GPU against CPU, entry by entry:
    |Δ| ≤ lr·(2γ_k · (|X|ᵀ|dZ|)/B + ...) is bounded here by lr · 4·γ_k · max|g|-scale,
    with k = the batch (the longest sum), measured against a float64 step."""
    from distffn.data.prepare import prepare_data
    from distffn.data.sharding import Batch
    from distffn.parallel.local import LocalBackend
    results = {}
    for use_gpu in (False, True, None):          # None: the float64 reference on the CPU
        job = from_dict(job_with(use_gpu=bool(use_gpu), cuda_graph=False) if use_gpu is not None
                        else job_with(kernels="numpy"))
        _, data, model = prepare_data(job)
        theta = np.empty(model.num_params, np.float32)
        model.init_params(theta, job.training.seed)
        if use_gpu is None:
            from distffn.nn.model import MLP
            m64 = MLP(job.model, dtype=np.float64)
            x = np.asarray(data.x_train, np.float64)
            from distffn.data.sharding import epoch_permutation
            idx = epoch_permutation(job.training.seed, 0, x.shape[0])[:64]
            grads = np.zeros(model.num_params, np.float64)
            m64.loss_and_grad(m64.layout.views(theta.astype(np.float64)), m64.layout.views(grads),
                              x[idx], np.asarray(data.t_train)[idx])
            results[None] = (theta.astype(np.float64) - 0.05 * grads / 64, grads / 64)
            continue
        be = LocalBackend(job, data)
        be.start(theta, None, 0)
        be.train_step(Batch(0, 0, 64, 0), 0.05)
        results[use_gpu] = np.asarray(be.params().get() if use_gpu else be.params(), np.float64)
        be.close()
    ref, g = results[None]
    k = 64 * 784                        # the longest chain of sums a gradient entry depends on
    bound = 0.05 * 4 * k * U * (np.abs(g).max() + 1e-3) + 4 * U * np.abs(ref).max()
    for dev in (False, True):
        err = np.abs(results[dev] - ref).max()
        assert err <= bound, (dev, err, bound)
    assert np.abs(results[True] - results[False]).max() <= 2 * bound


def test_a_short_run_on_the_gpu_reaches_the_cpus_accuracy(cupy, tmp_path):
    """3 epochs: the same trajectory up to rounding, so the same test accuracy within a point
    (100 of the 10,000 test images)."""
    gpu, gpu_out = train(tmp_path, "gpu", job_with(use_gpu=True))
    cpu, cpu_out = train(tmp_path, "cpu", job_with())
    assert gpu["test_accuracy"] > 0.7
    assert abs(gpu["test_accuracy"] - cpu["test_accuracy"]) <= 0.01
    a, b = final_model(gpu_out)[0], final_model(cpu_out)[0]
    for name in b:          # 96 steps apart only by the order of float32 sums
        np.testing.assert_allclose(a[name], b[name], rtol=1e-3, atol=1e-3 * np.abs(b[name]).max(), err_msg=name)


@pytest.mark.parametrize("first, second", [(True, False), (False, True)])
def test_a_checkpoint_crosses_devices_both_ways(cupy, tmp_path, first, second):
    """2 epochs on one device, the third resumed on the other, against 3 on the first: the
    resumed run continues from the checkpoint's Θ and velocity (its step count and accuracy
    match; Θ within the rounding differences of one epoch on the other device)."""
    raw = job_with(use_gpu=first)
    raw["training"] = dict(raw["training"], epochs=2)
    train(tmp_path, "split", raw)
    raw = job_with(use_gpu=second)
    resumed, out = train(tmp_path, "split", raw, resume=True)
    whole, whole_out = train(tmp_path, "whole", job_with(use_gpu=first))
    a, meta_a = final_model(out)
    b, meta_b = final_model(whole_out)
    assert meta_a["step"] == meta_b["step"]
    assert abs(resumed["test_accuracy"] - whole["test_accuracy"]) <= 0.01
    for name in b:
        scale = np.abs(b[name]).max() + 1e-6
        assert np.abs(a[name] - b[name]).max() <= 1e-3 * scale, name


def test_evaluation_on_the_gpu_equals_the_cpus(cupy):
    """The test split's loss sum and right answers for the same Θ: the loss within the float32
    rounding of its terms (K-term softmax sums, exp/log within 2 ulp in CUDA), the count
    exactly but for rows whose two best logits tie within rounding."""
    from distffn.data.prepare import prepare_data
    from distffn.training.evaluation import SplitEvaluator
    job = from_dict(job_with())
    _, data, model = prepare_data(job)
    theta = np.empty(model.num_params, np.float32)
    model.init_params(theta, 3)
    out = {}
    for xp in (np, cupy):
        ev = SplitEvaluator(job.model, data.x_test, data.t_test, data.labels_test, 64, xp)
        out[xp] = ev(xp.asarray(theta))
    cpu, gpu = out[np], out[cupy]
    assert gpu.count == cpu.count
    n, k = cpu.count, 64
    assert abs(gpu.loss_sum - cpu.loss_sum) <= n * (4 * k * U + 8 * U) * (1 + abs(cpu.loss_sum) / n)
    assert abs(gpu.correct - cpu.correct) <= 1


def _backend(job_raw, use_graph_eager=False):
    from distffn.data.prepare import prepare_data
    from distffn.parallel.local import LocalBackend
    job = from_dict(job_raw)
    _, data, model = prepare_data(job)
    theta = np.empty(model.num_params, np.float32)
    model.init_params(theta, job.training.seed)
    be = LocalBackend(job, data)
    be.start(theta, None, 0)
    if use_graph_eager:
        be.graphs.off = "compared against the graph"      # eager steps on the graph's cuBLAS handle
    return be, data


@pytest.mark.parametrize("workers", [1, 2])
def test_the_cuda_graph_step_is_bit_identical_to_the_eager_step(cupy, workers):
    """60 steps (a short last batch and a new epoch among them) replayed from CUDA graphs
    against the same steps run eagerly: Θ, the velocity and the loss totals bit for bit."""
    from distffn.data.sharding import Batch
    out = []
    for eager in (False, True):
        raw = job_with(use_gpu=True, cuda_graph=True, num_workers=workers)
        be, data = _backend(raw, use_graph_eager=eager)
        n, B, step = data.x_train.shape[0], 64, 0
        for epoch in range(3):
            for start in range(0, n, B):
                be.train_step(Batch(epoch, start, min(start + B, n), step), 0.05 / (1 + step / 50))
                step += 1
                if step == 60:
                    break
            if step == 60:
                break
        tot = be.train_totals()
        if not eager:
            assert be.graphs.off is None and len(be.graphs.graphs) >= 1
        out.append((be.params().get(), be.aggregator.optimizer.state["velocity"].get(), tot.loss_sum,
                    tot.correct, tot.count))
        be.close()
    (t1, v1, l1, c1, n1), (t2, v2, l2, c2, n2) = out
    assert np.array_equal(t1, t2) and np.array_equal(v1, v2)
    assert (l1, c1, n1) == (l2, c2, n2)


def test_tf32_trains_to_float32s_accuracy(cupy, tmp_path):
    """TF32 products (10-bit mantissas) against float32: both accuracies printed (the record
    BENCHMARKS cites), and within 2 points of each other."""
    f32, _ = train(tmp_path, "f32", job_with(use_gpu=True))
    tf32, _ = train(tmp_path, "tf32", job_with(use_gpu=True, tf32=True))
    print(f"Fashion-MNIST (2,048 samples) 784-128-10, 3 epochs: float32 {f32['test_accuracy']:.4f}, TF32 {tf32['test_accuracy']:.4f}")
    assert abs(tf32["test_accuracy"] - f32["test_accuracy"]) <= 0.02


def _mpi_env():
    """Open MPI refuses root unless told (the GPU test machines run as root)."""
    env = {}
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


@pytest.mark.parametrize("mode", ["allreduce", "central"])
def test_two_mpi_ranks_on_the_gpu_equal_one(cupy, tmp_path, mode):
    """2 ranks (sharing the GPU when there is one) against 1 GPU worker, with the bound the
    CPU tests use: twice the difference 2 local GPU workers show from 1."""
    sections = {"data": {"dataset": "fashion-mnist", "limit_train": 512}, "model": {"layers": [784, 24, 10]}}
    r, out, _ = run_mpi(tmp_path, 2, mode, env=_mpi_env(), timeout=240, under_mpiexec=False,
                        scaling={"use_gpu": True}, **sections)
    assert r.returncode == 0, r.stderr
    if cupy.cuda.runtime.getDeviceCount() < 2:
        assert r.stderr.count("workers share 1 GPU on this node") == 1, r.stderr
    assert_model_of_one(str(out), tmp_path, workers=(2,), scaling={"use_gpu": True}, **sections)


def test_ray_workers_take_a_gpu(cupy, tmp_path):
    """Ray with use_gpu: one worker on the GPU, against the local GPU run."""
    pytest.importorskip("ray")
    job = write_job(tmp_path, job_with(use_gpu=True, backend="ray", num_workers=1))
    r = run_group([sys.executable, "-m", "distffn", "run", job, "--out", str(tmp_path / "ray"),
                   "--no-progress"], timeout=300)
    assert r.returncode == 0, r.stderr
    local, _ = train(tmp_path, "local", job_with(use_gpu=True))
    import json
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert abs(summary["test_accuracy"] - local["test_accuracy"]) <= 0.01


def test_a_model_too_large_for_the_gpu_is_refused_before_training(cupy, tmp_path):
    """784-200000-200000-10 (40 billion parameters, 640 GB with its state) on one GPU: exit 2,
    one line with the estimate and what the GPU has free, nothing trained."""
    job = write_job(tmp_path, job_with(use_gpu=True))
    r = run_group([sys.executable, "-m", "distffn", "run", job, "--out", str(tmp_path / "big"),
                   "--no-progress", "--set", "model.layers=[784, 200000, 200000, 10]"], timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distffn: error: model.layers:"), r.stderr
    assert "GiB of GPU memory" in lines[0] and "is free" in lines[0]
    assert not (tmp_path / "big" / "checkpoints").exists() or not os.listdir(tmp_path / "big" / "checkpoints")
