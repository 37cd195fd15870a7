"""``distffn sweep``: the whole scaling experiment in one resumable command.

1. convergence trials: steps to the target for every batch size × learning rate × momentum,
   on one worker (N workers at global batch B train the model of one, so the steps do not
   depend on N; tests/parallel prove it);
2. timed runs: the step time at every batch size × worker count, a few steps each;
3. the gradient noise scale B_simple at each batch size's best trial's final checkpoint
   (where it reached the target);
4. analysis: the best trial per batch size (with ``seeds``: the best rate by its median steps
   over the seeds), the critical-batch fit, the regimes, each adaptive entry's steps and
   samples against the fit, the α-β projection to 1024 workers (an adaptive run's by its
   batch schedule); ``results.csv``, ``summary.json`` and four PNG plots.

What was measured is kept whatever happens after: ``results.csv`` is written before the
analysis, and a stage that fails (a timed run, the noise scale, the fit, the projection, a
figure) is one line under ``errors`` in ``summary.json`` and on the console (its traceback in
``errors.log``), while the other stages and the figures still come out.
"""
from __future__ import annotations

import json
import os
import statistics
import traceback
from dataclasses import asdict
from typing import Callable, Optional

import yaml

from ..data.prepare import prepare_data
from ..errors import RunFailed, UserError
from ..files import write_atomic, write_json
from ..plot import plain_number as plain
from ..training.metrics import iter_records
from ..training.noise_scale import estimate_checkpoint
from ..training.run_lock import RunLock
from . import fit as fitting
from . import plots, projection
from .spec import SweepSpec, schedule_label
from .trials import (
    counted,
    plan_timings,
    plan_trials,
    promising_first,
    result_rows,
    run_timings,
    run_trials,
    write_csv,
)

NOISE = "noise.json"
ERRORS_LOG = "errors.log"                # the tracebacks of the stages that failed
NOISE_SMALL, NOISE_BIG = 256, 4096       # batch pairs for the measured B_simple


def check_timing_backend(spec: SweepSpec) -> None:
    """A sweep that times N > 1 workers needs their backend; say so before hours of trials."""
    if max(spec.num_workers) == 1:
        return
    if spec.timing_backend == "mpi":
        from ..parallel.mpi_env import check_mpi4py, find_mpiexec
        try:
            check_mpi4py()
            find_mpiexec(single_node=True)
        except UserError as e:
            raise UserError(f"timing_backend: mpi times the N > 1 runs and needs MPI ({e}); install "
                            f"the mpi extra, or use num_workers: [1]") from None
    elif spec.timing_backend == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UserError("timing_backend: ray needs Ray; install the ray extra") from None


def run_sweep(spec: SweepSpec, base, out: str, command: str, echo: Callable[[str], None] = print,
              progress: Optional[bool] = None) -> dict:
    """Run (or resume) the sweep into ``out``; returns the summary."""
    lock = RunLock(out).acquire()
    try:
        return _run(spec, base, out, command, echo, progress)
    finally:
        lock.release()


