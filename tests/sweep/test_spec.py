"""SWEEP.yaml: typed and validated like a job spec; every mistake exits 2 with one line."""
from __future__ import annotations

import os

import pytest
import yaml

from distffn.sweep.spec import AUTO, LrRule, load_sweep, split_overrides

from helpers import user_error

JOBS = os.path.join(os.path.dirname(__file__), "..", "..", "jobs")
BASE = {"name": "base", "data": {"dataset": "digits", "validation_fraction": 0.1},
        "model": {"layers": [64, 16, 10]}, "optimizer": {"lr": 0.05, "momentum": 0.9}}
SWEEP = {"job": "base.yaml", "batch_sizes": [32, 8], "lr": [0.1, 0.03],
         "target": {"metric": "validation_accuracy", "value": 0.9}, "max_epochs": 5}


def write(tmp_path, sweep=None, base=None, **changes):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base or BASE))
    spec = {**(sweep or SWEEP), **changes}
    spec = {k: v for k, v in spec.items() if v is not None}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_a_sweep_reads_with_defaults_and_its_base_job_relative_to_it(tmp_path):
    spec, base = load_sweep(write(tmp_path))
    assert spec.job == str(tmp_path / "base.yaml") and base.name == "base"
    assert spec.batch_sizes == [8, 32] and spec.num_workers == [1] and spec.eval_every == AUTO
    assert spec.rates(8) == [0.1, 0.03] and spec.momenta(base) == [0.9] and spec.name == "sweep"
    assert spec.eval_steps(1000, 8, False) == 12          # auto: 10 evaluations per epoch
    assert spec.eval_steps(1000, 512, False) == 1         # ... and at least one step


def test_the_shipped_sweeps_read():
    for name in ("digits-sweep.yaml", "fashion-mnist-sweep.yaml", "digits-adaptive-sweep.yaml",
                 "fashion-mnist-adaptive-sweep.yaml"):
        spec, base = load_sweep(os.path.join(JOBS, name))
        assert len(spec.batch_sizes) >= 3 and base.data.validation_fraction > 0


def test_an_lr_rule_gives_one_rate_per_batch_size_times_the_multipliers(tmp_path):
    spec, _ = load_sweep(write(tmp_path, lr={"rule": "linear", "base_lr": 0.1, "base_batch": 32,
                                             "warmup_epochs": 2, "multipliers": [0.5, 1]}))
    assert isinstance(spec.lr, LrRule)
    assert spec.rates(8) == pytest.approx([0.0125, 0.025]) and spec.rates(32) == pytest.approx([0.05, 0.1])
    assert spec.warmup_steps(1000, 100, False) == 20      # 2 epochs of 10 steps
    spec, _ = load_sweep(write(tmp_path, lr={"rule": "sqrt", "base_lr": 0.1, "base_batch": 32}))
    assert spec.rates(8) == pytest.approx([0.05])


def test_set_overrides_sweep_keys_and_the_base_job(tmp_path):
    assert split_overrides(["max_epochs=3", "job.training.seed=4"]) == (["max_epochs=3"], ["training.seed=4"])
    spec, base = load_sweep(write(tmp_path), ["max_epochs=3", "target.value=0.8", "batch_sizes=[4]",
                                              "job.training.seed=4"])
    assert spec.max_epochs == 3 and spec.target.value == 0.8 and spec.batch_sizes == [4]
    assert base.training.seed == 4
    spec, _ = load_sweep(write(tmp_path, lr={"rule": "linear", "base_lr": 0.1, "base_batch": 32}),
                         ["lr.rule=sqrt", "lr.base_lr=0.4"])
    assert spec.lr.rule == "sqrt" and spec.rates(8) == pytest.approx([0.2])


