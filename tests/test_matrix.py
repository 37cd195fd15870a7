"""The matrix: every command on every kind of data the loaders produce, and on every backend
and scheduler where it applies, a few steps each.

Two tables make it: ``DATA`` (a data kind → the job-spec fragment that makes that data) and
``COMMANDS`` (a command → the check that runs it and asserts on what it wrote, and where it
runs). The test is their product; a new data kind or command joins by one line in its table.

                   local        mpi (2 ranks)             ray (2 workers)   Ray Jobs, SLURM
  run, --resume,   every kind   EVERYWHERE                EVERYWHERE
  adaptive batch
  eval, plot,      every kind
  noise-scale
  sweep            every kind   EVERYWHERE (timed runs)
  submit+status                                                             EVERYWHERE (Ray Jobs:
  +logs                                                                     also diabetes)
  stop                                                                      EVERYWHERE

Which cells, and why:

* every data kind × every local command (run, --resume, eval, plot, noise-scale, sweep): each
  costs a second or a few, and every loader's output meets every command's own code path
  (8-bit images kept as bytes, float features, integer npz features, regression targets);
* ``EVERYWHERE`` kinds (the real Fashion-MNIST: 8-bit IDX images) also cross run and --resume
  on mpi (distffn's own mpiexec) and ray (the session's Ray head), the sweep with timed runs on
  2 MPI ranks, and submit+status+logs and stop on both schedulers. Those cells are the slowest
  (a process start per rank, a cluster job), so one data kind crosses them all: 8-bit images,
  whose shared-memory, byte-gather and checkpoint paths differ most from the float arrays, and
  the crossing that broke before. ``EXTRA`` adds single cells: a regression target (no accuracy
  in status) submitted to Ray Jobs (status reads the run folder alike for both schedulers).
  Every other kind would add ~12 s per scheduler (and their loaders are the same code on a
  cluster), so they are left out. Not crossed: sweeps timed on Ray or with concurrent Ray
  trials (an embedded Ray per timed run: slow for what it adds here).

Every base run (a data kind on a backend) is trained once for the module and reused by eval,
plot, noise-scale and the --resume cells, which compare with it bit for bit. The file takes
about 2 minutes on 2 cores at load 1, 3 at load 4-5 (measured); most of it is the cluster cells,
the local sweeps' timed runs (a process each) and the clusters' start and stop.
"""
from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import matplotlib.image as mpimg
import numpy as np
import pytest
import yaml

from distffn.cli import main
from distffn.training import checkpoint as ckpt
from distffn.training.evaluation import evaluate_checkpoint

from helpers import FASHION_DIR, IMAGES, LABELS, T_IMAGES, T_LABELS, final_model, run_group, write_mnist

EPOCHS, BATCH = 2, 40
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- data kinds

@dataclass(frozen=True)
class Kind:
    """A kind of data: ``data(folder)`` writes what it needs there and returns the job's data
    section; ``layers`` fit it; ``n_train`` training samples are used (data.limit_train)."""
    data: Callable
    layers: list
    image: bool = False             # the loader gives an image shape: plot draws weights.png
    regression: bool = False        # float targets: a linear output and mse, no accuracy
    n_train: int = 200


def builtin(name):
    return lambda folder: {"dataset": name}


def fashion_mnist(folder):
    """Debian's Fashion-MNIST, decompressed once for the module beside the job folders: the
    real images, without the 0.7 s of gunzip every load of the .gz files costs (a sweep loads
    its data seven times); the tiny ``idx-gz`` kind keeps the gzip path in the matrix."""
    dest = folder.parent / "fashion-mnist-idx"
    if not dest.exists():
        part = folder.parent / "fashion-mnist-idx.part"
        part.mkdir()
        for base in (IMAGES, LABELS, T_IMAGES, T_LABELS):
            with gzip.open(os.path.join(FASHION_DIR, base + ".gz")) as src, open(part / base, "wb") as dst:
                shutil.copyfileobj(src, dst)
        part.rename(dest)
    return {"dataset": "fashion-mnist", "path": str(dest)}


