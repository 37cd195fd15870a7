"""``distffn plot RUN_DIR``: learning curves and first-layer weight images as PNG files.

* ``curves.png`` -- loss (and, for classification, accuracy) per epoch for the training and
  test sets side by side, so a widening train/test gap (overtraining) is visible at a glance.
* ``weights.png`` -- for image datasets, the incoming weights of the first hidden units
  reshaped to the image, from the newest checkpoint ("visualizing neural network weights").
* ``batch.png`` -- for a run with an adaptive batch (``training.batch_size: adaptive``), the
  global batch it chose over the steps, with the gradient noise scale B_simple the choices
  followed, and AdaScale's gain and the learning rate below.

``distffn plot A B ...`` overlays runs against steps, epochs or training samples seen; an
adaptive run's samples are counted from its ``batch`` records, not from one batch size.

Only matplotlib's object-oriented ``Figure`` API with the Agg canvas is used: no pyplot global
state, no display needed, nothing left open.
"""
from __future__ import annotations

import math
import os
from bisect import bisect_right

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from . import bounded_yaml
from .data.dataset import IMAGE_SHAPES
from .errors import UserError
from .files import write_figure
from .jobspec import ADAPTIVE
from .training.checkpoint import list_checkpoints, newest_valid_checkpoint
from .training.metrics import iter_records

DPI = 120
MAX_UNITS = 100  # weight tiles shown in weights.png


def plain_log_axes(ax) -> None:
    """Label both log axes of ``ax`` with plain numbers (60, 0.05, 1,024) instead of
    matplotlib's 6×10^1 and 2^10."""
    for axis in (ax.xaxis, ax.yaxis):
        if axis.get_scale() == "log":
            base = axis.get_transform().base
            axis.set_major_formatter(PlainLogFormatter(base))
            # under two decades, some minor ticks are labelled too (20, 50, ...)
            axis.set_minor_formatter(PlainLogFormatter(base, labelOnlyBase=False, minor_thresholds=(2, 0.5)))


class PlainLogFormatter(LogFormatter):
    """matplotlib's choice of which log ticks get a label, each written as a plain number."""

    def __call__(self, x, pos=None):
        return plain_number(x) if super().__call__(x, pos) else ""


def plain_number(x: float, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits in plain notation, as people write it: 0.00123,
    0.05, 4.56, 60, 1,024 (never 6×10^1, 1.2e+03 or 0.00)."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    if abs(x) >= 10 ** (digits - 1):
        return f"{x:,.0f}"
    text = f"{x:.{digits - 1 - math.floor(math.log10(abs(x)))}f}"
    return text.rstrip("0").rstrip(".")


def _finite(v) -> bool:
    """A number to plot: not a bool, NaN or infinite."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _count(v) -> bool:
    """A step or sample count."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _metrics_path(run_dir: str) -> str:
    """``RUN_DIR/metrics.jsonl``, or a :class:`UserError` saying what ``run_dir`` is not."""
    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir}: no such run folder")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise UserError(f"{metrics}: not found; is {run_dir} a distffn run folder?")
    return metrics


def read_epochs(metrics_path: str) -> list[dict]:
    """The ``"event": "epoch"`` records of a ``metrics.jsonl`` file, ordered by epoch.

    Other events are skipped. If an epoch appears more than once (a run resumed from an
    earlier checkpoint), the last record wins, since it belongs to the run that continued.
    """
    by_epoch: dict[int, dict] = {}
    for rec in iter_records(metrics_path):
        if rec.get("event") == "epoch" and "epoch" in rec:
            try:
                by_epoch[int(rec["epoch"])] = rec
            except (TypeError, ValueError):
                continue
    return [by_epoch[e] for e in sorted(by_epoch)]