@pytest.mark.parametrize("changes,needles", [
    ({"colour": "red"}, ["colour: unknown key", "batch_sizes"]),
    ({"batch_sizes": []}, ["batch_sizes", "non-empty"]),
    ({"batch_sizes": [8, 0]}, ["batch_sizes", "positive"]),
    ({"batch_sizes": [8, -4]}, ["batch_sizes", "positive"]),
    ({"num_workers": [0]}, ["num_workers", "positive"]),
    ({"lr": []}, ["lr", "non-empty"]),
    ({"lr": [0.1, -0.1]}, ["lr", "positive"]),
    ({"lr": {"rule": "cubic", "base_lr": 0.1, "base_batch": 32}}, ["lr.rule", "linear, sqrt"]),
    ({"lr": {"rule": "linear", "base_lr": 0, "base_batch": 32}}, ["lr.base_lr", "positive"]),
    ({"lr": {"rule": "linear", "base_lr": 0.1, "base_batch": 32, "warmup": 1}}, ["lr.warmup: unknown key"]),
    ({"momentum": [0.9, 1.0]}, ["momentum", "[0, 1)"]),
    ({"momentum": []}, ["momentum", "non-empty"]),
    ({"target": {"metric": "f1", "value": 0.9}}, ["target.metric", "validation_accuracy"]),
    ({"target": {"metric": "test_accuracy", "value": 95}}, ["target.value", "fraction"]),
    ({"target": {"metric": "test_loss", "value": 0}}, ["target.value", "positive"]),
    ({"target": {"metric": "test_loss", "value": 0.1, "patience": 3}}, ["target.patience: unknown key"]),
    ({"max_epochs": 0}, ["max_epochs", "positive"]),
    ({"max_epochs": 2.5}, ["max_epochs", "integer"]),
    ({"max_epochs": None}, ["max_epochs: required"]),
    ({"eval_every": 0}, ["eval_every", "auto"]),
    ({"eval_every": "often"}, ["eval_every", "auto"]),
    ({"concurrency": -1}, ["concurrency", "positive"]),
    ({"timing_backend": "spark"}, ["timing_backend", "local, mpi, ray"]),
    ({"network": "carrier-pigeon"}, ["network", "10gbe"]),
    ({"regime_tolerance": 2}, ["regime_tolerance", "(0, 1)"]),
    ({"job": "missing.yaml"}, ["missing.yaml", "no such"]),
])
def test_bad_sweeps_exit_2_naming_the_key(tmp_path, capsys, changes, needles):
    user_error(capsys, ["sweep", write(tmp_path, **changes), "--out", str(tmp_path / "out")], *needles)
    assert not (tmp_path / "out" / "trials").exists()


