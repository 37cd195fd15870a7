"""Helpers shared by the tests: small jobs, running the CLI, reference computations."""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from distffn.cli import main
from distffn.data.load import load_dataset
from distffn.jobspec import DataConfig, ModelConfig, from_dict
from distffn.nn.activations import ACTIVATIONS
from distffn.nn.model import MLP
from distffn.nn.objectives import OBJECTIVES, P_CLIP
from distffn.parallel.watchdog import process_table
from distffn.training import Extension, Trainer
from distffn.training import checkpoint as ckpt
from distffn.training.extension import PRIORITY_CHECK

SMALL = {
    "name": "small",
    "data": {"dataset": "digits"},
    "model": {"layers": [64, 32, 10], "activation": "relu"},
    "optimizer": {"lr": 0.05, "momentum": 0.9},
    "training": {"epochs": 2, "batch_size": 50, "seed": 3},
}


def write_job(tmp_path, job=None, name="job.yaml", **sections):
    job = json.loads(json.dumps(job or SMALL))
    for sec, values in sections.items():
        job.setdefault(sec, {}).update(values)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(job))
    return str(path)


def run_cli(*argv):
    return main(["run", *argv, "--no-progress"])


def user_error(capsys, argv, *needles):
    """Run the CLI, expect exit 2 and one message on stderr that names the problem."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("distffn: error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def final_params(run_dir):
    _, path = ckpt.list_checkpoints(os.path.join(run_dir, "checkpoints"))[-1]
    arrays, meta = ckpt.load_checkpoint(path)
    return arrays, meta


def interrupted_copy(full, cut, last_step):
    """A run directory as if the run had stopped after checkpoint ``last_step``."""
    os.makedirs(cut / "checkpoints")
    for step, path in ckpt.list_checkpoints(str(full / "checkpoints")):
        if step <= last_step:
            shutil.copy(path, cut / "checkpoints")


def npz_job(tmp_path, **arrays):
    rng = np.random.default_rng(0)
    base = {"x_train": rng.standard_normal((40, 3)).astype(np.float32),
            "y_train": rng.integers(0, 2, 40), "x_test": rng.standard_normal((10, 3)).astype(np.float32),
            "y_test": rng.integers(0, 2, 10)}
    base.update(arrays)
    path = tmp_path / "data.npz"
    np.savez(path, **base)
    return write_job(tmp_path, data={"dataset": "npz", "path": str(path)}, model={"layers": [3, 4, 2]},
                     training={"batch_size": 8})


def raw_idx_bytes(magic, dims, payload):
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + payload


def checkpoint_of_a_run(tmp_path):
    out = tmp_path / "run"
    run_cli(write_job(tmp_path), "--out", str(out))
    return ckpt.list_checkpoints(str(out / "checkpoints"))[-1][1]


FASHION_DIR = "/usr/share/datasets/fashion-mnist"
IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
T_IMAGES, T_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"


def idx_bytes(arr: np.ndarray) -> bytes:
    assert arr.dtype == np.uint8
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.tobytes()


def write_bytes(path, payload: bytes, gz: bool):
    path = str(path) + (".gz" if gz else "")
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(payload)
    return path


def write_mnist(folder, n_train=5, n_test=3, gz=False, seed=0):
    """Four tiny IDX files; returns the raw arrays."""
    rng = np.random.default_rng(seed)
    arrays = {IMAGES: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              LABELS: rng.integers(0, 10, n_train, dtype=np.uint8),
              T_IMAGES: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              T_LABELS: rng.integers(0, 10, n_test, dtype=np.uint8)}
    os.makedirs(folder, exist_ok=True)
    for name, arr in arrays.items():
        write_bytes(os.path.join(folder, name), idx_bytes(arr), gz)
    return arrays


def mnist(path, **kw):
    return load_dataset(DataConfig(dataset="mnist", path=str(path), **kw), seed=0)


def npz(tmp_path, name="d.npz", **arrays):
    rng = np.random.default_rng(0)
    base = dict(x_train=rng.normal(size=(20, 3)), y_train=rng.integers(0, 3, 20),
                x_test=rng.normal(size=(10, 3)), y_test=rng.integers(0, 3, 10))
    base.update(arrays)
    path = tmp_path / name
    np.savez(path, **{k: v for k, v in base.items() if v is not None})
    return str(path)


def load_npz(path, **kw):
    return load_dataset(DataConfig(dataset="npz", path=path, **kw), seed=0)


# every registered output/loss pair and trainable activation: a new one is tested by registering it
PAIRS = [(cls.output, cls.loss) for _, cls in OBJECTIVES.items()]
TRAINABLE = ACTIVATIONS.names(lambda act: act.trainable)


def objective(output, loss, k):
    """The registered objective for ``output``/``loss`` with ``k`` outputs."""
    return OBJECTIVES.get(f"{output}/{loss}")(k)


KINKED = {"relu", "leaky_relu", "prelu", "abs"}


MARGIN = 1e-3                  # no pre-activation (maxout gap, l1 residual) this close to a kink


LAYERS = [5, 7, 6, 4]          # two hidden layers: the chain rule through hidden layers is exercised


N_ROWS = 8


def ref_hidden(name, z, alpha=None, slope=0.01, pieces=2):
    """The hidden activations written from their textbook definitions."""
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    if name == "tanh":
        return np.tanh(z)
    if name == "relu":
        return np.where(z > 0, z, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, z, slope * z)
    if name == "prelu":
        return np.where(z > 0, z, alpha[None, :] * z)
    if name == "abs":
        return np.abs(z)
    if name == "softplus":
        return np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0.0)
    if name == "maxout":                       # unit j = max over columns j*k .. j*k+k-1
        n = z.shape[0]
        return z.reshape(n, -1, pieces).max(axis=2)
    if name == "linear":
        return z.copy()
    raise AssertionError(name)


def ref_forward(p, x, cfg: ModelConfig):
    """Pre-activations of every layer (last = logits), from copies of the parameters."""
    zs, a = [], x
    n_layers = len(cfg.layers) - 1
    for i in range(n_layers):
        z = a @ p[f"W{i}"] + p[f"b{i}"]
        zs.append(z)
        if i < n_layers - 1:
            a = ref_hidden(cfg.activation, z, p.get(f"alpha{i}"), cfg.leaky_slope, cfg.maxout_pieces)
    return zs


def ref_loss(output, loss, z, t):
    """Summed-over-rows loss written from the formulas (mse/l1 averaged over the K outputs)."""
    k = z.shape[1]
    if output == "softmax":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        pt = p[np.arange(len(t)), t]
        if loss == "cross_entropy":
            return float(-np.log(np.clip(pt, *P_CLIP)).sum())
        if loss == "one_minus_true_prob":
            return float((1.0 - pt).sum())
        if loss == "expected_squared_error":
            c = (np.arange(k)[None, :] - t[:, None]) ** 2
            return float((p * c).sum())
    if output == "sigmoid":
        if loss == "binary_cross_entropy":       # -[y log s + (1-y) log(1-s)] = log(1+e^z) - y z
            return float((np.logaddexp(0.0, z) - t * z).sum())
        if loss == "mse":
            s = 1.0 / (1.0 + np.exp(-z))
            return float(((s - t) ** 2).sum() / k)
    if output == "linear":
        if loss == "mse":
            return float(((z - t) ** 2).sum() / k)
        if loss == "l1":
            return float(np.abs(z - t).sum() / k)
    raise AssertionError((output, loss))


def make_targets(output, loss, rng, n, k):
    if output == "softmax":
        return rng.integers(0, k, n)
    if output == "sigmoid":
        if loss == "binary_cross_entropy":
            return rng.integers(0, 2, (n, k)).astype(np.float64)
        return rng.uniform(0.0, 1.0, (n, k))
    return rng.normal(0.0, 1.0, (n, k))


def near_kink(cfg, zs, t, output, loss):
    hidden = zs[:-1]
    if cfg.activation in KINKED and any(np.abs(z).min() < MARGIN for z in hidden):
        return True
    if cfg.activation == "maxout":
        for z in hidden:
            s = np.sort(z.reshape(z.shape[0], -1, cfg.maxout_pieces), axis=2)
            if (s[:, :, -1] - s[:, :, -2]).min() < MARGIN:
                return True
    if output == "linear" and loss == "l1" and np.abs(zs[-1] - t).min() < MARGIN:
        return True
    if output == "softmax" and loss == "cross_entropy":   # the probability clip is a kink too
        z = zs[-1]
        e = np.exp(z - z.max(axis=1, keepdims=True))
        pt = (e / e.sum(axis=1, keepdims=True))[np.arange(len(t)), t]
        if pt.min() < 1e3 * P_CLIP[0] or pt.max() > 1 - 1e3 * (1 - P_CLIP[1]):
            return True
    return False


def setup_net(activation, output, loss, seed, layers=LAYERS, n=N_ROWS):
    """A float64 net with random parameters and data, re-drawn until nothing sits near a kink."""
    cfg = ModelConfig(layers=list(layers), activation=activation, output=output, loss=loss)
    model = MLP(cfg, np, dtype=np.float64)
    rng = np.random.default_rng(seed)
    for _ in range(200):
        flat = rng.normal(0.0, 0.7, model.num_params)
        views = model.layout.views(flat)
        for name in views:
            if name.startswith("alpha"):
                views[name][...] = rng.uniform(0.1, 0.5, views[name].shape)
        x = rng.normal(0.0, 1.0, (n, layers[0]))
        t = make_targets(output, loss, rng, n, layers[-1])
        p = {k: np.array(v) for k, v in views.items()}
        if not near_kink(cfg, ref_forward(p, x, cfg), t, output, loss):
            return model, flat, x, t
    raise AssertionError("could not draw parameters away from the kinks")


def grads_of(model, flat, x, t, labels=None):
    g = np.full(model.num_params, np.nan)          # every entry must be written
    loss, correct = model.loss_and_grad(model.layout.views(flat), model.layout.views(g), x, t, labels)
    return float(loss), g, correct


def loss_of(model, flat, x, t):
    return float(model.evaluate(model.layout.views(flat), x, t)[0])


def train_job(tmp_path, raw):
    job = from_dict(raw)
    out = str(tmp_path / raw["name"])
    return Trainer(job, out, progress=False, echo=lambda s: None).run(), out


EQUIV_JOB = {
    "name": "equiv",
    "data": {"dataset": "digits", "limit_train": 101},
    "model": {"layers": [64, 24, 10], "activation": "tanh"},
    "optimizer": {"lr": 0.1, "momentum": 0.9, "schedule": "inverse_time", "decay": 0.1},
    "training": {"epochs": 2, "batch_size": 50, "seed": 5},
    "checkpoint": {"every_steps": 0, "num_to_keep": 2},
}


MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")


needs_mpi = pytest.mark.skipif(not os.access(MPIEXEC, os.X_OK), reason="the mpi extra is not installed")


def run_group(cmd, timeout, env=None):
    """subprocess.run in its own session; on a timeout the whole group dies (mpiexec's ranks
    too), so a failing test never leaves ranks spinning behind it."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def job_dict(**sections):
    job = json.loads(json.dumps(EQUIV_JOB))
    for sec, values in sections.items():
        job.setdefault(sec, {}).update(values)
    return job


