"""Job specs: types, choices from the registries, overrides, and one clear line for every mistake."""
from __future__ import annotations

import pytest
import yaml

from distffn.errors import UserError
from distffn.jobspec import apply_overrides, from_dict
from distffn.nn.objectives import losses, losses_for, outputs

from helpers import PAIRS, SMALL, run_cli, user_error, write_job


def test_set_overrides_fields(tmp_path):
    out = tmp_path / "run"
    run_cli(write_job(tmp_path), "--out", str(out), "--set", "training.epochs=1",
            "--set", "model.layers=[64, 16, 10]")
    job = yaml.safe_load((out / "job.yaml").read_text())
    assert job["training"]["epochs"] == 1 and job["model"]["layers"] == [64, 16, 10]


def test_set_reaches_a_key_of_a_mapping_and_keeps_its_other_keys():
    """``--set training.adaptive.rule=goodput`` changes that key only; a key below a field
    that is not a mapping is refused naming it."""
    raw = {"training": {"batch_size": "adaptive", "adaptive": {"start": 16, "max": 64}}}
    job = from_dict(apply_overrides(raw, ["training.adaptive.rule=goodput"]))
    assert (job.training.adaptive.rule, job.training.adaptive.start, job.training.adaptive.max) == ("goodput", 16, 64)
    with pytest.raises(UserError, match=r"^training.epochs: expected a mapping of keys$"):
        apply_overrides({"training": {"epochs": 3}}, ["training.epochs.max=1"])


def test_malformed_yaml(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("model: [unclosed\n")
    user_error(capsys, ["run", str(p)], "bad.yaml", "malformed YAML", "line")


def test_missing_job_file(tmp_path, capsys):
    user_error(capsys, ["run", str(tmp_path / "nope.yaml")], "nope.yaml")


def test_unknown_key(tmp_path, capsys):
    user_error(capsys, ["run", write_job(tmp_path, model={"layer": [1, 2]})], "model.layer", "unknown key")


def test_unknown_section(tmp_path, capsys):
    job = dict(SMALL, modle={})
    user_error(capsys, ["run", write_job(tmp_path, job=job)], "modle")


def test_wrong_type(tmp_path, capsys):
    user_error(capsys, ["run", write_job(tmp_path, training={"epochs": "ten"})], "training.epochs", "integer")


def test_bad_choice(tmp_path, capsys):
    user_error(capsys, ["run", write_job(tmp_path, model={"activation": "swish"})], "model.activation")


def test_bad_override(tmp_path, capsys):
    user_error(capsys, ["run", write_job(tmp_path), "--set", "epochs=3"], "section.key=value")


def test_sign_activation_is_refused_for_training(tmp_path, capsys):
    user_error(capsys, ["run", write_job(tmp_path, model={"activation": "sign"})], "zero gradient")


@pytest.mark.parametrize("name", ["sign", "step"])
def test_zero_gradient_activations_refused_for_training(name):
    with pytest.raises(UserError, match="zero gradient") as info:
        from_dict({"name": "x", "model": {"layers": [2, 2, 1], "activation": name,
                                          "output": "linear", "loss": "mse"}})
    assert "model.activation" in str(info.value)


@pytest.mark.parametrize("output,loss", [(o, l) for o in outputs() for l in losses() if l not in losses_for(o)])
def test_invalid_output_loss_pair_refused(output, loss):
    with pytest.raises(UserError) as info:
        from_dict({"name": "x", "model": {"layers": [2, 4, 2], "activation": "relu",
                                          "output": output, "loss": loss}})
    msg = str(info.value)
    assert msg.startswith("model.loss"), msg
    assert loss in msg and output in msg


def test_softmax_mse_refused():
    with pytest.raises(UserError, match=r"model\.loss"):
        from_dict({"model": {"layers": [4, 3], "output": "softmax", "loss": "mse"}})


@pytest.mark.parametrize("output,loss", PAIRS)
def test_valid_pairs_accepted(output, loss):
    job = from_dict({"model": {"layers": [2, 4, 2], "output": output, "loss": loss}})
    assert (job.model.output, job.model.loss) == (output, loss)


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n", "{}\n"])
def test_an_empty_job_spec_is_refused(tmp_path, capsys, text):
    p = tmp_path / "empty.yaml"
    p.write_text(text)
    user_error(capsys, ["run", str(p)], "empty.yaml", "the job spec is empty")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("section,values,needles", [
    ("optimizer", {"name": "lbfgs"}, ["optimizer.name", "momentum, nesterov, adam", "'lbfgs'"]),
    ("optimizer", {"weight_decay": -1}, ["optimizer.weight_decay"]),
    ("optimizer", {"name": "nesterov", "momentum": 1.0}, ["optimizer.momentum"]),
    ("optimizer", {"schedule": "exponential"}, ["optimizer.schedule", "constant, inverse_time, step, cosine"]),
    ("training", {"eval_every": -5}, ["training.eval_every"]),
    ("training", {"seed": -1}, ["training.seed", "non-negative"]),
    ("training", {"seed": 1.5}, ["training.seed", "an integer"]),
    ("model", {"init": "orthogonal"}, ["model.init", "he, xavier, normal"]),
    ("scaling", {"aggregation": "gossip"}, ["scaling.aggregation", "central, allreduce"]),
    ("scaling", {"backend": "spark"}, ["scaling.backend", "local, mpi, ray"]),
    ("scaling", {"backend": "ray", "placement": "round-robin"}, ["scaling.placement", "auto, spread or pack"]),
    ("scaling", {"placement": "spread"}, ["scaling.placement", "scaling.backend: local", "use auto"]),
    ("failure", {"min_workers": 2}, ["failure.min_workers", "up to scaling.num_workers (1)", "got 2"]),
    ("failure", {"min_workers": -1}, ["failure.min_workers", "got -1"]),
])
def test_choices_and_ranges_name_the_field(tmp_path, capsys, section, values, needles):
    user_error(capsys, ["run", write_job(tmp_path, **{section: values})], *needles)


def test_going_on_with_fewer_workers_is_refused_where_a_launcher_restarts_every_rank(tmp_path, capsys):
    job = write_job(tmp_path, scaling={"backend": "mpi", "num_workers": 4}, failure={"min_workers": 2})
    user_error(capsys, ["run", job], "failure.min_workers", "needs scaling.backend: ray", "2 of 4")
    ray = from_dict({**SMALL, "scaling": {"backend": "ray", "num_workers": 4, "placement": "pack"},
                     "failure": {"min_workers": 2}})
    assert (ray.scaling.placement, ray.failure.min_workers) == ("pack", 2)


def test_new_keys_have_defaults_so_old_specs_run_unchanged():
    job = from_dict(SMALL)
    assert job.optimizer.name == "momentum" and job.optimizer.weight_decay == 0.0
    assert job.optimizer.betas == [0.9, 0.999] and job.optimizer.eps == 1e-8
    assert job.training.eval_every == 0


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../up", "x\\y"])
def test_name_is_one_folder_name(tmp_path, capsys, name):
    user_error(capsys, ["run", write_job(tmp_path), "--set", f"name={name}"], "name: expected one folder name")
    assert not (tmp_path / "up").exists()