def idx_gz(folder):
    """Eight-bit images in gzip-compressed IDX files written here (random pixels and labels)."""
    write_mnist(folder / "mnist", n_train=240, n_test=50, gz=True, seed=4)
    return {"dataset": "mnist", "path": str(folder / "mnist")}


def npz_arrays(x_dtype, regression=False):
    """An .npz of 240 / 60 samples of 6 features of ``x_dtype``; integer class labels, or
    two float targets."""
    def write(folder):
        rng = np.random.default_rng(7)
        x = rng.integers(0, 200, (300, 6)) if np.dtype(x_dtype).kind in "iu" else rng.normal(size=(300, 6))
        x = x.astype(x_dtype)
        w = rng.normal(size=(6, 3))
        scores = (x.astype(np.float64) - x.mean(0)) / x.std(0) @ w
        y = scores[:, :2].astype(np.float32) if regression else scores.argmax(1)
        path = folder / "data.npz"
        np.savez(path, x_train=x[:240], y_train=y[:240], x_test=x[240:], y_test=y[240:])
        return {"dataset": "npz", "path": str(path)}
    return write


DATA = {
    "fashion-mnist": Kind(fashion_mnist, [784, 16, 10], image=True),
    "idx-gz": Kind(idx_gz, [784, 16, 10], image=True),
    "digits": Kind(builtin("digits"), [64, 16, 10], image=True),
    "breast-cancer": Kind(builtin("breast-cancer"), [30, 8, 2]),
    "diabetes": Kind(builtin("diabetes"), [10, 8, 1], regression=True),
    "npz-float32": Kind(npz_arrays(np.float32), [6, 8, 3]),
    "npz-uint8": Kind(npz_arrays(np.uint8), [6, 8, 3]),
    "npz-int64": Kind(npz_arrays(np.int64), [6, 8, 3]),
    "npz-regression": Kind(npz_arrays(np.float32, regression=True), [6, 8, 2], regression=True),
}
# the kinds that also cross every backend and scheduler (see the module's docstring)
EVERYWHERE = ("fashion-mnist",)


def steps_per_epoch(kind: Kind) -> int:
    return math.ceil(kind.n_train / BATCH)


def job_dict(name: str, kind: Kind, folder, backend: str, ray_address=None) -> dict:
    model = {"layers": kind.layers}
    if kind.regression:
        model.update(output="linear", loss="mse")
    scaling = {"backend": backend, "num_workers": 1 if backend == "local" else 2}
    if ray_address:
        scaling["address"] = ray_address
    return {"name": name, "data": {**kind.data(folder), "limit_train": kind.n_train},
            "model": model, "optimizer": {"lr": 0.02 if kind.regression else 0.05, "momentum": 0.9},
            "training": {"epochs": EPOCHS, "batch_size": BATCH, "seed": 1}, "scaling": scaling}


# ---------------------------------------------------------------- running distffn

def in_process(*argv) -> tuple[int, str, str]:
    """`distffn ARGV` in this process (no interpreter start): (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def ray_env(request) -> tuple[dict, str]:
    """The environment and GCS address that reach the session's Ray head (token auth)."""
    state, _, env = request.getfixturevalue("ray_head")
    return ({**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(state / "auth_token")},
            f"127.0.0.1:{env['RAY_HEAD_PORT']}")


