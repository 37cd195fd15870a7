"""``training.batch_size: adaptive``: the formulas against values computed by hand, the
re-sharding of a batch of any size, the settings refused, and N workers against 1 (the
resume and the backends are cells of tests/test_matrix.py)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from distffn.data import prepare_data
from distffn.data.sharding import Batch, epoch_permutation
from distffn.errors import UserError
from distffn.jobspec import from_dict
from distffn.parallel.links import NETWORKS
from distffn.parallel.worker import Worker
from distffn.training.adaptive import (
    AdaptiveBatch,
    adascale_gain,
    fit_step_time,
    goodput,
    goodput_rule,
    noise_rule,
    round_batch,
    statistical_efficiency,
)
from distffn.training.noise_scale import ema_update

from helpers import final_model, job_dict, train_in_process


def test_adascale_gain_by_hand():
    """r = (tr(Σ)/B₀ + |G|²) / (tr(Σ)/B + |G|²): |G|² = 2, tr(Σ) = 1000, B₀ = 100, B = 400 gives
    (10 + 2) / (2.5 + 2) = 8/3; the estimates' noise is clamped to [1, S = 4]."""
    assert adascale_gain(2.0, 1000.0, 100, 400) == pytest.approx(8 / 3, rel=1e-15)
    assert adascale_gain(2.0, 1000.0, 100, 100) == 1.0                # the base batch: gain 1
    assert adascale_gain(-0.5, 1000.0, 100, 400) == 4.0               # all noise: linear scaling
    assert adascale_gain(2.0, -3.0, 100, 400) == 1.0                  # no noise: no gain
    assert adascale_gain(1e-12, 1e6, 100, 400) == pytest.approx(4.0, rel=1e-6)   # S at most


def test_efficiency_and_goodput_by_hand():
    """E = (φ + B₀)/(φ + B): φ = 300, B₀ = 100, B = 500 gives 400/800; goodput = B/T(B)·E/B₀
    with T = 2 ms + 10 µs·500 = 7 ms: 500/0.007 · 0.5 / 100."""
    assert statistical_efficiency(300.0, 100, 500) == 0.5
    assert goodput(300.0, 100, 500, 2e-3, 1e-5) == pytest.approx(500 / 0.007 * 0.5 / 100, rel=1e-12)


def test_the_goodput_rule_picks_the_best_multiple():
    """B* = √(a·φ/b) maximises goodput; the rule's choice is the best of every allowed batch
    (enumerated), for models where the optimum is inside, at a bound, or between multiples."""
    for a, b, phi, lo, hi, m in [(1e-3, 1e-5, 1000.0, 64, 4096, 4), (5e-2, 1e-6, 2000.0, 64, 4096, 8),
                                 (1e-6, 1e-4, 50.0, 32, 1024, 1), (2e-3, 7e-6, 861.0, 100, 3000, 3)]:
        chosen = goodput_rule(phi, lo, lo, hi, m, a, b)
        allowed = [B for B in range(lo, hi + 1) if B % m == 0]
        best = max(allowed, key=lambda B: goodput(phi, lo, B, a, b))
        assert goodput(phi, lo, chosen, a, b) == pytest.approx(goodput(phi, lo, best, a, b), rel=1e-12)
    assert abs(goodput_rule(1000.0, 64, 64, 4096, 1, 1e-3, 1e-5) - math.sqrt(1e-3 * 1000 / 1e-5)) < 1


def test_the_goodput_rule_plans_for_other_workers_with_their_allreduce():
    """goodput_workers: 64 on 10 GbE: T_64(B) = a + 2·63·α + 2·63/64·n·β + b·B/64 (by hand:
    α = 20 µs, β = 0.8 ns/B, n = 4 × 101,770 parameters), and the choice is its B* = √(a'φ/b')."""
    job = from_dict(job_dict(model={"layers": [784, 128, 10]}, training={
        "batch_size": "adaptive", "adaptive": {"start": 128, "max": 16384, "rule": "goodput",
                                               "goodput_workers": 64, "goodput_network": "10gbe"}}))
    ext = AdaptiveBatch(job)
    ext.n_bytes = 4 * 101_770
    a, b = ext.planned(1e-4, 3.75e-6)
    assert a == pytest.approx(1e-4 + 126 * 20e-6 + 2 * 63 / 64 * 407_080 * 0.8e-9, rel=1e-12)
    assert b == pytest.approx(3.75e-6 / 64, rel=1e-12)
    assert ext.multiple == 64 and (ext.lo, ext.hi) == (128, 16384)
    best = math.sqrt(a * 500.0 / b)                     # ≈ 5,275: a cluster's step favours large batches
    assert abs(goodput_rule(500.0, 128, 128, 16384, 64, a, b) - best) <= 64
    assert goodput_rule(500.0, 128, 128, 16384, 64, 1e-4, 3.75e-6) <= 192      # one worker's: √(a·φ/b) ≈ 115
    assert NETWORKS.get("10gbe").alpha == 20e-6
    own = AdaptiveBatch(from_dict(job_dict(training={"batch_size": "adaptive", "adaptive": {"rule": "goodput"}})))
    assert own.planned(1e-4, 3.75e-6) == (1e-4, 3.75e-6)