def _series(epochs: list[dict], key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    """(epoch numbers, values) for ``key``, leaving out epochs where it is absent or null."""
    xs, ys = [], []
    for rec in epochs:
        v = rec.get(key)
        if _finite(v):
            xs.append(int(rec["epoch"]))
            ys.append(float(v) * scale)
    return xs, ys


def _save(fig: Figure, path: str) -> None:
    write_figure(fig, path, DPI)        # atomically, never through a link planted in a run folder


def _label_side(xs: list[int], i: int, dy: float) -> dict:
    """Annotation style: text right of point ``i``, or left of it in the right half, so it stays inside."""
    right_half = xs[i] > (xs[0] + xs[-1]) / 2
    return dict(xytext=(-12 if right_half else 12, dy), ha="right" if right_half else "left",
                textcoords="offset points", fontsize=8,
                bbox=dict(boxstyle="round", fc="white", ec="gray", alpha=0.85),
                arrowprops=dict(arrowstyle="->", color="gray"))


def plot_curves(epochs: list[dict], title: str, path: str) -> str:
    """Write the loss / accuracy per epoch figure to ``path`` and return ``path``."""
    has_acc = any(_series(epochs, k)[0] for k in ("train_accuracy", "test_accuracy"))
    fig = Figure(figsize=(12, 4.8) if has_acc else (6.5, 4.8))
    axes = fig.subplots(1, 2 if has_acc else 1, squeeze=False)[0]
    style = {"train": dict(color="tab:blue", marker="o", ms=3), "test": dict(color="tab:orange", marker="s", ms=3)}

    ax = axes[0]
    all_losses = []
    for split in ("train", "test"):
        xs, ys = _series(epochs, f"{split}_loss")
        all_losses += ys
        if xs:
            ax.plot(xs, ys, label=f"{split} loss", **style[split])
    # log scale shows late-training differences, but only makes sense for positive losses
    if all_losses and min(all_losses) > 0:
        ax.set_yscale("log")
        plain_log_axes(ax)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.set_title("loss per epoch")
    xs, ys = _series(epochs, "test_loss")
    if xs:  # the best test loss marks where further training starts to overfit
        i = int(np.argmin(ys))
        ax.axvline(xs[i], color="gray", ls=":", lw=1)
        ax.annotate(f"best test loss {ys[i]:.4g}\n(epoch {xs[i]})", (xs[i], ys[i]),
                    **_label_side(xs, i, 18))

    if has_acc:
        ax = axes[1]
        for split in ("train", "test"):
            xs, ys = _series(epochs, f"{split}_accuracy", 100.0)
            if xs:
                ax.plot(xs, ys, label=f"{split} accuracy", **style[split])
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.set_title("accuracy per epoch")
        xs, ys = _series(epochs, "test_accuracy", 100.0)
        if xs:
            i = int(np.argmax(ys))  # first epoch reaching the best value
            ax.axvline(xs[i], color="gray", ls=":", lw=1)
            ax.annotate(f"best test accuracy {ys[i]:.2f}%\n(epoch {xs[i]})", (xs[i], ys[i]),
                        **_label_side(xs, i, -36))

    for ax in axes:
        ax.grid(True, which="major", alpha=0.4)
        ax.grid(True, which="minor", alpha=0.15)
        if ax.get_legend_handles_labels()[0]:  # a diverged run may have no finite loss to show
            ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title if has_acc else f"{title} (regression: no accuracy)")
    fig.tight_layout()
    _save(fig, path)
    return path