class Runs:
    """The job file of every (data kind, backend), written once, and its base run, trained
    once for the module on first use (eval, plot, noise-scale and --resume reuse it)."""

    def __init__(self, root):
        self.root = root
        self.jobs, self.done = {}, {}

    def job(self, name, backend, request) -> str:
        if (name, backend) not in self.jobs:
            folder = self.root / f"{name}-{backend}"
            folder.mkdir()
            address = ray_env(request)[1] if backend == "ray" else None
            path = folder / "job.yaml"
            path.write_text(yaml.safe_dump(job_dict(name, DATA[name], folder, backend, address)))
            self.jobs[name, backend] = str(path)
        return self.jobs[name, backend]

    def base(self, cell) -> str:
        key = cell.name, cell.backend
        if key not in self.done:
            out = os.path.join(os.path.dirname(cell.job), "run")
            code, stdout, stderr = cell.distffn("run", cell.job, "--out", out, "--no-progress")
            assert code == 0, f"the base run of {key} failed:\n{stdout}\n{stderr}"
            self.done[key] = out
        return self.done[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("matrix"))


@dataclass
class Cell:
    """One cell of the matrix: a data kind, where it runs, and what the check may use."""
    name: str
    kind: Kind
    where: str
    runs: Runs
    tmp: object
    request: object
    backend: str = "local"          # the job's scaling.backend
    job: str = field(init=False)

    def __post_init__(self):
        self.job = self.runs.job(self.name, self.backend, self.request)

    def distffn(self, *argv, timeout=240) -> tuple[int, str, str]:
        """`distffn ARGV` here: in this process on local, else a process of its own (distffn
        relaunches itself under mpiexec; the Ray client needs the head's token)."""
        if self.backend == "local":
            return in_process(*argv)
        env = ray_env(self.request)[0] if self.backend == "ray" else None
        r = run_group([sys.executable, "-m", "distffn", *map(str, argv)], timeout, env=env)
        return r.returncode, r.stdout, r.stderr

    def base(self) -> str:
        return self.runs.base(self)


# ---------------------------------------------------------------- what each command must do

def summary_of(run_dir) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def records(run_dir, event) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("event") == event]


def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50, (path, img.shape)


def assert_bit_for_bit(a_dir, b_dir):
    """The newest checkpoints hold the same step and the same arrays (Θ and the optimizer's
    buffers), bit for bit."""
    a, meta_a = final_model(a_dir)
    b, meta_b = final_model(b_dir)
    assert meta_a["step"] == meta_b["step"]
    assert set(a) == set(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), f"{name} differs: max |Δ| {np.abs(a[name] - b[name]).max()}"


def check_run(cell):
    """summary.json with finite losses after epochs × ⌈n_train / B⌉ steps, one epoch record
    each; N workers on any backend train the model of one local worker."""
    run = cell.base()
    s = summary_of(run)
    spe = steps_per_epoch(cell.kind)
    assert s["step"] == EPOCHS * spe and s["epochs"] == EPOCHS
    assert math.isfinite(s["train_loss"]) and math.isfinite(s["test_loss"]), s
    assert (s["test_accuracy"] is None) == cell.kind.regression, s
    assert s["backend"] == cell.backend and s["num_workers"] == (1 if cell.backend == "local" else 2)
    (start,) = records(run, "start")
    assert start["n_train"] == cell.kind.n_train and start["steps_per_epoch"] == spe
    assert [r["epoch"] for r in records(run, "epoch")] == list(range(1, EPOCHS + 1))
    if cell.backend != "local":
        local = Cell(cell.name, cell.kind, "local", cell.runs, cell.tmp, cell.request).base()
        a, _ = final_model(local)
        b, _ = final_model(run)
        for name in a:
            np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=2e-6, err_msg=name)


def check_resume(cell):
    """A run stopped mid-epoch (training.max_steps), then `--resume`d, ends with the
    uninterrupted run's arrays, bit for bit."""
    stop = steps_per_epoch(cell.kind) + 2
    out = cell.tmp / "resumed"
    code, stdout, stderr = cell.distffn("run", cell.job, "--out", out, "--no-progress",
                                        "--set", f"training.max_steps={stop}")
    assert code == 0, stdout + stderr
    assert ckpt.list_checkpoints(str(out / "checkpoints"))[-1][0] == stop
    code, stdout, stderr = cell.distffn("run", cell.job, "--out", out, "--no-progress", "--resume")
    assert code == 0, stdout + stderr
    assert f"(step {stop})" in stdout + stderr
    assert_bit_for_bit(cell.base(), out)


