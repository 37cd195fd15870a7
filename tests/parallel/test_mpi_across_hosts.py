"""Plain MPI across two test hosts (`cluster/test-hosts.sh`: network namespaces with their own
hostname, IPC and /dev/shm on a private bridge): MPICH's mpiexec (hydra) started on host 1 with a
host file naming both hosts, one rank on each, its proxy on host 2 started through
`cluster/test-hosts-ssh.sh` (hydra's ssh launcher), MPI over eth0 (`scaling.interface: eth0`).

Two ranks on two hosts train the 1-worker model in both aggregation modes; the ranks' MPI
listeners are on their host's eth0 address only (not loopback, not every address); SIGTERM to
mpiexec stops both ranks after the same step, checkpointed."""
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
    return [MPIEXEC, "-f", hosts.hostfile, "-launcher", "ssh", "-launcher-exec", LAUNCHER, "-iface", "eth0",
            "-n", "2", sys.executable, "-m", "distffn", "run", job, "--out", out, "--no-progress",
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
