"""The α-β model: its formulas, its fit, and the model held against step times measured here."""
from __future__ import annotations

import math
import os

import pytest

from distffn.jobspec import load_job
from distffn.parallel.links import Network, communication_seconds
from distffn.sweep.projection import (
    NETWORKS,
    StepModel,
    batch_schedule,
    fit_step_model,
    fit_sync,
    schedule_seconds,
    worker_counts,
)
from distffn.sweep.trials import Timing, run_timings

from helpers import needs_mpi

JOBS = os.path.join(os.path.dirname(__file__), "..", "..", "jobs")


def test_the_compute_fit_recovers_fixed_and_per_sample_costs():
    truth = StepModel(fixed=2e-4, per_sample=3e-6, n_bytes=400)
    one = {b: truth.compute_seconds(b, 1) for b in (16, 64, 256, 1024)}
    model = fit_step_model(one, 400)
    assert model.fixed == pytest.approx(2e-4, rel=1e-6) and model.per_sample == pytest.approx(3e-6, rel=1e-6)
    measured = {(b, 2): truth.compute_seconds(b, 2) + 5e-4 for b in (16, 64, 256)}
    assert fit_sync(model, measured).sync == pytest.approx(5e-4, rel=1e-6)
    assert model.step_seconds(64, 1, NETWORKS.get("10gbe")) == pytest.approx(truth.compute_seconds(64, 1))
    net = NETWORKS.get("ib-hdr")
    assert model.step_seconds(64, 4, net) == pytest.approx(
        2e-4 + 16 * 3e-6 + 5e-4 + communication_seconds(400, 4, net))


def test_the_measured_veth_link_is_a_preset_that_says_how_to_measure_it_again():
    """veth-local: two test hosts' veth link as bench/bench_hosts.py measured it, not a line rate."""
    veth = NETWORKS.get("veth-local")
    assert "bench/bench_hosts.py" in NETWORKS.doc("veth-local")
    # a link inside one machine: a lower latency than kernel TCP over Ethernet, but a bandwidth
    # below 25 GbE's line rate (one core copies every byte twice)
    assert veth.alpha < NETWORKS.get("10gbe").alpha and NETWORKS.get("25gbe").beta < veth.beta
    assert fit_sync(StepModel(0.0, 0.0, 1000), {(8, 2): 1.0}, net=veth).sync < 1.0


def test_the_sync_fitted_over_a_measured_link_leaves_out_the_links_own_cost():
    """Step times measured over a link hold its communication: fitted with ``net``, ``sync`` is
    what they add beyond compute and that link, so the model gives the measured times back."""
    model = StepModel(fixed=2e-4, per_sample=3e-6, n_bytes=3_000_000)
    net = Network(alpha=8e-6, beta=6e-10)
    for aggregation in ("allreduce", "central"):
        measured = {(b, 2): model.compute_seconds(b, 2) + 4e-3 + communication_seconds(3_000_000, 2, net, aggregation)
                    for b in (128, 512)}
        fitted = fit_sync(StepModel(2e-4, 3e-6, 3_000_000), measured, net=net, aggregation=aggregation)
        assert fitted.sync == pytest.approx(4e-3, rel=1e-9)
        assert fitted.step_seconds(512, 2, net, aggregation) == pytest.approx(measured[(512, 2)], rel=1e-9)
        # without the link, its cost lands in sync
        assert fit_sync(StepModel(2e-4, 3e-6, 3_000_000), measured).sync > 4e-3


def test_worker_counts_are_powers_of_two_up_to_the_batch_and_1024():
    assert worker_counts(5) == [1, 2, 4]
    assert worker_counts(1 << 20)[-1] == 1024


@needs_mpi
def test_step_times_measured_here_feed_the_model(tmp_path):
    """Real 1- and 2-worker runs (local, then mpiexec) give the timings a sweep fits: each a
    finite positive time, the fit's normal equations hold on them, and ``sync`` is the median
    of the 2-worker times' excess over the fitted compute. How well the model predicts is a
    speed figure, and speed lives in bench/ (BENCHMARKS.md, the scaling experiment), not in a
    test on a shared machine."""
    job = os.path.join(JOBS, "fashion-mnist-sweep-job.yaml")
    if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
        job = os.path.join(JOBS, "digits-sweep-job.yaml")
    base = load_job(job)
    path = tmp_path / "job.yaml"
    path.write_text(base.to_yaml())
    measured = {}
    for b, n in ((64, 1), (256, 1), (1024, 1), (64, 2), (256, 2), (1024, 2)):
        t = Timing(b, n, "local" if n == 1 else "mpi", steps=30, epochs=2)
        measured[(b, n)] = run_timings(t, str(path), str(tmp_path), threads=1, repeats=1)["step_seconds"]
    assert all(math.isfinite(s) and s > 0 for s in measured.values()), measured
    n_bytes = 4 * sum((a + 1) * c for a, c in zip(base.model.layers[:-1], base.model.layers[1:]))
    one = {b: s for (b, n), s in measured.items() if n == 1}
    model = fit_sync(fit_step_model(one, n_bytes), measured)
    if model.fixed > 0 and model.per_sample > 0:
        # least squares in relative error: the residuals are orthogonal to both columns
        r = [(model.compute_seconds(b, 1) - s) / s for b, s in one.items()]
        assert abs(sum(ri / s for ri, s in zip(r, one.values()))) < 1e-6 * sum(1 / s for s in one.values())
        assert abs(sum(ri * b / s for ri, (b, s) in zip(r, one.items()))) < 1e-6 * sum(b / s for b, s in one.items())
    excess = sorted(max(0.0, s - model.compute_seconds(b, n)) for (b, n), s in measured.items() if n == 2)
    assert model.sync == pytest.approx(excess[1])      # the median of three, not their mean


def test_a_changing_batch_is_projected_step_by_step_from_its_batch_records():
    records = [{"event": "batch", "step": 0, "batch_size": 8}, {"event": "batch", "step": 3, "batch_size": 32},
               {"event": "batch", "step": 3, "batch_size": 64},        # resumed: the later record counts
               {"event": "batch", "step": 5, "batch_size": 128}, {"event": "batch", "step": 9, "batch_size": 256}]
    schedule = batch_schedule(records, 7)
    assert schedule == [(8, 3), (64, 2), (128, 2)]
    model, net = StepModel(fixed=1e-3, per_sample=1e-4, n_bytes=1000, sync=2e-4), Network(1e-5, 1e-9)
    # one worker: 3 (1 + 0.8) ms + 2 (1 + 6.4) ms + 2 (1 + 12.8) ms
    assert schedule_seconds(model, schedule, 1, net) == pytest.approx(47.8e-3)
    # 16 workers; B = 8 runs on 8 of them, a sample each: 1 + 0.1 + 0.2 + 2·7·0.01 + 2·7/8·1000·1e-6 ms
    b8 = 3 * (1.1e-3 + 2e-4 + 1.4e-4 + 1.75e-6)
    b64 = 2 * (1.4e-3 + 2e-4 + 3e-4 + 1.875e-6)
    b128 = 2 * (1.8e-3 + 2e-4 + 3e-4 + 1.875e-6)
    assert b8 + b64 + b128 == pytest.approx(12.73275e-3)
    assert schedule_seconds(model, schedule, 16, net) == pytest.approx(12.73275e-3)
    with pytest.raises(ValueError):
        batch_schedule(records[1:], 7)             # no batch before step 3
