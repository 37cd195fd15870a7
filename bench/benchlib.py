"""Helpers shared by the benchmark scripts in bench/ (bench_cpu.py, bench_distributed.py and
the per-configuration helpers _dist_distffn.py and _dist_ddp.py).

The scripts run as ``python bench/X.py`` (or under mpiexec / torchrun, which start them the
same way), so this folder is sys.path[0] and they ``import benchlib``. Nothing heavy is
imported at module level: numpy, torch and distffn are imported inside the functions that
need them, so the bench_distributed.py driver stays light.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(REPO, "jobs", "fashion-mnist-mlp.yaml")
GRAD_FLOATS = 814_090          # 784·1024 + 1024 + 1024·10 + 10
DEFAULT_STEPS = {128: 200, 512: 60}
# The setting: constant lr 0.05, momentum 0.9 (the job file may carry another
# schedule; torch runs a constant lr, so pin it here).
OPTIMIZER_OVERRIDES = ("optimizer.schedule=constant", "optimizer.lr=0.05", "optimizer.momentum=0.9")


# ---------------------------------------------------------------- logging and command line

def log(msg: str, pid: bool = False):
    """Print one progress line to stderr at once; ``pid=True`` tags it with this process's id
    (the helpers, where several ranks log into one file)."""
    if pid:
        msg = f"  [{os.getpid()}] {msg}"
    print(msg, file=sys.stderr, flush=True)


def driver_parser(doc: str) -> argparse.ArgumentParser:
    """A driver's argument parser (its docstring's first paragraph as description), with the
    --batch-sizes option both drivers take."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    return ap


def run_parser(doc: str, timeout: float, wait_idle: float | None = None) -> argparse.ArgumentParser:
    """The parser of a bench that times whole ``distffn run`` commands (memory, start-up, time to
    accuracy): its docstring's first paragraph as description, --timeout per command,
    --wait-idle where the bench waits for an idle machine, --job and --json."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--timeout", type=float, default=timeout)
    if wait_idle is not None:
        ap.add_argument("--wait-idle", type=float, default=wait_idle)
    ap.add_argument("--job", default=JOB)
    ap.add_argument("--json", default=None)
    return ap


def run_record(argv, script: str) -> tuple[str, dict]:
    """(the command as typed, the environment record: git revision and CPU model) of such a bench."""
    return command_line(argv, script), base_environment(git=git_rev(), cpu_model=cpu_model())


def command_line(argv, script: str) -> str:
    """The command as typed (``python path/to/script.py ARGS``), or with ``script`` and
    ``argv`` when main() was called from Python."""
    return " ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), os.getcwd())
                     if argv is None else script, *(sys.argv[1:] if argv is None else argv)])


def default_steps(b: int) -> int:
    """Timed steps per block at batch size ``b`` (200 at 128, 60 at 512, else ~25600/b)."""
    return DEFAULT_STEPS.get(b, max(10, round(25600 / b)))


def steps_per_batch(ap, steps, batch_sizes: list) -> dict:
    """{batch size: timed steps} from --steps: none (defaults), one value, or one per batch size."""
    if steps is None:
        return {B: default_steps(B) for B in batch_sizes}
    if len(steps) == 1:
        return {B: steps[0] for B in batch_sizes}
    if len(steps) == len(batch_sizes):
        return dict(zip(batch_sizes, steps))
    ap.error("--steps takes one value or one per batch size")


def parse_driver_args(ap, argv, script: str):
    """Parse a driver's ``argv`` (None: the command line); returns (args, the command as
    typed, {batch size: timed steps})."""
    args = ap.parse_args(argv)
    return args, command_line(argv, script), steps_per_batch(ap, args.steps, args.batch_sizes)


def helper_steps(batch_sizes: list, steps: list) -> dict:
    """{batch size: timed steps} in the helpers: one value for all, else paired in order."""
    return dict(zip(batch_sizes, steps if len(steps) > 1 else steps * len(batch_sizes)))


def add_helper_args(ap):
    """The options both helpers take from the driver, in their order up to --comm-reps."""
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--steps", type=int, nargs="+", default=[150, 50])
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--warmup-s", type=float, default=0.3)
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--comm-reps", type=int, default=100)


def add_helper_io_args(ap):
    """The helpers' last two options: the job file and the JSON result file."""
    ap.add_argument("--job", default=JOB)
    ap.add_argument("--out", required=True)


def config_record(args, steps: dict, **extra) -> dict:
    """The "config" entry of a driver's JSON: the settings both drivers share, then ``extra``."""
    return {"job": args.job, "batch_sizes": args.batch_sizes, "rounds": args.rounds,
            "steps": {str(b): s for b, s in steps.items()}, "warmup": args.warmup,
            "warmup_s": args.warmup_s, "wait_idle": args.wait_idle, **extra}


def write_json(path: str, obj, indent: int):
    """Write the driver's result file (creating its folder) and say so on stderr."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent)
    log(f"wrote {path}")


def stop(proc, grace: float = 60.0):
    """End a run started with ``start_new_session=True``: SIGTERM to the command alone (it
    checkpoints and takes its own processes down: mpiexec's ranks, Ray's), then, after
    ``grace`` seconds or once it is gone, SIGKILL to whatever is left of its session."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


