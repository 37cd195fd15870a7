"""The sweep's figures draw from whatever a sweep produced: a full result, or no fit, no
timing and no trial that reached the target."""
from __future__ import annotations

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from distffn.sweep.fit import fit_critical_batch, regime_bounds
from distffn.sweep.plots import draw_all, lr_vs_batch, steps_vs_batch, time_vs_workers
from distffn.sweep.projection import worker_counts

PNG = b"\x89PNG\r\n\x1a\n"


def summary_of(results, fit=None, projection=None):
    best = [r for r in results if r["reached"]]
    return {"sweep": "synthetic", "target": {"metric": "test_loss", "value": 0.5}, "max_epochs": 9,
            "best": best, "fit": fit, "regimes": regime_bounds(fit["b_crit"]) if fit else None,
            "b_noise": 150.0 if fit else None, "projection": projection,
            "measured_seconds_to_target": {}}


def trial(b, lr, steps, **kw):
    return {"batch_size": b, "lr": lr, "steps_to_target": steps, "reached": steps is not None, **kw}


def full_sweep(largest=1024):
    """A sweep at B = 16 … ``largest``, projected to min(B, 1024) workers."""
    batches = [b for b in (16, 64, 256, 1024) if b <= largest]
    results = [trial(b, lr, int(50 * (1 + 200 / b) * f)) for b in batches
               for lr, f in ((0.01, 1.3), (0.05, 1.0))] + [trial(64, 0.5, None, diverged="nan"),
                                                          trial(256, 0.001, None, pruned=True)]
    best = {}
    for r in results:
        if r["reached"] and (r["batch_size"] not in best or r["steps_to_target"] < best[r["batch_size"]]["steps_to_target"]):
            best[r["batch_size"]] = r
    fit = fit_critical_batch({b: r["steps_to_target"] for b, r in best.items()}).as_dict()
    table = {str(b): {str(n): best[b]["steps_to_target"] * (1e-3 * b / n + 2e-3 * (n > 1))
                      for n in worker_counts(b)} for b in batches}
    projection = {"label": "projection", "network": "10gbe", "aggregation": "allreduce", "seconds_to_target": table}
    summary = summary_of(results, fit, projection)
    summary["best"] = list(best.values())
    summary["measured_seconds_to_target"] = {"64": {"1": 0.1, "2": 0.06}}
    return summary, results


def test_every_figure_is_drawn_for_a_full_sweep(tmp_path):
    summary, results = full_sweep()
    for path in draw_all(summary, results, str(tmp_path)):
        data = open(path, "rb").read()
        assert data.startswith(PNG) and 10_000 < len(data) < 200_000


def legend_labels(fig):
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def tick_labels(fig):
    """Every tick label as drawn (the labels exist once the figure is drawn)."""
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    return [t.get_text() for minor in (False, True)
            for t in ax.get_xticklabels(minor=minor) + ax.get_yticklabels(minor=minor) if t.get_text()]


def test_the_fitted_critical_batch_line_is_in_the_legend():
    summary, results = full_sweep()
    labels = legend_labels(steps_vs_batch(summary, results))
    assert f"B_crit {summary['fit']['b_crit']:.0f} (fitted)" in labels, labels


@pytest.mark.parametrize("largest, most", [(256, 256), (1024, 1024)])
def test_the_projection_figure_spans_and_names_the_workers_it_shows(largest, most):
    summary, _ = full_sweep(largest)
    ax = time_vs_workers(summary).axes[0]
    lines = [line for line in ax.get_lines() if len(line.get_xdata())]
    assert max(max(line.get_xdata()) for line in lines) == most
    assert ax.get_xlim()[0] < 1 and most < ax.get_xlim()[1] < 2 * most
    title = ax.get_title()
    assert f"projection (10gbe) to {most:,} workers" in title, title
    assert ("N ≤ B" in title) == (most < 1024)


def test_log_axes_are_labelled_with_plain_numbers():
    summary, results = full_sweep()
    for fig in (steps_vs_batch(summary, results), time_vs_workers(summary), lr_vs_batch(summary, results)):
        labels = tick_labels(fig)
        assert labels and not [t for t in labels if "$" in t or "^" in t or "times" in t], labels
    assert {"16", "64", "256", "1,024"} <= set(tick_labels(steps_vs_batch(summary, results)))


def test_figures_are_drawn_when_no_trial_reached_the_target(tmp_path):
    results = [trial(64, 0.05, None, best_metric=0.7), trial(128, 0.05, None)]
    for path in draw_all(summary_of(results), results, str(tmp_path)):
        assert open(path, "rb").read().startswith(PNG)


def test_every_line_in_the_legend_is_inside_the_axis():
    summary, results = full_sweep(256)
    summary["b_noise"] = 2.0                        # far below the smallest batch size tried (16)
    summary["fit"]["b_crit"] = 5000.0               # far above the largest (256)
    lo, hi = steps_vs_batch(summary, results).axes[0].get_xlim()
    assert lo < 2.0 and 5000.0 < hi
