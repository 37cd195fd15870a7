"""A whole sweep on digits, end to end: trials are plain runs, the steps to the target fall
with the batch size and fall less at the large end, N workers need the steps of 1, the
outputs are there, and the same command again resumes."""
from __future__ import annotations

import csv
import json
import os
import shlex
import sys

import pytest
import yaml

from distffn.cli import main
from distffn.plot import plot_comparison
from distffn.sweep.trials import Timing, run_timing

from helpers import MPIEXEC, run_group

MPI = os.access(MPIEXEC, os.X_OK)
JOBS = os.path.join(os.path.dirname(__file__), "..", "..", "jobs")
SHIPPED = os.path.join(JOBS, "digits-sweep.yaml")
BATCHES = [8, 32, 128, 512]
QUICK = [f"batch_sizes={BATCHES}", f"num_workers={[1, 2] if MPI else [1]}", "timing_steps=20", "timing_repeats=1",
         "noise_batches=10"]
LRS = 7                                     # the shipped sweep's grid


def write(folder, **changes):
    """A sweep file of the shipped one's keys with ``changes``, next to its base job."""
    folder.mkdir(exist_ok=True)
    with open(os.path.join(JOBS, "digits-sweep-job.yaml")) as f:
        (folder / "digits-sweep-job.yaml").write_text(f.read())
    with open(SHIPPED) as f:
        spec = yaml.safe_load(f)
    (folder / "sweep.yaml").write_text(yaml.safe_dump({**spec, "num_workers": [1], "timing_repeats": 1, **changes}))
    return str(folder / "sweep.yaml")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The shipped digits sweep on four batch sizes: the README's example, tested."""
    folder = tmp_path_factory.mktemp("sweep")
    out = folder / "out"
    code = main(["sweep", SHIPPED, "--out", str(out), "--no-progress", *(x for q in QUICK for x in ("--set", q))])
    assert code == 0
    return folder, out


def rows(out):
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def results(out):
    return [json.loads((out / "trials" / d / "result.json").read_text()) for d in os.listdir(out / "trials")]


