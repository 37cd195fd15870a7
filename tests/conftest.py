"""Fixtures shared by the tests."""
from __future__ import annotations

import glob
import os

import pytest

from distffn.data import idx

from helpers import ADAM, train_in_process


@pytest.fixture
def no_system_data(tmp_path, monkeypatch):
    """Point the system folder and $DISTFFN_DATA at empty folders."""
    empty = tmp_path / "system"
    empty.mkdir()
    monkeypatch.setattr(idx, "SYSTEM_DATA_DIR", str(empty))
    monkeypatch.delenv("DISTFFN_DATA", raising=False)
    return empty


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The equivalence job on 1 local worker: what N workers anywhere must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train_in_process(out)
    return out


@pytest.fixture(scope="module")
def adam_reference(tmp_path_factory):
    """The same with Adam, whose state (two moments, the step count) lives with the aggregator."""
    out = tmp_path_factory.mktemp("ref-adam") / "run"
    train_in_process(out, optimizer=ADAM)
    return out


@pytest.fixture(scope="module")
def ray_instance():
    """One embedded Ray instance for the module (starting one takes seconds)."""
    pytest.importorskip("ray")
    from distffn.parallel.ray_cluster import _import_ray
    ray = _import_ray(local=True)
    ray.init(include_dashboard=False, logging_level="warning", num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture
def cupy():
    """CuPy with a visible CUDA GPU, else the test is skipped (tests that take it are marked
    ``gpu``: run them with ``pytest -m gpu`` on a GPU machine)."""
    cupy = pytest.importorskip("cupy")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:
        count = 0
    if count < 1:
        pytest.skip("no CUDA GPU")
    return cupy


@pytest.fixture(autouse=True)
def no_leaked_mpi_shared_memory():
    """MPICH leaves its /dev/shm segments behind when a rank is killed or aborted (the failure
    tests do both on purpose); remove the ones that appeared during the test."""
    before = set(glob.glob("/dev/shm/mpich_shm_*"))
    yield
    for path in set(glob.glob("/dev/shm/mpich_shm_*")) - before:
        try:
            os.unlink(path)
        except OSError:
            pass
