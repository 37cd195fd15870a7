#!/usr/bin/env python
"""Time to accuracy: wall-clock seconds from a command's start to its first evaluation at or
above --target test accuracy (89%) on Fashion-MNIST, distffn against PyTorch CPU.

distffn: ``python -m distffn run jobs/fashion-mnist-mlp.yaml --set training.seed=S`` (1 local
worker, the job's cosine from lr 0.05, batch 128, --epochs epochs; evaluation each epoch, or
every --eval-every steps), the time read as each eval line appears in its metrics.jsonl.
PyTorch: ``bench/_tta_torch.py`` (the same model, initialisation family, optimizer, schedule,
batch and evaluation; its own IDX reading), the time read as each eval line appears on its
stdout. Both sides get the machine's cores (2 threads). Seeds alternate the order of the two
sides; each run stops once it crossed the target. Reported: per side the median over seeds of
the time to target, the evaluation that crossed it, and the start-up (command start to its
"start" line, i.e. just before the first step); the ratio of medians distffn / PyTorch.

    python bench/bench_time_to_accuracy.py --seeds 0 1 2 --json runs/tta.json
    python bench/bench_time_to_accuracy.py --eval-every 100 --seeds 0 1 2     # evaluation every 100 steps
    python bench/bench_time_to_accuracy.py --epochs 8 --seeds 0 1 2           # a shorter cosine
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import benchlib
from benchlib import log, wait_idle


def follow(proc, source, t0: float, target: float, timeout: float, stop: bool) -> dict:
    """Poll ``source()`` (the lines so far) until an eval line reaches ``target`` (then stop
    the process if ``stop``), the process ends, or ``timeout``."""
    seen, evals, start = 0, [], None
    reached = None
    while time.perf_counter() - t0 < timeout:
        lines = source()
        for line in lines[seen:]:
            now = time.perf_counter() - t0
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == "start" and start is None:
                start = now
            elif rec.get("event") == "eval":
                evals.append({"t": now, "step": rec["step"], "epoch": rec.get("epoch"),
                              "test_accuracy": rec["test_accuracy"]})
                if reached is None and rec["test_accuracy"] >= target:
                    reached = evals[-1]
        seen = len(lines)
        if reached is not None and stop:
            break
        if proc.poll() is not None:
            lines = source()
            if len(lines) == seen:
                break
            continue
        time.sleep(0.01)
    return {"startup_s": start, "reached": reached, "evals": evals}


def run_distffn(args, seed: int, tmp: str) -> dict:
    out = os.path.join(tmp, f"distffn-{seed}-{time.monotonic_ns()}")
    cmd = [sys.executable, "-m", "distffn", "run", args.job, "--out", out, "--no-progress",
           "--set", f"training.seed={seed}", "--set", f"training.epochs={args.epochs}",
           "--set", f"training.eval_every={args.eval_every}", *sum((["--set", o] for o in args.set), [])]
    env = dict(os.environ, PYTHONPATH=benchlib.REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    metrics = os.path.join(out, "metrics.jsonl")

    def lines():
        try:
            with open(metrics) as f:
                text = f.read()
        except OSError:
            return []
        return text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env, cwd=benchlib.REPO)
    try:
        return dict(follow(proc, lines, t0, args.target, args.timeout, not args.full), command=cmd)
    finally:
        _end(proc)


def run_torch(args, seed: int, tmp: str) -> dict:
    cmd = [sys.executable, os.path.join(benchlib.REPO, "bench", "_tta_torch.py"), "--seed", str(seed),
           "--epochs", str(args.epochs), "--eval-every", str(args.eval_every)]
    log_path = os.path.join(tmp, f"torch-{seed}-{time.monotonic_ns()}.jsonl")
    f = open(log_path, "w")

    def lines():
        with open(log_path) as g:
            text = g.read()
        return text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        return dict(follow(proc, lines, t0, args.target, args.timeout, not args.full), command=cmd)
    finally:
        _end(proc)
        f.close()


def _end(proc):
    benchlib.stop(proc, grace=20)


def main(argv=None):
    ap = benchlib.run_parser(__doc__, timeout=240, wait_idle=5.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--target", type=float, default=0.89)
    ap.add_argument("--epochs", type=int, default=20, help="the cosine's length (the job's: 20)")
    ap.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: each epoch)")
    ap.add_argument("--set", action="append", default=[], help="extra distffn --set overrides")
    ap.add_argument("--full", action="store_true", help="let every run finish (default: stop at the target)")
    args = ap.parse_args(argv)
    cmd, env = benchlib.run_record(argv, "bench_time_to_accuracy.py")
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_tta_") as tmp:
        for i, seed in enumerate(args.seeds):
            order = [("distffn", run_distffn), ("torch", run_torch)]
            for side, fn in (order if i % 2 == 0 else order[::-1]):
                idle = wait_idle(args.wait_idle) if args.wait_idle > 0 else {}
                r = fn(args, seed, tmp)
                r.update(side=side, seed=seed, idle_before=idle.get("idle_fraction"))
                runs.append(r)
                hit = r["reached"]
                log(f"seed {seed} {side:8s} start-up {r['startup_s'] or float('nan'):5.2f} s, "
                    + (f"{100 * hit['test_accuracy']:.2f}% at step {hit['step']} (epoch {hit['epoch']:.2f}) "
                       f"after {hit['t']:6.2f} s" if hit else
                       f"never reached {100 * args.target:.0f}% (best "
                       f"{100 * max([e['test_accuracy'] for e in r['evals']] or [0]):.2f}%)"))
    env["loadavg_end"] = list(os.getloadavg())
    summary = {}
    for side in ("distffn", "torch"):
        rows = [r for r in runs if r["side"] == side]
        hits = [r["reached"] for r in rows if r["reached"]]
        summary[side] = {
            "runs": len(rows), "reached": len(hits),
            "time_to_target_s_median": statistics.median(h["t"] for h in hits) if hits else None,
            "time_to_target_s": [h["t"] if h else None for h in (r["reached"] for r in rows)],
            "epoch_at_target": [h["epoch"] if h else None for h in (r["reached"] for r in rows)],
            "startup_s_median": statistics.median(r["startup_s"] for r in rows if r["startup_s"] is not None),
            "seconds_per_eval_interval_median": statistics.median(
                b["t"] - a["t"] for r in rows for a, b in zip(r["evals"], r["evals"][1:])) if any(
                len(r["evals"]) > 1 for r in rows) else None,
        }
    d, t = summary["distffn"]["time_to_target_s_median"], summary["torch"]["time_to_target_s_median"]
    summary["ratio_distffn_over_torch"] = d / t if d and t else None
    print(benchlib.machine_line(env))
    for line in benchlib.context_lines(env, cmd):
        print(line)
    print(f"target {100 * args.target:.0f}% test accuracy; cosine over {args.epochs} epochs; evaluation "
          + (f"every {args.eval_every} steps" if args.eval_every else "each epoch"))
    for side in ("distffn", "torch"):
        s = summary[side]
        print(f"  {side:8s} median {s['time_to_target_s_median'] or float('nan'):6.2f} s to target "
              f"({s['reached']}/{s['runs']} reached; per seed {', '.join('%.2f' % x if x else '—' for x in s['time_to_target_s'])}; "
              f"epochs {', '.join('%.2f' % e if e else '—' for e in s['epoch_at_target'])}), start-up "
              f"{s['startup_s_median']:.2f} s, {s['seconds_per_eval_interval_median'] or float('nan'):.2f} s per "
              f"evaluation interval")
    if summary["ratio_distffn_over_torch"]:
        print(f"  distffn / PyTorch: {summary['ratio_distffn_over_torch']:.2f}× (bar ≤ 0.45×, goal 0.35×)")
    if args.json:
        benchlib.write_json(args.json, {"command": cmd, "environment": env, "config": vars(args),
                                        "runs": runs, "summary": summary}, indent=2)


if __name__ == "__main__":
    main()
