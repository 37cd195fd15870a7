#!/usr/bin/env python
"""Distributed training throughput of distffn (MPI, Ray) against PyTorch DDP (gloo), one machine.

The Fashion-MNIST job (jobs/fashion-mnist-mlp.yaml: 784-1024-10 ReLU, softmax cross-entropy,
momentum SGD, constant lr 0.05, μ 0.9) at global batch 128 and 512, in these configurations:

  distffn N=1      LocalBackend, one process, BLAS threads = all CPUs
  MPI N=2          mpiexec -n 2 (MPIBackend: 1 BLAS thread per rank), aggregation allreduce / central
  Ray N=2          embedded Ray on loopback (1 CPU per actor): allreduce (the actors form one
                   MPI communicator, steps sent in chunks of Trainer.log_every) / central
                   (an aggregator actor, one round of Ray tasks per step)
  DDP N=1, N=2     torchrun --nproc_per_node N, DistributedDataParallel over gloo, torch threads
                   = CPUs / N, same model, initial weights, data, shards and global batch

Each configuration runs in a fresh process (or MPI world / torchrun job) per round; the
rounds alternate the configurations (rotating their order each round). Inside, for every
batch size: start-up (untimed; Ray's takes seconds), warm-up >= --warmup steps and
>= --warmup-s seconds (untimed), then one timed block of K consecutive global steps over
consecutive batches with distffn's stats sync every 50 steps, as in the trainer, and at the
end (distffn: train_totals(); DDP, at the end only: one all_reduce and
.item() of the summed loss). samples/s = K·B / seconds. Helpers: bench/_dist_distffn.py and
bench/_dist_ddp.py.

Communication per step: distffn's own breakdown (time_communication_s / time_steps of the
timed steps) for MPI and Ray; for DDP, torch.distributed.all_reduce of an 814,090-float32
buffer (the ΔΘ size) alone; for MPI also a raw Allreduce and Reduce+Bcast of that buffer; and
the floor on one machine, np.copyto of that buffer (median of many, one thread).

Targets (ratios of medians, samples/s): MPI N=2 (better mode) >= 1.5× DDP N=2 and >= 0.8×
distffn N=1; Ray N=2 (better mode) >= 1.0× DDP N=2.

    python bench/bench_distributed.py --json runs/bench_distributed.json   # full run, ~5-6 min
    python bench/bench_distributed.py --rounds 1 --limit-train 4000 --steps 20 10   # smoke test
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import benchlib
from benchlib import GRAD_FLOATS, JOB, REPO, log, wait_idle

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> (label, kind, workers, aggregation)
CONFIGS = {
    "distffn1": ("distffn N=1 (local)", "local", 1, None),
    "mpi-allreduce": ("MPI N=2 allreduce", "mpi", 2, "allreduce"),
    "mpi-central": ("MPI N=2 central", "mpi", 2, "central"),
    "ray-allreduce": ("Ray N=2 allreduce", "ray", 2, "allreduce"),
    "ray-central": ("Ray N=2 central", "ray", 2, "central"),
    "ddp1": ("DDP N=1 (gloo)", "ddp", 1, None),
    "ddp2": ("DDP N=2 (gloo)", "ddp", 2, None),
}
TARGETS = [  # (label, numerator configs (best of), denominator config, target)
    ("MPI N=2 / DDP N=2", ("mpi-allreduce", "mpi-central"), "ddp2", 1.5),
    ("MPI N=2 / distffn N=1", ("mpi-allreduce", "mpi-central"), "distffn1", 0.8),
    ("Ray N=2 / DDP N=2", ("ray-allreduce", "ray-central"), "ddp2", 1.0),
]


# ---------------------------------------------------------------- machine

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool(name: str) -> str:
    """An executable beside this Python first (the wheels install mpiexec/torchrun there)."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    found = here if os.access(here, os.X_OK) else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found beside {sys.executable} or on PATH")
    return found


