"""Plain MPI across two test hosts (`cluster/test-hosts.sh`: network namespaces with their own
hostname, IPC and /dev/shm on a private bridge): MPICH's mpiexec (hydra) started on host 1 with a
host file naming both hosts, one rank on each, its proxy on host 2 started through
`cluster/test-hosts-ssh.sh` (hydra's ssh launcher), MPI over eth0 (`scaling.interface: eth0`).

Two ranks on two hosts train the 1-worker model in both aggregation modes; the ranks' MPI
listeners are on their host's eth0 address only (not loopback, not every address); SIGTERM to
mpiexec stops both ranks after the same step, checkpointed. Ranks bound to cores of their own
(`mpiexec -bind-to core`, `taskset`, SLURM's binding) take one BLAS thread per core they may use,
or as many as the user exported (`-genv OMP_NUM_THREADS 1`: test hosts share this machine's cores)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from distffn.parallel.mpi import blas_threads_per_rank, exported_threads

from helpers import MPIEXEC, REPO, assert_same_model, job_dict, needs_mpi

LAUNCHER = os.path.join(REPO, "cluster", "test-hosts-ssh.sh")

pytestmark = needs_mpi


@pytest.fixture(scope="module")
def hosts(module_hosts, tmp_path_factory):
    """Two test hosts and a host file naming them, one slot each."""
    names = module_hosts.make(2)
    hostfile = tmp_path_factory.mktemp("mpi-hosts") / "hosts"
    hostfile.write_text("".join(f"{name}:1\n" for name, _ in names))
    module_hosts.names, module_hosts.hostfile = names, hostfile
    return module_hosts


def mpiexec_on_host_1(hosts, job, out, *sets) -> list:
    """`mpiexec -f HOSTFILE` (hydra, ssh launcher = the test hosts' one) of `distffn run`, as typed on host 1."""
    # one BLAS thread a rank: each test host counts this machine's cores as its own
    return [MPIEXEC, "-f", hosts.hostfile, "-launcher", "ssh", "-launcher-exec", LAUNCHER, "-iface", "eth0",
            "-genv", "OMP_NUM_THREADS", "1", "-n", "2", sys.executable, "-m", "distffn", "run", job, "--out", out, "--no-progress",
            "--set", "scaling.backend=mpi", "--set", "scaling.interface=eth0", *(x for s in sets for x in ("--set", s))]


def write_job(tmp_path, **sections):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_dict(**sections)))
    return job


@pytest.mark.parametrize("mode", ["allreduce", "central"])
def test_two_ranks_on_two_hosts_train_the_model_of_one(hosts, tmp_path, reference, mode):
    out = tmp_path / "run"
    r = hosts.run(1, *mpiexec_on_host_1(hosts, write_job(tmp_path), out, f"scaling.aggregation={mode}"), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    workers = json.loads((out / "workers.json").read_text())
    assert [(w["rank"], w["host"]) for w in workers] == [(0, hosts.names[0][0]), (1, hosts.names[1][0])]
    assert_same_model(reference, out)


def listening(hosts, i: int) -> list:
    """[(address:port, {pid: process name})] of every TCP socket listening on host i now."""
    found = []
    for line in hosts.run(i, "ss", "-ltnpH", timeout=30).stdout.splitlines():
        found.append((line.split()[3], {int(pid): name for name, pid in re.findall(r'\("([^"]+)",pid=(\d+)', line)}))
    return found


def test_mpi_keeps_to_the_named_interface_and_sigterm_stops_both_hosts_at_one_step(hosts, tmp_path):
    out = tmp_path / "run"
    job = write_job(tmp_path, training={"epochs": 100_000})
    run = hosts.popen(1, *mpiexec_on_host_1(hosts, job, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      text=True)
    try:
        deadline = time.monotonic() + 90
        while not (out / "workers.json").exists():
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.1)
        workers = {w["pid"]: i for i, w in enumerate(json.loads((out / "workers.json").read_text()), 1)}
        # every socket a rank listens on, on its host (both ranks are past MPI's start-up)
        ranks_listen = {}
        for pid, i in workers.items():
            for address, holders in listening(hosts, i):
                # hydra's control port (0.0.0.0) reaches rank 0 as a descriptor it inherits: hydra's, not MPI's
                if pid in holders and "mpiexec" not in holders.values():
                    ranks_listen.setdefault(i, []).append(address)
        os.kill(run.pid, signal.SIGTERM)            # mpiexec: hydra passes it to both ranks
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(10)
    assert sorted(ranks_listen) == [1, 2], ranks_listen
    for i, addresses in ranks_listen.items():
        assert all(a.rsplit(":", 1)[0] == hosts.names[i - 1][1] for a in addresses), (i, addresses)
    step = json.loads((out / "summary.json").read_text())["step"]
    assert run.returncode == 143 and f"stopped by SIGTERM after step {step}," in err, err
    assert sorted(os.listdir(out / "checkpoints"))[-1] == f"step-{step:08d}.npz"


def test_blas_threads_follow_the_cores_a_rank_may_run_on():
    """Threads per rank from its CPU affinity and those of the ranks on its node: the node's
    cores shared when nobody binds, a rank's own cores when each has its own (os.cpu_count()
    would give each of two ranks bound to one core each the machine's every core)."""
    both, first, second = frozenset({0, 1}), frozenset({0}), frozenset({1})
    assert blas_threads_per_rank(both, [both, both]) == 1            # unbound, 2 ranks on 2 cores
    assert blas_threads_per_rank(both, [both]) == 2                  # alone on the node
    assert blas_threads_per_rank(first, [first, second]) == 1        # bound: its own core
    assert blas_threads_per_rank(first, [first]) == 1                # one rank a host, bound to one core
    four = frozenset(range(4))
    assert blas_threads_per_rank(four, [four, frozenset(range(4, 8))]) == 4     # 4 cores each (srun -c 4)
    assert blas_threads_per_rank(four, [four] * 8) == 1                         # oversubscribed: at least 1


def test_an_exported_thread_count_wins(monkeypatch):
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert exported_threads() is None
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert exported_threads() == 3
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")         # OpenBLAS's own variable first
    assert exported_threads() == 1
    for junk in ("0", "", "two"):
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", junk)
        assert exported_threads() == 3
