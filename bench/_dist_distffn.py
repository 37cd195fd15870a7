#!/usr/bin/env python
"""Helper of bench_distributed.py: timed blocks of distffn training on one backend.

    python bench/_dist_distffn.py --backend local --out r.json ...            # N = 1
    mpiexec -n 2 python bench/_dist_distffn.py --backend mpi --aggregation allreduce --out r.json
    python bench/_dist_distffn.py --backend ray --workers 2 --aggregation central --out r.json

One process (or one MPI world) runs every batch size in turn: build the backend (start-up
untimed), warm up (>= --warmup steps and >= --warmup-s seconds, untimed), then one timed block
of K consecutive global steps over consecutive batches of the epoch permutation followed by
train_totals() (the trainer's stats sync). samples/s = K·B / seconds; the per-phase breakdown
comes from backend.pop_times() over the timed steps. The root process writes one JSON file.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRAD_FLOATS = 814_090          # 784·1024 + 1024 + 1024·10 + 10


def log(msg):
    print(f"  [{os.getpid()}] {msg}", file=sys.stderr, flush=True)


def steal_idle():
    """(steal, idle, total) jiffies since boot, machine-wide."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[7] if len(v) > 7 else 0, v[3] + v[4], sum(v[:8])


def median_time(fn, reps, warm=5):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts)


