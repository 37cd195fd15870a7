#!/usr/bin/env python
"""What ``metrics.noise_scale`` costs a training step.

The Fashion-MNIST job (jobs/fashion-mnist-mlp.yaml, 784-1024-10; or --job) on one local
worker, which measures the noise scale the expensive way: every noise_every-th step it runs
the two halves of the batch separately and takes their squared norms, and the aggregator the
norm of the sum. ``--steps`` consecutive steps (the trainer's pull of the norms every 50) are
timed with and without it, alternating, ``--rounds`` times, in CPU seconds of this process
(one BLAS thread) as well as wall seconds: on a machine shared with other work the CPU time
is the cost; the wall time is what a user waits. Reported: the medians and the overhead.

    python bench/bench_noise_scale.py                    # ~1 min on 2 cores
    python bench/bench_noise_scale.py --batch 512 --noise-every 1
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

from distffn.data.prepare import prepare_data  # noqa: E402
from distffn.data.sharding import fixed_batch, steps_per_epoch  # noqa: E402
from distffn.jobspec import load_job  # noqa: E402
from distffn.parallel.local import LocalBackend  # noqa: E402
from distffn.xp import limit_blas_threads  # noqa: E402

JOB = os.path.join(os.path.dirname(__file__), "..", "jobs", "fashion-mnist-mlp.yaml")


def time_steps(job, data, model, steps: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per step over ``steps`` steps after 20 warm-up steps."""
    backend = LocalBackend(job, data)
    theta = np.empty(model.num_params, np.float32)
    model.init_params(theta, 0)
    backend.start(theta, None, 0)
    n = data.x_train.shape[0]
    spe = steps_per_epoch(n, job.training.batch_size, True)
    measured = job.metrics.noise_scale

    def run(first, n):
        for s in range(first, first + n):
            backend.train_step(fixed_batch(n, job.training.batch_size, s // spe, s % spe, s), 0.01)
            if (s + 1) % 50 == 0:
                backend.train_totals()
                if measured:
                    backend.grad_norms()
    run(0, 20)
    c0, w0 = time.process_time(), time.perf_counter()
    run(20, steps)
    return (time.process_time() - c0) / steps, (time.perf_counter() - w0) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", default=JOB)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--noise-every", type=int, default=10)
    a = p.parse_args(argv)
    limit_blas_threads(1)
    jobs = {on: load_job(a.job, [f"training.batch_size={a.batch}", "training.drop_last=true",
                                 f"metrics.noise_scale={'true' if on else 'false'}",
                                 f"metrics.noise_every={a.noise_every}"]) for on in (False, True)}
    _, data, model = prepare_data(jobs[False])
    times = {False: [], True: []}
    for _ in range(a.rounds):
        for on in (False, True):
            times[on].append(time_steps(jobs[on], data, model, a.steps))
    (c0, w0), (c1, w1) = ([statistics.median(t[i] for t in times[on]) for i in (0, 1)] for on in (False, True))
    print(f"{os.path.basename(a.job)} B={a.batch} noise_every={a.noise_every}, 1 worker (two half-batch passes "
          f"on measured steps): CPU {1e3 * c0:.3f} → {1e3 * c1:.3f} ms/step ({100 * (c1 / c0 - 1):+.1f}%), "
          f"wall {1e3 * w0:.3f} → {1e3 * w1:.3f} ms/step ({100 * (w1 / w0 - 1):+.1f}%); medians of {a.rounds} "
          f"alternating rounds of {a.steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