def final_model(run_dir):
    """Every array of the newest checkpoint (Θ and the optimizer's buffers) and its meta."""
    found = ckpt.newest_valid_checkpoint(os.path.join(run_dir, "checkpoints"))
    return found[1], found[2]


ADAM = {"name": "adam", "lr": 0.01, "weight_decay": 1e-3}   # the equivalence job with Adam


def train_in_process(out_dir, **sections):
    job = from_dict(job_dict(**sections))
    return Trainer(job, str(out_dir), progress=False, echo=lambda s: None).run()


def assert_same_model(a_dir, b_dir):
    a, meta_a = final_model(a_dir)
    b, meta_b = final_model(b_dir)
    assert meta_a["step"] == meta_b["step"] == 6
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=2e-6, err_msg=name)


def assert_model_of_one(run_dir, tmp_path, workers=(2,), **sections):
    """The run in ``run_dir`` (the equivalence job changed by ``sections``, on any number of
    workers, possibly changing on the way) trained the 1-worker model: Θ and the optimizer's
    buffers within twice the largest difference that uninterrupted runs on each of ``workers``
    show from 1 worker for the same job (the N-vs-1 bound grows with the number of steps: about
    2e-7 after 6, 4e-6 after 300). Returns (that difference, the bound)."""
    one, _ = final_model(train_dir(tmp_path / "n1", sections))
    run, meta = final_model(run_dir)
    assert meta["step"] == final_model(tmp_path / "n1")[1]["step"]

    def distance(theta):
        return max(float(np.abs(theta[k].astype(np.float64) - one[k]).max()) for k in one)
    bound = 2 * max(distance(final_model(train_dir(tmp_path / f"n{n}", sections, num_workers=n))[0])
                    for n in workers)
    assert set(run) == set(one) and 0 < bound < 1e-4, bound
    found = distance(run)
    assert found <= bound, (found, bound)
    return found, bound