def _run(spec, base, out, command, echo, progress) -> dict:
    ds, _, model = prepare_data(base)
    n_train = int(ds.x_train.shape[0])
    too_big = [b for b in spec.batch_sizes if b > n_train]
    if too_big:
        raise UserError(f"batch_sizes: {too_big[0]} is larger than the {n_train:,} training samples of the "
                        f"base job's data ({base.data.dataset}"
                        f"{', after data.validation_fraction' if ds.x_val is not None else ''})")
    for i, entry in enumerate(spec.adaptive):
        most = entry.resolved(base)["max"]
        if most > n_train:
            raise UserError(f"adaptive[{i}].max: {most} is larger than the {n_train:,} training samples of the "
                            f"base job's data ({base.data.dataset})")
    check_timing_backend(spec)
    job_path = os.path.join(out, "job.yaml")
    os.makedirs(out, exist_ok=True)
    write_atomic(job_path, base.to_yaml())
    dump_spec(spec, os.path.join(out, "sweep.yaml"))
    base_raw = base.to_dict()
    trials = promising_first(plan_trials(spec, base, n_train))
    timings = plan_timings(spec, base, n_train)
    fixed = sum(not t.adaptive for t in trials)
    extra = f" + {counted(len(trials) - fixed, 'adaptive trial')}" if spec.adaptive else ""
    echo(f"sweep {spec.name}: {counted(len(trials), 'trial')} ({counted(len(spec.batch_sizes), 'batch size')} × "
         f"{counted(fixed // len(spec.batch_sizes), 'setting')}{extra}, ≤ {counted(spec.max_epochs, 'epoch')} "
         f"each, target {spec.target.metric} {spec.target.value:g}), then {counted(len(timings), 'timed run')}; "
         f"folder {out}")

    def interim(done: dict):             # results.csv grows as trials finish
        write_csv(os.path.join(out, "results.csv"), result_rows(list(done.values()), {}, [1]))
    results = run_trials(trials, base_raw, out, job_path, command, spec.concurrency, echo, progress, interim,
                         spec.prune)

    stages = Stages(out, echo)
    step_times = {}
    measured = []
    threads = max(1, (os.cpu_count() or 1) // max(spec.num_workers))
    for t in timings:
        m = stages.run("timing", lambda: run_timings(t, job_path, out, threads, spec.timing_repeats),
                       f"B={t.batch_size} N={t.num_workers}")
        if m is None:
            continue
        measured.append(m)
        step_times[(t.batch_size, t.num_workers)] = m["step_seconds"]
        echo(f"timed B={t.batch_size} N={t.num_workers} ({t.backend}): {1e3 * m['step_seconds']:.3g} ms/step")
    rows = result_rows(list(results.values()), step_times, spec.num_workers)
    write_csv(os.path.join(out, "results.csv"), rows)

    summary = analyse(spec, base, list(results.values()), measured, model.num_params, n_train, out, echo, stages)
    summary["command"] = command
    summary["errors"] = stages.errors
    write_json(os.path.join(out, "summary.json"), summary)
    summary["plots"] = plots.draw_all(summary, list(results.values()), out,
                                      lambda name, draw: stages.run("plots", draw, name))
    summary["errors"] = stages.errors
    write_json(os.path.join(out, "summary.json"), summary)
    for line in closing_lines(summary):
        echo(line)
    return summary


class Stages:
    """Runs the sweep's stages after the trials so that one failing loses nothing else: its
    error becomes a line of ``errors`` (stage → message) and of the console, its traceback
    goes to ``errors.log``, and the caller carries on without its result. A
    :class:`UserError` (a spec that cannot work) still ends the sweep."""

    def __init__(self, out: str, echo):
        self.out, self.echo = out, echo
        self.errors: dict[str, str] = {}
        self._log: list[str] = []

    def run(self, stage: str, fn: Callable, what: str = ""):
        """``fn()``, or None when it raised (recorded under ``stage``, ``what`` naming the part)."""
        try:
            return fn()
        except UserError:
            raise
        except Exception as e:
            # a RunFailed names what failed; anything else is a bug, named by its type
            text = str(e) if isinstance(e, RunFailed) and str(e) else f"{type(e).__name__}: {e}"
            message = " ".join(f"{what + ': ' if what else ''}{text}".split())      # one line
            self.errors[stage] = f"{self.errors[stage]}; {message}" if stage in self.errors else message
            self.echo(f"warning: the {stage.replace('_', ' ')} stage failed: {message}")
            self._log.append(f"{stage}{f' ({what})' if what else ''}:\n{traceback.format_exc()}")
            write_atomic(os.path.join(self.out, ERRORS_LOG), "\n".join(self._log))
            return None


def over_seeds(group: list[dict]) -> Optional[dict]:
    """One setting's trials, one per seed, as one: the median over the seeds of the steps,
    samples, epochs and seconds to the target, and each seed's under ``seeds``; the rest (the
    ``trial`` too) is the seed's with the lower median steps. None unless every seed reached
    the target. With one seed, that trial."""
    if not group or not all(r["reached"] for r in group):
        return None
    group = sorted(group, key=lambda r: (r["steps_to_target"], r.get("seed") or 0))
    middle = {**group[(len(group) - 1) // 2]}

    def median(key):
        values = [r.get(key) for r in group]
        return None if None in values else statistics.median(values)
    for key in ("steps_to_target", "samples_to_target", "epochs_to_target", "seconds_to_target"):
        middle[key] = median(key)
    middle["seeds"] = [{"seed": r.get("seed"), "steps": r["steps_to_target"], "samples": r.get("samples_to_target"),
                        "seconds": r.get("seconds_to_target"), "trial": r.get("trial")}
                       for r in sorted(group, key=lambda r: r.get("seed") or 0)]
    return middle


def _best_setting(results: list[dict]) -> Optional[dict]:
    """Of trials of one batch (or adaptive entry): :func:`over_seeds` of the (lr, momentum)
    with the fewest median steps (ties: the smaller lr)."""
    groups: dict[tuple, list] = {}
    for r in results:
        groups.setdefault((r["lr"], r.get("momentum") or 0), []).append(r)
    best = None
    for key in sorted(groups):
        m = over_seeds(groups[key])
        if m is not None and (best is None or m["steps_to_target"] < best["steps_to_target"]):
            best = m
    return best


def best_per_batch(results: list[dict]) -> dict[int, dict]:
    """The setting with the fewest steps to the target at each fixed batch size (ties: smaller
    lr); with seeds, the fewest median steps over the seeds among the settings that reached
    the target in every seed (:func:`over_seeds`)."""
    by_batch: dict[int, list] = {}
    for r in results:
        if not r.get("adaptive"):
            by_batch.setdefault(r["batch_size"], []).append(r)
    best = {b: _best_setting(rs) for b, rs in sorted(by_batch.items())}
    return {b: r for b, r in best.items() if r is not None}


def adaptive_results(spec: SweepSpec, base, results: list[dict], fit) -> list[dict]:
    """summary.json's ``adaptive``: per entry, its best rate's median steps, samples and
    seconds (trained on one worker) to the target over the seeds, each seed's, and the steps
    the fixed batches' fit needs for those samples (:func:`fit.steps_at_samples`)."""
    out = []
    for entry in spec.adaptive:
        settings = entry.resolved(base)
        best = _best_setting([r for r in results if r.get("adaptive") == settings])
        row = {**settings, "reached": best is not None, "lr": None, "momentum": None, "steps_to_target": None,
               "samples_to_target": None, "seconds_to_target": None, "seeds": [], "trial": None,
               "fit_steps_at_samples": None, "steps_saving": None}
        if best is not None:
            row.update({k: best[k] for k in ("lr", "momentum", "steps_to_target", "samples_to_target",
                                             "seconds_to_target", "seeds", "trial")})
            if fit is not None:
                at = fit.steps_at_samples(best["samples_to_target"])
                row["fit_steps_at_samples"] = at
                row["steps_saving"] = None if at is None else 1.0 - best["steps_to_target"] / at
        out.append(row)
    return out


def read_schedule(out: str, trial: str, steps: int) -> list[tuple[int, int]]:
    """A trial's batch schedule up to ``steps`` from its metrics.jsonl (:func:`projection.batch_schedule`)."""
    records = (r for r in iter_records(os.path.join(out, "trials", trial, "metrics.jsonl")) if r.get("event") == "batch")
    return projection.batch_schedule(records, steps)


def grid_edges(results: list[dict], best: dict[int, dict]) -> list[int]:
    """Batch sizes whose best rate is the smallest or largest tried there (of three or more):
    the optimum may lie outside the grid, and the steps there are then an upper bound."""
    edges = []
    for b, r in sorted(best.items()):
        rates = sorted({x["lr"] for x in results if x["batch_size"] == b})
        if len(rates) >= 3 and r["lr"] in (rates[0], rates[-1]):
            edges.append(b)
    return edges


def measure_noise(spec: SweepSpec, best: dict[int, dict], out: str, echo,
                  stages: Optional["Stages"] = None) -> dict[int, dict]:
    """B_simple at each batch size's best trial's final checkpoint (kept in its noise.json);
    with ``stages``, a batch size whose estimate fails is left out and recorded."""
    found = {}
    for b, r in sorted(best.items()):
        run_dir = os.path.join(out, "trials", r["trial"])
        path = os.path.join(run_dir, NOISE)

        def estimate():
            est = estimate_checkpoint(run_dir, batches=spec.noise_batches, small=NOISE_SMALL, big=NOISE_BIG)
            write_json(path, est)
            return est
        try:
            with open(path) as f:
                est = json.load(f)
        except (OSError, ValueError):
            est = stages.run("noise_scale", estimate, f"B={b}") if stages else estimate()
        if est is None:
            continue
        found[b] = est
        if est["b_simple"] is not None and est["b_simple"] > 0:
            echo(f"B_simple at B={b}'s target (step {est['step']}): {plain(est['b_simple'])} ± "
                 f"{plain(est['b_simple_se'], 2)}")
        else:
            echo(f"B_simple at B={b}'s target (step {est['step']}): not positive, lost in the noise "
                 f"(more noise_batches); left out of B_noise")
    return found


def median_b_simple(noise: dict[int, dict]) -> Optional[float]:
    """B_noise: the median over batch sizes of the positive B_simple estimates (a negative one,
    tr(Σ) < 0 from too few batch pairs, says nothing about the scale); None without one."""
    values = [e["b_simple"] for e in noise.values() if (e.get("b_simple") or 0) > 0]
    return statistics.median(values) if values else None


def analyse(spec: SweepSpec, base, results: list[dict], measured: list[dict], num_params: int,
            n_train: int, out: str, echo, stages: "Stages") -> dict:
    """summary.json: best trials, the fit, B_noise, the regimes, the step-time model and the
    projection; the fit, the noise scale and the projection each fail alone (``stages``)."""
    best = best_per_batch(results)
    best_steps = {b: r["steps_to_target"] for b, r in best.items()}
    fit = stages.run("fit", lambda: fitting.fit_critical_batch(best_steps))
    adaptive = adaptive_results(spec, base, results, fit)
    noise = measure_noise(spec, best, out, echo, stages)
    b_noise = median_b_simple(noise)
    summary = {
        "sweep": spec.name, "base_job": spec.job, "target": {"metric": spec.target.metric, "value": spec.target.value},
        "max_epochs": spec.max_epochs, "n_train": n_train, "num_params": num_params,
        "trials": len(results), "reached": sum(r["reached"] for r in results), "seeds": spec.seeds,
        "best": [{k: best[b][k] for k in ("batch_size", "lr", "momentum", "steps_to_target",
                                          "samples_to_target", "epochs_to_target", "trial")
                  + (("seeds",) if spec.seeds is not None else ())}
                 for b in sorted(best)],
        "adaptive": adaptive,
        "not_reached": [b for b in spec.batch_sizes if b not in best],
        "fit": fit.as_dict() if fit else None,
        "s_min": fit.s_min if fit else None, "e_min": fit.e_min if fit else None,
        "b_crit": fit.b_crit if fit else None,
        "b_noise": b_noise, "b_noise_per_batch": {str(b): e.get("b_simple") for b, e in noise.items()},
        "b_noise_se_per_batch": {str(b): e.get("b_simple_se") for b, e in noise.items()},
        "b_crit_over_b_noise": fit.b_crit / b_noise if fit and b_noise else None,
        "measured_slopes": {str(b): s for b, s in fitting.local_slopes(best_steps).items()},
        "best_lr_at_grid_edge": grid_edges(results, best),
    }
    if fit:
        tol = spec.regime_tolerance
        summary["regimes"] = {**fitting.regime_bounds(fit.b_crit, tol), "tolerance": tol,
                              "by_batch_size": {str(b): fitting.regime_of(b, fit.b_crit, tol) for b in spec.batch_sizes}}
    def schedules():            # each adaptive entry's batch schedule per seed, to its target
        return [[read_schedule(out, x["trial"], x["steps"]) for x in a["seeds"]] for a in adaptive]
    summary.update(stages.run("projection", lambda: project(spec, base, best_steps, measured, num_params,
                                                           schedules()))
                   or {"step_model": None, "projection": None})
    for a, times in zip(adaptive, ((summary.get("projection") or {}).get("adaptive") or [])):
        a["projected_seconds"] = times
    return summary


def project(spec: SweepSpec, base, best_steps: dict[int, int], measured: list[dict], num_params: int,
            schedules: Optional[list] = None) -> dict:
    """The step-time model fitted here and seconds-to-target projected to 1024 workers; with
    ``schedules`` (per adaptive entry, a batch schedule per seed; empty where it did not reach
    the target), theirs too: the median over the seeds of the sum of their steps' times."""
    one = {m["batch_size"]: m["step_seconds"] for m in measured if m["num_workers"] == 1}
    if not one:
        return {"step_model": None, "projection": None}
    times = {(m["batch_size"], m["num_workers"]): m["step_seconds"] for m in measured}
    aggregation = next((m["aggregation"] for m in measured if m["num_workers"] > 1 and m.get("aggregation")),
                       "allreduce" if base.scaling.aggregation == "auto" else base.scaling.aggregation)
    model = projection.fit_sync(projection.fit_step_model(one, 4 * num_params), times)
    # here the link's own cost is inside `sync`: the model checked against what was measured
    checks = [{"batch_size": b, "num_workers": n, "measured_s": s,
               "model_s": model.step_seconds(b, n, projection.Network(0.0, 0.0), aggregation)}
              for (b, n), s in sorted(times.items())]
    net = projection.NETWORKS.get(spec.network)
    by_net = {}
    for name, link in projection.NETWORKS.items():
        table = {b: {n: steps * model.step_seconds(b, n, link, aggregation)
                     for n in projection.worker_counts(b)} for b, steps in best_steps.items()}
        fastest = min(((s, b, n) for b, row in table.items() for n, s in row.items()), default=None)
        by_net[name] = {"fastest": None if fastest is None else
                        {"seconds": fastest[0], "batch_size": fastest[1], "num_workers": fastest[2]},
                        "table": table}
    chosen = by_net[spec.network]
    # every fixed batch (N <= B: a worker needs a sample) and adaptive entry at PROJECTED_WORKERS
    at_workers = {name: {
        "fixed": {str(b): {str(n): steps * model.step_seconds(b, n, link, aggregation) if n <= b else None
                           for n in projection.PROJECTED_WORKERS} for b, steps in best_steps.items()},
        "adaptive": [{str(n): statistics.median(projection.schedule_seconds(model, s, n, link, aggregation)
                                                for s in per_seed) if per_seed else None
                      for n in projection.PROJECTED_WORKERS} for per_seed in schedules or []]}
        for name, link in projection.NETWORKS.items()}
    return {
        "step_model": {**model.as_dict(), "aggregation": aggregation, "checks": checks},
        "measured_seconds_to_target": {str(b): {str(n): best_steps[b] * s for (bb, n), s in times.items() if bb == b}
                                       for b in best_steps},
        "projection": {"label": "projection", "network": spec.network, "alpha": net.alpha, "beta": net.beta,
                       "aggregation": aggregation,
                       "seconds_to_target": {str(b): {str(n): s for n, s in row.items()}
                                             for b, row in chosen["table"].items()},
                       "fastest_by_network": {name: v["fastest"] for name, v in by_net.items()},
                       "workers": list(projection.PROJECTED_WORKERS), "by_network": at_workers,
                       "adaptive": at_workers[spec.network]["adaptive"]},
    }


def closing_lines(summary: dict) -> list[str]:
    lines = []
    if summary.get("fit"):
        f = summary["fit"]
        lines.append(f"fit S = S_min(1 + B_crit/B): S_min {f['s_min']:.1f} steps, B_crit {f['b_crit']:.0f}, "
                     f"E_min {f['e_min']:.0f} samples (rms log error {f['rms_log_error']:.3f})")
        r = summary["regimes"]
        lines.append(f"regimes: perfect scaling B ≤ {r['perfect_scaling'][1]:.0f}, diminishing returns up to "
                     f"{r['diminishing_returns'][1]:.0f}, maximal data parallelism beyond")
    else:
        lines.append("fit: needs at least 3 batch sizes that reached the target")
    if summary.get("b_noise") is not None:
        ratio = summary.get("b_crit_over_b_noise")
        lines.append(f"B_noise (measured B_simple, median over batch sizes) {summary['b_noise']:.0f}"
                     + (f"; B_crit / B_noise = {ratio:.2f}" if ratio else ""))
    lines += [adaptive_line(a, summary) for a in summary.get("adaptive") or []]
    if summary.get("best_lr_at_grid_edge"):
        lines.append(f"the best rate is at the edge of the grid at batch sizes "
                     f"{', '.join(map(str, summary['best_lr_at_grid_edge']))}: widen the grid there")
    if summary.get("not_reached"):
        lines.append(f"target not reached within {summary['max_epochs']} epochs at batch sizes "
                     f"{', '.join(map(str, summary['not_reached']))}")
    proj = summary.get("projection")
    if proj:
        fast = proj["fastest_by_network"][proj["network"]]
        if fast:
            lines.append(f"projection ({proj['network']}): fastest {plain(fast['seconds'])} s to target with "
                         f"B={fast['batch_size']} on {counted(fast['num_workers'], 'worker')}")
    if summary.get("errors"):
        lines.append(f"incomplete: the {' and '.join(s.replace('_', ' ') for s in summary['errors'])} "
                     f"stage{'s' if len(summary['errors']) > 1 else ''} failed (summary.json \"errors\", "
                     f"tracebacks in {ERRORS_LOG}); what was measured is kept, and the same command again "
                     f"redoes only what is missing")
    return lines


def adaptive_line(a: dict, summary: dict) -> str:
    """An adaptive entry's closing line: its steps and samples, the saving against the fit,
    and its projection at 64 workers against the fastest fixed batch there."""
    head = schedule_label(a, every=True)
    if not a["reached"]:
        return (f"{head}: target not reached{' in every seed' if summary.get('seeds') else ''} within "
                f"{summary.get('max_epochs')} epochs")
    n_seeds = len(a["seeds"])
    line = (f"{head}, lr {a['lr']:.4g}: {plain(a['steps_to_target'])} steps, {plain(a['samples_to_target'])} samples "
            f"to target{f' (median of {n_seeds} seeds)' if n_seeds > 1 else ''}")
    if a.get("steps_saving") is not None:
        saving = a["steps_saving"]
        line += (f"; the fixed batches' fit needs {plain(a['fit_steps_at_samples'])} steps for those samples: "
                 f"{100 * abs(saving):.0f}% {'fewer' if saving >= 0 else 'more'} steps")
    proj = summary.get("projection") or {}
    mine = (a.get("projected_seconds") or {}).get("64")
    if mine is not None:
        fixed = {b: row.get("64") for b, row in proj["by_network"][proj["network"]]["fixed"].items()}
        fixed = {b: s for b, s in fixed.items() if s is not None}
        line += f"; projection ({proj['network']}) on 64 workers {plain(mine)} s"
        if fixed:
            b = min(fixed, key=fixed.get)
            line += f" (the fastest fixed batch there: {plain(fixed[b])} s at B={b})"
    return line


def dump_spec(spec: SweepSpec, path: str) -> None:
    """The resolved sweep spec, for the record."""
    write_atomic(path, yaml.safe_dump(asdict(spec), sort_keys=False))