def weight_mosaic(w0: np.ndarray, image_shape: tuple[int, int], max_units: int = MAX_UNITS) -> np.ndarray:
    """Tile the first ``max_units`` columns of ``w0`` as images into one 2-D array.

    Each tile is divided by its own largest absolute weight, so it spans [-1, 1] symmetrically
    around 0 (0 stays the colormap's neutral centre); the one-pixel gaps between tiles are NaN.
    """
    h, w = image_shape
    cols = np.asarray(w0, dtype=np.float64)[:, :max_units]
    n = cols.shape[1]
    ncol = math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    mosaic = np.full((nrow * (h + 1) - 1, ncol * (w + 1) - 1), np.nan)
    for j in range(n):
        tile = cols[:, j].reshape(h, w)  # row-major, as the images were flattened
        peak = np.max(np.abs(tile))
        r, c = divmod(j, ncol)
        mosaic[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = tile / peak if peak > 0 else tile
    return mosaic


def plot_weights(w0: np.ndarray, image_shape: tuple[int, int], title: str, path: str) -> str:
    """Write the first-layer weight tiles to ``path`` and return ``path``."""
    mosaic = weight_mosaic(w0, image_shape)
    fig = Figure(figsize=(8.4, 7.6), layout="constrained")
    ax = fig.subplots()
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="white")
    im = ax.imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cbar.set_label("weight / max |weight| of the unit (blue < 0 < red)")
    _save(fig, path)
    return path


def _read_job(run_dir: str) -> dict:
    path = os.path.join(run_dir, "job.yaml")
    if not os.path.isfile(path):
        return {}
    job = bounded_yaml.load_file(path, "run's job spec")
    return job if isinstance(job, dict) else {}


def _image_shape(job: dict):
    """The dataset's image shape if the first layer takes whole images, else None."""
    shape = IMAGE_SHAPES.get((job.get("data") or {}).get("dataset"))
    layers = (job.get("model") or {}).get("layers") or []
    if shape is None or not layers or layers[0] != math.prod(shape):
        return None
    return tuple(shape)


# ---------------------------------------------------------------- an adaptive batch

SPAN_EVENTS = ("epoch", "eval", "times")    # records whose step says how far the run got


def batch_records(records) -> list[dict]:
    """The ``batch`` records of a run with an adaptive batch, by step: each holds from its step
    (the first update with that batch) until the next. ``records`` are in file order; a
    resumed life's ``start`` record drops the choices an earlier life made after the step it
    resumed at (the new life makes its own; its choice for that very step may come just
    before its ``start`` record, and replaces the earlier life's for that step)."""
    by_step: dict[int, dict] = {}
    for rec in records:
        event = rec.get("event")
        if event == "start" and _count(rec.get("start_step")):
            by_step = {s: r for s, r in by_step.items() if s <= rec["start_step"]}
        elif event == "batch" and _count(rec.get("step")) and _count(rec.get("batch_size")):
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def batch_schedule(records) -> tuple[list[int], list[int]]:
    """The global batch over the steps, as the corners of a step function drawn with
    ``where="post"``: ``batches[i]`` holds from ``steps[i]`` to ``steps[i + 1]``; the last
    batch is repeated at the run's last step (the newest epoch, eval or times record's, or
    the last choice's if that is later). Empty lists when the run has no ``batch`` records."""
    records = list(records)
    chosen = batch_records(records)
    if not chosen:
        return [], []
    steps = [r["step"] for r in chosen]
    batches = [r["batch_size"] for r in chosen]
    last = next((r["step"] for r in reversed(records) if r.get("event") in SPAN_EVENTS and _count(r.get("step"))),
                steps[-1])
    return steps + [max(last, steps[-1])], batches + [batches[-1]]


