#!/usr/bin/env python
"""CPU training throughput of distffn against PyTorch and the GEMM-only bound.

The Fashion-MNIST job (jobs/fashion-mnist-mlp.yaml: 784-1024-10 ReLU, softmax cross-entropy,
momentum SGD lr 0.05 μ 0.9) on one local worker, per batch size, in rounds of three timed
blocks run one after another in the same process:

  distffn  LocalBackend.train_step over K consecutive full batches of the epoch permutation
           (wrapping to the next epoch), then train_totals() (the trainer's stats sync), timed.
  torch    the same model, data (the same normalized arrays, via torch.from_numpy), batch and
           optimizer as a plain fast PyTorch CPU loop: per-epoch randperm, index_select,
           zero_grad(set_to_none=True), forward, CrossEntropyLoss, backward, SGD step; the
           running loss is summed on the tensor side and read with .item() once per block.
  gemm     only the matrix products a distffn step needs, with distffn's layouts (W stored
           transposed, i.e. F-ordered (fan_in, fan_out) views of the flat buffer), np.matmul
           with out= into preallocated arrays: X·W0, A·W1, Aᵀ·dZ1, dZ1·W1ᵀ, Xᵀ·dZ0.

samples/s = K·B / seconds. Reported per batch size: medians over rounds, ratio of medians and
median of per-round ratios, and pass/fail against the targets (distffn ≥ 1.2× torch at batch
128, ≥ 1.0× at 512, ≥ 75% of the GEMM-only bound at every batch size).

    python bench/bench_cpu.py                          # full run (~1-3 min on 2 cores)
    python bench/bench_cpu.py --limit-train 2000 --rounds 2 --steps 20   # smoke test
    python bench/bench_cpu.py --json runs/bench.json   # also write raw timings + summary
"""
from __future__ import annotations

import os
import statistics
import time

import benchlib
import numpy as np
from benchlib import JOB, log, wait_idle

from distffn.data.sharding import Batch

TORCH_TARGET = {128: 1.2, 512: 1.0}     # distffn / torch, ratio of medians
GEMM_TARGET = 0.75                      # distffn / GEMM-only bound


# ---------------------------------------------------------------- environment

def environment(threads: int) -> dict:
    import torch
    env = benchlib.base_environment(
        threads_requested=threads,
        numpy=np.__version__,
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        torch_interop_threads=torch.get_num_interop_threads(),
    )
    env["cpu_model"] = benchlib.cpu_model()
    try:
        from threadpoolctl import threadpool_info
        env["blas_pools"] = [{k: p.get(k) for k in ("internal_api", "version", "num_threads",
                                                       "architecture", "threading_layer", "prefix")}
                             for p in threadpool_info()]
    except Exception as e:  # threadpoolctl missing: fall back to numpy's build info
        env["blas_pools"] = None
        env["blas_pools_error"] = repr(e)
    env["numpy_blas"] = benchlib.numpy_blas()
    try:
        env["torch_parallel_info"] = torch.__config__.parallel_info()
    except Exception:
        pass
    env["git"] = benchlib.git_rev()
    return env


def numpy_threads(env: dict):
    pools = env.get("blas_pools") or []
    n = [p["num_threads"] for p in pools if p.get("internal_api") in ("openblas", "mkl", "blis")]
    return n[0] if n else None