# ---------------------------------------------------------------- machine load

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat_cpu() -> list:
    """The machine-wide jiffy counters of /proc/stat's first ("cpu") line."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def _cpu_ticks():
    """(idle ticks, all ticks incl. steal, this process's ticks) since boot."""
    v = _proc_stat_cpu()
    t = os.times()
    return v[3] + v[4], sum(v[:8]), (t.user + t.system) * _HZ


def steal_idle():
    """(steal, idle, total) jiffies since boot, machine-wide."""
    v = _proc_stat_cpu()
    return v[7] if len(v) > 7 else 0, v[3] + v[4], sum(v[:8])


def steal_idle_fractions(s0, s1) -> dict:
    """Steal and idle fractions of the machine between two steal_idle() readings."""
    total_j = max(1, s1[2] - s0[2])
    return {"steal_fraction": (s1[0] - s0[0]) / total_j, "idle_fraction": (s1[1] - s0[1]) / total_j}


def wait_idle(max_s: float, need: float = 0.9, window: float = 0.25) -> dict:
    """Wait (up to ``max_s``) until other processes left the machine >= ``need`` idle over one
    ``window`` (this process's own spinning BLAS/OpenMP threads don't count; a previous
    configuration's processes winding down count as busy, as do other tenants): other
    tenants' jobs on a 2-core box otherwise halve whichever block they overlap."""
    t0 = time.perf_counter()
    idle = None
    try:
        while True:
            i0, n0, s0 = _cpu_ticks()
            time.sleep(window)
            i1, n1, s1 = _cpu_ticks()
            total = max(1, n1 - n0)
            others = max(0.0, (total - (i1 - i0)) - (s1 - s0))
            idle = 1.0 - others / total
            if idle >= need or time.perf_counter() - t0 >= max_s:
                break
    except OSError:
        pass
    return {"waited_s": time.perf_counter() - t0, "idle_fraction": idle}


def median_time_ms(fn, reps: int, warm: int = 5) -> dict:
    """{"median", "min"} milliseconds of one ``fn()`` call over ``reps`` timed calls, after
    ``warm`` untimed ones."""
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"median": 1e3 * statistics.median(ts), "min": 1e3 * min(ts)}


# ---------------------------------------------------------------- environment

def base_environment(**extra) -> dict:
    """Date, Python, platform, CPU count and start load average, then ``extra`` in order."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
        **extra,
    }


def cpu_model():
    """The CPU's model name from /proc/cpuinfo, or None."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f
                         if ln.startswith("model name")), None)
    except OSError:
        return None


def numpy_blas(keys=("name", "version", "openblas configuration")):
    """numpy's build-time BLAS (those ``keys`` of it), or None where numpy cannot tell."""
    import numpy as np
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return {k: blas.get(k) for k in keys}
    except Exception:
        return None


def git_rev():
    """Short HEAD of the repository, "+dirty(distffn/)" if distffn/ has changes; None on error."""
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "distffn"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty(distffn/)" if dirty else "")
    except Exception:
        return None


def machine_line(env: dict) -> str:
    """The report's date / git / CPU line."""
    return (f"  date {env['date']}   git {env.get('git')}   CPU {env.get('cpu_model')} "
            f"({env['cpu_count']} logical CPUs)")


def context_lines(env: dict, cmd: str) -> list:
    """The report's load-average line (start and end) and command line."""
    la = lambda v: "/".join("%.2f" % x for x in v)
    return [f"  load average (1/5/15 min) at start {la(env['loadavg_start'])}, "
            f"at end {la(env['loadavg_end'])}",
            f"  command: {cmd}"]


# ---------------------------------------------------------------- job, data, torch model

def job_overrides(limit_train=None, extra=()) -> list:
    """The benchmark's optimizer overrides, then ``extra``, then data.limit_train unless it is None."""
    overrides = [*OPTIMIZER_OVERRIDES, *extra]
    if limit_train is not None:
        overrides.append(f"data.limit_train={limit_train}")
    return overrides


def load_data(job_path: str, overrides: list):
    """(job, data, model) of the job file with ``overrides``, data prepared as distffn does."""
    from distffn.data import prepare_data
    from distffn.jobspec import load_job
    job = load_job(job_path, overrides)
    ds, data, model = prepare_data(job)
    return job, data, model


def initial_theta(model, seed: int):
    """distffn's initial flat float32 parameter vector for ``seed``."""
    import numpy as np
    theta0 = np.empty(model.num_params, np.float32)
    model.init_params(theta0, seed)
    return theta0


def torch_data(data):
    """(X, Y): the same normalized training arrays as torch tensors (float32, int64)."""
    import numpy as np
    import torch
    return (torch.from_numpy(np.ascontiguousarray(data.x_train, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(data.t_train, dtype=np.int64)))


def torch_mlp(layer_arrays):
    """Linear(784,1024), ReLU, Linear(1024,10) started from distffn's initial weights."""
    import numpy as np
    import torch
    nn = torch.nn
    net = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 10))
    with torch.no_grad():
        for lin, i in ((net[0], 0), (net[2], 1)):
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(layer_arrays[f"W{i}"].T)))
            lin.bias.copy_(torch.from_numpy(layer_arrays[f"b{i}"]))
    return net


def torch_step(net, loss_fn, opt, X, Y, idx, loss_sum):
    """One plain torch training step on rows ``idx``; adds the loss to ``loss_sum`` in place."""
    xb, yb = X.index_select(0, idx), Y.index_select(0, idx)
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(net(xb), yb)
    loss.backward()
    opt.step()
    loss_sum += loss.detach()