def train_dir(out, sections, num_workers=1):
    """The equivalence job changed by ``sections`` trained in process on ``num_workers`` local workers."""
    sections = {**sections, "scaling": {**sections.get("scaling", {}), "backend": "local", "num_workers": num_workers}}
    train_in_process(out, **sections)
    return out


def write_equiv_job(tmp_path, **sections):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_dict(**sections)))
    return str(path)


def run_mpi(tmp_path, n, mode, env=None, timeout=120, under_mpiexec=True, **sections):
    job = write_equiv_job(tmp_path, **sections)
    out = tmp_path / "run"
    args = ["run", job, "--out", str(out), "--no-progress",
            "--set", "scaling.backend=mpi", "--set", f"scaling.num_workers={n}",
            "--set", f"scaling.aggregation={mode}"]
    cli = [sys.executable, "-m", "distffn.cli", *args]
    cmd = [MPIEXEC, "-n", str(n), *cli] if under_mpiexec else cli
    t0 = time.monotonic()
    r = run_group(cmd, timeout, env=dict(os.environ, **(env or {})))
    return r, out, time.monotonic() - t0


def run_ray_cli(tmp_path, capsys, mode, **scaling):
    """`distffn run` on the module's Ray instance: (exit code, stderr, seconds)."""
    job = write_equiv_job(tmp_path, scaling={"backend": "ray", "num_workers": 2, "aggregation": mode, **scaling})
    t0 = time.monotonic()
    code = main(["run", job, "--out", str(tmp_path / "run"), "--no-progress"])
    return code, capsys.readouterr().err, time.monotonic() - t0


