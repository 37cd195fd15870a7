"""Running a sweep's runs and resuming them: convergence trials (steps to the target at each
batch size, learning rate and momentum, on one worker) and timed runs (the step time at each
batch size and worker count).

Every run is an ordinary run folder: a trial is ``distffn run SWEEP_DIR/job.yaml`` with the
``--set`` overrides its ``result.json`` lists, so ``distffn plot`` works on it and any row of
``results.csv`` can be reproduced. A trial is finished when its ``result.json`` exists; one
that was killed continues from its newest checkpoint. Trials run one at a time in this
process, or side by side as Ray tasks (``concurrency`` > 1); timed runs always run alone,
so that nothing else competes for the cores they are timed on.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from .. import bounded_yaml
from ..data.sharding import steps_per_epoch
from ..errors import RunFailed, UserError
from ..files import write_atomic, write_json
from ..jobspec import apply_overrides, from_dict
from ..training import Trainer, TrainingDiverged
from ..training import checkpoint as ckpt
from ..training.progress import ProgressBar
from .spec import adaptive_overrides, schedule_label

RESULT = "result.json"       # a finished trial's outcome
TRIAL = "trial.json"         # the trial a folder holds (a changed sweep starts it afresh)
CSV_COLUMNS = ["batch_size", "num_workers", "lr", "momentum", "reached", "steps_to_target",
               "samples_to_target", "epochs_to_target", "seconds_to_target", "step_seconds",
               "best_metric", "diverged", "pruned", "eval_every", "adaptive", "trial"]


@dataclass
class Trial:
    """One convergence trial: the base job at (batch size, lr, momentum) on one worker, for
    at most ``max_epochs``, stopped at the first evaluation that reaches the target."""
    batch_size: int
    lr: float
    momentum: Optional[float]          # None: the base job's
    eval_every: int
    max_epochs: int
    target_metric: str
    target_value: float
    warmup_steps: Optional[int] = None
    seed: Optional[int] = None         # None: the base job's
    adaptive: Optional[dict] = None    # an adaptive entry's settings (batch_size is its start)

    @property
    def id(self) -> str:
        m = "" if self.momentum is None else f"-m{self.momentum:g}"
        s = "" if self.seed is None else f"-s{self.seed}"
        if self.adaptive:
            a = self.adaptive
            plan = f"-w{a['goodput_workers']}-{a['goodput_network']}" if a.get("goodput_workers") else ""
            return f"a-{a['rule']}-b{a['start']:06d}-{a['max']}-e{a['every_steps']}{plan}-lr{self.lr:.6g}{m}{s}"
        return f"b{self.batch_size:06d}-lr{self.lr:.6g}{m}{s}"

    def as_dict(self) -> dict:
        """The trial as ``trial.json`` keeps it: without the seed and adaptive keys where they
        are unset, so that a sweep folder from before they existed resumes."""
        d = asdict(self)
        return {k: v for k, v in d.items() if not (k in ("seed", "adaptive") and v is None)}

    def overrides(self) -> list[str]:
        """The ``--set`` values that make the base job this trial."""
        batch = adaptive_overrides(self.adaptive) if self.adaptive else [f"training.batch_size={self.batch_size}"]
        sets = [*batch, f"optimizer.lr={self.lr!r}",
                f"training.epochs={self.max_epochs}", f"training.eval_every={self.eval_every}",
                f"training.target_metric={self.target_metric}", f"training.target_value={self.target_value!r}",
                "scaling.backend=local", "scaling.num_workers=1", "checkpoint.num_to_keep=1"]
        if self.momentum is not None:
            sets.append(f"optimizer.momentum={self.momentum!r}")
        if self.warmup_steps is not None:
            sets.append(f"optimizer.warmup_steps={self.warmup_steps}")
        if self.seed is not None:
            sets.append(f"training.seed={self.seed}")
        return sets


@dataclass
class Timing:
    """A timed run: ``steps`` steps at batch size B on N workers (backend ``backend``)."""
    batch_size: int
    num_workers: int
    backend: str
    steps: int
    epochs: int

    @property
    def id(self) -> str:
        return f"b{self.batch_size:06d}-n{self.num_workers}"

    def overrides(self) -> list[str]:
        return [f"training.batch_size={self.batch_size}", f"scaling.num_workers={self.num_workers}",
                f"scaling.backend={self.backend}", f"training.max_steps={self.steps}",
                f"training.epochs={self.epochs}", "training.eval_every=0", "training.target_metric=null",
                "training.target_value=null", "checkpoint.num_to_keep=1", "failure.max_failures=0"]


def plan_trials(spec, base, n_train: int) -> list[Trial]:
    """Every (batch size, lr, momentum, seed) of the sweep, smallest batch first, then every
    adaptive entry's (lr, momentum, seed)."""
    out = []
    momenta = spec.momenta(base) if spec.momentum is not None else [None]
    seeds = spec.seeds if spec.seeds is not None else [None]
    drop = base.training.drop_last
    for b in spec.batch_sizes:
        for lr in spec.rates(b):
            for m in momenta:
                for s in seeds:
                    out.append(Trial(b, lr, m, spec.eval_steps(n_train, b, drop), spec.max_epochs,
                                     spec.target.metric, spec.target.value, spec.warmup_steps(n_train, b, drop), s))
    for entry in spec.adaptive:
        a = entry.resolved(base)
        for lr in spec.adaptive_rates(entry, base):
            for m in momenta:
                for s in seeds:
                    # evaluated every eval_steps(max) steps: the batch never exceeds max, so an
                    # evaluation comes at least as often in samples as for a fixed batch of max,
                    # and the samples to target are at least as precise as the fixed batches' there
                    out.append(Trial(a["start"], lr, m, spec.eval_steps(n_train, a["max"], drop), spec.max_epochs,
                                     spec.target.metric, spec.target.value,
                                     spec.warmup_steps(n_train, a["start"], drop), s, a))
    return out


