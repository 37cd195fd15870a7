"""The sweep's figures draw from whatever a sweep produced: a full result, or no fit, no
timing and no trial that reached the target."""
from __future__ import annotations

from distffn.sweep.fit import fit_critical_batch, regime_bounds
from distffn.sweep.plots import draw_all

PNG = b"\x89PNG\r\n\x1a\n"


def summary_of(results, fit=None, projection=None):
    best = [r for r in results if r["reached"]]
    return {"sweep": "synthetic", "target": {"metric": "test_loss", "value": 0.5}, "max_epochs": 9,
            "best": best, "fit": fit, "regimes": regime_bounds(fit["b_crit"]) if fit else None,
            "b_noise": 150.0 if fit else None, "projection": projection,
            "measured_seconds_to_target": {}}


def trial(b, lr, steps, **kw):
    return {"batch_size": b, "lr": lr, "steps_to_target": steps, "reached": steps is not None, **kw}


def test_every_figure_is_drawn_for_a_full_sweep(tmp_path):
    results = [trial(b, lr, int(50 * (1 + 200 / b) * f)) for b in (16, 64, 256, 1024)
               for lr, f in ((0.01, 1.3), (0.05, 1.0))] + [trial(64, 0.5, None, diverged="nan"),
                                                          trial(256, 0.001, None, pruned=True)]
    best = {}
    for r in results:
        if r["reached"] and (r["batch_size"] not in best or r["steps_to_target"] < best[r["batch_size"]]["steps_to_target"]):
            best[r["batch_size"]] = r
    fit = fit_critical_batch({b: r["steps_to_target"] for b, r in best.items()}).as_dict()
    projection = {"label": "projection", "network": "10gbe", "aggregation": "allreduce",
                  "seconds_to_target": {"64": {"1": 3.0, "2": 1.7, "4": 1.0}, "1024": {"1": 9.0, "2": 4.6}}}
    summary = summary_of(results, fit, projection)
    summary["best"] = list(best.values())
    summary["measured_seconds_to_target"] = {"64": {"1": 3.1, "2": 2.0}}
    for path in draw_all(summary, results, [], str(tmp_path)):
        data = open(path, "rb").read()
        assert data.startswith(PNG) and 10_000 < len(data) < 200_000


def test_figures_are_drawn_when_no_trial_reached_the_target(tmp_path):
    results = [trial(64, 0.05, None, best_metric=0.7), trial(128, 0.05, None)]
    for path in draw_all(summary_of(results), results, [], str(tmp_path)):
        assert open(path, "rb").read().startswith(PNG)
