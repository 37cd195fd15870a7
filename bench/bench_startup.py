#!/usr/bin/env python
"""Start-up: seconds from ``distffn run`` to its first training step, per backend.

Each configuration runs ``python -m distffn run JOB`` (the Fashion-MNIST job) in a fresh
session; the time is read when the run folder's metrics.jsonl gets its "start" line, which the
trainer writes just before the first step (imports, job spec, data, the backend's processes,
the initial checkpoint and numba's kernels all come before it). The run is then stopped.
Configurations rotate round by round; medians are reported.

    python bench/bench_startup.py --rounds 5 --json runs/bench_startup.json
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

import benchlib
from benchlib import log, wait_idle

CONFIGS = {
    "local": ["scaling.backend=local"],
    "local-numpy": ["scaling.backend=local", "scaling.kernels=numpy"],
    "mpi2": ["scaling.backend=mpi", "scaling.num_workers=2"],
    "ray2": ["scaling.backend=ray", "scaling.num_workers=2"],
}


def time_to_start(overrides, args, folder) -> float | None:
    metrics = os.path.join(folder, "metrics.jsonl")
    cmd = [sys.executable, "-m", "distffn", "run", args.job, "--out", folder, "--no-progress",
           *sum((["--set", o] for o in overrides), [])]
    env = dict(os.environ, PYTHONPATH=benchlib.REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env, cwd=benchlib.REPO)
    try:
        while time.perf_counter() - t0 < args.timeout and proc.poll() is None:
            if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
                return time.perf_counter() - t0
            time.sleep(0.005)
        return None
    finally:
        benchlib.stop(proc)


def main(argv=None):
    ap = benchlib.run_parser(__doc__, timeout=120, wait_idle=3.0)
    ap.add_argument("--configs", nargs="+", default=["local", "mpi2", "ray2"], choices=list(CONFIGS))
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    cmd, env = benchlib.run_record(argv, "bench_startup.py")
    times = {c: [] for c in args.configs}
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        for rnd in range(args.rounds):
            order = args.configs[rnd % len(args.configs):] + args.configs[:rnd % len(args.configs)]
            for name in order:
                if args.wait_idle > 0:
                    wait_idle(args.wait_idle)
                t = time_to_start(CONFIGS[name], args, os.path.join(tmp, f"{name}-{rnd}"))
                times[name].append(t)
                log(f"[round {rnd + 1}] {name:12s} {'%.2f s' % t if t else 'no start line'}")
    env["loadavg_end"] = list(os.getloadavg())
    print(benchlib.machine_line(env))
    for line in benchlib.context_lines(env, cmd):
        print(line)
    summary = {}
    for name, ts in times.items():
        ok = [t for t in ts if t is not None]
        summary[name] = {"median_s": statistics.median(ok) if ok else None, "all_s": ts}
        print(f"  {name:12s} median {summary[name]['median_s'] or float('nan'):.2f} s to the first step "
              f"(rounds: {', '.join('%.2f' % t if t else '—' for t in ts)})")
    if args.json:
        benchlib.write_json(args.json, {"command": cmd, "environment": env, "summary": summary}, indent=2)


if __name__ == "__main__":
    main()