def batch_figure(records: list[dict], name: str, bounds: tuple = (None, None), rule=None) -> Figure:
    """An adaptive run's batch over the steps (``records`` in file order): the global batch as
    a step function with the B_simple estimates (log scale) above, AdaScale's gain r and the
    learning rate below; ``bounds`` are the batch's (start, max), drawn as dotted lines. The
    title names the run and the rule of the choices (``rule`` where they do not say)."""
    chosen = batch_records(records)
    rules = list(dict.fromkeys(str(r["rule"]) for r in chosen if r.get("rule"))) or [str(rule or "?")]
    steps, batches = batch_schedule(records)
    fig = Figure(figsize=(8.5, 6.8))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))

    top.step(steps, batches, where="post", color="tab:blue", lw=2, label="global batch B")
    noise = [(r["step"], r["b_simple"]) for r in records
             if r.get("event") == "noise" and _count(r.get("step")) and _finite(r.get("b_simple")) and r["b_simple"] > 0]
    if noise:
        top.plot(*zip(*noise), ls="none", marker=".", ms=4, color="0.55", label="B_simple (noise estimates)")
    at_choice = [(r["step"], r["b_simple"]) for r in chosen if _finite(r.get("b_simple")) and r["b_simple"] > 0]
    if at_choice:
        top.plot(*zip(*at_choice), ls="none", marker="o", ms=5, mfc="none", color="tab:orange",
                 label="B_simple the choice followed" if rules == ["noise"] else "B_simple each choice was made from")
    # named where the batch is usually far from them: the start on the right, the max on the left
    for bound, which, side in zip(bounds, ("start", "max"), (1, 0)):
        if _finite(bound) and bound > 0:
            top.axhline(bound, color="0.3", ls=(0, (1, 3)), lw=1)
            top.annotate(f"{which} {plain_number(bound)}", (side, bound), xycoords=("axes fraction", "data"),
                         xytext=(-4 if side else 4, 3), textcoords="offset points", ha="right" if side else "left",
                         fontsize=8, color="0.3")
    top.set_yscale("log")
    plain_log_axes(top)
    top.set_ylabel("samples per step (log scale)")

    gains = [r.get("gain") if _finite(r.get("gain")) else math.nan for r in chosen]
    bottom.step(steps, gains + gains[-1:], where="post", color="tab:purple", lw=1.5, label="AdaScale gain r")
    bottom.set_ylabel("gain r")
    bottom.set_xlabel("step (update)")
    # the learning rate as applied: at each choice and at each evaluation and epoch end
    by_step = {r["step"]: r["lr"] for r in records
               if r.get("event") in ("batch", "eval", "epoch") and _count(r.get("step")) and _finite(r.get("lr"))}
    handles, labels = bottom.get_legend_handles_labels()
    if by_step:
        lr_ax = bottom.twinx()
        xs = sorted(by_step)
        lr_ax.plot(xs, [by_step[x] for x in xs], color="tab:green", marker=".", ms=4, lw=1, ls="--",
                   drawstyle="steps-post", label="learning rate")
        lr_ax.set_ylabel("learning rate")
        more = lr_ax.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    bottom.legend(handles, labels, fontsize=8, loc="best")
    for ax in (top, bottom):
        ax.grid(True, which="major", alpha=0.4)
        ax.grid(True, which="minor", alpha=0.15)
    top.legend(fontsize=8, loc="best")
    bottom.xaxis.get_major_locator().set_params(integer=True)
    plan = next((f", for {r['goodput_workers']} workers on {r.get('goodput_network')}" for r in chosen
                 if _count(r.get("goodput_workers"))), "")
    fig.suptitle(f"{name}: adaptive global batch (rule: {', '.join(rules)}{plan})")
    fig.tight_layout()
    return fig