def seconds_per_call(fn, reps: int, blocks: int, warmup: int) -> float:
    """Median over ``blocks`` blocks of ``reps`` calls of ``fn``, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        ts.append((time.perf_counter() - t0) / reps)
    return statistics.median(ts)


# ---------------------------------------------------------------- contenders

class DistffnRunner:
    """One LocalBackend at batch size B; keeps its place in the epochs between blocks."""

    name = "distffn"

    def __init__(self, job, data, model_init_theta):
        from distffn.optim.schedules import learning_rate
        from distffn.parallel.local import LocalBackend
        self.job, self.B = job, job.training.batch_size
        self.n = data.x_train.shape[0]
        self.full = self.n // self.B                # full batches per epoch (timed steps only)
        if self.full == 0:
            raise SystemExit(f"batch size {self.B} exceeds the {self.n} training samples")
        self.backend = LocalBackend(job, data)
        self.backend.start(model_init_theta, None, 0)     # None: fresh (zero) velocity
        self.lr_fn = learning_rate
        self.epoch = self.batch = self.step = 0
        self.total = 10 ** 9                        # constant schedule: total steps unused

    def run(self, k: int) -> dict:
        be, B, opt = self.backend, self.B, self.job.optimizer
        t0 = time.perf_counter()
        for _ in range(k):
            lr = self.lr_fn(opt, self.step, self.total)
            be.train_step(Batch(self.epoch, self.batch * B, (self.batch + 1) * B, self.step), lr)
            self.step += 1
            self.batch += 1
            if self.batch == self.full:
                self.epoch, self.batch = self.epoch + 1, 0
        tot = be.train_totals()
        dt = time.perf_counter() - t0
        return {"seconds": dt, "mean_loss": tot.loss_sum / tot.count if tot.count else None,
                "accuracy": tot.correct / tot.count if tot.count else None}


class TorchRunner:
    name = "torch"

    def __init__(self, B, data, layer_arrays, lr, momentum, seed=0):
        import torch
        self.torch, self.B = torch, B
        self.X, self.Y = benchlib.torch_data(data)
        self.n = self.X.shape[0]
        self.full = self.n // B
        self.net = benchlib.torch_mlp(layer_arrays)     # starts from distffn's initial weights
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.opt = torch.optim.SGD(self.net.parameters(), lr=lr, momentum=momentum)
        self.gen = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(self.n, generator=self.gen)
        self.batch = 0

    def run(self, k: int) -> dict:
        torch, B, X, Y = self.torch, self.B, self.X, self.Y
        net, loss_fn, opt, torch_step = self.net, self.loss_fn, self.opt, benchlib.torch_step
        t0 = time.perf_counter()
        loss_sum = torch.zeros(())
        for _ in range(k):
            if self.batch == self.full:
                self.perm = torch.randperm(self.n, generator=self.gen)
                self.batch = 0
            idx = self.perm[self.batch * B:(self.batch + 1) * B]
            self.batch += 1
            torch_step(net, loss_fn, opt, X, Y, idx, loss_sum)
        mean_loss = loss_sum.item() / k
        dt = time.perf_counter() - t0
        return {"seconds": dt, "mean_loss": mean_loss}


class GemmRunner:
    """The five matrix products of a distffn step, in distffn's memory layouts, alone."""

    name = "gemm"

    def __init__(self, model, B, x_train, seed=0):
        rng = np.random.default_rng(seed)
        f32 = np.float32
        self.B = B
        self.pbuf = np.empty(model.num_params, f32)
        self.gbuf = np.empty(model.num_params, f32)
        model.init_params(self.pbuf, seed)
        self.gbuf[...] = 0
        p, g = model.layout.views(self.pbuf), model.layout.views(self.gbuf)
        self.W0, self.W1, self.dW0, self.dW1 = p["W0"], p["W1"], g["W0"], g["W1"]
        n_in, n_h = self.W0.shape
        n_out = self.W1.shape[1]
        self.X = np.take(x_train, rng.permutation(x_train.shape[0])[:B], axis=0)
        # the work buffers in the model's own memory order
        from distffn.nn.model import ORDER as order
        self.Z0 = np.empty((B, n_h), f32, order=order)
        self.A = np.asarray(np.maximum(rng.standard_normal((B, n_h), dtype=f32), 0), order=order)
        self.Z1 = np.empty((B, n_out), f32, order=order)
        self.dZ1 = np.asarray(rng.standard_normal((B, n_out), dtype=f32), order=order)
        self.dA = np.empty((B, n_h), f32, order=order)
        self.dZ0 = np.asarray(rng.standard_normal((B, n_h), dtype=f32), order=order)
        mm = np.matmul
        self.products = {
            "X·W0 (fwd 0)": lambda: mm(self.X, self.W0, out=self.Z0),
            "A·W1 (fwd 1)": lambda: mm(self.A, self.W1, out=self.Z1),
            "Aᵀ·dZ1 (dW1)": lambda: mm(self.A.T, self.dZ1, out=self.dW1),
            "dZ1·W1ᵀ (dA)": lambda: mm(self.dZ1, self.W1.T, out=self.dA),
            "Xᵀ·dZ0 (dW0)": lambda: mm(self.X.T, self.dZ0, out=self.dW0),
        }

    def run(self, k: int) -> dict:
        mm = np.matmul
        X, W0, Z0, A, W1, Z1 = self.X, self.W0, self.Z0, self.A, self.W1, self.Z1
        dZ1, dW1, dA, dZ0, dW0 = self.dZ1, self.dW1, self.dA, self.dZ0, self.dW0
        XT, AT, W1T = X.T, A.T, W1.T
        t0 = time.perf_counter()
        for _ in range(k):
            mm(X, W0, out=Z0)
            mm(A, W1, out=Z1)
            mm(AT, dZ1, out=dW1)
            mm(dZ1, W1T, out=dA)
            mm(XT, dZ0, out=dW0)
        return {"seconds": time.perf_counter() - t0}

    def breakdown(self, k: int) -> dict:
        """Seconds per call of each product timed on its own (median of 3 blocks of k)."""
        return {name: seconds_per_call(fn, k, blocks=3, warmup=3) for name, fn in self.products.items()}