ADAPTIVE = ["--set", "training.batch_size=adaptive", "--set", "metrics.noise_every=1",
            "--set", "training.adaptive={start: 8, max: 64, every_steps: 2, multiple: 2}"]


def check_adaptive(cell):
    """``training.batch_size: adaptive``: batches re-chosen every 2 steps within [8, 64] in
    multiples of 2, each a ``batch`` record; a run stopped between two choices and
    checkpoints, then `--resume`d, ends bit for bit with the uninterrupted adaptive run; 2
    workers on mpi and ray choose the same batches as 1 local worker (its two halves are
    their shards) and train its model."""
    full, cut = cell.tmp / "adaptive", cell.tmp / "adaptive-cut"
    code, stdout, stderr = cell.distffn("run", cell.job, "--out", full, "--no-progress", *ADAPTIVE)
    assert code == 0, stdout + stderr
    chosen = [(r["step"], r["batch_size"]) for r in records(full, "batch")]
    assert len(chosen) >= 2 and all(8 <= b <= 64 and b % 2 == 0 for _, b in chosen), chosen
    s = summary_of(full)
    assert s["samples"] == EPOCHS * cell.kind.n_train and s["batch_size"] == chosen[-1][1], s
    if cell.backend == "local":
        stop = chosen[1][0] + 1                      # after a choice, before the next one
        code, stdout, stderr = cell.distffn("run", cell.job, "--out", cut, "--no-progress", *ADAPTIVE,
                                            "--set", f"training.max_steps={stop}")
        assert code == 0, stdout + stderr
        code, stdout, stderr = cell.distffn("run", cell.job, "--out", cut, "--no-progress", *ADAPTIVE, "--resume")
        assert code == 0, stdout + stderr
        assert f"(step {stop})" in stdout + stderr
        assert_bit_for_bit(full, cut)
        return
    local = Cell(cell.name, cell.kind, "local", cell.runs, cell.tmp / "local", cell.request)
    (cell.tmp / "local").mkdir()
    reference = cell.tmp / "local" / "adaptive"
    code, stdout, stderr = local.distffn("run", local.job, "--out", reference, "--no-progress", *ADAPTIVE)
    assert code == 0, stdout + stderr
    assert chosen == [(r["step"], r["batch_size"]) for r in records(reference, "batch")]
    a, b = final_model(reference)[0], final_model(full)[0]
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=2e-6, err_msg=name)


def check_eval(cell):
    """The test loss and accuracy the run's summary gives, printed."""
    run = cell.base()
    s = summary_of(run)
    code, out, err = cell.distffn("eval", run)
    assert code == 0, out + err
    m = re.search(r": step (\d+)  test loss (\S+)(?:  test accuracy \S+% \((\d+)/(\d+)\))?$", out.strip())
    assert m, out
    assert int(m[1]) == s["step"]
    assert abs(float(m[2]) - s["test_loss"]) <= 5e-5 + 1e-6 * abs(s["test_loss"]), (out, s["test_loss"])
    if cell.kind.regression:
        assert m[3] is None, out
    else:
        assert m[3] is not None and int(m[3]) / int(m[4]) == s["test_accuracy"], (out, s["test_accuracy"])
    assert evaluate_checkpoint(run)["test_loss"] == pytest.approx(s["test_loss"], rel=1e-6)


def check_plot(cell):
    """curves.png, and weights.png for images, as the paths printed."""
    run = cell.base()
    code, out, err = cell.distffn("plot", run)
    assert code == 0, out + err
    names = ["curves.png", "weights.png"] if cell.kind.image else ["curves.png"]
    assert out.split() == [os.path.join(run, n) for n in names]
    for path in out.split():
        assert_png(path)