def assert_cpus_released(ray, within_s=20):
    """Torn down: the actors and their placement group gave every CPU back."""
    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + within_s
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == total


class StopAt(Extension):
    """Ends the run after ``step`` (what an early-stopping extension does)."""

    priority = PRIORITY_CHECK

    def __init__(self, step):
        self.step = step
        self.trigger = lambda trainer: trainer.state.step == step

    def __call__(self, trainer):
        trainer.stop(f"step {self.step} reached")


def processes_in_sessions(sessions, within_s: float = 0.0) -> list[int]:
    """Live pids whose session id is one of ``sessions`` (read from /proc; nothing is searched by
    name), waiting up to ``within_s`` for them to be gone."""
    deadline = time.monotonic() + within_s
    while True:
        found = _session_members(sessions)
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.2)


def _session_members(sessions) -> list[int]:
    return [pid for pid, p in process_table().items() if p.state != "Z" and p.session in sessions]


def _session_of(pid: int):
    proc = process_table().get(pid)
    return None if proc is None else proc.session


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port nothing on 127.0.0.1 uses right now (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_listeners(sessions) -> set:
    """Every TCP/UDP socket (address, process name) that a process of ``sessions`` listens on now."""
    out = subprocess.run(["ss", "-ltunpH"], capture_output=True, text=True, check=True).stdout
    return {(line.split()[4], name) for line in out.splitlines()
            for name, pid in re.findall(r'\("([^"]+)",pid=(\d+)', line) if _session_of(int(pid)) in sessions}


def processes_naming(path: str, within_s: float = 0.0) -> list[int]:
    """Live pids whose command line names ``path`` (a run directory; read from /proc, nothing
    is killed), waiting up to ``within_s`` for them to be gone."""
    deadline = time.monotonic() + within_s
    while True:
        found = [pid for pid, p in process_table().items() if p.state != "Z" and _cmdline_names(pid, path)]
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.3)


