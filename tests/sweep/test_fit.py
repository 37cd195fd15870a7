"""The critical-batch fit recovers a known curve, and the regimes follow from it."""
from __future__ import annotations

import numpy as np
import pytest

from distffn.sweep.fit import (
    CriticalBatchFit,
    fit_critical_batch,
    local_slopes,
    regime_bounds,
    regime_of,
    steps_at_samples,
)


@pytest.mark.parametrize("s_min,b_crit", [(40.0, 300.0), (1200.0, 20.0), (7.0, 5000.0)])
def test_the_fit_recovers_s_min_and_b_crit_from_noisy_steps(s_min, b_crit):
    rng = np.random.default_rng(int(b_crit))
    batch = 2 ** np.arange(3, 15)
    steps = s_min * (1 + b_crit / batch) * np.exp(rng.normal(0, 0.03, batch.size))   # 3% noise
    fit = fit_critical_batch(dict(zip(batch.tolist(), steps.tolist())))
    assert fit.b_crit == pytest.approx(b_crit, rel=0.15)
    assert fit.s_min == pytest.approx(s_min, rel=0.1)
    assert fit.e_min == pytest.approx(fit.s_min * fit.b_crit)
    assert fit.rms_log_error < 0.05 and fit.points == batch.size
    np.testing.assert_allclose(fit.steps(batch), s_min * (1 + b_crit / batch), rtol=0.2)


def test_an_exact_curve_is_fitted_exactly():
    batch = [16, 64, 256, 1024]
    fit = fit_critical_batch({b: 100 * (1 + 200 / b) for b in batch})
    assert fit.b_crit == pytest.approx(200, rel=1e-4) and fit.s_min == pytest.approx(100, rel=1e-4)
    assert fit.rms_log_error < 1e-6


def test_fewer_than_three_batch_sizes_give_no_fit():
    assert fit_critical_batch({16: 100, 64: 40}) is None


def test_regimes_split_the_batch_sizes_at_a_quarter_and_four_times_b_crit():
    bounds = regime_bounds(400, 0.25)
    assert bounds["perfect_scaling"] == [None, 100] and bounds["maximal_data_parallelism"] == [1600, None]
    assert [regime_of(b, 400) for b in (64, 100, 101, 1599, 1600, 8192)] == [
        "perfect_scaling", "perfect_scaling", "diminishing_returns", "diminishing_returns",
        "maximal_data_parallelism", "maximal_data_parallelism"]
    # under the model, the steps are within 25% of perfect scaling / of S_min at the bounds
    s_min, b_crit = 10.0, 400.0
    steps = lambda b: s_min * (1 + b_crit / b)  # noqa: E731
    assert steps(100) / (s_min * b_crit / 100) == pytest.approx(1.25)
    assert steps(1600) / s_min == pytest.approx(1.25)


def test_local_slopes_are_minus_one_under_perfect_scaling_and_zero_without_gain():
    assert local_slopes({8: 800, 16: 400, 32: 200}) == pytest.approx({8: -1.0, 16: -1.0})
    assert local_slopes({1024: 50, 2048: 50}) == pytest.approx({1024: 0.0})


def test_the_fit_in_samples_space_gives_the_steps_a_fixed_batch_needs_for_those_samples():
    # S_min 100, B_crit 50, E_min 5000: at E = 20,000 samples, S = 100 / (1 - 5000/20000) = 133.33 steps,
    # the fixed batch B = E/S = 150 of the curve: 100 (1 + 50/150) = 133.33
    fit = CriticalBatchFit(s_min=100.0, b_crit=50.0, e_min=5000.0, rms_log_error=0.0, points=3)
    assert steps_at_samples(100.0, 5000.0, 20000.0) == pytest.approx(400 / 3)
    assert fit.steps_at_samples(20000.0) == pytest.approx(float(fit.steps(150)))
    assert steps_at_samples(100.0, 5000.0, 5000.0) is None and fit.steps_at_samples(4000.0) is None
