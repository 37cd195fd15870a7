#!/usr/bin/env python
"""Helper of bench_distributed.py: timed blocks of distffn training on one backend.

    python bench/_dist_distffn.py --backend local --out r.json ...            # N = 1
    mpiexec -n 2 python bench/_dist_distffn.py --backend mpi --aggregation allreduce --out r.json
    python bench/_dist_distffn.py --backend ray --workers 2 --aggregation central --out r.json

One process (or one MPI world) runs every batch size in turn: build the backend (start-up
untimed), warm up (>= --warmup steps and >= --warmup-s seconds, untimed), then one timed block
of K consecutive global steps over consecutive batches of the epoch permutation, with
train_totals() (the trainer's stats sync) every Trainer.log_every steps and at the end. samples/s = K·B / seconds; the per-phase breakdown
comes from backend.pop_times() over the timed steps. The root process writes one JSON file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import benchlib
import numpy as np
from benchlib import GRAD_FLOATS, median_time_ms, steal_idle

from distffn.data.sharding import Batch
from distffn.parallel.backend import Totals


def log(msg):
    benchlib.log(msg, pid=True)


class Stepper:
    """Consecutive global batches over the epochs (full batches only), constant lr, and the
    trainer's pull of the totals every Trainer.log_every steps (so Ray's allreduce mode
    sends the same chunks of steps as in a real run)."""

    def __init__(self, backend, n, B, lr):
        from distffn.training import Trainer
        self.be, self.B, self.lr = backend, B, lr
        self.full = n // B
        self.epoch = self.batch = self.steps = 0
        self.log_every = Trainer.log_every
        self.totals = Totals()

    def run(self, k):
        be, B, lr = self.be, self.B, self.lr
        for _ in range(k):
            be.train_step(Batch(self.epoch, self.batch * B, (self.batch + 1) * B, self.steps), lr)
            self.steps += 1
            self.batch += 1
            if self.batch == self.full:
                self.epoch, self.batch = self.epoch + 1, 0
            if self.steps % self.log_every == 0:
                self.pull()

    def pull(self):
        """The totals since the last pull, added to ``self.totals``; returns them all."""
        t = self.be.train_totals()
        self.totals.add(t.loss_sum, t.correct, t.count)
        return self.totals


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=["local", "mpi", "ray"], required=True)
    ap.add_argument("--aggregation", choices=["allreduce", "central"], default="allreduce")
    ap.add_argument("--workers", type=int, default=1, help="local/ray (MPI: the world size)")
    ap.add_argument("--threads", type=int, default=None, help="local: BLAS threads (default all CPUs)")
    benchlib.add_helper_args(ap)
    benchlib.add_helper_io_args(ap)
    args = ap.parse_args()
    t_proc = time.perf_counter()

    if args.backend == "local":
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads or os.cpu_count(), user_api="blas")

    from distffn.jobspec import load_job

    base = benchlib.job_overrides(args.limit_train or None, (f"scaling.backend={args.backend}",
                                                            f"scaling.aggregation={args.aggregation}"))
    mpi_comm = None
    if args.backend == "mpi":
        from mpi4py import MPI
        mpi_comm = MPI.COMM_WORLD
        args.workers = mpi_comm.Get_size()
    base.append(f"scaling.num_workers={args.workers}")

    job0, data, model = benchlib.load_data(args.job, base + [f"training.batch_size={args.batch_sizes[0]}"])
    n = int(data.x_train.shape[0])
    theta0 = benchlib.initial_theta(model, job0.training.seed)

    from distffn.parallel import make_backend

    result = {"backend": args.backend, "aggregation": args.aggregation, "workers": args.workers,
              "num_params": int(model.num_params), "n_train": n, "blocks": []}
    steps = benchlib.helper_steps(args.batch_sizes, args.steps)
    root = True
    for i, B in enumerate(args.batch_sizes):
        job = load_job(args.job, base + [f"training.batch_size={B}"])
        t0 = time.perf_counter()
        be = make_backend(job, data)
        root = be.is_root
        be.start(theta0.copy(), None, 0)       # None: fresh (zero) optimizer buffers
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
        st.totals = Totals()
        s0 = steal_idle()
        t0 = time.perf_counter()
        st.run(k)
        tot = st.pull()
        dt = time.perf_counter() - t0
        s1 = steal_idle()
        times = be.pop_times().as_dict()
        blk = {"batch_size": B, "steps": k, "seconds": dt, "samples_per_s": k * B / dt,
               "startup_s": startup, "warmup_s": warm_s, "warmup_steps": done,
               "mean_loss": tot.loss_sum / tot.count if tot.count else None,
               "accuracy": tot.correct / tot.count if tot.count else None,
               "samples_counted": tot.count, "times": times,
               **benchlib.steal_idle_fractions(s0, s1), "placement": placement}
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
        result["raw_allreduce_ms"] = median_time_ms(lambda: mpi_comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM),
                                                    args.comm_reps)

        def reduce_bcast():
            mpi_comm.Reduce(buf, out, op=MPI.SUM, root=0)
            mpi_comm.Bcast(buf, root=0)
        result["raw_reduce_bcast_ms"] = median_time_ms(reduce_bcast, args.comm_reps)
        result["mpi_library"] = MPI.Get_library_version().strip().splitlines()[0]

    # The floor on one machine: a plain copy of the buffer (one thread, this process).
    if args.backend == "local":
        src = np.ones(GRAD_FLOATS, np.float32)
        dst = np.empty_like(src)
        result["copy_ms"] = median_time_ms(lambda: np.copyto(dst, src), max(200, args.comm_reps), warm=20)
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