def _cmdline_names(pid: int, path: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return path.encode() in f.read()
    except OSError:
        return False


def listeners_during(cmd, timeout, env=None, every_s=0.2):
    """Run ``cmd`` in a session of its own and sample, while it runs, every TCP/UDP socket that
    a process of that session listens on (``ss -ltunp``). Returns (CompletedProcess, {(address,
    process name)})."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    seen = set()
    deadline = time.monotonic() + timeout
    try:
        while p.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(cmd, timeout)
            seen |= session_listeners({p.pid})
            time.sleep(every_s)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
    return subprocess.CompletedProcess(cmd, p.returncode, out, err), seen


def is_loopback(address: str) -> bool:
    """``127.0.0.1:80``, ``[::1]:80``, ``[::ffff:127.0.0.1]:80``, ``127.0.0.53%lo:53``."""
    host = address.rsplit(":", 1)[0].strip("[]").split("%")[0]
    return host.startswith("127.") or host == "::1" or host.startswith("::ffff:127.")


def kill_a_worker_mid_run(cmd, run_dir, rank=1, after_checkpoints=3, timeout=240):
    """Start ``cmd`` (a `distffn run` into ``run_dir``) in a session of its own; once it has
    written ``after_checkpoints`` checkpoints, SIGKILL worker ``rank`` (its pid from
    RUN_DIR/workers.json) and let the run go on. Returns (CompletedProcess, killed pid)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while len(ckpt.list_checkpoints(os.path.join(run_dir, "checkpoints"))) < after_checkpoints \
                or not os.path.exists(os.path.join(run_dir, "workers.json")):
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1]
            time.sleep(0.05)
        with open(os.path.join(run_dir, "workers.json")) as f:
            victim = json.load(f)[rank]["pid"]
        os.kill(victim, signal.SIGKILL)
        out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    return subprocess.CompletedProcess(cmd, p.returncode, out, err), victim


def running_past(step):
    """A ``done`` for :func:`wait_for_status`: past ``step``, or no longer pending or running."""
    return lambda s: (s.get("step") or 0) >= step or s["state"] not in {"PENDING", "RUNNING"}


def wait_for_status(distffn, job_id, done, timeout=240, poll_s=0.5) -> dict:
    """``distffn status JOB_ID --json`` until ``done(status)`` holds or ``timeout`` s pass;
    the last status either way (the caller asserts on it)."""
    deadline = time.monotonic() + timeout
    while True:
        r = distffn("status", job_id, "--json")
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        if done(status) or time.monotonic() > deadline:
            return status
        time.sleep(poll_s)


def assert_same_as_uninterrupted_mpi_run(job, run_dir, tmp_path, workers=2):
    """The model in ``run_dir`` (a run that was stopped and resumed, or requeued) equals, bit
    for bit, ``job`` run uninterrupted on ``workers`` MPI ranks on this machine (a sum of the
    same shards is the same sum anywhere)."""
    full = tmp_path / "full"
    r = run_group([sys.executable, "-m", "distffn", "run", job, "--no-progress", "--out", str(full),
                   "--set", "scaling.backend=mpi", "--set", f"scaling.num_workers={workers}"], timeout=300)
    assert r.returncode == 0, r.stderr
    a, b = final_model(full)[0], final_model(run_dir)[0]
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
