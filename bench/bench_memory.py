#!/usr/bin/env python
"""Memory of a distffn run: the summed PSS of every process of the run, while it trains.

Each configuration runs ``python -m distffn run JOB --set ...`` (the Fashion-MNIST job, a few
epochs) in a session of its own. Every ``--interval`` seconds the script reads
``/proc/PID/smaps_rollup`` of every process of the run (the command's descendants and every
process in its session: mpiexec and the ranks, Ray's GCS, raylet, workers and dashboard) and
sums their PSS (proportional set size: a page shared by k processes counts 1/k in each, so
the sum is the memory the run holds). Reported per configuration: the peak of that sum once
training has started (the run folder's metrics.jsonl has its first line), the median over
those samples, the number of processes, and the largest processes by name.

    python bench/bench_memory.py --json runs/bench_memory.json
    python bench/bench_memory.py --configs local mpi2 --epochs 1     # a subset
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

import benchlib
from benchlib import log

CONFIGS = {
    "local": ["scaling.backend=local"],
    "local-numpy": ["scaling.backend=local", "scaling.kernels=numpy"],
    "mpi2": ["scaling.backend=mpi", "scaling.num_workers=2"],
    "mpi4": ["scaling.backend=mpi", "scaling.num_workers=4"],
    "ray1": ["scaling.backend=ray", "scaling.num_workers=1"],
    "ray2": ["scaling.backend=ray", "scaling.num_workers=2"],
    "ray4": ["scaling.backend=ray", "scaling.num_workers=4"],
    # the NumPy kernels: what numba's runtime costs each process
    "mpi2-numpy": ["scaling.backend=mpi", "scaling.num_workers=2", "scaling.kernels=numpy"],
    "ray1-numpy": ["scaling.backend=ray", "scaling.num_workers=1", "scaling.kernels=numpy"],
    "ray4-numpy": ["scaling.backend=ray", "scaling.num_workers=4", "scaling.kernels=numpy"],
}
DEFAULT = ["local", "mpi2", "mpi4", "ray1", "ray4"]


def _stat(pid: int):
    """(ppid, session id, command name) of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    name = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[3]), name


def run_processes(root: int) -> dict:
    """{pid: name} of ``root``, its descendants and every process in its session."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            s = _stat(int(entry))
            if s is not None:
                stats[int(entry)] = s
    sid = stats.get(root, (0, root, ""))[1]
    found = {pid for pid, (_, s, _) in stats.items() if s == sid}
    found.add(root)
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _, _) in stats.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grew = True
    return {pid: stats[pid][2] for pid in found if pid in stats}


def pss_kib(pid: int):
    """PSS of ``pid`` in KiB from smaps_rollup, or None."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(name: str, overrides: list, args, tmp: str) -> dict:
    run_dir = os.path.join(tmp, name)
    cmd = [sys.executable, "-m", "distffn", "run", args.job, "--set", f"name={name}",
           "--set", f"training.epochs={args.epochs}", "--out", run_dir]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, PYTHONPATH=benchlib.REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env, cwd=benchlib.REPO)
    samples, peak_detail = [], None
    metrics = os.path.join(run_dir, "metrics.jsonl")
    try:
        while proc.poll() is None and time.perf_counter() - t0 < args.timeout:
            time.sleep(args.interval)
            if not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
                continue                            # start-up: not the steady state yet
            procs = run_processes(proc.pid)
            sizes = {pid: pss_kib(pid) for pid in procs}
            total = sum(v for v in sizes.values() if v)
            samples.append((total, len(procs)))
            if peak_detail is None or total > peak_detail[0]:
                by_name = {}
                for pid, kib in sizes.items():
                    if kib:
                        by_name.setdefault(procs[pid], []).append(kib)
                peak_detail = (total, {n: [round(k / 1024, 1) for k in v] for n, v in by_name.items()})
    finally:
        benchlib.stop(proc)
        out = proc.stdout.read()
    if not samples:
        raise SystemExit(f"{name}: no sample after training started; output:\n{out[-3000:]}")
    mib = [s / 1024 for s, _ in samples]
    return {"config": name, "overrides": overrides, "samples": len(samples),
            "pss_peak_mib": max(mib), "pss_median_mib": statistics.median(mib),
            "processes": max(n for _, n in samples),
            "peak_by_process_mib": peak_detail[1], "returncode": proc.returncode,
            "tail": out[-400:]}


def main(argv=None):
    ap = benchlib.run_parser(__doc__, timeout=300)
    ap.add_argument("--configs", nargs="+", default=DEFAULT, choices=list(CONFIGS))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--interval", type=float, default=0.25)
    args = ap.parse_args(argv)
    cmd, env = benchlib.run_record(argv, "bench_memory.py")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_mem_") as tmp:
        for rnd in range(args.rounds):
            for name in args.configs:
                r = measure(name, CONFIGS[name], args, os.path.join(tmp, str(rnd)))
                r["round"] = rnd
                results.append(r)
                top = sorted(((max(v), n) for n, v in r["peak_by_process_mib"].items()), reverse=True)[:4]
                log(f"[round {rnd + 1}] {name:12s} PSS peak {r['pss_peak_mib']:7.1f} MiB, median "
                    f"{r['pss_median_mib']:7.1f} MiB, {r['processes']} processes; largest: "
                    + ", ".join(f"{n} {m:.0f}" for m, n in top))
    env["loadavg_end"] = list(os.getloadavg())
    print(benchlib.machine_line(env))
    for line in benchlib.context_lines(env, cmd):
        print(line)
    print(f"{'configuration':14s} {'PSS peak MiB':>13s} {'median':>8s} {'processes':>9s}")
    for name in args.configs:
        rows = [r for r in results if r["config"] == name]
        print(f"{name:14s} {statistics.median(r['pss_peak_mib'] for r in rows):13.1f} "
              f"{statistics.median(r['pss_median_mib'] for r in rows):8.1f} "
              f"{max(r['processes'] for r in rows):9d}")
    if args.json:
        benchlib.write_json(args.json, {"command": cmd, "environment": env, "results": results}, indent=2)


if __name__ == "__main__":
    main()