def plan_timings(spec, base, n_train: int) -> list[Timing]:
    """Every (batch size, worker count) with at least one sample per worker."""
    out = []
    for b in spec.batch_sizes:
        spe = steps_per_epoch(n_train, b, base.training.drop_last)
        for n in spec.num_workers:
            if n <= b:
                out.append(Timing(b, n, "local" if n == 1 else spec.timing_backend, spec.timing_steps,
                                  max(1, math.ceil(spec.timing_steps / spe))))
    return out


# ---------------------------------------------------------------- one trial

def _read(run_dir: str, name: str) -> Optional[dict]:
    try:
        with open(os.path.join(run_dir, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_result(run_dir: str) -> Optional[dict]:
    """A finished trial's ``result.json``, or None."""
    return _read(run_dir, RESULT)


def run_trial(base_raw: dict, trial: dict, run_dir: str, job_path: str, resume_command: str,
              max_steps: Optional[int] = None) -> dict:
    """Train one trial (a :class:`Trial` as a dict) into ``run_dir``, continuing from its
    checkpoints if a killed attempt left some; writes and returns its ``result.json``.
    ``max_steps``: stop there (pruned: the best trial at this batch size took no more). A
    module-level function of plain data, so that a Ray task can run it too."""
    t = Trial(**trial)
    sets = t.overrides() + ([f"training.max_steps={max_steps}"] if max_steps else [])
    job = from_dict(apply_overrides(base_raw, sets), source=f"trial {t.id}")
    resume = bool(ckpt.list_checkpoints(os.path.join(run_dir, "checkpoints")))
    os.makedirs(run_dir, exist_ok=True)
    write_json(os.path.join(run_dir, TRIAL), t.as_dict())    # what this folder holds
    diverged = None
    summary = _read(run_dir, "summary.json") or {}
    if not (summary.get("target") or {}).get("reached"):
        # (a run that reached the target and was killed before result.json is done: its last
        # checkpoint is past the evaluation that found the target, so it must not go on)
        try:
            summary = Trainer(job, run_dir, resume=resume, progress=False, echo=lambda s: None,
                              resume_command=resume_command).run()
        except TrainingDiverged as e:         # a rate too large for this batch size: a result
            diverged, summary = str(e), {}
    target = summary.get("target") or {}
    reached = bool(target.get("reached"))
    result = {
        **trial, "trial": t.id, "reached": reached,
        "steps_to_target": target.get("step") if reached else None,
        "samples_to_target": target.get("samples") if reached else None,
        "epochs_to_target": target.get("epoch") if reached else None,
        "metric_at_target": target.get("observed"),
        "best_metric": target.get("observed") if reached else target.get("best"),
        "diverged": diverged, "steps_run": summary.get("step"),
        "pruned": bool(max_steps) and not reached and not diverged and summary.get("step") == max_steps,
        "train_seconds": summary.get("train_time_s"),
        "seconds_to_target": target.get("train_seconds") if reached else None,
        "command": " ".join(["distffn", "run", job_path, "--out", run_dir,
                             *(x for o in sets for x in ("--set", o))]),
    }
    write_json(os.path.join(run_dir, RESULT), result)
    return result


def _ray_trial(base_raw, trial, run_dir, job_path, resume_command, threads):
    """A trial in a Ray task, with the BLAS threads of the task's CPUs."""
    from ..xp import limit_blas_threads
    limit_blas_threads(threads)
    return run_trial(base_raw, trial, run_dir, job_path, resume_command)


def promising_first(trials: list[Trial]) -> list[Trial]:
    """Within each batch size, the middle of the learning-rate grid first: the best trial is
    likely there, and pruning then stops the others sooner."""
    by_batch: dict[tuple, list[Trial]] = {}
    for t in trials:            # an adaptive entry's trials are a group of their own, after the fixed
        key = (bool(t.adaptive), t.batch_size, tuple(sorted((t.adaptive or {}).items())))
        by_batch.setdefault(key, []).append(t)
    out = []
    for key in sorted(by_batch):
        group = by_batch[key]
        rates = sorted({t.lr for t in group})
        middle = math.log(rates[(len(rates) - 1) // 2])
        out += sorted(group, key=lambda t: (round(abs(math.log(t.lr) - middle), 6), t.lr, t.seed or 0))
    return out


def counted(n: int, noun: str) -> str:
    """``1 trial``, ``2 trials``: a count and its noun, plural unless it is one."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def trial_line(r: dict, done: int, total: int) -> str:
    """One line per finished trial."""
    a = r.get("adaptive")
    batch = schedule_label(a) if a else f"B={r['batch_size']}"
    head = f"[{done:>{len(str(total))}}/{total}] {batch} lr={r['lr']:.4g}" + (
        "" if r.get("momentum") is None else f" momentum={r['momentum']:g}") + (
        "" if r.get("seed") is None else f" seed={r['seed']}")
    if r["reached"]:
        return (f"{head}: {r['target_metric']} {r['metric_at_target']:.4g} at step {r['steps_to_target']} "
                f"({r['epochs_to_target']:.3g} epochs)")
    why = ("diverged" if r.get("diverged") else
           f"pruned at step {r['steps_run']} (no fewer steps than the best at B={r['batch_size']})"
           if r.get("pruned") else f"not reached in {counted(r['max_epochs'], 'epoch')}")
    best = "" if r.get("best_metric") is None else f" (best {r['best_metric']:.4g})"
    return f"{head}: {why}{best}"


def run_trials(trials: list[Trial], base_raw: dict, out: str, job_path: str, resume_command: str,
               concurrency: int = 1, echo: Callable[[str], None] = print, progress: Optional[bool] = None,
               on_result: Callable[[dict], None] = lambda results: None, prune: bool = True) -> dict[str, dict]:
    """Run every trial not finished yet; returns ``{trial id: result}`` for all of them.
    ``on_result`` gets that mapping, so far, after each trial. With ``prune``, a trial run
    one at a time stops once it has taken as many steps as the best trial so far at its
    batch size: it can no longer have the fewest steps."""
    results, todo = {}, []
    for t in trials:
        run_dir = os.path.join(out, "trials", t.id)
        if _read(run_dir, TRIAL) != t.as_dict():
            shutil.rmtree(run_dir, ignore_errors=True)      # another sweep's trial, or none
        r = read_result(run_dir)
        if r is not None:
            results[t.id] = r
        else:
            todo.append(t)
    if results:
        echo(f"{len(results)} of {len(trials)} trials already finished; {len(todo)} to run")
    bar = ProgressBar(len(trials), "sweep", enabled=progress)
    bar.update(len(results))

    def finished(r):
        results[r["trial"]] = r
        bar.close()
        echo(trial_line(r, len(results), len(trials)))
        bar.update(len(results))
        on_result(results)

    def budget(t: Trial) -> Optional[int]:
        # not with seeds: the best rate is the one with the fewest steps in the median over
        # seeds, which a rate stopped in one seed at another rate's steps could no longer be;
        # not for an adaptive batch: its steps are measured whole, against the fixed batches
        if not prune or t.adaptive or t.seed is not None:
            return None
        steps = [r["steps_to_target"] for r in results.values()
                 if r["batch_size"] == t.batch_size and r["reached"] and not r.get("adaptive")]
        return min(steps) if steps else None

    args = [(base_raw, t.as_dict(), os.path.join(out, "trials", t.id), job_path, resume_command) for t in todo]
    if concurrency <= 1 or len(todo) <= 1:
        for t, a in zip(todo, args):
            finished(run_trial(*a, max_steps=budget(t)))
    else:
        _on_ray(args, concurrency, finished)
    bar.close()
    return results


def _on_ray(args: list[tuple], concurrency: int, finished: Callable[[dict], None]):
    """Every trial as a Ray task of one CPU on a Ray of the sweep's own with ``concurrency``
    CPUs (or on the cluster at ``$RAY_ADDRESS``); Ray decides what runs when."""
    from ..parallel.ray_cluster import _import_ray, connect_to_ray, is_loopback, start_own_ray, stop_own_ray
    address = os.environ.get("RAY_ADDRESS") or None
    ray = _import_ray(local=address is None or is_loopback(address))
    own = None
    if address is None:
        own = start_own_ray(ray, concurrency, log_to_driver=False)
    else:
        base_raw = args[0][0]               # the base job's scaling.connect_timeout_s bounds it
        connect_to_ray(ray, address, base_raw["scaling"]["connect_timeout_s"], logging_level="warning")
    try:
        task = ray.remote(num_cpus=1)(_ray_trial)
        pending = [task.remote(*a, 1) for a in args]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                finished(ray.get(ready[0]))
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, UserError):
                    raise UserError(str(cause)) from None
                raise RunFailed(f"a trial failed on Ray: {cause or e}") from None
    finally:
        if own is not None:
            stop_own_ray(ray, *own)
        else:
            ray.shutdown()


# ---------------------------------------------------------------- timed runs

def run_timings(timing: Timing, job_path: str, out: str, threads: int, repeats: int) -> dict:
    """``repeats`` timed runs of ``timing``; the fastest counts (other work on a shared machine
    only ever slows a run down), with every run's step time in ``all_step_seconds``."""
    runs = [run_timing(timing, job_path, out, threads, k) for k in range(repeats)]
    best = min(runs, key=lambda r: r["step_seconds"])
    return {**best, "all_step_seconds": [r["step_seconds"] for r in runs]}


def run_timing(timing: Timing, job_path: str, out: str, threads: int, repeat: int = 0) -> dict:
    """One timed run as a ``distffn run`` of its own (so MPI's launcher can start its ranks);
    returns ``{batch_size, num_workers, backend, step_seconds, ms_per_step, steps}``. A run
    without a summary (killed) is started again from scratch: its times would mix two lives."""
    run_dir = os.path.join(out, "timing", f"{timing.id}-r{repeat}")
    summary_path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(summary_path):
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [sys.executable, "-m", "distffn", "run", job_path, "--out", run_dir, "--no-progress",
               *(x for o in timing.overrides() for x in ("--set", o))]
        # one worker gets the cores one of the N workers has, so that compute per sample is
        # the same in every timed run (the step-time model assumes it)
        env = dict(os.environ)
        if timing.num_workers == 1:
            env.update({k: str(threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        if p.returncode != 0:
            # distffn's own line, not MPI's abort notice that follows it under mpiexec
            lines = p.stderr.strip().splitlines()
            last = ([ln for ln in lines if ln.startswith("distffn: error: ")] or lines or [f"exit code {p.returncode}"])[-1]
            last = last.removeprefix("distffn: error: ")
            raise (UserError if p.returncode == 2 else RunFailed)(f"timed run {timing.id} ({timing.backend}): {last}")
    with open(summary_path) as f:
        s = json.load(f)
    steps, seconds = s["step"], s["train_time_s"]
    if steps > 1 and s.get("startup_s"):
        # the first step's one-off start-up (kernels, buffers, actors) is no step time: with
        # a few timed steps it would dominate the step-time model
        steps, seconds = steps - 1, seconds - s["startup_s"]
    return {"batch_size": timing.batch_size, "num_workers": timing.num_workers, "backend": timing.backend,
            "aggregation": _aggregation(run_dir), "steps": s["step"],
            "step_seconds": seconds / steps, "ms_per_step": s.get("ms_per_step")}


def _aggregation(run_dir: str) -> Optional[str]:
    try:
        job = bounded_yaml.load_file(os.path.join(run_dir, "job.yaml"), "run's job spec")
    except UserError:
        return None
    return ((job if isinstance(job, dict) else {}).get("scaling") or {}).get("aggregation")


# ---------------------------------------------------------------- results.csv

def result_rows(results: list[dict], step_seconds: dict[tuple[int, int], float],
                workers: list[int]) -> list[dict]:
    """One row per trial and worker count: seconds to target = steps × the measured step
    time at (B, N) (N workers at batch B train the model of one, so the steps are the same)."""
    rows = []
    for r in sorted(results, key=result_order):
        for n in workers:
            if n > r["batch_size"]:
                continue
            steps = r["steps_to_target"]
            if r.get("adaptive"):
                # an adaptive trial's steps have many batch sizes: no one step time; one row,
                # the seconds it trained on its one worker (summary.json projects it to N)
                if n != 1:
                    continue
                t, seconds = None, r.get("seconds_to_target")
            else:
                t = step_seconds.get((r["batch_size"], n))
                seconds = None if steps is None or t is None else _sig(steps * t)
            rows.append({
                "batch_size": r["batch_size"], "num_workers": n, "lr": r["lr"],
                "momentum": r.get("momentum"), "reached": r["reached"], "steps_to_target": steps,
                "samples_to_target": r["samples_to_target"], "epochs_to_target": r["epochs_to_target"],
                "seconds_to_target": seconds,
                "step_seconds": None if t is None else _sig(t), "best_metric": r.get("best_metric"),
                "diverged": bool(r.get("diverged")), "pruned": bool(r.get("pruned")), "eval_every": r["eval_every"],
                "adaptive": (r.get("adaptive") or {}).get("rule"), "trial": os.path.join("trials", r["trial"])})
    return rows


def result_order(r: dict) -> tuple:
    """Fixed batches first, by (batch size, lr, momentum, seed); then the adaptive trials."""
    a = r.get("adaptive") or {}
    return (bool(a), a.get("rule", ""), a.get("max", 0), a.get("every_steps", 0), r["batch_size"], r["lr"],
            r.get("momentum") or 0, r.get("seed") or 0)


def write_csv(path: str, rows: list[dict]) -> None:
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, CSV_COLUMNS)
    w.writeheader()
    for row in rows:
        w.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_COLUMNS})
    write_atomic(path, text.getvalue())


def _sig(seconds: float) -> float:
    """Four significant digits: a 25 µs step keeps its precision, as a 2 s one does."""
    return float(f"{seconds:.4g}")
