"""Tests for distffn.plot: curves.png / weights.png from a fake run folder."""
import json
import os

import matplotlib.image as mpimg
import numpy as np
import pytest
import yaml

from distffn.errors import UserError
from distffn.plot import plot_run, read_epochs, weight_mosaic
from distffn.training.checkpoint import checkpoint_name, save_checkpoint

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _job(dataset="digits", layers=(64, 16, 10)):
    return {
        "name": f"test-{dataset}",
        "data": {"dataset": dataset},
        "model": {"layers": list(layers), "activation": "relu", "output": "softmax", "loss": "cross_entropy"},
    }


def _epoch(e, classification=True):
    rec = {"event": "epoch", "epoch": e, "step": 10 * e, "lr": 0.1, "train_loss": 1.0 / e,
           "test_loss": 1.0 / e + 0.05 * e, "samples_per_s": 1000.0, "elapsed_s": float(e)}
    if classification:
        rec.update(train_accuracy=0.7 + 0.1 * e, test_accuracy=[0.7, 0.85, 0.8][e - 1])
    return rec


def _params(fan_in=64, hidden=16, out=10, seed=0):
    rng = np.random.default_rng(seed)
    return {"W0": rng.standard_normal((fan_in, hidden)).astype("float32"), "b0": np.zeros(hidden, "float32"),
            "W1": rng.standard_normal((hidden, out)).astype("float32"), "b1": np.zeros(out, "float32")}


def make_run(root, job=None, classification=True, checkpoint=True):
    job = job or _job()
    root.mkdir(parents=True, exist_ok=True)
    (root / "job.yaml").write_text(yaml.safe_dump(job))
    lines = [json.dumps({"event": "start", "time": 0})]
    lines += [json.dumps(_epoch(e, classification)) for e in (1, 2, 3)]
    lines.insert(2, json.dumps({"event": "step", "step": 5, "loss": 0.5}))
    text = "\n".join(lines) + "\n" + '{"event": "epoch", "epoch": 4, "train_lo'  # killed mid-write
    (root / "metrics.jsonl").write_text(text)
    if checkpoint:
        save_checkpoint(str(root / "checkpoints" / checkpoint_name(10)), _params(job["model"]["layers"][0]),
                        {"job": job, "step": 10, "epoch": 1})
    return root


def assert_png(path):
    assert os.path.isfile(path)
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert (img != img[0, 0]).any()         # more than one colour
    return img


def test_classification_run_writes_curves_and_weights(tmp_path):
    run = make_run(tmp_path / "run")
    paths = plot_run(str(run))
    assert [os.path.basename(p) for p in paths] == ["curves.png", "weights.png"]
    for p in paths:
        assert_png(p)
    # a diverging colormap: weights.png has both reddish and bluish pixels
    img = assert_png(paths[1])[..., :3]
    assert np.any((img[..., 0] - img[..., 2]) > 0.3) and np.any((img[..., 2] - img[..., 0]) > 0.3)


def test_read_epochs_skips_other_events_and_truncated_line(tmp_path):
    run = make_run(tmp_path / "run")
    epochs = read_epochs(str(run / "metrics.jsonl"))
    assert [r["epoch"] for r in epochs] == [1, 2, 3]