class Stepper:
    """Consecutive global batches over the epochs (full batches only), constant lr."""

    def __init__(self, backend, n, B, lr):
        self.be, self.B, self.lr = backend, B, lr
        self.full = n // B
        self.epoch = self.batch = 0

    def run(self, k):
        be, B, lr = self.be, self.B, self.lr
        for _ in range(k):
            be.train_step(self.epoch, self.batch, B, lr)
            self.batch += 1
            if self.batch == self.full:
                self.epoch, self.batch = self.epoch + 1, 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=["local", "mpi", "ray"], required=True)
    ap.add_argument("--aggregation", choices=["allreduce", "central"], default="allreduce")
    ap.add_argument("--workers", type=int, default=1, help="local/ray (MPI: the world size)")
    ap.add_argument("--threads", type=int, default=None, help="local: BLAS threads (default all CPUs)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--steps", type=int, nargs="+", default=[150, 50])
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--warmup-s", type=float, default=0.3)
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--comm-reps", type=int, default=100)
    ap.add_argument("--job", default=os.path.join(REPO, "jobs", "fashion-mnist-mlp.yaml"))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t_proc = time.perf_counter()

    if args.backend == "local":
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads or os.cpu_count(), user_api="blas")

    from distffn.config import load_job
    from distffn.trainer import prepare_data

    base = ["optimizer.schedule=constant", "optimizer.lr=0.05", "optimizer.momentum=0.9",
            f"scaling.backend={args.backend}", f"scaling.aggregation={args.aggregation}"]
    if args.limit_train:
        base.append(f"data.limit_train={args.limit_train}")
    mpi_comm = None
    if args.backend == "mpi":
        from mpi4py import MPI
        mpi_comm = MPI.COMM_WORLD
        args.workers = mpi_comm.Get_size()
    base.append(f"scaling.num_workers={args.workers}")

    job0 = load_job(args.job, base + [f"training.batch_size={args.batch_sizes[0]}"])
    ds, data, model = prepare_data(job0)
    n = int(data.x_train.shape[0])
    theta0 = np.empty(model.num_params, np.float32)
    model.init_params(theta0, job0.training.seed)

    if args.backend == "local":
        from distffn.backends.local import LocalBackend as Backend
    elif args.backend == "mpi":
        from distffn.backends.mpi import MPIBackend as Backend
    else:
        from distffn.backends.ray import RayBackend as Backend

    result = {"backend": args.backend, "aggregation": args.aggregation, "workers": args.workers,
              "num_params": int(model.num_params), "n_train": n, "blocks": []}
    steps = dict(zip(args.batch_sizes, args.steps if len(args.steps) > 1
                     else args.steps * len(args.batch_sizes)))
    root = True
    for i, B in enumerate(args.batch_sizes):
        job = load_job(args.job, base + [f"training.batch_size={B}"])
        t0 = time.perf_counter()
        be = Backend(job, data)
        root = be.is_root
        be.init_state(theta0.copy(), np.zeros_like(theta0), 0)
        placement = be.placement()              # Ray: waits until the actors are up
        startup = time.perf_counter() - t0
        st = Stepper(be, n, B, job.optimizer.lr)
        # warm-up: rank 0 decides when it has lasted long enough, every rank follows
        w0, done = time.perf_counter(), 0
        while True:
            st.run(5)
            done += 5
            more = done < args.warmup or time.perf_counter() - w0 < args.warmup_s
            if not be.broadcast(more):
                break
        be.train_totals()
        be.pop_times()
        warm_s = time.perf_counter() - w0
        k = steps[B]
        if mpi_comm is not None:
            mpi_comm.Barrier()
        s0 = steal_idle()
        t0 = time.perf_counter()
        st.run(k)
        tot = be.train_totals()
        dt = time.perf_counter() - t0
        s1 = steal_idle()
        times = be.pop_times().as_dict()
        total_j = max(1, s1[2] - s0[2])
        blk = {"batch_size": B, "steps": k, "seconds": dt, "samples_per_s": k * B / dt,
               "startup_s": startup, "warmup_s": warm_s, "warmup_steps": done,
               "mean_loss": tot.loss_sum / tot.count if tot.count else None,
               "accuracy": tot.correct / tot.count if tot.count else None,
               "samples_counted": tot.count, "times": times,
               "steal_fraction": (s1[0] - s0[0]) / total_j, "idle_fraction": (s1[1] - s0[1]) / total_j,
               "placement": placement}
        ts = max(1, times["time_steps"])
        for ph in ("compute", "communication", "update", "waiting"):
            blk[f"{ph}_ms_per_step"] = 1e3 * times[f"time_{ph}_s"] / ts
        blk["wall_ms_per_step"] = 1e3 * dt / k
        result["blocks"].append(blk)
        if root:
            log(f"{args.backend}/{args.aggregation} N={args.workers} B={B}: "
                f"{blk['samples_per_s']:,.0f} samples/s, comm {blk['communication_ms_per_step']:.2f} "
                f"ms/step (startup {startup:.1f} s, warm-up {done} steps)")
        if args.backend == "ray" and i < len(args.batch_sizes) - 1:
            be.owns_ray = False             # keep the Ray instance for the next batch size
        be.close()

    if args.backend == "ray":
        import ray
        if ray.is_initialized():
            ray.shutdown()

    # Raw collectives on the ΔΘ buffer, for comparison with the breakdown (MPI only).
    if mpi_comm is not None and args.workers > 1:
        from mpi4py import MPI
        buf = np.zeros(GRAD_FLOATS, np.float32)
        out = np.empty_like(buf)
        med, mn = median_time(lambda: mpi_comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM), args.comm_reps)
        result["raw_allreduce_ms"] = {"median": 1e3 * med, "min": 1e3 * mn}

        def reduce_bcast():
            mpi_comm.Reduce(buf, out, op=MPI.SUM, root=0)
            mpi_comm.Bcast(buf, root=0)
        med, mn = median_time(reduce_bcast, args.comm_reps)
        result["raw_reduce_bcast_ms"] = {"median": 1e3 * med, "min": 1e3 * mn}
        result["mpi_library"] = MPI.Get_library_version().strip().splitlines()[0]

    # The floor on one machine: a plain copy of the buffer (one thread, this process).
    if args.backend == "local":
        src = np.ones(GRAD_FLOATS, np.float32)
        dst = np.empty_like(src)
        med, mn = median_time(lambda: np.copyto(dst, src), max(200, args.comm_reps), warm=20)
        result["copy_ms"] = {"median": 1e3 * med, "min": 1e3 * mn}
        from threadpoolctl import threadpool_info
        result["blas_threads"] = [p.get("num_threads") for p in threadpool_info()
                                  if p.get("user_api") == "blas"]

    result["process_s"] = time.perf_counter() - t_proc
    if root:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    if "mpi" in sys.argv:
        try:
            main()
        except BaseException:
            # a failing rank takes the whole world down at once (else the others wait in a
            # collective until scaling.timeout_s or the driver's timeout)
            import traceback
            traceback.print_exc()
            sys.stderr.flush()
            from mpi4py import MPI
            MPI.COMM_WORLD.Abort(1)
    else:
        main()