def environment() -> dict:
    import numpy as np
    env = benchlib.base_environment(numpy=np.__version__)
    env["cpu_model"] = benchlib.cpu_model()
    # versions without importing heavy packages into the driver
    from importlib import metadata
    for pkg in ("torch", "ray", "mpi4py", "mpich", "threadpoolctl", "distffn"):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = None
    try:
        out = subprocess.run([tool("mpiexec"), "--version"], capture_output=True, text=True,
                             timeout=30).stdout
        env["mpiexec"] = next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                               if ln.strip().startswith("Version")), None)
    except Exception:
        env["mpiexec"] = None
    blas = benchlib.numpy_blas(("name", "version"))
    env["numpy_blas"] = None if blas is None else f"{blas['name']} {blas['version']}"
    env["git"] = benchlib.git_rev()
    return env


# ---------------------------------------------------------------- one configuration, one round

def command(name: str, args, batch_sizes: list, steps: dict, out: str):
    label, kind, n, agg = CONFIGS[name]
    common = ["--batch-sizes", *map(str, batch_sizes), "--steps", *(str(steps[b]) for b in batch_sizes),
              "--warmup", str(args.warmup), "--warmup-s", str(args.warmup_s),
              "--comm-reps", str(args.comm_reps), "--job", args.job, "--out", out]
    if args.limit_train:
        common += ["--limit-train", str(args.limit_train)]
    env = dict(os.environ)
    py, dd = sys.executable, os.path.join(HERE, "_dist_distffn.py")
    if kind == "local":
        cmd = [py, dd, "--backend", "local", "--threads", str(os.cpu_count() or 1), *common]
    elif kind == "mpi":
        cmd = [tool("mpiexec"), "-n", str(n), "-launcher", "fork", "-iface", "lo",
               py, dd, "--backend", "mpi", "--aggregation", agg, *common]
    elif kind == "ray":
        env.pop("RAY_ADDRESS", None)            # always the embedded loopback instance
        cmd = [py, dd, "--backend", "ray", "--workers", str(n), "--aggregation", agg, *common]
    else:
        threads = max(1, (os.cpu_count() or 1) // n)
        env.update(OMP_NUM_THREADS=str(threads), GLOO_SOCKET_IFNAME="lo")
        cmd = [tool("torchrun"), "--nnodes", "1", "--nproc_per_node", str(n),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               os.path.join(HERE, "_dist_ddp.py"), "--timeout-s", str(args.timeout), *common]
    return cmd, env


def run_config(name: str, args, batch_sizes: list, steps: dict, tmp: str, tag: str):
    """Run one configuration in fresh processes; returns (result dict or None, error text)."""
    out = os.path.join(tmp, f"{tag}.json")
    errf = os.path.join(tmp, f"{tag}.log")
    cmd, env = command(name, args, batch_sizes, steps, out)
    t0 = time.perf_counter()
    with open(errf, "w") as ef:
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=ef,
                             stderr=subprocess.STDOUT, start_new_session=True)
        err = None
        try:
            rc = p.wait(timeout=args.timeout)
            if rc != 0:
                err = f"exit status {rc}"
        except subprocess.TimeoutExpired:
            err = f"timed out after {args.timeout:g} s"
        except BaseException:
            _kill_group(p)
            raise
        finally:
            _kill_group(p)      # the whole session we started: MPI ranks, Ray's daemons, DDP ranks
    wall = time.perf_counter() - t0
    res = None
    if err is None:
        try:
            with open(out) as f:
                res = json.load(f)
        except (OSError, ValueError) as e:
            err = f"no result file ({e})"
    if err is not None:
        with open(errf, errors="replace") as f:
            tail = f.read().splitlines()[-args.error_lines:]
        err = f"{name}: {err}; command: {' '.join(cmd)}\n" + "\n".join("    | " + ln for ln in tail)
    else:
        res["wall_s"] = wall
        res["command"] = cmd
    return res, err


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` (0: only probe) to process group ``pgid``; False if it is gone (or not ours)."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _kill_group(p):
    """Stop the process group of ``p`` (started with start_new_session=True), if anything is left."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        if not _signal_group(p.pid, 0) or not _signal_group(p.pid, sig):
            break
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < grace and _signal_group(p.pid, 0):
            time.sleep(0.1)
    try:
        p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


# ---------------------------------------------------------------- summary

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(blocks: list, extras: list, batch_sizes: list, configs: list) -> dict:
    summary = {}
    rounds = sorted({b["round"] for b in blocks})
    for B in batch_sizes:
        rows = [b for b in blocks if b["batch_size"] == B]
        s = {"configs": {}, "targets": []}
        sps = {c: {b["round"]: b["samples_per_s"] for b in rows if b["config"] == c} for c in configs}
        for c in configs:
            cr = [b for b in rows if b["config"] == c]
            if not cr:
                s["configs"][c] = {"rounds_ok": 0}
                continue
            v = list(sps[c].values())
            s["configs"][c] = {
                "rounds_ok": len(cr),
                "samples_per_s_median": med(v), "samples_per_s_min": min(v), "samples_per_s_max": max(v),
                "samples_per_s_per_round": sps[c],
                "ms_per_step_median": med([b["wall_ms_per_step"] for b in cr]),
                "comm_ms_per_step_median": med([b.get("communication_ms_per_step") for b in cr]),
                "comm_ms_per_step_range": ([min(b["communication_ms_per_step"] for b in cr),
                                            max(b["communication_ms_per_step"] for b in cr)]
                                           if "communication_ms_per_step" in cr[0] else None),
                "compute_ms_per_step_median": med([b.get("compute_ms_per_step") for b in cr]),
                "update_ms_per_step_median": med([b.get("update_ms_per_step") for b in cr]),
                "waiting_ms_per_step_median": med([b.get("waiting_ms_per_step") for b in cr]),
                "mean_loss_median": med([b.get("mean_loss") for b in cr]),
                "steal_fraction_max": max(b.get("steal_fraction") or 0 for b in cr),
            }
        for label, nums, den, target in TARGETS:
            cands = [c for c in nums if c in configs and s["configs"][c].get("rounds_ok")]
            if not cands or den not in configs or not s["configs"][den].get("rounds_ok"):
                s["targets"].append({"label": label, "target": target, "ratio": None, "pass": None})
                continue
            dm = s["configs"][den]["samples_per_s_median"]
            per_mode = {}
            for c in cands:
                per_round = [sps[c][r] / sps[den][r] for r in rounds if r in sps[c] and r in sps[den]]
                per_mode[c] = {"ratio": s["configs"][c]["samples_per_s_median"] / dm,
                               "per_round_median": med(per_round), "per_round": per_round}
            best = max(cands, key=lambda c: s["configs"][c]["samples_per_s_median"])
            s["targets"].append({"label": label, "target": target, "best": best,
                                 "ratio": per_mode[best]["ratio"],
                                 "per_round_median": per_mode[best]["per_round_median"],
                                 "pass": per_mode[best]["ratio"] >= target, "per_mode": per_mode})
        summary[str(B)] = s
    # communication alone (per process, any batch size)
    comm = {}
    for key, src, field in (("copy_floor_ms", "distffn1", "copy_ms"),
                            ("mpi_raw_allreduce_ms", ("mpi-allreduce", "mpi-central"), "raw_allreduce_ms"),
                            ("mpi_raw_reduce_bcast_ms", ("mpi-allreduce", "mpi-central"), "raw_reduce_bcast_ms"),
                            ("ddp2_gloo_allreduce_ms", "ddp2", "allreduce_ms")):
        srcs = (src,) if isinstance(src, str) else src
        vals = [e[field]["median"] for e in extras if e["config"] in srcs and field in e]
        mins = [e[field]["min"] for e in extras if e["config"] in srcs and field in e]
        comm[key] = {"median": med(vals), "min": min(mins) if mins else None, "processes": len(vals)}
    summary["communication_alone"] = comm
    return summary


def fmt(v, spec=",.0f", none="—"):
    return none if v is None else format(v, spec)


def print_table(summary: dict, env: dict, args, cmd: str, configs: list, steps: dict, failures: list):
    p = print
    p("distffn distributed benchmark: Fashion-MNIST 784-1024-10 ReLU, softmax CE, momentum SGD "
      "lr 0.05 μ 0.9, one machine, loopback")
    p(benchlib.machine_line(env))
    p(f"  python {env['python']}  numpy {env['numpy']} ({env.get('numpy_blas')})  torch {env.get('torch')}  "
      f"ray {env.get('ray')}  mpi4py {env.get('mpi4py')}  MPICH/hydra {env.get('mpiexec')}")
    p(f"  rounds {args.rounds} (each config a fresh process per round, order rotated every round), "
      f"steps per timed block " + ", ".join(f"{s} at B={b}" for b, s in steps.items())
      + f", warm-up >= {args.warmup} steps and >= {args.warmup_s} s")
    for line in benchlib.context_lines(env, cmd):
        p(line)
    p("")
    bs = [b for b in summary if b != "communication_alone"]
    hdr = f"{'configuration':<22}" + "".join(
        f"  {'B=' + b + ' samples/s':>17} {'(min–max)':>15} {'ms/step':>7} {'comm ms':>7}" for b in bs)
    p(hdr)
    p("-" * len(hdr))
    for c in configs:
        line = f"{CONFIGS[c][0]:<22}"
        for b in bs:
            r = summary[b]["configs"][c]
            if not r.get("rounds_ok"):
                line += f"  {'FAILED':>17} {'':>15} {'':>7} {'':>7}"
                continue
            rng = f"{r['samples_per_s_min'] / 1e3:.1f}k–{r['samples_per_s_max'] / 1e3:.1f}k"
            ok = "" if r["rounds_ok"] == args.rounds else f"[{r['rounds_ok']}/{args.rounds}]"
            line += (f"  {ok + fmt(r['samples_per_s_median']):>17} {rng:>15} "
                     f"{fmt(r['ms_per_step_median'], '.2f'):>7} "
                     f"{fmt(r['comm_ms_per_step_median'] if CONFIGS[c][1] in ('mpi', 'ray') else None, '.2f'):>7}")
        p(line)
    p("")
    p("targets (ratio of median samples/s; the better aggregation mode counts; "
      "'rnd med' = median of per-round ratios):")
    for b in bs:
        for t in summary[b]["targets"]:
            if t["ratio"] is None:
                p(f"  B={b:<4} {t['label']:<22} —  (not run or failed)")
                continue
            modes = "   ".join(f"{CONFIGS[c][0].split()[-1]} {m['ratio']:.2f}× (rnd med {m['per_round_median']:.2f}×)"
                               for c, m in t["per_mode"].items())
            p(f"  B={b:<4} {t['label']:<22} {t['ratio']:5.2f}×  ≥{t['target']:.2f}×  "
              f"{'PASS' if t['pass'] else 'FAIL'}   [{modes}]")
    p("")
    ca = summary["communication_alone"]
    floor = ca["copy_floor_ms"]["median"]
    times_floor = lambda v: "" if v is None or not floor else f"  ({v / floor:.1f}× the copy)"
    p(f"communication of the {GRAD_FLOATS:,}-float32 (3.26 MB) gradient buffer, ms (median over processes "
      f"of each process's median; min in brackets):")
    for key, what in (("copy_floor_ms", "plain copy np.copyto (floor)"),
                      ("mpi_raw_allreduce_ms", "MPI Allreduce alone"),
                      ("mpi_raw_reduce_bcast_ms", "MPI Reduce + Bcast alone"),
                      ("ddp2_gloo_allreduce_ms", "DDP gloo all_reduce alone")):
        v = ca[key]
        p(f"  {what:<30} {fmt(v['median'], '7.3f'):>7} [{fmt(v['min'], '.3f')}]"
          + (times_floor(v["median"]) if key != "copy_floor_ms" else ""))
    p("per training step, distffn's own breakdown (medians over rounds; communication = handshake + "
      "collectives for MPI and Ray allreduce, driver wall − slowest compute − update for Ray central):")
    p(f"  {'configuration':<20} {'batch':>5}  {'comm ms (min–max)':>20} {'×copy':>6}  {'compute':>7} "
      f"{'update':>6} {'waiting':>7}")
    for c in configs:
        if CONFIGS[c][1] not in ("mpi", "ray"):
            continue
        for b in bs:
            r = summary[b]["configs"][c]
            if not r.get("rounds_ok"):
                p(f"  {CONFIGS[c][0]:<20} {b:>5}  FAILED")
                continue
            cm, (lo, hi) = r["comm_ms_per_step_median"], r["comm_ms_per_step_range"]
            p(f"  {CONFIGS[c][0]:<20} {b:>5}  {f'{cm:.2f} ({lo:.2f}–{hi:.2f})':>20} "
              f"{fmt(cm / floor if floor else None, '5.1f') + '×':>6}  {r['compute_ms_per_step_median']:>7.2f} "
              f"{r['update_ms_per_step_median']:>6.2f} {r['waiting_ms_per_step_median']:>7.2f}")
    if failures:
        p("")
        p(f"FAILURES ({len(failures)}):")
        for f in failures:
            p(f"  round {f['round'] + 1}: {f['error']}")


# ---------------------------------------------------------------- main

def main(argv=None):
    ap = benchlib.driver_parser(__doc__)
    ap.add_argument("--rounds", type=int, default=7,
                    help="rounds of all configurations (default 7: ~5-6 min on 2 cores, ~45 s a round)")
    ap.add_argument("--steps", type=int, nargs="+", default=None,
                    help="timed steps per block: one value, or one per batch size "
                         "(default 200 at 128, 60 at 512, else ~25600/B)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps before each block (default 10)")
    ap.add_argument("--warmup-s", type=float, default=0.3,
                    help="...and at least this many seconds of them (default 0.3)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--limit-train", type=int, default=None, help="first N training samples (smoke tests)")
    ap.add_argument("--comm-reps", type=int, default=100,
                    help="timed repetitions of each collective / copy (default 100)")
    ap.add_argument("--timeout", type=float, default=180, help="seconds per process (default 180)")
    ap.add_argument("--wait-idle", type=float, default=3.0,
                    help="before each configuration wait up to this many seconds for the machine "
                         "to be >=90%% idle (0 = don't wait)")
    ap.add_argument("--error-lines", type=int, default=25, help="log lines shown for a failed process")
    ap.add_argument("--job", default=JOB)
    ap.add_argument("--json", default=None, help="write raw results and the summary here")
    args, cmd, steps = benchlib.parse_driver_args(ap, argv, "bench_distributed.py")
    configs = list(dict.fromkeys(args.configs))

    env = environment()
    log(f"distffn distributed benchmark: {len(configs)} configurations × {args.rounds} rounds, "
        f"batch sizes {args.batch_sizes}, CPU {env.get('cpu_model')} ×{env['cpu_count']}")
    blocks, extras, failures = [], [], []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_dist_") as tmp:
        for rnd in range(args.rounds):
            order = configs[rnd % len(configs):] + configs[:rnd % len(configs)]
            bsz = args.batch_sizes if rnd % 2 == 0 else args.batch_sizes[::-1]
            for c in order:
                idle = wait_idle(args.wait_idle) if args.wait_idle > 0 else {}
                res, err = run_config(c, args, bsz, steps, tmp, f"r{rnd}_{c}")
                if err:
                    failures.append({"round": rnd, "config": c, "error": err})
                    log(f"[round {rnd + 1}/{args.rounds}] {c:<14} FAILED: {err}")
                    continue
                for b in res.pop("blocks"):
                    b.update(config=c, round=rnd)
                    blocks.append(b)
                res.update(config=c, round=rnd, idle_before=idle.get("idle_fraction"),
                           waited_s=idle.get("waited_s"))
                extras.append(res)
                got = {b["batch_size"]: b for b in blocks if b["config"] == c and b["round"] == rnd}
                desc = "  ".join(
                    f"B={B} {got[B]['samples_per_s']:>7,.0f}/s"
                    + (f" comm {got[B]['communication_ms_per_step']:.2f} ms" if CONFIGS[c][1] in ("mpi", "ray") else "")
                    for B in args.batch_sizes if B in got)
                log(f"[round {rnd + 1}/{args.rounds}] {c:<14} {desc}   (process {res['wall_s']:.1f} s, "
                    f"total {time.perf_counter() - t_start:.0f} s)")

    env["loadavg_end"] = list(os.getloadavg())
    summary = summarize(blocks, extras, args.batch_sizes, configs)
    print_table(summary, env, args, cmd, configs, steps, failures)
    if args.json:
        out = {"command": cmd, "environment": env,
               "config": benchlib.config_record(
                   args, steps, comm_reps=args.comm_reps, limit_train=args.limit_train,
                   configs={c: CONFIGS[c][0] for c in configs},
                   targets=[{"label": l, "numerator_best_of": list(n), "denominator": d,
                             "target": t} for l, n, d, t in TARGETS]),
               "blocks": blocks, "processes": extras, "failures": failures, "summary": summary,
               "bench_seconds": time.perf_counter() - t_start}
        benchlib.write_json(args.json, out, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