def plot_run(run_dir: str) -> list[str]:
    """Write PNGs into ``run_dir`` and return their paths.

    Always writes ``curves.png`` from ``metrics.jsonl``. Writes ``batch.png`` when the run chose
    its batch as it trained (``batch`` records in ``metrics.jsonl``, see :func:`batch_figure`;
    its ``noise`` records are shown there too). Writes ``weights.png`` as well when
    the job's dataset has an image shape that matches the input layer and a readable
    checkpoint exists: the newest checkpoint that loads and verifies is used (a damaged newer
    one is passed over, like ``--resume`` does) and its step is named in the title. No
    checkpoint at all, or none readable, means no ``weights.png``, silently: the curves are
    the essential output and a run may be plotted before its first checkpoint.

    Raises :class:`UserError` if ``run_dir`` is not a folder, has no ``metrics.jsonl``, that
    file has no completed epoch yet, or ``job.yaml`` is not valid YAML.
    """
    metrics = _metrics_path(run_dir)
    epochs = read_epochs(metrics)
    if not epochs:
        raise UserError(f"{metrics}: no completed epoch yet, nothing to plot")

    job = _read_job(run_dir)
    name = job.get("name") or os.path.basename(os.path.normpath(os.path.abspath(run_dir)))
    written = [plot_curves(epochs, str(name), os.path.join(run_dir, "curves.png"))]

    records = list(iter_records(metrics))
    if batch_records(records):
        spec = (job.get("training") or {}).get("adaptive") or {}
        path = os.path.join(run_dir, "batch.png")
        _save(batch_figure(records, str(name), (spec.get("start"), spec.get("max")), spec.get("rule")), path)
        written.append(path)

    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if list_checkpoints(ckpt_dir):
        found = newest_valid_checkpoint(ckpt_dir)
        if found is not None:
            _, arrays, meta = found
            # job.yaml may be missing (copied checkpoints); the checkpoint carries the spec too
            shape = _image_shape(job or meta.get("job") or {})
            w0 = arrays.get("W0")
            if shape is not None and w0 is not None and w0.ndim == 2 and w0.shape[0] == math.prod(shape):
                n = min(MAX_UNITS, w0.shape[1])
                title = (f"{name}: first-layer weights (W0), checkpoint step {meta.get('step', '?')}\n"
                         f"incoming weights of {n} of {w0.shape[1]} hidden units")
                written.append(plot_weights(w0, shape, title, os.path.join(run_dir, "weights.png")))
    return written


# ---------------------------------------------------------------- comparing runs

X_AXES = {"epoch": "epochs", "step": "steps (updates)", "samples": "training samples seen"}


def read_records(metrics_path: str) -> list[dict]:
    """Every parseable record of a ``metrics.jsonl``, in order (a resumed run's replayed steps
    are kept once: a later record for the same event and step replaces the earlier one)."""
    return latest_per_step(iter_records(metrics_path))


def latest_per_step(records) -> list[dict]:
    """``records`` with one per event and step, the later one: see :func:`read_records`."""
    out: dict[tuple, dict] = {}
    for rec in records:
        if isinstance(rec.get("step", rec.get("start_step")), int):
            out[(rec.get("event"), rec.get("step", rec.get("start_step")))] = rec
    return list(out.values())