# ---------------------------------------------------------------- where the time goes

class _NoProducts:
    """NumPy with ``matmul`` a no-op: the model's step without its matrix products."""
    ndarray = np.ndarray

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def matmul(a, b, out=None):
        return out


def phases(d: DistffnRunner, g: GemmRunner, k: int) -> dict:
    """µs per step (median of 5 blocks of ``k``): the whole step, its five products alone
    (GemmRunner), the update alone (the optimizer on the step's ΔΘ), and the step without
    products (gather, elementwise kernels, Python): the roofline of BENCHMARKS.md."""
    be = d.backend
    worker, agg = be.workers[0], be.aggregator
    lr = d.job.optimizer.lr

    def median_us(fn, reps):
        return 1e6 * seconds_per_call(fn, reps, blocks=5, warmup=max(3, reps // 10))

    out = {"step": median_us(lambda: d.run(1), k),
           "products": median_us(lambda: g.run(1), k)}
    grad = worker.grad.copy()                  # a real ΔΘ: no denormals in the velocity
    out["update"] = median_us(lambda: agg.optimizer.update(agg.theta, grad, lr, 1.0 / d.B), k)
    model_xp, worker.model.xp = worker.model.xp, _NoProducts()
    try:
        out["step_without_products"] = median_us(lambda: d.run(1), k)
    finally:
        worker.model.xp = model_xp
    n = agg.theta.size
    # bytes the momentum update moves: read Θ, v, ΔΘ; write Θ, v (float32)
    out["update_GB_per_s"] = 5 * 4 * n / (out["update"] * 1e-6) / 1e9 if agg.optimizer.name == "momentum" else None
    sizes = worker.model.sizes
    flops = 2 * d.B * sum(a * b for a, b in zip(sizes[:-1], sizes[1:])) * 3 - 2 * d.B * sizes[0] * sizes[1]
    out["products_GFLOP_per_s"] = flops / (out["products"] * 1e-6) / 1e9
    return out


# ---------------------------------------------------------------- summary

def summarize(blocks: list, batch_sizes: list) -> dict:
    summary = {}
    for B in batch_sizes:
        rows = [r for r in blocks if r["batch_size"] == B]
        rounds = sorted({r["round"] for r in rows})
        sps = {c: {r["round"]: r["samples_per_s"] for r in rows if r["contender"] == c}
               for c in ("distffn", "torch", "gemm")}
        med = {c: statistics.median(v.values()) for c, v in sps.items()}
        per_round_t = [sps["distffn"][i] / sps["torch"][i] for i in rounds]
        per_round_g = [sps["distffn"][i] / sps["gemm"][i] for i in rounds]
        ratio = med["distffn"] / med["torch"]
        frac = med["distffn"] / med["gemm"]
        tt = TORCH_TARGET.get(B)
        summary[str(B)] = {
            "rounds": len(rounds),
            "steps": rows[0]["steps"],
            "distffn_sps_median": med["distffn"],
            "torch_sps_median": med["torch"],
            "gemm_bound_sps_median": med["gemm"],
            "distffn_sps_range": [min(sps["distffn"].values()), max(sps["distffn"].values())],
            "torch_sps_range": [min(sps["torch"].values()), max(sps["torch"].values())],
            "gemm_bound_sps_range": [min(sps["gemm"].values()), max(sps["gemm"].values())],
            "distffn_sps_best": max(sps["distffn"].values()),
            "torch_sps_best": max(sps["torch"].values()),
            "gemm_bound_sps_best": max(sps["gemm"].values()),
            "ratio_vs_torch_best": max(sps["distffn"].values()) / max(sps["torch"].values()),
            "fraction_of_gemm_bound_best": max(sps["distffn"].values()) / max(sps["gemm"].values()),
            "cpu_per_wall_median": {c: statistics.median(r["cpu_per_wall"] for r in rows
                                                         if r["contender"] == c)
                                    for c in ("distffn", "torch", "gemm")},
            "ratio_vs_torch": ratio,
            "ratio_vs_torch_per_round_median": statistics.median(per_round_t),
            "ratio_vs_torch_per_round": per_round_t,
            "fraction_of_gemm_bound": frac,
            "fraction_of_gemm_bound_per_round_median": statistics.median(per_round_g),
            "fraction_of_gemm_bound_per_round": per_round_g,
            "torch_target": tt,
            "torch_pass": None if tt is None else ratio >= tt,
            "gemm_target": GEMM_TARGET,
            "gemm_pass": frac >= GEMM_TARGET,
        }
    return summary


def print_table(summary: dict, env: dict, args, cmd: str):
    p = print
    p("distffn CPU benchmark: Fashion-MNIST 784-1024-10 ReLU, softmax CE, momentum SGD "
      "lr 0.05 μ 0.9, 1 worker")
    p(benchlib.machine_line(env))
    blas = env.get("numpy_blas") or {}
    p(f"  numpy {env['numpy']} ({blas.get('name')} {blas.get('version')}, "
      f"{numpy_threads(env)} threads)   torch {env['torch']} ({env['torch_threads']} threads)")
    p(f"  rounds {args.rounds} (alternating distffn, torch, gemm-only), warm-up "
      f">= {args.warmup} steps and >= {args.warmup_s} s before every block, n_train {args.n_train}")
    for line in benchlib.context_lines(env, cmd):
        p(line)
    p("")
    hdr = (f"{'batch':>5}  {'steps':>5}  {'distffn/s':>10}  {'torch/s':>10}  {'ratio':>6}  "
           f"{'(rnd med)':>9}  {'target':>7}  {'':4}  {'GEMM bound/s':>12}  {'of bound':>8}  "
           f"{'(rnd med)':>9}  {'target':>6}  {'':4}")
    p(hdr)
    p("-" * len(hdr))
    for B, s in summary.items():
        tt = s["torch_target"]
        tpass = "" if tt is None else ("PASS" if s["torch_pass"] else "FAIL")
        p(f"{B:>5}  {s['steps']:>5}  {s['distffn_sps_median']:>10,.0f}  {s['torch_sps_median']:>10,.0f}  "
          f"{s['ratio_vs_torch']:>5.2f}×  {s['ratio_vs_torch_per_round_median']:>8.2f}×  "
          f"{'≥%.2f×' % tt if tt else '—':>7}  {tpass:4}  {s['gemm_bound_sps_median']:>12,.0f}  "
          f"{100 * s['fraction_of_gemm_bound']:>7.1f}%  "
          f"{100 * s['fraction_of_gemm_bound_per_round_median']:>8.1f}%  "
          f"{'≥%d%%' % round(100 * GEMM_TARGET):>6}  {'PASS' if s['gemm_pass'] else 'FAIL':4}")
    p("")
    p("samples/s are medians over rounds; 'ratio' and 'of bound' are ratios of medians, "
      "'(rnd med)' the median of per-round ratios.")
    p("ranges (min–max samples/s over rounds), best-of-rounds ratios (noise only slows a "
      "block, so the best is a second estimate of the uncontended speed), median CPU s per wall s:")
    for B, s in summary.items():
        r = lambda k: "%s–%s" % tuple(f"{v:,.0f}" for v in s[k])
        u = s["cpu_per_wall_median"]
        p(f"  batch {B}: distffn {r('distffn_sps_range')}   torch {r('torch_sps_range')}   "
          f"gemm {r('gemm_bound_sps_range')}")
        p(f"  {'':{len(str(B)) + 7}} best: distffn/torch {s['ratio_vs_torch_best']:.2f}×, "
          f"distffn/GEMM {100 * s['fraction_of_gemm_bound_best']:.1f}%   "
          f"cpu/wall distffn {u['distffn']:.2f} torch {u['torch']:.2f} gemm {u['gemm']:.2f}")


# ---------------------------------------------------------------- main

def main(argv=None):
    ap = benchlib.driver_parser(__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, nargs="+", default=None,
                    help="timed steps per block: one value for every batch size or one per "
                         "batch size (default 200 at 128, 60 at 512, else ~25600/B)")
    ap.add_argument("--warmup", type=int, default=20,
                    help="untimed steps before every timed block (default 20)")
    ap.add_argument("--warmup-s", type=float, default=0.3,
                    help="...and at least this many seconds of untimed steps (default 0.3)")
    ap.add_argument("--limit-train", type=int, default=None,
                    help="use only the first N training samples (quick smoke test)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch threads (and numpy BLAS threads via threadpoolctl); default: all CPUs")
    ap.add_argument("--wait-idle", type=float, default=5.0,
                    help="before each round of a batch size, wait up to this many seconds for "
                         "the machine to be >=90%% idle (shared box; 0 = don't wait)")
    ap.add_argument("--job", default=JOB, help="job spec (default jobs/fashion-mnist-mlp.yaml)")
    ap.add_argument("--json", default=None, help="write raw timings and the summary here")
    args, cmd, steps = benchlib.parse_driver_args(ap, argv, "bench_cpu.py")

    import torch
    torch.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=args.threads, user_api="blas")
    except Exception:
        log("threadpoolctl not available: numpy BLAS keeps its default thread count")

    from distffn.jobspec import load_job

    # The setting: constant lr 0.05, momentum 0.9 (see benchlib.OPTIMIZER_OVERRIDES).
    overrides = benchlib.job_overrides(args.limit_train)
    t0 = time.perf_counter()
    job0, data, model = benchlib.load_data(args.job, overrides)   # the data do not depend on B
    args.n_train = int(data.x_train.shape[0])
    log(f"loaded {job0.data.dataset}: {args.n_train} training samples "
        f"({data.x_train.dtype}, {time.perf_counter() - t0:.1f} s)")
    theta0 = benchlib.initial_theta(model, job0.training.seed)
    arrays0 = model.layout.to_arrays(theta0)

    env = environment(args.threads)
    log(f"numpy {env['numpy']} BLAS threads {numpy_threads(env)}, torch {env['torch']} "
        f"threads {env['torch_threads']}, CPU {env.get('cpu_model')}")

    runners = {}
    for B in args.batch_sizes:
        job = load_job(args.job, overrides + [f"training.batch_size={B}"])
        if args.n_train < B:
            raise SystemExit(f"batch size {B} exceeds the {args.n_train} training samples")
        runners[B] = [DistffnRunner(job, data, theta0.copy()),
                      TorchRunner(B, data, arrays0, job.optimizer.lr, job.optimizer.momentum,
                                  job.training.seed),
                      GemmRunner(model, B, data.x_train, job.training.seed)]

    blocks = []
    t_start = time.perf_counter()
    for rnd in range(args.rounds):
        for B in args.batch_sizes:
            k = steps[B]
            line = []
            idle = wait_idle(args.wait_idle) if args.wait_idle > 0 else {}
            for r in runners[B]:
                # Warm-up: the steps asked for, and at least --warmup-s seconds, since the
                # previous contender's BLAS/OpenMP threads keep spinning ~0.1 s after it stops
                # (measured: torch's first steps after a NumPy block run ~8x slower).
                w0, done = time.perf_counter(), 0
                while done < args.warmup or time.perf_counter() - w0 < args.warmup_s:
                    r.run(5)
                    done += 5
                c0 = time.process_time()
                res = r.run(k)
                # CPU seconds of this process per wall second: ~threads when it had the
                # cores to itself, lower when another tenant's job shared them.
                cpu = (time.process_time() - c0) / res["seconds"]
                res.update(contender=r.name, batch_size=B, round=rnd, steps=k,
                           samples_per_s=k * B / res["seconds"], cpu_per_wall=cpu,
                           idle_before=idle.get("idle_fraction"))
                blocks.append(res)
                line.append(f"{r.name} {res['samples_per_s']:>9,.0f} (cpu {cpu:.2f})")
            log(f"[round {rnd + 1}/{args.rounds}] B={B:<4} " + "  ".join(line) + " samples/s"
                f"   ({time.perf_counter() - t_start:.0f} s"
                + (f", waited {idle['waited_s']:.1f} s for idle" if idle else "") + ")")

    breakdown = {}
    for B in args.batch_sizes:
        g = runners[B][2]
        breakdown[str(B)] = g.breakdown(max(5, steps[B] // 4))
    for B in args.batch_sizes:
        last = {r["contender"]: r for r in blocks if r["batch_size"] == B}
        log(f"B={B}: last-block mean training loss distffn {last['distffn']['mean_loss']:.4f}, "
            f"torch {last['torch']['mean_loss']:.4f}; GEMM per call (µs): " +
            ", ".join(f"{n} {1e6 * t:.0f}" for n, t in breakdown[str(B)].items()))

    roofline = {}
    for B in args.batch_sizes:
        d, _, g = runners[B]
        roofline[str(B)] = ph = phases(d, g, steps[B])
        log(f"B={B}: where a step's time goes (µs): step {ph['step']:.0f} = products "
            f"{ph['products']:.0f} ({ph['products_GFLOP_per_s']:.0f} GFLOP/s) + the rest; the rest "
            f"alone: update {ph['update']:.0f}"
            + (f" ({ph['update_GB_per_s']:.0f} GB/s)" if ph["update_GB_per_s"] else "")
            + f", step without products {ph['step_without_products']:.0f} (update, gather, "
              f"elementwise kernels, Python)")

    env["loadavg_end"] = list(os.getloadavg())
    summary = summarize(blocks, args.batch_sizes)
    print_table(summary, env, args, cmd)

    if args.json:
        out = {"command": cmd, "environment": env,
               "config": benchlib.config_record(
                   args, steps, overrides=overrides, limit_train=args.limit_train, n_train=args.n_train,
                   threads=args.threads,
                   targets={"torch": {str(b): t for b, t in TORCH_TARGET.items()},
                            "gemm_fraction": GEMM_TARGET}),
               "blocks": blocks, "gemm_breakdown_s_per_call": breakdown, "roofline_us": roofline,
               "summary": summary,
               "bench_seconds": time.perf_counter() - t_start}
        benchlib.write_json(args.json, out, indent=2)


if __name__ == "__main__":
    main()