def check_noise_scale(cell):
    """Finite tr(Σ) and |G|² with their standard errors, from the batches asked for."""
    run = cell.base()
    code, out, err = cell.distffn("noise-scale", run, "--batches", 3, "--small", 8, "--big", 32, "--json")
    assert code == 0, out + err
    r = json.loads(out)
    assert (r["batches"], r["b_small"], r["b_big"]) == (3, 8, 32)
    assert r["n_train"] == cell.kind.n_train and r["step"] == summary_of(run)["step"]
    for key in ("trace_sigma", "trace_sigma_se", "grad_norm_sq", "grad_norm_sq_se"):
        assert math.isfinite(r[key]), r
    assert r["b_simple"] is None or math.isfinite(r["b_simple"]), r


def check_sweep(cell):
    """A tiny sweep (2 batch sizes, 1 rate, 1 epoch): results.csv with both, summary.json with
    the noise scale measured at both and a step time for every (batch size, workers), and the
    three PNGs. Beyond local, the timed runs use 2 workers on that backend too."""
    workers = [1] if cell.where == "local" else [1, 2]
    sweep = cell.tmp / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "job": cell.job, "batch_sizes": [16, 32], "lr": [0.05], "max_epochs": 1,
        "target": {"metric": "test_loss", "value": 1e6},       # reached at the first evaluation
        "num_workers": workers, "timing_backend": "mpi" if cell.where == "local" else cell.where,
        "timing_steps": 2, "timing_repeats": 1, "noise_batches": 2}))
    out = cell.tmp / "sweep"
    code, stdout, stderr = cell.distffn("sweep", sweep, "--out", out, "--no-progress")
    assert code == 0, stdout + stderr
    cells = [(b, n) for b in (16, 32) for n in workers]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))       # one row per trial and worker count
    assert sorted((int(r["batch_size"]), int(r["num_workers"])) for r in rows) == cells, rows
    assert all(r["reached"] == "True" and float(r["step_seconds"]) > 0 for r in rows), rows
    s = json.loads((out / "summary.json").read_text())
    assert s["trials"] == s["reached"] == 2 and s["n_train"] == cell.kind.n_train
    assert sorted(s["b_noise_per_batch"]) == ["16", "32"], s["b_noise_per_batch"]
    timed = sorted((c["batch_size"], c["num_workers"]) for c in s["step_model"]["checks"] if c["measured_s"] > 0)
    assert timed == cells, s["step_model"]["checks"]
    for name in ("steps_vs_batch.png", "time_vs_workers.png", "lr_vs_batch.png"):
        assert_png(out / name)