class RunCurves:
    """What a comparison plot needs of one run folder: its records, its spec and a label."""

    def __init__(self, run_dir: str):
        metrics = _metrics_path(run_dir)
        in_order = list(iter_records(metrics))
        records = latest_per_step(in_order)
        self.start = next((r for r in records if r.get("event") == "start"), {})
        self.evals = sorted((r for r in records if r.get("event") == "eval"), key=lambda r: r["step"])
        self.epochs = sorted((r for r in records if r.get("event") == "epoch"), key=lambda r: r["step"])
        if not self.evals and not self.epochs:
            raise UserError(f"{metrics}: no evaluation or epoch yet, nothing to plot")
        job = _read_job(run_dir)
        t, o, s = job.get("training") or {}, job.get("optimizer") or {}, job.get("scaling") or {}
        self.batches = batch_records(in_order)
        self.adaptive = t.get("batch_size") == ADAPTIVE or bool(self.batches)
        adaptive = t.get("adaptive") or {}
        # an adaptive run starts at training.adaptive.start: the batch where its records lack one
        self.batch = (adaptive.get("start") or 1) if self.adaptive else t.get("batch_size") or 1
        self._anchors = self._sample_anchors(records, bool(t.get("drop_last")))
        self.target = (t.get("target_metric"), t.get("target_value"))      # a sweep trial's aim
        d, m = job.get("data") or {}, job.get("model") or {}
        # the settings a title names: what the runs share
        self.settings = {"data": d.get("dataset"), "model": "-".join(map(str, m.get("layers") or [])) or None,
                         "B": t.get("batch_size"), "optimizer": o.get("name"), "lr": o.get("lr"),
                         "momentum": o.get("momentum"), "schedule": o.get("schedule"),
                         "workers": s.get("num_workers"), "backend": s.get("backend")}
        rule = next((r["rule"] for r in reversed(self.batches) if r.get("rule")), adaptive.get("rule"))
        shown = (f"{ADAPTIVE} ({rule})" if rule else ADAPTIVE) if self.adaptive else self.batch
        self.label = (f"{os.path.basename(os.path.normpath(os.path.abspath(run_dir)))}: B={shown}, "
                      f"{o.get('name', 'momentum')} lr={o.get('lr')} ({o.get('schedule', 'constant')}), "
                      f"{s.get('num_workers', 1)} worker{'' if s.get('num_workers', 1) == 1 else 's'} "
                      f"{s.get('backend', 'local')}")

    def _sample_anchors(self, records: list[dict], drop_last: bool) -> list[tuple[int, int]]:
        """(step, samples seen before it) where the records say: an adaptive run's choices,
        its epoch ends and any record with ``samples``, by step."""
        anchors = {r["step"]: r["samples"] for r in records
                   if r.get("event") != "batch" and _count(r.get("step")) and _count(r.get("samples"))}
        anchors.update((r["step"], r["samples"]) for r in self.batches if _count(r.get("samples")))
        n = self.start.get("n_train")
        if self.adaptive and _count(n) and not drop_last:
            # without drop_last an epoch ends with its last sample, whatever batches it took
            for r in self.epochs:
                if _count(r.get("epoch")):
                    anchors.setdefault(r["step"], r["epoch"] * n)
        return sorted(anchors.items())

    def batch_at(self, step: int) -> int:
        """The global batch of update ``step`` (0-based)."""
        i = bisect_right([r["step"] for r in self.batches], step) - 1
        return self.batches[max(i, 0)]["batch_size"] if self.batches else self.batch

    def samples(self, step: int) -> int:
        """Training samples seen before update ``step`` of an adaptive run: from the newest
        record that counted them, plus the steps since at the batch they ran with."""
        if not self._anchors:
            return step * self.batch
        i = max(bisect_right([a for a, _ in self._anchors], step) - 1, 0)
        at, seen = self._anchors[i]
        return seen + (step - at) * self.batch_at(at)

    def x(self, step: int, axis: str, rec: dict | None = None) -> float:
        """Where the record ``rec`` of ``step`` lies on ``axis``: its own ``samples`` and (on
        an adaptive batch) ``epoch`` where it has them."""
        spe = self.start.get("steps_per_epoch") or 1
        n = self.start.get("n_train")
        if axis == "step":
            return step
        if axis == "samples" and rec is not None and _count(rec.get("samples")):
            return rec["samples"]
        if self.adaptive:       # the steps of an epoch vary with the batch
            if axis == "samples":
                return self.samples(step)
            if rec is not None and _finite(rec.get("epoch")):
                return rec["epoch"]
            return self.samples(step) / n if n else step / spe
        if axis == "epoch":
            return step / spe
        full, rest = divmod(step, spe)              # samples: the short last batch counts as it is
        return full * n + rest * self.batch if n else step * self.batch

    def series(self, records: list[dict], key: str, axis: str, scale: float = 1.0):
        xs, ys = [], []
        for rec in records:
            v = rec.get(key)
            if _finite(v):
                xs.append(self.x(rec["step"], axis, rec))
                ys.append(float(v) * scale)
        return xs, ys


def comparison_title(runs: list[RunCurves]) -> str:
    """The data and model, then one run's label, or the settings all the runs share."""
    first = runs[0].settings
    what = " ".join(str(first[k]) for k in ("data", "model") if first[k])
    if len(runs) == 1:
        return f"{what}: {runs[0].label}" if what else runs[0].label
    shared = [f"{k}={first[k]}" for k in ("B", "optimizer", "lr", "momentum", "schedule", "workers", "backend")
              if first[k] is not None and all(r.settings[k] == first[k] for r in runs)]
    return f"{len(runs)} runs compared{f' ({what})' if what else ''}" + (f"; all with {', '.join(shared)}" if shared else "")


