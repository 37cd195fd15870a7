"""A sweep's figures, as PNG files in its folder:

* ``steps_vs_batch.png`` -- log-log: every trial's steps to the target (grey), the best per
  batch size, the fit S = S_min(1 + B_crit/B), the perfect-scaling line, the regimes shaded;
* ``time_vs_workers.png`` -- seconds to the target against workers: measured here (markers)
  and the α-β projection (dashed, labelled "projection") up to 1024 workers, or to the
  largest batch size (a worker needs a sample);
* ``lr_vs_batch.png`` -- the best learning rate per batch size among those tried;
* ``steps_vs_samples.png`` -- log-log: steps against samples to the target for every fixed
  batch size (its median over seeds labelled with B, each seed a faint dot), the fit as
  S_fit(E) = S_min/(1 − E_min/E), and every adaptive entry's median and seeds.

Matplotlib's object-oriented API with the Agg canvas, as :mod:`distffn.plot`.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator

from ..files import write_figure
from ..plot import plain_log_axes
from ..plot import plain_number as plain
from .fit import steps_at_samples
from .spec import schedule_label

DPI = 100
REGIME_COLOURS = {"perfect_scaling": "#d9f0d3", "diminishing_returns": "#fee8c8",
                  "maximal_data_parallelism": "#e7d4e8"}


def _save(fig: Figure, path: str) -> str:
    return write_figure(fig, path, DPI)


def _legend(ax, **kw):
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def _title(summary: dict) -> str:
    t = summary["target"]
    return f"{summary['sweep']}: steps to {t['metric']} {t['value']:g} (≤ {summary['max_epochs']} epochs per trial)"


def steps_vs_batch(summary: dict, results: list[dict]) -> Figure:
    """Steps to the target against B: every trial, the best ones, the fit and the regimes."""
    fig = Figure(figsize=(7.5, 5.2), layout="constrained")
    ax = fig.subplots()
    reached = [r for r in results if r["reached"]]
    if reached:
        ax.scatter([r["batch_size"] for r in reached], [r["steps_to_target"] for r in reached],
                   s=14, color="0.7", label="every trial that reached the target", zorder=2)
    best = summary["best"]
    bs = np.array([b["batch_size"] for b in best], np.float64)
    steps = np.array([b["steps_to_target"] for b in best], np.float64)
    if len(bs):
        ax.plot(bs, steps, "o", color="tab:blue", ms=7, label="best steps to target (lr tuned per B)", zorder=3)
    fit = summary.get("fit")
    # the axis shows every batch size, B_crit and B_noise (each line in the legend is drawn)
    all_b = sorted({r["batch_size"] for r in results} | {x for x in (summary.get("b_noise"),
                                                                       fit and fit["b_crit"]) if x}) or [1]
    grid = np.geomspace(min(all_b) / 1.5, max(all_b) * 1.5, 200)
    if fit:
        ax.plot(grid, fit["s_min"] * (1 + fit["b_crit"] / grid), "-", color="tab:red",
                label=f"fit S = S_min(1 + B_crit/B): S_min {fit['s_min']:.0f}, B_crit {fit['b_crit']:.0f}")
        ax.axvline(fit["b_crit"], color="tab:red", ls=":", lw=1, label=f"B_crit {fit['b_crit']:.0f} (fitted)")
        lo, hi = grid[0], grid[-1]
        for name, (a, b) in ((k, v) for k, v in summary["regimes"].items() if k in REGIME_COLOURS):
            a, b = max(a or lo, lo), min(b or hi, hi)
            if a < b:
                ax.axvspan(a, b, color=REGIME_COLOURS[name], zorder=0,
                           label=f"regime: {name.replace('_', ' ')}")
    if len(bs):
        ax.plot(grid, steps[0] * bs[0] / grid, "--", color="0.3", lw=1, label="perfect scaling (steps ∝ 1/B)")
    if summary.get("b_noise"):
        ax.axvline(summary["b_noise"], color="tab:green", ls="-.", lw=1,
                   label=f"measured B_noise (B_simple) {summary['b_noise']:.0f}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    if len(bs):
        ax.set_ylim(steps.min() / 3, max(steps.max(), max((r["steps_to_target"] for r in reached), default=1)) * 2)
    ax.set_xlim(grid[0], grid[-1])
    ax.set_xlabel("batch size B")
    ax.set_ylabel("steps to target")
    ax.set_title(_title(summary), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    plain_log_axes(ax)
    _legend(ax, fontsize=7, loc="lower left")
    return fig


def time_vs_workers(summary: dict) -> Figure:
    """Seconds to the target against N: measured here and projected (α-β model)."""
    fig = Figure(figsize=(7.5, 5.2), layout="constrained")
    ax = fig.subplots()
    proj = summary.get("projection") or {}
    table = proj.get("seconds_to_target") or {}
    measured_s = summary.get("measured_seconds_to_target") or {}
    batches = sorted(int(b) for b in table)
    cmap = matplotlib.colormaps["viridis"]
    for i, b in enumerate(batches):
        colour = cmap(0.92 * i / max(len(batches) - 1, 1))      # one colour per batch size, in order
        row = table[str(b)]
        ns = sorted(int(n) for n in row)
        ax.plot(ns, [row[str(n)] for n in ns], "--", color=colour, lw=1)
        m = measured_s.get(str(b)) or {}
        if m:
            mn = sorted(int(n) for n in m)
            ax.plot(mn, [m[str(n)] for n in mn], "o", color=colour, ms=6, label=f"B={b}")
        else:
            ax.plot([], [], "--", color=colour, label=f"B={b}")
    if batches:
        envelope = {}
        for b in batches:
            for n, s in table[str(b)].items():
                envelope[int(n)] = min(envelope.get(int(n), np.inf), s)
        ns = sorted(envelope)
        ax.plot(ns, [envelope[n] for n in ns], "-", color="black", lw=2,
                label="projection: fastest over B")
        ax.plot([], [], "--", color="0.4", label=f"projection ({proj['network']}, {proj['aggregation']})")
        ax.plot([], [], "o", color="0.4", label="measured here")
    # the axis spans what is drawn: the projection stops at 1024 workers or at the batch size
    most = max([int(n) for row in table.values() for n in row] + [int(n) for row in measured_s.values() for n in row]
               + [2])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlim(1 / 1.3, most * 1.3)
    ax.xaxis.set_major_locator(LogLocator(base=2, numticks=16))       # every power of two
    ax.set_xlabel("workers N")
    ax.set_ylabel("seconds to target (steps × step time)")
    shown = (f"the α-β projection ({proj['network']}) to {most:,} workers"
             + ("" if most >= 1024 else "\n(N ≤ B: a worker needs a sample; the largest B bounds N)")
             ) if batches else "no projection"
    ax.set_title(f"{summary['sweep']}: measured, and {shown}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    plain_log_axes(ax)
    _legend(ax, fontsize=7, ncol=2)
    if not batches:
        why = ("no batch size reached the target" if not summary.get("best") else
               "no step times to project from (summary.json: errors)")
        ax.text(0.5, 0.5, why, ha="center", transform=ax.transAxes)
    return fig


def lr_vs_batch(summary: dict, results: list[dict]) -> Figure:
    """The learning rates tried per batch size, by outcome, and the best one."""
    fig = Figure(figsize=(7.5, 5.2), layout="constrained")
    ax = fig.subplots()
    kinds = (("reached", dict(marker="o", color="0.6", label="tried: reached the target")),
             ("pruned", dict(marker="s", facecolors="none", edgecolors="0.6",
                             label="tried: stopped at the best steps so far (pruned)")),
             ("diverged", dict(marker="v", color="tab:red", alpha=0.5, label="tried: diverged")),
             ("missed", dict(marker="x", color="0.6", label="tried: not reached within the budget")))

    def kind(r):
        return ("reached" if r["reached"] else "pruned" if r.get("pruned") else
                "diverged" if r.get("diverged") else "missed")
    for name, style in kinds:
        pts = [r for r in results if kind(r) == name]
        if pts:
            ax.scatter([r["batch_size"] for r in pts], [r["lr"] for r in pts], s=18, **style)
    best = summary["best"]
    if best:
        ax.plot([b["batch_size"] for b in best], [b["lr"] for b in best], "o-", color="tab:blue", ms=7,
                label="best lr (fewest steps to target)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{summary['sweep']}: the learning rate tuned per batch size", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    plain_log_axes(ax)
    _legend(ax, fontsize=8)
    return fig


ADAPTIVE_STYLES = (("D", "tab:red"), ("^", "tab:green"), ("s", "tab:purple"), ("P", "tab:orange"),
                   ("v", "tab:brown"), ("X", "tab:pink"))


def steps_vs_samples(summary: dict) -> Figure:
    """Steps against samples to the target: the fixed batches (each seed and the median), the
    fitted curve, and each adaptive entry, which can lie below it (fewer steps for the samples)."""
    fig = Figure(figsize=(7.5, 5.2), layout="constrained")
    ax = fig.subplots()
    best = [b for b in summary["best"] if b.get("samples_to_target")]
    points = [(b["samples_to_target"], b["steps_to_target"]) for b in best]
    seeds = [(x["samples"], x["steps"]) for b in best for x in b.get("seeds") or [] if len(b["seeds"]) > 1]
    if seeds:
        ax.scatter(*zip(*seeds), s=10, color="tab:blue", alpha=0.25, label="fixed batch: each seed", zorder=2)
    if points:
        ax.plot(*zip(*points), "o", color="tab:blue", ms=7, label="fixed batch (best lr" + ("; median over seeds)" if seeds else ")"), zorder=3)
        for b in best:
            ax.annotate(f"B={b['batch_size']}", (b["samples_to_target"], b["steps_to_target"]),
                        textcoords="offset points", xytext=(5, 4), fontsize=7)
    for (marker, colour), a in zip(ADAPTIVE_STYLES * 4, [a for a in summary.get("adaptive") or [] if a["reached"]]):
        what = schedule_label(a)
        runs = [(x["samples"], x["steps"]) for x in a["seeds"]]
        ax.scatter(*zip(*runs), s=14, marker=marker, color=colour, alpha=0.35, zorder=3)
        ax.plot([a["samples_to_target"]], [a["steps_to_target"]], marker, color=colour, ms=9, zorder=4,
                label=f"{what}: median" + (" (faint: each seed)" if len(runs) > 1 else ""))
        points += runs
    fit = summary.get("fit")
    if fit and points:
        # from where the curve is 3× the most steps drawn (it rises to infinity at E_min)
        top = 3 * max(st for _, st in points)
        lo = max(min(e for e, _ in points) / 2,
                 fit["e_min"] / (1 - fit["s_min"] / top) if top > fit["s_min"] else fit["e_min"] * 1.01)
        grid = np.geomspace(lo, max(max(e for e, _ in points) * 2, lo * 2), 200)
        ax.plot(grid, [steps_at_samples(fit["s_min"], fit["e_min"], e) for e in grid], "-", color="0.3",
                label=f"fit S_fit(E) = S_min/(1 − E_min/E): S_min {plain(fit['s_min'])}, E_min {plain(fit['e_min'])}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("samples to target E")
    ax.set_ylabel("steps to target S")
    t = summary["target"]
    ax.set_title(f"{summary['sweep']}: steps against samples to {t['metric']} {t['value']:g}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    plain_log_axes(ax)
    ax.tick_params(axis="x", which="both", labelrotation=30)     # "300,000" labels side by side overlap
    _legend(ax, fontsize=7, loc="best")
    if not points:
        ax.text(0.5, 0.5, "no run reached the target", ha="center", transform=ax.transAxes)
    return fig


def draw_all(summary: dict, results: list[dict], out: str,
             guard: Optional[Callable[[str, Callable[[], str]], Optional[str]]] = None) -> list[str]:
    """The four figures; returns the paths of those drawn. ``guard(name, draw)`` runs each
    drawing (and may return None for one that failed, so that the others are still drawn)."""
    guard = guard or (lambda name, draw: draw())
    figures = {"steps_vs_batch": lambda: steps_vs_batch(summary, results),
               "time_vs_workers": lambda: time_vs_workers(summary),
               "lr_vs_batch": lambda: lr_vs_batch(summary, results),
               "steps_vs_samples": lambda: steps_vs_samples(summary)}
    paths = [guard(name, lambda make=make, name=name: _save(make(), os.path.join(out, f"{name}.png")))
             for name, make in figures.items()]
    return [p for p in paths if p]