def test_a_schedule_planned_for_a_cluster_steps_in_its_multiples_and_says_so(tmp_path):
    """goodput_workers: 4 on one worker: every batch a multiple of 4 (its workers' shards),
    each choice recorded with the plan it was made for."""
    out = tmp_path / "run"
    train_in_process(out, training={**ADAPTIVE, "adaptive": {"start": 8, "max": 60, "every_steps": 3, "rule": "goodput",
                                                             "goodput_workers": 4, "goodput_network": "ib-hdr"}},
                     metrics={"noise_every": 1})
    with open(out / "metrics.jsonl") as f:
        chosen = [r for r in map(json.loads, f) if r["event"] == "batch"]
    assert len(chosen) > 3 and len({r["batch_size"] for r in chosen}) > 1
    assert all(r["batch_size"] % 4 == 0 and 8 <= r["batch_size"] <= 60 for r in chosen)
    assert {(r["goodput_workers"], r["goodput_network"]) for r in chosen} == {(4, "ib-hdr")}


def test_the_noise_estimates_average_over_a_window_of_steps():
    """ema_update: decay exp(−steps/window) per update, so two updates 50 steps apart weigh
    an old estimate as one 100 steps later does; the bias correction makes the first update
    the estimate itself; an estimate 500 steps old keeps e^-5 of its weight (by hand)."""
    d = math.exp(-0.5)
    ema, w = ema_update([0.0, 0.0], 0.0, 4.0, 100.0, 50, 100)
    assert ema == pytest.approx([(1 - d) * 4.0, (1 - d) * 100.0]) and w == pytest.approx(1 - d)
    assert ema[0] / w == pytest.approx(4.0) and ema[1] / w == pytest.approx(100.0)
    twice = ema_update(*ema_update(ema, w, 1.0, 90.0, 50, 100), 1.0, 90.0, 50, 100)
    once = ema_update(ema, w, 1.0, 90.0, 100, 100)
    assert twice[0] == pytest.approx(once[0], rel=1e-12) and twice[1] == pytest.approx(once[1], rel=1e-12)
    late = ema_update(ema, w, 0.2, 90.0, 500, 100)
    old = math.exp(-5) * (1 - d)                        # the first estimate's weight now
    assert late[0][0] / late[1] == pytest.approx((old * 4.0 + (1 - math.exp(-5)) * 0.2) / (old + 1 - math.exp(-5)))
    assert late[0][0] / late[1] < 1.01 * 0.2 + 0.01


def test_the_noise_rule_rounds_to_multiples_within_the_bounds():
    assert noise_rule(1000.4, 100, 4096, 3) == 999
    assert noise_rule(1000.4, 100, 512, 3) == 510                     # the largest multiple ≤ max
    assert noise_rule(5.0, 100, 512, 3) == 102                        # the smallest ≥ start
    assert round_batch(7.0, 1, 64, 8) == 8                            # at least one multiple


def test_the_step_time_model_is_recovered_from_timed_segments():
    """T(B) = a + b·B from (batch, steps, seconds) of segments at several sizes; a segment
    slowed by other work on the machine (here 20×) does not move it."""
    a, b = 3e-3, 2e-5
    segments = [[B, k, k * (a + b * B)] for B, k in [(64, 10), (128, 7), (256, 3)]]
    segments.append([128, 50, 50 * 20 * (a + b * 128)])
    fit = fit_step_time(segments)
    assert fit[0] == pytest.approx(a, rel=1e-9) and fit[1] == pytest.approx(b, rel=1e-9)
    assert fit_step_time([[64, 10, 0.5], [64, 3, 0.2]]) is None       # one size: no model yet
    assert fit_step_time([[64, 10, 0.5], [80, 10, 0.6]]) is None      # sizes too close to tell a from b
    assert fit_step_time([[64, 10, 0.5], [128, 10, 0.4]]) is None     # faster with more samples: noise


