"""The backend registry and ``scaling.aggregation: auto`` (the default)."""
from __future__ import annotations

import json

import pytest

from distffn import parallel
from distffn.errors import UserError
from distffn.jobspec import from_dict
from distffn.parallel import resolve_aggregation

from helpers import job_dict, train_in_process


def resolved(monkeypatch=None, **scaling):
    return resolve_aggregation(from_dict(job_dict(scaling=scaling)))


def test_auto_is_allreduce_where_mpi_can_carry_the_gradients(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolved(backend="mpi") == "allreduce"
    assert resolved(backend="ray") == "allreduce"                              # its own Ray
    assert resolved(backend="ray", address="10.0.0.5:6379") == "central"       # no interface named
    assert resolved(backend="ray", address="10.0.0.5:6379", interface="eth0") == "allreduce"
    assert resolved(backend="ray", aggregation="central") == "central"         # a choice is kept


def test_auto_is_central_on_ray_without_mpi(monkeypatch):
    def missing():
        raise UserError("no mpi4py")
    monkeypatch.setattr(parallel, "check_mpi4py", missing)
    assert resolved(backend="ray") == "central"


def test_the_default_is_auto_and_a_run_records_the_mode_it_used(tmp_path):
    assert from_dict(job_dict()).scaling.aggregation == "auto"
    out = tmp_path / "run"
    train_in_process(out, scaling={"num_workers": 2})
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["aggregation"] == "allreduce"


def test_unknown_aggregation_lists_auto_first():
    with pytest.raises(UserError, match="scaling.aggregation: expected one of auto, central, allreduce"):
        from_dict(job_dict(scaling={"aggregation": "ring"}))
