"""Which mpiexec distffn starts and which network MPI may use."""
from __future__ import annotations

import os

from distffn.parallel.mpi_env import find_mpiexec, network_env

from helpers import needs_mpi


@needs_mpi
def test_one_node_runs_start_mpichs_forker():
    assert os.path.basename(find_mpiexec(single_node=True)) == "mpiexec.gforker"
    assert os.path.basename(find_mpiexec()) == "mpiexec"


def test_shared_memory_only_unless_an_interface_is_named(monkeypatch):
    monkeypatch.delenv("UCX_TLS", raising=False)
    monkeypatch.delenv("UCX_NET_DEVICES", raising=False)
    assert network_env(None) == {"UCX_TLS": "self,sm"}
    assert network_env("eth1") == {"UCX_TLS": "self,sm,tcp", "UCX_NET_DEVICES": "eth1"}
    monkeypatch.setenv("UCX_TLS", "self,sm,rc")                     # what the user exported wins
    assert network_env(None) == {"UCX_TLS": "self,sm,rc"}