def test_a_batch_of_any_size_is_split_into_the_same_shards_as_a_fixed_one():
    """Batch (epoch, start, stop): 3 workers' shards concatenate to the permutation's slice,
    sizes differing by at most one, whatever the size; their ΔΘ sum to one worker's."""
    job = from_dict(job_dict())
    _, data, model = prepare_data(job)
    theta = np.empty(model.num_params, np.float32)
    model.init_params(theta, 0)
    n = data.x_train.shape[0]
    perm = epoch_permutation(job.training.seed, 1, n)
    one = Worker(job, data.x_train, data.t_train, data.labels_train)
    three = [Worker(job, data.x_train, data.t_train, data.labels_train, r, 3) for r in range(3)]
    for start, stop in [(0, 7), (7, 40), (40, 101)]:
        batch = Batch(1, start, stop, 0)
        shards = [w.shard_indices(batch) for w in three]
        np.testing.assert_array_equal(np.concatenate(shards), perm[start:stop])
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        whole = one.compute(theta, batch).astype(np.float64)
        summed = sum(w.compute(theta, batch).astype(np.float64) for w in three)
        np.testing.assert_allclose(summed, whole, rtol=1e-4, atol=1e-5)


ADAPTIVE = {"batch_size": "adaptive", "epochs": 3,
            "adaptive": {"start": 8, "max": 60, "every_steps": 3, "multiple": 2}}


def test_two_workers_choose_the_batches_of_one_and_train_its_model(tmp_path):
    """With batches in multiples of 2, 2 local workers measure what 1 does (its two halves
    are their shards), so they choose the same batches, and train the same model within the
    N-vs-1 bound; the schedule really changes the batch and the learning rate."""
    def run(name, workers):
        out = tmp_path / name
        train_in_process(out, training=ADAPTIVE, metrics={"noise_every": 1},
                         scaling={"num_workers": workers})
        with open(out / "metrics.jsonl") as f:
            chosen = [r for r in map(json.loads, f) if r["event"] == "batch"]
        return out, chosen
    one, chosen_1 = run("n1", 1)
    two, chosen_2 = run("n2", 2)
    assert [(r["step"], r["batch_size"]) for r in chosen_1] == [(r["step"], r["batch_size"]) for r in chosen_2]
    assert len({r["batch_size"] for r in chosen_1}) > 1 and any(r["gain"] > 1 for r in chosen_1)
    for r in chosen_1:
        assert r["gain"] == pytest.approx(r["lr"] / 0.1 * (1 + 0.1 * math.floor(r["progress"])), rel=1e-12)
    a, b = final_model(one)[0], final_model(two)[0]
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=5e-6, err_msg=name)


@pytest.mark.parametrize("training,optimizer,expected", [
    ({"adaptive": {"start": 512, "max": 256}}, {}, "training.adaptive.start: 512 is above training.adaptive.max (256)"),
    ({"adaptive": {"every_steps": 0}}, {}, "training.adaptive.every_steps: expected a positive value, got 0"),
    ({"adaptive": {"every_steps": -5}}, {}, "training.adaptive.every_steps: expected a positive value, got -5"),
    ({"adaptive": {"rule": "fast"}}, {}, "training.adaptive.rule: expected one of noise, goodput; got 'fast'"),
    ({}, {"schedule": "cosine"}, "optimizer.schedule: cosine is fixed to the run's length in steps"),
    ({}, {"name": "adam"}, "optimizer.name: adam with training.batch_size: adaptive"),
    ({"batch_size": "auto"}, {}, "training.batch_size: expected a positive integer or adaptive, got 'auto'"),
    ({"adaptive": {"goodput_workers": 64}}, {}, "training.adaptive.goodput_workers: plans the goodput rule's"),
    ({"adaptive": {"rule": "goodput", "goodput_workers": -1}}, {},
     "training.adaptive.goodput_workers: expected a non-negative value, got -1"),
    ({"adaptive": {"rule": "goodput", "goodput_workers": 256, "start": 128}}, {},
     "training.adaptive.goodput_workers: 256 workers cannot share a global batch of 128"),
    ({"adaptive": {"rule": "goodput", "goodput_network": "carrier-pigeon"}}, {},
     "training.adaptive.goodput_network: expected one of 10gbe,"),
])
def test_settings_that_cannot_work_are_refused_naming_the_field(training, optimizer, expected):
    spec = job_dict(training={"batch_size": "adaptive", **training}, optimizer=optimizer)
    with pytest.raises(UserError) as e:
        from_dict(spec)
    assert str(e.value).startswith(expected), str(e.value)
    assert "\n" not in str(e.value)


def test_a_largest_batch_above_the_training_split_is_refused():
    job = from_dict(job_dict(training={"batch_size": "adaptive", "adaptive": {"start": 8, "max": 102}}))
    with pytest.raises(UserError, match=r"^training.adaptive.max: 102 is larger than the 101 training samples"):
        prepare_data(job)