def test_read_epochs_last_record_of_a_repeated_epoch_wins(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = [_epoch(1), _epoch(2), dict(_epoch(2), train_loss=0.123), _epoch(3)]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    epochs = read_epochs(str(path))
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert epochs[1]["train_loss"] == 0.123


def test_regression_run_writes_only_curves(tmp_path):
    job = _job("sine", (1, 16, 1))
    run = make_run(tmp_path / "run", job=job, classification=False)
    paths = plot_run(str(run))
    assert [os.path.basename(p) for p in paths] == ["curves.png"]
    assert_png(paths[0])
    assert not (run / "weights.png").exists()


def test_null_accuracies_are_treated_as_regression(tmp_path):
    run = make_run(tmp_path / "run", job=_job("sine", (1, 16, 1)), classification=False)
    lines = [json.dumps(dict(_epoch(e, False), train_accuracy=None, test_accuracy=None)) for e in (1, 2)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert_png(plot_run(str(run))[0])


def test_no_checkpoint_means_no_weights(tmp_path):
    run = make_run(tmp_path / "run", checkpoint=False)
    assert [os.path.basename(p) for p in plot_run(str(run))] == ["curves.png"]


def test_damaged_checkpoint_skips_weights_but_writes_curves(tmp_path):
    run = make_run(tmp_path / "run", checkpoint=False)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / checkpoint_name(20)).write_bytes(b"PK\x03\x04 not really a zip")
    assert [os.path.basename(p) for p in plot_run(str(run))] == ["curves.png"]


def test_newest_readable_checkpoint_is_used(tmp_path):
    run = make_run(tmp_path / "run")  # valid step 10
    (run / "checkpoints" / checkpoint_name(20)).write_bytes(b"garbage")  # newer but damaged
    paths = plot_run(str(run))
    assert [os.path.basename(p) for p in paths] == ["curves.png", "weights.png"]


def test_input_layer_not_matching_image_shape_means_no_weights(tmp_path):
    job = _job("digits", (32, 16, 10))  # e.g. a feature-selected input, not whole images
    run = make_run(tmp_path / "run", job=job)
    assert [os.path.basename(p) for p in plot_run(str(run))] == ["curves.png"]


def test_weight_mosaic_tiles_are_reshaped_columns_scaled_per_unit():
    rng = np.random.default_rng(1)
    w0 = np.asfortranarray(rng.standard_normal((64, 5)))
    w0[:, 3] *= 50.0  # a large unit must not wash out the others
    m = weight_mosaic(w0, (8, 8))
    # 5 tiles -> 3 columns x 2 rows of 8x8 tiles with 1-pixel NaN gaps
    assert m.shape == (2 * 9 - 1, 3 * 9 - 1)
    for j in range(5):
        r, c = divmod(j, 3)
        tile = m[r * 9:r * 9 + 8, c * 9:c * 9 + 8]
        expected = w0[:, j].reshape(8, 8) / np.abs(w0[:, j]).max()
        np.testing.assert_allclose(tile, expected)
        assert np.nanmax(np.abs(tile)) == pytest.approx(1.0)
    assert np.isnan(m[8, :]).all() and np.isnan(m[:, 8]).all()
    assert np.isnan(m[9:, 18:]).all()  # the unused sixth slot stays blank


def test_weight_mosaic_shows_at_most_100_units():
    w0 = np.ones((64, 250))  # e.g. maxout: fan_out * pieces columns
    m = weight_mosaic(w0, (8, 8))
    assert m.shape == (10 * 9 - 1, 10 * 9 - 1)
    assert np.count_nonzero(~np.isnan(m)) == 100 * 64


def test_missing_run_dir_is_user_error(tmp_path):
    with pytest.raises(UserError, match="nope"):
        plot_run(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="file"):
        plot_run(str(tmp_path / "file"))


def test_missing_metrics_is_user_error(tmp_path):
    run = make_run(tmp_path / "run")
    os.unlink(run / "metrics.jsonl")
    with pytest.raises(UserError, match="metrics.jsonl"):
        plot_run(str(run))


def test_no_epoch_lines_is_user_error(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "metrics.jsonl").write_text(json.dumps({"event": "start"}) + "\n" + '{"event": "ep')
    with pytest.raises(UserError, match="no completed epoch"):
        plot_run(str(run))
    assert not (run / "curves.png").exists()


def two_runs(tmp_path):
    from distffn.cli import main
    job = tmp_path / "job.yaml"
    job.write_text("data: {dataset: digits, limit_train: 300}\nmodel: {layers: [64, 16, 10]}\n"
                   "training: {epochs: 3, batch_size: 50, eval_every: 2}\n")
    for name, extra in (("a", []), ("b", ["--set", "training.batch_size=100", "--set", "optimizer.schedule=cosine"])):
        assert main(["run", str(job), "--out", str(tmp_path / name), "--no-progress", *extra]) == 0
    return tmp_path / "a", tmp_path / "b"


def test_several_runs_overlay_in_one_figure(tmp_path, capsys):
    from distffn.cli import main
    a, b = two_runs(tmp_path)
    out = tmp_path / "cmp.png"
    assert main(["plot", str(a), str(b), "--x", "samples", "--out", str(out)]) == 0
    assert_png(str(out))
    assert main(["plot", str(a), "--x", "step"]) == 0
    assert_png(str(a / "curves-step.png"))


def test_x_axes_count_steps_epochs_and_samples_seen(tmp_path):
    from distffn.plot import RunCurves
    a, b = two_runs(tmp_path)
    run = RunCurves(str(a))                       # 300 samples, batch 50: 6 steps per epoch
    assert [run.x(s, "step") for s in (2, 6, 9)] == [2, 6, 9]
    assert [run.x(s, "epoch") for s in (3, 6, 9)] == [0.5, 1.0, 1.5]
    assert [run.x(s, "samples") for s in (2, 6, 9)] == [100, 300, 450]
    assert [r["step"] for r in run.evals] == [2, 4, 6, 8, 10, 12, 14, 16, 18]
    assert run.label.startswith("a: B=50, momentum lr=0.05 (constant), 1 worker local")


def test_comparing_needs_an_output_and_real_run_folders(tmp_path, capsys):
    from distffn.cli import main
    a, _ = two_runs(tmp_path)
    capsys.readouterr()
    assert main(["plot", str(a), str(a)]) == 2 and "--out" in capsys.readouterr().err
    assert main(["plot", str(a), str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_the_comparison_title_names_the_data_the_model_and_the_shared_settings(tmp_path):
    from distffn.plot import RunCurves, comparison_title

    from helpers import run_cli, write_job
    runs = []
    for name, lr in (("a", 0.05), ("b", 0.1)):
        out = tmp_path / name
        assert run_cli(write_job(tmp_path, name=f"{name}.yaml", optimizer={"lr": lr}), "--out", str(out)) == 0
        runs.append(RunCurves(str(out)))
    title = comparison_title(runs)
    assert title.startswith("2 runs compared (digits 64-32-10)") and "B=50" in title and "lr=" not in title
    assert comparison_title(runs[:1]) == f"digits 64-32-10: {runs[0].label}"


def fake_run(root, validation=True, lr=0.05, target=("validation_loss", 0.3)):
    """A run folder as a sweep trial leaves it: evaluations with validation and test figures."""
    root.mkdir(parents=True)
    job = {"data": {"dataset": "digits"}, "model": {"layers": [64, 16, 10]},
           "optimizer": {"name": "momentum", "lr": lr},
           "training": {"batch_size": 50, "target_metric": target[0], "target_value": target[1]}}
    (root / "job.yaml").write_text(yaml.safe_dump(job))
    recs = [{"event": "start", "start_step": 0, "steps_per_epoch": 10, "n_train": 500}]
    for step in range(2, 21, 2):
        rec = {"event": "eval", "step": step, "lr": lr, "test_loss": 2.0 / step, "test_accuracy": 0.5}
        if validation:
            rec.update(validation_loss=3.0 / step, validation_accuracy=0.6)
        recs.append(rec)
    recs += [{"event": "epoch", "epoch": e, "step": 10 * e, "lr": lr, "train_loss": 1.0 / e} for e in (1, 2)]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(root)


def panels(fig):
    return {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}


def test_identical_runs_stay_visible_with_their_own_marker_and_line(tmp_path):
    from distffn.plot import RunCurves, comparison_figure
    runs = [RunCurves(fake_run(tmp_path / name)) for name in ("a", "b", "c")]
    for title, ax in panels(comparison_figure(runs)).items():
        lines = [line for line in ax.get_lines() if line.get_label() in {r.label for r in runs}]
        assert len(lines) == 3, title
        assert len({(line.get_marker(), line.get_linestyle()) for line in lines}) == 3, title
        widths = [line.get_linewidth() for line in lines]
        assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1], title   # the first underneath, widest
        assert [line.get_zorder() for line in lines] == sorted(line.get_zorder() for line in lines)


def test_sweep_trials_are_compared_on_the_validation_metric_they_aimed_at(tmp_path):
    from distffn.plot import RunCurves, comparison_figure
    runs = [RunCurves(fake_run(tmp_path / "a")), RunCurves(fake_run(tmp_path / "b", lr=0.1))]
    shown = panels(comparison_figure(runs))
    assert {"validation loss", "validation accuracy (%)"} <= set(shown) and "test loss" not in shown
    curve = next(line for line in shown["validation loss"].get_lines() if line.get_label() == runs[0].label)
    assert list(curve.get_ydata()) == [3.0 / s for s in range(2, 21, 2)]
    assert any(list(line.get_ydata()) == [0.3, 0.3] for line in shown["validation loss"].get_lines())  # the target
    # a run without a validation split: every run is shown on the test split
    runs.append(RunCurves(fake_run(tmp_path / "c", validation=False)))
    shown = panels(comparison_figure(runs))
    assert {"test loss", "test accuracy (%)"} <= set(shown) and "validation loss" not in shown


def test_log_axes_of_a_comparison_show_plain_numbers(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from distffn.plot import RunCurves, comparison_figure
    fig = comparison_figure([RunCurves(fake_run(tmp_path / "a", validation=False))])
    FigureCanvasAgg(fig).draw()
    ax = panels(fig)["test loss"]
    assert ax.get_yscale() == "log"
    labels = [t.get_text() for minor in (False, True) for t in ax.get_yticklabels(minor=minor) if t.get_text()]
    assert labels and all(t.replace(".", "").replace(",", "").isdigit() for t in labels), labels


# ---------------------------------------------------------------- an adaptive batch

def adaptive_records():
    """The record format of an adaptive run (``training.batch_size: adaptive``), as it writes
    ``metrics.jsonl``: a ``batch`` record at step 0, at each re-choice and at the first step
    after a resume (written just before that life's ``start`` record), ``noise`` records,
    evaluations and epoch ends. 500 training samples, no drop_last: updates 0-3 take 50 samples,
    4-5 take 100, 6 the 100 left in epoch 1 (a short batch of the 150 chosen), 7 takes 150,
    8 takes 200 and 9 the 150 left in epoch 2. The first life chose 400 at step 8 and died; the
    second resumed from the checkpoint at step 6 and chose 200 there."""
    def batch(step, size, samples, b_simple, gain):
        return {"event": "batch", "step": step, "epoch": samples / 500, "batch_size": size, "gain": gain,
                "lr": 0.05 * gain, "progress": float(step), "b_simple": b_simple, "rule": "noise",
                "samples": samples}

    def ev(step, epoch):
        return {"event": "eval", "step": step, "epoch": epoch, "lr": 0.05, "test_loss": 1.0 / step,
                "test_accuracy": 0.5 + step / 40}

    def epoch_end(e, step):
        return {"event": "epoch", "epoch": e, "step": step, "lr": 0.05, "train_loss": 1.0 / e,
                "test_loss": 1.2 / e, "train_accuracy": 0.8, "test_accuracy": 0.7}

    start = {"event": "start", "n_train": 500, "steps_per_epoch": 10, "start_step": 0}
    return [batch(0, 50, 0, None, 1.0), start,
            {"event": "noise", "step": 2, "epoch": 0.2, "b_simple": 60.0, "grad_norm_sq": 1.0, "trace_sigma": 60.0},
            ev(2, 0.2), batch(4, 100, 200, 90.0, 1.6), ev(5, 0.6), batch(6, 150, 400, 140.0, 2.2),
            epoch_end(1, 7), ev(7, 1.0), batch(8, 400, 650, 390.0, 3.0),            # the first life ends
            batch(6, 150, 400, 140.0, 2.2), dict(start, start_step=6),
            epoch_end(1, 7), ev(7, 1.0), batch(8, 200, 650, 210.0, 2.6), ev(8, 1.3), ev(9, 1.7),
            epoch_end(2, 10), ev(10, 2.0)]


def adaptive_run(root, records):
    root.mkdir(parents=True)
    job = {"name": "adaptive", "data": {"dataset": "digits"}, "model": {"layers": [64, 16, 10]},
           "optimizer": {"name": "momentum", "lr": 0.05},
           "training": {"batch_size": "adaptive", "drop_last": False,
                        "adaptive": {"start": 50, "max": 400, "every_steps": 2, "rule": "noise"}}}
    (root / "job.yaml").write_text(yaml.safe_dump(job))
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def test_an_adaptive_run_writes_batch_png_holding_each_batch_until_the_next_choice(tmp_path):
    records = adaptive_records()
    run = adaptive_run(tmp_path / "run", records)
    paths = plot_run(str(run))
    assert [os.path.basename(p) for p in paths] == ["curves.png", "batch.png"]
    img = assert_png(paths[1])
    assert img.shape[0] > 400 and img.shape[1] > 600
    from distffn.plot import batch_figure, batch_schedule
    # each batch from its step to the next choice, the last to the newest epoch's step; the
    # first life's choice at step 8 is replaced by the second life's
    assert batch_schedule(records) == ([0, 4, 6, 8, 10], [50, 100, 150, 200, 200])
    # plotted during the second life, before it reached step 8: the first life's choice there is gone
    assert batch_schedule(records[:13]) == ([0, 4, 6, 7], [50, 100, 150, 150])
    fig = batch_figure(records, "adaptive")
    assert fig.get_suptitle() == "adaptive: adaptive global batch (rule: noise)"
    top = fig.axes[0]
    line = next(line for line in top.get_lines() if line.get_label() == "global batch B")
    assert list(line.get_xdata()) == [0, 4, 6, 8, 10] and line.get_drawstyle() == "steps-post"
    assert top.get_yscale() == "log"
    # a goodput schedule planned for a cluster says so; its B_simple is what it chose from
    planned = [dict(r, rule="goodput", goodput_workers=64, goodput_network="10gbe") if r.get("event") == "batch" else r
               for r in records]
    fig = batch_figure(planned, "adaptive")
    assert fig.get_suptitle() == "adaptive: adaptive global batch (rule: goodput, for 64 workers on 10gbe)"
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "B_simple each choice was made from" in labels and "B_simple the choice followed" not in labels


def test_a_run_without_batch_records_has_no_batch_schedule_and_no_batch_png(tmp_path):
    from distffn.plot import batch_schedule
    from distffn.training.metrics import iter_records
    run = make_run(tmp_path / "run", checkpoint=False)
    noise = {"event": "noise", "step": 10, "epoch": 1.0, "b_simple": 80.0, "grad_norm_sq": 1.0, "trace_sigma": 80.0}
    with open(run / "metrics.jsonl", "a") as f:       # a fixed batch with metrics.noise_scale
        f.write("\n" + json.dumps(noise) + "\n")
    assert batch_schedule(iter_records(str(run / "metrics.jsonl"))) == ([], [])
    assert [os.path.basename(p) for p in plot_run(str(run))] == ["curves.png"]
    assert not (run / "batch.png").exists()


def test_an_adaptive_run_is_compared_on_the_samples_its_records_count(tmp_path):
    from distffn.plot import RunCurves, comparison_figure
    adaptive = RunCurves(str(adaptive_run(tmp_path / "adaptive", adaptive_records())))
    fixed = RunCurves(fake_run(tmp_path / "fixed", validation=False))   # batch 50, 500 samples
    assert [r["step"] for r in adaptive.evals] == [2, 5, 7, 8, 9, 10]
    # the samples adaptive_records' docstring counts, the short batches that end epochs included
    seen = [100, 300, 500, 650, 850, 1000]
    assert [adaptive.x(r["step"], "samples") for r in adaptive.evals] == seen
    assert [adaptive.x(r["step"], "epoch") for r in adaptive.evals] == [r["epoch"] for r in adaptive.evals]
    assert adaptive.label.startswith("adaptive: B=adaptive (noise),")
    loss = panels(comparison_figure([adaptive, fixed], "samples"))["test loss"]
    curves = {line.get_label(): list(line.get_xdata()) for line in loss.get_lines()}
    assert curves[adaptive.label] == seen
    assert curves[fixed.label] == [50 * s for s in range(2, 21, 2)]          # a fixed batch as before