def submitted(cell, *overrides, timeout=60):
    """Submit the cell's job to its scheduler, into tmp/run: (client, job id, run folder)."""
    client = cell.request.getfixturevalue(f"{cell.where}_client")
    run_dir = cell.tmp / "run"
    r = client("submit", cell.job, "--cluster", client.profile, "--out", run_dir,
               *(x for o in overrides for x in ("--set", o)), timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return client, r.stdout.strip().splitlines()[-1], run_dir


def status_of(client, job_id) -> dict:
    r = client("status", job_id, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_job(client, job_id, ready, timeout=150) -> dict:
    """Wait until ``ready()`` (read from the run folder: cheap) or the job has ended (asked of the
    scheduler every few seconds: each `distffn status` is a process of its own, and polling it
    fast takes the CPU the job needs); returns the job's status then."""
    deadline = time.monotonic() + timeout
    ask = 0.0
    while not ready() and time.monotonic() < deadline:
        if time.monotonic() >= ask:
            if status_of(client, job_id)["state"] not in {"PENDING", "RUNNING"}:
                break
            ask = time.monotonic() + 3
        time.sleep(0.2)
    return status_of(client, job_id)


def newest_step(run_dir, event) -> int:
    try:
        return max((r["step"] for r in records(run_dir, event)), default=0)
    except (OSError, ValueError):               # not there yet, or a line being written
        return 0


def check_submit(cell):
    """A short job submitted: status reaches SUCCEEDED with every step, logs has the epoch
    lines, jobs lists it."""
    client, job_id, run_dir = submitted(cell, "scaling.num_workers=2")
    steps = EPOCHS * steps_per_epoch(cell.kind)
    wait_job(client, job_id, lambda: os.path.exists(run_dir / "summary.json"))
    status = wait_job(client, job_id, lambda: False, timeout=60)     # the scheduler's word that it ended
    assert status["state"] == "SUCCEEDED", (status, client("logs", job_id).stdout)
    assert status["step"] == steps and status["epoch"] == EPOCHS and status["run_dir"] == str(run_dir)
    assert status["num_workers"] == 2 and math.isfinite(status["metrics"]["test_loss"])
    assert (status["metrics"].get("test_accuracy") is None) == cell.kind.regression, status
    assert client("status", job_id).stdout.startswith(f"SUCCEEDED  {job_id}")
    logs = client("logs", job_id).stdout
    for e in range(1, EPOCHS + 1):
        assert f"  {e}/{EPOCHS}  step" in logs, logs
    assert "done:" in logs, logs
    listed = [line for line in client("jobs").stdout.splitlines() if line.split()[:1] == [job_id]]
    assert len(listed) == 1 and cell.where in listed[0], listed


def check_stop(cell):
    """A long job stopped while it runs: STOPPED, with a checkpoint of the step it reached."""
    client, job_id, run_dir = submitted(cell, "scaling.num_workers=2", "training.epochs=100000",
                                        "checkpoint.every_steps=1000000")
    try:
        status = wait_job(client, job_id, lambda: newest_step(run_dir, "epoch") >= 10)
        assert status["state"] == "RUNNING", (status, client("logs", job_id).stdout)
        r = client("stop", job_id)
        assert r.returncode == 0 and r.stdout.startswith("STOPPED "), r.stdout + r.stderr
    finally:                            # never leave a job of 100000 epochs behind a failure
        if status_of(client, job_id)["state"] in {"PENDING", "RUNNING"}:
            client("stop", job_id)
    status = status_of(client, job_id)
    assert status["state"] == "STOPPED", status
    newest = ckpt.list_checkpoints(os.path.join(run_dir, "checkpoints"))[-1][0]
    assert newest >= 10 and newest == summary_of(run_dir)["step"]
    assert f"stopped by SIGTERM after step {newest}" in client("logs", job_id).stdout


@dataclass(frozen=True)
class Command:
    """A command's check, and where it runs: the backends its job's runs use, or (``local_job``:
    the job itself runs locally) the schedulers it submits to or the sweep's timed runs' backend."""
    check: Callable
    where: tuple = ("local",)
    local_job: bool = False


BACKENDS = ("local", "mpi", "ray")
SCHEDULERS = ("ray", "slurm")
COMMANDS = {
    "run": Command(check_run, BACKENDS),
    "resume": Command(check_resume, BACKENDS),
    "adaptive": Command(check_adaptive, BACKENDS),
    "eval": Command(check_eval),
    "plot": Command(check_plot),
    "noise-scale": Command(check_noise_scale),
    "sweep": Command(check_sweep, ("local", "mpi"), local_job=True),
    "submit-status-logs": Command(check_submit, SCHEDULERS, local_job=True),
    "stop": Command(check_stop, SCHEDULERS, local_job=True),
}

# single cells beyond the product: (command, data kind, where)
EXTRA = [
    ("submit-status-logs", "diabetes", "ray"),     # a regression target: status without an accuracy
]
CELLS = [pytest.param(command, name, where, id=f"{command}-{name}-{where}")
         for command, c in COMMANDS.items() for where in c.where for name in DATA
         if where == "local" or name in EVERYWHERE or (command, name, where) in EXTRA]


@pytest.mark.parametrize("command,name,where", CELLS)
def test_matrix(command, name, where, runs, tmp_path, request):
    c = COMMANDS[command]
    c.check(Cell(name, DATA[name], where, runs, tmp_path, request, backend="local" if c.local_job else where))