def test_outputs_one_row_per_trial_and_worker_count(sweep):
    _, out = sweep
    r = rows(out)
    assert len(r) == len(BATCHES) * LRS * (2 if MPI else 1)
    for key in ("batch_size", "num_workers", "lr", "reached", "steps_to_target", "samples_to_target",
                "seconds_to_target", "step_seconds"):
        assert key in r[0]
    for row in r:
        if row["reached"] == "True":
            assert float(row["seconds_to_target"]) == pytest.approx(
                int(row["steps_to_target"]) * float(row["step_seconds"]), rel=1e-2, abs=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("s_min", "e_min", "b_crit", "b_noise", "regimes", "best", "projection", "step_model"):
        assert summary[key] is not None, key
    assert summary["e_min"] == pytest.approx(summary["s_min"] * summary["b_crit"])
    assert summary["projection"]["label"] == "projection"
    assert max(int(n) for n in summary["projection"]["seconds_to_target"]["512"]) == 512
    for png in ("steps_vs_batch.png", "time_vs_workers.png", "lr_vs_batch.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000


def test_steps_fall_with_the_batch_size_and_fall_less_at_the_large_end(sweep):
    _, out = sweep
    best = {b["batch_size"]: b["steps_to_target"] for b in json.loads((out / "summary.json").read_text())["best"]}
    assert sorted(best) == BATCHES
    s = [best[b] for b in sorted(best)]
    assert s[0] > s[1] > s[2] >= s[3]
    assert s[0] / s[1] > s[2] / s[3]                 # diminishing returns at the large end
    summary = json.loads((out / "summary.json").read_text())
    assert BATCHES[0] < summary["b_crit"] < BATCHES[-1] * 4


def test_the_best_rate_is_the_one_with_fewest_steps_and_others_are_pruned_at_it(sweep):
    _, out = sweep
    by_batch = {}
    for r in results(out):
        by_batch.setdefault(r["batch_size"], []).append(r)
    summary = json.loads((out / "summary.json").read_text())
    for b, group in by_batch.items():
        reached = {r["steps_to_target"] for r in group if r["reached"]}
        best = next(x for x in summary["best"] if x["batch_size"] == b)
        assert best["steps_to_target"] == min(reached)
        for r in group:
            assert r["reached"] or r["diverged"] or r["pruned"] or r["steps_run"] >= min(reached)
            if r["pruned"]:        # stopped at the fewest steps found before it ran
                assert r["steps_run"] in reached and not r["reached"]


def test_a_trial_is_a_plain_run_that_distffn_run_reproduces(sweep, tmp_path):
    _, out = sweep
    r = next(r for r in results(out) if r["reached"] and r["batch_size"] == 32)
    argv = shlex.split(r["command"])
    assert argv[:3] == ["distffn", "run", str(out / "job.yaml")]
    again = tmp_path / "again"
    argv[argv.index("--out") + 1] = str(again)
    assert main(argv[1:] + ["--no-progress"]) == 0
    summary = json.loads((again / "summary.json").read_text())
    assert summary["target"]["step"] == r["steps_to_target"]
    assert plot_comparison([str(out / "trials" / r["trial"]), str(again)], str(tmp_path / "cmp.png"), "samples")


def test_n_workers_reach_the_target_in_the_steps_of_one(sweep, tmp_path):
    """The shortcut the sweep takes: steps to target depend on (B, lr, momentum), not on N."""
    _, out = sweep
    r = next(r for r in results(out) if r["reached"] and r["batch_size"] == 128)
    argv = shlex.split(r["command"])[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "local2")
    assert main(argv + ["--no-progress", "--set", "scaling.num_workers=2"]) == 0
    assert json.loads((tmp_path / "local2" / "summary.json").read_text())["target"]["step"] == r["steps_to_target"]
    if MPI:
        argv[argv.index("--out") + 1] = str(tmp_path / "mpi2")
        p = run_group([sys.executable, "-m", "distffn", *argv, "--no-progress", "--set", "scaling.num_workers=2",
                       "--set", "scaling.backend=mpi"], 120)
        assert p.returncode == 0, p.stderr
        assert json.loads((tmp_path / "mpi2" / "summary.json").read_text())["target"]["step"] == r["steps_to_target"]


def test_the_same_command_again_skips_finished_trials_and_reruns_a_lost_one(sweep, capsys):
    _, out = sweep
    before = {r["trial"]: r for r in results(out)}
    lost = next(t for t, r in before.items() if r["reached"] and r["batch_size"] == 8)
    os.unlink(out / "trials" / lost / "result.json")   # killed before it wrote its result
    capsys.readouterr()
    assert main(["sweep", SHIPPED, "--out", str(out), "--no-progress", *(x for q in QUICK for x in ("--set", q))]) == 0
    printed = capsys.readouterr().out
    total = len(BATCHES) * LRS
    assert f"{total - 1} of {total} trials already finished; 1 to run" in printed
    assert printed.count("] B=") == 1
    after = {r["trial"]: r for r in results(out)}
    assert after[lost]["steps_to_target"] == before[lost]["steps_to_target"]
    # killed mid-run: it continues from its newest checkpoint and reaches the target where it did
    trial = out / "trials" / lost
    for name in ("result.json", "summary.json"):
        os.unlink(trial / name)
    checkpoints = sorted(os.listdir(trial / "checkpoints"))
    os.unlink(trial / "checkpoints" / checkpoints[-1])                   # the one at the target
    assert main(["sweep", SHIPPED, "--out", str(out), "--no-progress", *(x for q in QUICK for x in ("--set", q))]) == 0
    again = json.loads((trial / "result.json").read_text())
    assert again["steps_to_target"] == before[lost]["steps_to_target"]


def test_a_target_not_reached_is_a_result(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["sweep", write(tmp_path, batch_sizes=[64, 128], lr=[0.05], num_workers=[1], max_epochs=1,
                                target={"metric": "validation_accuracy", "value": 0.999}, timing_steps=5),
                 "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "not reached in 1 epoch (" in printed and "fit: needs at least 3 batch sizes" in printed
    assert {r["reached"] for r in rows(out)} == {"False"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fit"] is None and summary["not_reached"] == [64, 128]


def test_trials_run_side_by_side_as_ray_tasks_with_the_same_results(sweep, tmp_path):
    pytest.importorskip("ray")
    _, first = sweep
    out = tmp_path / "out"
    assert main(["sweep", write(tmp_path, batch_sizes=[32, 128], lr=[0.05, 0.1], concurrency=2, prune=False,
                                timing_steps=5, noise_batches=5), "--out", str(out), "--no-progress"]) == 0
    ours = {r["trial"]: r for r in results(out)}
    theirs = {r["trial"]: r for r in results(first)}
    assert len(ours) == 4
    for trial, r in ours.items():
        if r["reached"] and theirs[trial]["reached"]:
            assert r["steps_to_target"] == theirs[trial]["steps_to_target"], trial



def test_a_timed_run_leaves_the_first_steps_start_up_out_of_the_step_time(tmp_path):
    """The first step of a run pays the backend's start-up (summary.json's startup_s): in a
    20-step timed run on Ray that was most of its time, so it stays out of step_seconds."""
    t = Timing(64, 2, "ray", steps=5, epochs=1)
    run_dir = tmp_path / "timing" / f"{t.id}-r0"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"step": 5, "train_time_s": 3.0, "startup_s": 1.0}))
    assert run_timing(t, "unused.yaml", str(tmp_path), threads=1)["step_seconds"] == 0.5


def test_a_failing_analysis_stage_keeps_the_measurements_and_the_figures(tmp_path, capsys, monkeypatch):
    """The noise scale failing after every trial and timed run: results.csv, summary.json with
    the error as one line, and the figures are written, and the exit code says it is
    incomplete; the same command again redoes only the analysis."""
    sweep = write(tmp_path, batch_sizes=[64, 128], lr=[0.1], max_epochs=1, timing_steps=5, noise_batches=4,
                  target={"metric": "validation_accuracy", "value": 0.5})
    out = tmp_path / "out"

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")
    monkeypatch.setattr("distffn.sweep.runner.estimate_checkpoint", broken)
    assert main(["sweep", sweep, "--out", str(out), "--no-progress"]) == 1
    printed, err = capsys.readouterr()
    assert "2 trials (2 batch sizes × 1 setting, ≤ 1 epoch each" in printed
    assert "warning: the noise scale stage failed: B=64: RuntimeError: boom second line" in printed
    assert err.startswith("distffn: error: ") and len(err.strip().splitlines()) == 1 and "noise_scale" in err
    assert {r["batch_size"] for r in rows(out)} == {"64", "128"} and all(r["step_seconds"] for r in rows(out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reached"] == 2 and summary["b_noise"] is None and summary["projection"] is not None
    assert summary["errors"] == {"noise_scale": "B=64: RuntimeError: boom second line; "
                                                "B=128: RuntimeError: boom second line"}
    assert "Traceback" in (out / "errors.log").read_text()
    for name in ("steps_vs_batch.png", "time_vs_workers.png", "lr_vs_batch.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG"), name

    monkeypatch.undo()
    assert main(["sweep", sweep, "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "2 of 2 trials already finished; 0 to run" in printed and "timed B=64 N=1" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"] == {} and summary["b_noise"] > 0


def test_seeds_and_an_adaptive_batch_against_the_fixed_batches(tmp_path, capsys):
    """Two batch sizes, one rate each, a noise-rule adaptive entry, two seeds: medians over the
    seeds, the adaptive rows and summary, its projection from its own batch schedule."""
    from statistics import median

    from distffn.sweep.projection import NETWORKS, StepModel, schedule_seconds
    from distffn.sweep.runner import read_schedule
    path = write(tmp_path / "s", batch_sizes=[16, 64], lr={"16": 0.05, "64": 0.1}, seeds=[0, 1], max_epochs=4,
                 target={"metric": "validation_loss", "value": 0.3}, timing_steps=5, noise_batches=5,
                 adaptive=[{"rule": "noise", "start": 16, "max": 256, "every_steps": 10}])
    out = tmp_path / "out"
    assert main(["sweep", path, "--out", str(out), "--no-progress"]) == 0
    got = rows(out)
    assert [(r["batch_size"], r["adaptive"], os.path.basename(r["trial"])) for r in got] == [
        ("16", "", "b000016-lr0.05-s0"), ("16", "", "b000016-lr0.05-s1"), ("64", "", "b000064-lr0.1-s0"),
        ("64", "", "b000064-lr0.1-s1"), ("16", "noise", "a-noise-b000016-256-e10-lr0.05-s0"),
        ("16", "noise", "a-noise-b000016-256-e10-lr0.05-s1")]
    assert all(r["reached"] == "True" for r in got), got
    summary = json.loads((out / "summary.json").read_text())
    for best in summary["best"]:
        mine = [r for r in got if r["batch_size"] == str(best["batch_size"]) and not r["adaptive"]]
        assert best["steps_to_target"] == median(int(r["steps_to_target"]) for r in mine)
    [a] = summary["adaptive"]
    assert (a["rule"], a["start"], a["max"], a["noise_every"], a["reached"]) == ("noise", 16, 256, 5, True)
    assert [x["seed"] for x in a["seeds"]] == [0, 1]
    assert a["steps_to_target"] == median(x["steps"] for x in a["seeds"])
    assert a["samples_to_target"] == median(x["samples"] for x in a["seeds"])
    model = StepModel(**{k: summary["step_model"][k] for k in ("fixed", "per_sample", "n_bytes", "sync")})
    schedules = [read_schedule(str(out), x["trial"], x["steps"]) for x in a["seeds"]]
    for x, s in zip(a["seeds"], schedules):           # the schedule's samples are the run's to the target
        assert sum(b * n for b, n in s) == x["samples"] and sum(n for _, n in s) == x["steps"]
    assert any(b > 16 for s in schedules for b, _ in s), schedules          # the batch did change
    for name, link in NETWORKS.items():
        projected = summary["projection"]["by_network"][name]
        assert projected["adaptive"][0]["64"] == pytest.approx(
            median(schedule_seconds(model, s, 64, link, summary["step_model"]["aggregation"]) for s in schedules))
        assert projected["fixed"]["16"]["64"] is None and projected["fixed"]["64"]["64"] is not None
    assert (out / "steps_vs_samples.png").stat().st_size > 0
    assert "adaptive noise (B 16→256, every 10 steps), lr 0.05" in capsys.readouterr().out