# one look per run, so that runs that coincide stay visible: the first is drawn widest and
# underneath, each later one thinner on top, with its own marker and dash pattern
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")


def run_style(i: int, n: int) -> dict:
    """Line style of run ``i`` of ``n`` in a comparison."""
    wider = min(n - 1 - i, 4)
    return dict(color=f"C{i % 10}", marker=MARKERS[i % len(MARKERS)], ls=LINESTYLES[i % len(LINESTYLES)],
                lw=1.2 + 1.1 * wider, ms=3.0 + 2.0 * wider, mfc="none" if i else None, zorder=2 + i)


def evaluated_split(runs: list[RunCurves]) -> str:
    """``validation`` where every run evaluated a validation split (a sweep's trials aim at
    it), else ``test``."""
    has_val = all(run.series(run.evals or run.epochs, "validation_loss", "step")[0] for run in runs)
    return "validation" if has_val else "test"


def comparison_figure(runs: list[RunCurves], x: str = "step") -> Figure:
    """Loss and accuracy (classification) on the validation split if every run has one, else on
    the test split; the training loss; the learning rate; against ``x``."""
    split = evaluated_split(runs)
    has_acc = any(r.series(r.evals or r.epochs, f"{split}_accuracy", x)[0] for r in runs)
    panels = [(f"{split} loss", f"{split}_loss", "evals", 1.0),
              *([(f"{split} accuracy (%)", f"{split}_accuracy", "evals", 100.0)] if has_acc else []),
              ("training loss (running, per epoch)", "train_loss", "epochs", 1.0),
              ("learning rate", "lr", "both", 1.0)]
    fig = Figure(figsize=(6.2 * len(panels) / 2 + 1, 8.4) if len(panels) > 2 else (12, 4.8))
    axes = fig.subplots(2, (len(panels) + 1) // 2, squeeze=False).ravel()
    for ax, (title, key, source, scale) in zip(axes, panels):
        for i, run in enumerate(runs):
            recs = (run.evals or run.epochs) if source == "evals" else run.epochs if source == "epochs" \
                else sorted(run.evals + run.epochs, key=lambda r: r["step"])
            xs, ys = run.series(recs, key, x, scale)
            if xs:
                ax.plot(xs, ys, label=run.label, **run_style(i, len(runs)))
        target = runs[0].target
        if target[0] == key and target[1] is not None and all(r.target == target for r in runs):
            ax.axhline(target[1] * scale, color="0.3", ls=(0, (1, 3)), lw=1, zorder=1)
            ax.annotate(f"target {target[1]:g}", (1, target[1] * scale), xycoords=("axes fraction", "data"),
                        xytext=(-4, 3), textcoords="offset points", ha="right", fontsize=8, color="0.3")
        if key.endswith("_loss") and all(
                y > 0 for run in runs for y in run.series(run.evals + run.epochs, key, x)[1]):
            ax.set_yscale("log")
            plain_log_axes(ax)
        ax.set_title(title)
        ax.set_xlabel(X_AXES[x])
        ax.grid(True, alpha=0.4)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=1, fontsize=8, frameon=False)
    fig.suptitle(comparison_title(runs))
    fig.tight_layout(rect=(0, 0.04 + 0.025 * len(runs), 1, 0.96))
    return fig


def plot_comparison(run_dirs: list[str], path: str, x: str = "step") -> str:
    """One figure overlaying several runs (or one, on another x-axis), each labelled with its
    key settings (:func:`comparison_figure`), written to ``path``. Returns ``path``."""
    if x not in X_AXES:
        raise UserError(f"--x: expected one of {', '.join(X_AXES)}; got {x!r}")
    _save(comparison_figure([RunCurves(d) for d in run_dirs], x), path)
    return path