def test_an_empty_sweep_file_and_a_bad_base_job_are_refused(tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("")
    user_error(capsys, ["sweep", str(tmp_path / "empty.yaml")], "empty")
    bad = dict(BASE, model={"layers": [64, 16, 10], "activation": "swish"})
    user_error(capsys, ["sweep", write(tmp_path, base=bad)], "model.activation")


def test_a_batch_larger_than_the_training_split_is_refused_before_any_trial(tmp_path, capsys):
    user_error(capsys, ["sweep", write(tmp_path, batch_sizes=[8, 4096]), "--out", str(tmp_path / "out")],
               "batch_sizes: 4096", "training samples", "validation_fraction")
    assert not (tmp_path / "out" / "trials").exists()


def test_a_validation_target_needs_a_validation_split_in_the_base_job(tmp_path, capsys):
    base = dict(BASE, data={"dataset": "digits"})
    user_error(capsys, ["sweep", write(tmp_path, base=base)], "target.metric", "data.validation_fraction")


def test_a_momentum_grid_needs_an_optimizer_with_momentum(tmp_path, capsys):
    base = dict(BASE, optimizer={"name": "adam", "lr": 0.01})
    user_error(capsys, ["sweep", write(tmp_path, base=base, momentum=[0.9])], "momentum", "adam")


def test_bad_set_values_are_refused(tmp_path, capsys):
    user_error(capsys, ["sweep", write(tmp_path), "--set", "max_epochs"], "--set", "key=value")
    user_error(capsys, ["sweep", write(tmp_path), "--set", "model.layers=[1]"], "--set", "job.SECTION.KEY")
    user_error(capsys, ["sweep", write(tmp_path), "--set", "job.training.batch_size=-1"], "training.batch_size")


def test_seeds_a_mapping_of_rates_and_adaptive_entries_plan_their_trials(tmp_path):
    from distffn.sweep.trials import plan_trials
    path = write(tmp_path, lr={"8": 0.1, "32": [0.2, 0.3]}, seeds=[0, 1],
                 adaptive=[{"rule": "noise", "start": 8, "max": 64}, {"rule": "goodput", "start": 32, "lr": 0.4,
                                                                     "noise_every": 2, "every_steps": 7},
                           {"rule": "goodput", "start": 32, "lr": 0.4, "goodput_workers": 8}])
    spec, base = load_sweep(path)
    assert spec.seeds == [0, 1] and spec.rates(8) == [0.1] and spec.rates(32) == [0.2, 0.3]
    trials = plan_trials(spec, base, 1000)
    fixed = [t for t in trials if not t.adaptive]
    assert [t.id for t in fixed] == ["b000008-lr0.1-s0", "b000008-lr0.1-s1", "b000032-lr0.2-s0", "b000032-lr0.2-s1",
                                     "b000032-lr0.3-s0", "b000032-lr0.3-s1"]
    assert "training.seed=1" in fixed[1].overrides()
    planned = [t for t in trials if t.adaptive and t.adaptive.get("goodput_workers")]
    noise, goodput = ([t for t in trials if t.adaptive and t.adaptive["rule"] == r and t not in planned]
                      for r in ("noise", "goodput"))
    # the rates at start; the base job's every_steps; noise measured every 5 steps; evaluations as for B = max
    assert [(t.lr, t.seed, t.batch_size) for t in noise] == [(0.1, 0, 8), (0.1, 1, 8)]
    assert noise[0].eval_every == spec.eval_steps(1000, 64, False) and noise[0].eval_every < fixed[0].eval_every
    sets = noise[0].overrides()
    for s in ("training.batch_size=adaptive", "training.adaptive.rule=noise", "training.adaptive.start=8",
              "training.adaptive.max=64", f"training.adaptive.every_steps={base.training.adaptive.every_steps}",
              "metrics.noise_every=5", "training.seed=0", "optimizer.lr=0.1"):
        assert s in sets, s
    assert [(t.lr, t.adaptive["every_steps"], t.adaptive["noise_every"]) for t in goodput] == [(0.4, 7, 2)] * 2
    # planned for 8 workers on the sweep's link; a schedule for this machine keeps its settings as before
    assert "goodput_workers" not in goodput[0].adaptive and "-w" not in goodput[0].id
    assert [t.id for t in planned] == [f"a-goodput-b000032-4096-e{base.training.adaptive.every_steps}-w8-10gbe-lr0.4-s{s}"
                                       for s in (0, 1)]
    for s in ("training.adaptive.goodput_workers=8", "training.adaptive.goodput_network=10gbe"):
        assert s in planned[0].overrides(), s
    assert len({t.id for t in trials}) == len(trials)
    # without seeds, the ids (and trial.json) of a sweep from before seeds existed
    spec, base = load_sweep(write(tmp_path))
    t = plan_trials(spec, base, 1000)[0]
    assert t.id == "b000008-lr0.1" and "seed" not in t.as_dict() and "adaptive" not in t.as_dict()


ENTRY = {"rule": "noise", "start": 8, "max": 64}


@pytest.mark.parametrize("changes,needles", [
    ({"seeds": [0, -1]}, ["seeds", "non-negative"]),
    ({"seeds": []}, ["seeds", "non-empty"]),
    ({"lr": {"8": 0.1}}, ["lr", "batch size 32"]),
    ({"lr": {"8": 0.1, "32": -1}}, ["lr.32", "positive"]),
    ({"lr": {"8": 0.1, "32": 0.1}, "adaptive": [{"rule": "noise", "start": 16, "max": 64}]}, ["lr", "batch size 16"]),
    ({"adaptive": {"rule": "noise"}}, ["adaptive", "expected a list"]),
    ({"adaptive": [ENTRY, {"start": 8}]}, ["adaptive[1].rule", "required"]),
    ({"adaptive": [dict(ENTRY, rule="fastest")]}, ["adaptive[0].rule", "noise, goodput"]),
    ({"adaptive": [dict(ENTRY, start=128)]}, ["adaptive[0].start", "above", "adaptive[0].max (64)"]),
    ({"adaptive": [{"rule": "noise", "start": 8192}]}, ["adaptive[0].start", "max (4096)"]),
    ({"adaptive": [dict(ENTRY, every_steps=0)]}, ["adaptive[0].every_steps", "positive"]),
    ({"adaptive": [dict(ENTRY, noise_every=0)]}, ["adaptive[0].noise_every", "positive"]),
    ({"adaptive": [dict(ENTRY, colour="red")]}, ["adaptive[0].colour: unknown key"]),
    ({"adaptive": [dict(ENTRY, goodput_workers=8)]}, ["adaptive[0].goodput_workers", "rule noise does not use"]),
    ({"adaptive": [dict(ENTRY, rule="goodput", goodput_network="dialup")]},
     ["adaptive[0].goodput_network: expected one of 10gbe"]),
    ({"adaptive": [dict(ENTRY, max=4096)]}, ["adaptive[0].max: 4096", "training samples"]),
])
def test_bad_seeds_rates_and_adaptive_entries_exit_2_naming_the_key(tmp_path, capsys, changes, needles):
    user_error(capsys, ["sweep", write(tmp_path, **changes), "--out", str(tmp_path / "out")], *needles)
    assert not (tmp_path / "out" / "trials").exists()


def test_an_adaptive_entry_is_checked_as_the_job_its_trials_run(tmp_path, capsys):
    base = dict(BASE, optimizer={"name": "adam", "lr": 0.01})
    user_error(capsys, ["sweep", write(tmp_path, base=base, adaptive=[ENTRY])], "adaptive[0]", "optimizer.name", "adam")
