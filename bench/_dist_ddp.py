#!/usr/bin/env python
"""Helper of bench_distributed.py: the PyTorch DistributedDataParallel reference.

    OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME=lo torchrun --nproc_per_node 2 --master_addr 127.0.0.1 \
        --master_port PORT bench/_dist_ddp.py --out r.json

Same model as distffn's Fashion-MNIST job (Linear(784,1024), ReLU, Linear(1024,10)) started
from distffn's initial weights, CrossEntropyLoss, SGD lr 0.05 momentum 0.9, gloo, and the SAME
normalized arrays (distffn's prepare_data in every rank). Every global batch of B rows comes
from distffn's own epoch permutation (distffn.data.sharding), and rank r takes distffn's shard r
of it (B/N rows); the mean loss over B/N rows with DDP's gradient averaging equals the global
batch mean. torch threads per rank = CPUs / ranks. The loop is the usual one:
zero_grad(set_to_none=True), forward, loss, backward (DDP's bucketed allreduce), step; the
running loss stays a tensor and is all-reduced and read once per timed block (the analogue of
distffn's train_totals()).

After the blocks, the communication alone: torch.distributed.all_reduce of an 814,090-float32
tensor (the ΔΘ buffer), median of --comm-reps calls. Rank 0 writes one JSON file.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import benchlib
from benchlib import GRAD_FLOATS, steal_idle


def log(msg):
    benchlib.log(msg, pid=True)


def main():
    ap = argparse.ArgumentParser()
    benchlib.add_helper_args(ap)
    ap.add_argument("--timeout-s", type=float, default=120)
    benchlib.add_helper_io_args(ap)
    args = ap.parse_args()
    t_proc = time.perf_counter()

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout_s))

    from distffn.data.sharding import epoch_permutation, shard_bounds

    job, data, model = benchlib.load_data(args.job, benchlib.job_overrides(args.limit_train or None))
    X, Y = benchlib.torch_data(data)
    n = X.shape[0]
    seed = job.training.seed
    theta0 = benchlib.initial_theta(model, seed)
    arrays0 = model.layout.to_arrays(theta0)
    lr, momentum = job.optimizer.lr, job.optimizer.momentum

    def flag(v: bool) -> bool:
        """Rank 0's decision on every rank."""
        t = torch.tensor([1 if v else 0], dtype=torch.int32)
        dist.broadcast(t, 0)
        return bool(t.item())

    result = {"world_size": world, "threads_per_rank": threads, "torch": torch.__version__,
              "n_train": int(n), "blocks": []}
    steps = benchlib.helper_steps(args.batch_sizes, args.steps)
    torch_step = benchlib.torch_step
    for B in args.batch_sizes:
        ddp = DDP(benchlib.torch_mlp(arrays0))
        loss_fn = torch.nn.CrossEntropyLoss()
        opt = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=momentum)
        full = n // B
        lo, hi = shard_bounds(B, world, rank)
        state = {"epoch": 0, "batch": 0, "perm": torch.from_numpy(epoch_permutation(seed, 0, n))}

        def run(k, loss_sum):
            perm = state["perm"]
            for _ in range(k):
                if state["batch"] == full:
                    state["epoch"] += 1
                    state["batch"] = 0
                    perm = state["perm"] = torch.from_numpy(epoch_permutation(seed, state["epoch"], n))
                start = state["batch"] * B
                idx = perm[start + lo:start + hi]
                state["batch"] += 1
                torch_step(ddp, loss_fn, opt, X, Y, idx, loss_sum)

        w0, done = time.perf_counter(), 0
        while True:
            run(5, torch.zeros(()))
            done += 5
            if not flag(done < args.warmup or time.perf_counter() - w0 < args.warmup_s):
                break
        warm_s = time.perf_counter() - w0
        k = steps[B]
        dist.barrier()
        s0 = steal_idle()
        t0 = time.perf_counter()
        loss_sum = torch.zeros(())
        run(k, loss_sum)
        dist.all_reduce(loss_sum)
        mean_loss = loss_sum.item() / (k * world)
        dt = time.perf_counter() - t0
        s1 = steal_idle()
        blk = {"batch_size": B, "steps": k, "seconds": dt, "samples_per_s": k * B / dt,
               "warmup_s": warm_s, "warmup_steps": done, "mean_loss": mean_loss,
               "wall_ms_per_step": 1e3 * dt / k, **benchlib.steal_idle_fractions(s0, s1)}
        result["blocks"].append(blk)
        if rank == 0:
            log(f"DDP N={world} B={B}: {blk['samples_per_s']:,.0f} samples/s "
                f"(warm-up {done} steps)")
        ddp = opt = None                 # let the model go before the next batch size

    # communication alone: one all_reduce of the ΔΘ-sized buffer
    buf = torch.zeros(GRAD_FLOATS, dtype=torch.float32)
    result["allreduce_ms"] = benchlib.median_time_ms(lambda: dist.all_reduce(buf), args.comm_reps)
    result["process_s"] = time.perf_counter() - t_proc
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
