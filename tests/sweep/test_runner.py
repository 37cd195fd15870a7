"""The sweep's analysis: the best trial per batch size, rates at the grid's edge, the closing lines."""
from __future__ import annotations

from distffn.sweep.runner import best_per_batch, closing_lines, grid_edges, median_b_simple


def results():
    return [{"batch_size": b, "lr": lr, "reached": steps is not None, "steps_to_target": steps}
            for b, lr, steps in ((16, 0.01, 90), (16, 0.02, 100), (16, 0.04, 120),
                                 (64, 0.01, 60), (64, 0.02, 40), (64, 0.04, 40), (256, 0.1, None))]


def test_the_best_trial_has_the_fewest_steps_and_ties_go_to_the_smaller_rate():
    best = best_per_batch(results())
    assert {b: (r["lr"], r["steps_to_target"]) for b, r in best.items()} == {16: (0.01, 90), 64: (0.02, 40)}


def test_a_best_rate_at_the_edge_of_the_grid_is_flagged():
    assert grid_edges(results(), best_per_batch(results())) == [16]


def test_the_closing_lines_give_the_fit_the_noise_scale_and_their_ratio():
    summary = {"fit": {"s_min": 100.0, "b_crit": 500.0, "e_min": 5e4, "rms_log_error": 0.1},
               "regimes": {"perfect_scaling": [None, 125.0], "diminishing_returns": [125.0, 2000.0]},
               "b_noise": 400.0, "b_crit_over_b_noise": 1.25, "best_lr_at_grid_edge": [16],
               "not_reached": [4096], "max_epochs": 9, "projection": None}
    text = "\n".join(closing_lines(summary))
    for needle in ("B_crit 500", "E_min 50000", "B_noise (measured B_simple, median over batch sizes) 400",
                   "B_crit / B_noise = 1.25", "edge of the grid at batch sizes 16", "not reached within 9 epochs"):
        assert needle in text, needle


def test_the_projection_line_keeps_significant_digits_and_counts_in_words():
    proj = {"network": "10gbe", "fastest_by_network": {"10gbe": {"seconds": 0.0012345, "batch_size": 64,
                                                                  "num_workers": 1}}}
    text = "\n".join(closing_lines({"projection": proj}))
    assert "fastest 0.00123 s to target with B=64 on 1 worker" in text, text
    proj["fastest_by_network"]["10gbe"].update(seconds=1234.5, num_workers=8)
    assert "fastest 1,234 s to target with B=64 on 8 workers" in "\n".join(closing_lines({"projection": proj}))


def test_a_failed_stage_is_named_in_the_closing_lines():
    text = "\n".join(closing_lines({"errors": {"noise_scale": "B=64: RuntimeError: boom"}}))
    assert "incomplete: the noise scale stage failed" in text and "errors.log" in text


def test_b_noise_leaves_out_estimates_that_are_not_positive():
    noise = {32: {"b_simple": 55.2}, 128: {"b_simple": -36.9}, 512: {"b_simple": None}, 1024: {"b_simple": 80.0}}
    assert median_b_simple(noise) == (55.2 + 80.0) / 2
    assert median_b_simple({128: {"b_simple": -36.9}}) is None


def test_an_adaptive_line_names_the_plan_and_says_more_steps_where_the_fit_needs_fewer():
    from distffn.sweep.runner import adaptive_line
    a = {"rule": "goodput", "start": 128, "max": 16384, "every_steps": 50, "goodput_workers": 64,
         "goodput_network": "10gbe", "reached": True, "seeds": [{}] * 10, "lr": 0.025, "steps_to_target": 318,
         "samples_to_target": 786016, "fit_steps_at_samples": 212.0, "steps_saving": 1 - 318 / 212}
    line = adaptive_line(a, {})
    assert line.startswith("adaptive goodput (B 128→16384, for 64 workers on 10gbe, every 50 steps), lr 0.025: "
                           "318 steps, 786,016 samples to target (median of 10 seeds)"), line
    assert line.endswith("needs 212 steps for those samples: 50% more steps"), line
    line = adaptive_line(dict(a, goodput_workers=None, steps_to_target=106, steps_saving=0.5), {})
    assert "(B 128→16384, every 50 steps)" in line and line.endswith(": 50% fewer steps"), line
