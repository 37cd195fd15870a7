"""SLURM across two test hosts (`cluster/test-hosts.sh`: network namespaces with their own
hostname, IPC and /dev/shm on a private bridge, 198.18.0.i on eth0, sharing the filesystem):
slurmctld and a slurmd on host 1, a slurmd on host 2, one munged whose socket lies on the shared
filesystem (`cluster/slurm/local-cluster.sh` with DISTFFN_SLURM_NODES and DISTFFN_SLURM_ON),
started once for the module and stopped by its pid files.

`distffn submit` run on host 1 with a profile of 2 nodes × 1 task starts one rank on each host
through `srun --mpi=pmi2`, MPI between them over eth0, and trains the 1-worker model; while it
runs, every listening socket on both hosts is on the host's own address; `distffn stop` ends it
checkpointed at its current step; `scontrol requeue` restarts it, and it resumes from the newest
checkpoint to the model of an uninterrupted run, bit for bit."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import pytest
import yaml

from helpers import (
    REPO,
    assert_same_as_uninterrupted_mpi_run,
    assert_same_model,
    job_dict,
    processes_naming,
    run_group,
    running_past,
    wait_for_status,
)

TEST_HOSTS = os.path.join(REPO, "cluster", "test-hosts.sh")
SLURM_CLUSTER = os.path.join(REPO, "cluster", "slurm", "local-cluster.sh")
FINISHED = {"SUCCEEDED", "FAILED", "STOPPED"}


class TwoHostSlurm:
    """The module's cluster on ``hosts`` (:class:`conftest.HostSet`); :meth:`on_host` runs a
    command on a host (SLURM's clients on host 1: the controller's address is reachable only
    from the hosts)."""

    def __init__(self, hosts):
        self.hosts = hosts
        self.nodes = hosts.make(2)
        self.env = {**hosts.env, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
        # munged wants every folder above its socket searchable by all (pytest's are 0700)
        self.state = tempfile.mkdtemp(prefix="distffn-slurm2-", dir="/tmp")
        os.chmod(self.state, 0o755)

    def on_host(self, i, *cmd, timeout=60, env=None):
        return run_group([TEST_HOSTS, "run", str(i), *map(str, cmd)], timeout=timeout, env=env or self.env)

    def slurm(self, action, timeout):
        env = {**self.env, "DISTFFN_SLURM_NODES": " ".join(f"{name}={addr}" for name, addr in self.nodes),
               "DISTFFN_SLURM_ON": f"{TEST_HOSTS} run %i", "DISTFFN_SLURM_KILLWAIT": "20",
               "DISTFFN_SLURM_CRED_EXPIRE": "5"}
        return run_group([SLURM_CLUSTER, action, self.state], timeout=timeout, env=env)

    def down(self):
        try:
            down = self.slurm("down", timeout=120)
            assert down.returncode == 0, down.stdout + down.stderr
            status = self.slurm("status", timeout=60)
            assert "running" not in status.stdout.replace("not running", ""), status.stdout
        finally:
            shutil.rmtree(self.state, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(module_hosts):
    """Up once for the module; stopped by its pid files before the hosts go (also on failure)."""
    assert shutil.which("slurmctld") and shutil.which("munged"), \
        "SLURM's daemons are missing: apt-get install -y slurm-wlm munge (.ci/run does)"
    c = None
    try:
        c = TwoHostSlurm(module_hosts)
        up = c.slurm("up", timeout=120)
        assert up.returncode == 0, up.stdout + up.stderr
        c.env["SLURM_CONF"] = os.path.join(c.state, "slurm.conf")
        yield c
    finally:
        if c is not None:
            c.down()


@pytest.fixture
def client(cluster, tmp_path):
    """`distffn ARGS` on host 1 as a user with a $DISTFFN_HOME of its own; ``.profile`` asks for
    2 nodes × 1 task, runs under tmp_path (the shared filesystem)."""
    profile = tmp_path / "slurm.yaml"
    profile.write_text(f"kind: slurm\npartition: debug\nnodes: 2\ntasks_per_node: 1\ntime: '00:10:00'\n"
                       f"command: {sys.executable} -m distffn\nruns: {tmp_path / 'runs'}\n")
    user = {**cluster.env, "DISTFFN_HOME": str(tmp_path / "home")}

    def distffn(*args, timeout=120):
        return cluster.on_host(1, sys.executable, "-m", "distffn", *args, timeout=timeout, env=user)
    distffn.profile = profile
    return distffn


def write(tmp_path, **sections):
    """The equivalence job with MPI on eth0 between the nodes, changed by ``sections``."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_dict(scaling={"interface": "eth0"}, **sections)))
    return str(path)


def submit(distffn, job):
    r = distffn("submit", job, "--cluster", distffn.profile)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def test_a_job_on_two_nodes_places_a_rank_on_each_and_trains_the_one_worker_model(client, cluster, reference,
                                                                                   tmp_path):
    job_id = submit(client, write(tmp_path))
    status = wait_for_status(client, job_id, lambda s: s["state"] in FINISHED)
    assert status["state"] == "SUCCEEDED", f"{status}\n{client('logs', job_id).stdout}"
    run_dir = status["run_dir"]
    names = [name for name, _ in cluster.nodes]
    workers = json.load(open(os.path.join(run_dir, "workers.json")))
    assert [w["host"] for w in workers] == names, workers          # rank i on host i+1
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        start = json.loads(f.readline())
    assert start["placement"] == names and start["backend"] == "mpi" and start["num_workers"] == 2
    assert_same_model(reference, run_dir)


def test_stop_checkpoints_the_current_step_on_both_nodes(client, cluster, tmp_path):
    job_id = submit(client, write(tmp_path, training={"epochs": 100000}, checkpoint={"every_steps": 1000000}))
    status = wait_for_status(client, job_id, running_past(30))
    assert status["state"] == "RUNNING", status
    run_dir = status["run_dir"]
    # while it runs, nothing on either host listens beyond the host's own address: SLURM's
    # daemons, srun and the ranks alike (MPI kept to eth0: UCX left to itself also listens on lo)
    for i, (_, address) in enumerate(cluster.nodes, 1):
        listening = cluster.hosts.listeners(i)
        rank = os.path.basename(sys.executable)[:15]             # its name as ss shows it (comm)
        assert {name for _, name, _ in listening} >= {"slurmd", rank}, listening
        assert {a.rsplit(":", 1)[0] for a, _, _ in listening} == {address}, (i, listening)
    r = client("stop", job_id)
    assert r.returncode == 0 and r.stdout.startswith("STOPPED "), r.stdout + r.stderr
    status = wait_for_status(client, job_id, lambda s: s["state"] in FINISHED)
    assert status["state"] == "STOPPED" and "CANCELLED" in status["detail"], status
    logs = client("logs", job_id).stdout
    assert "exit code 143" in status["detail"], f"{status}\n{logs}"
    for rank, (host, _) in enumerate(cluster.nodes):              # each ended itself, none was killed
        assert f"{host}: task {rank}: Exited with exit code 143" in logs, logs[-2000:]
    steps = sorted(int(n[5:13]) for n in os.listdir(os.path.join(run_dir, "checkpoints")))
    assert steps[-1] >= 30 and steps[-1] == json.load(open(os.path.join(run_dir, "summary.json")))["step"]
    assert f"stopped by SIGTERM after step {steps[-1]}" in logs
    assert processes_naming(run_dir, within_s=15) == []


def test_a_requeued_job_resumes_on_both_nodes_and_ends_bit_for_bit(client, cluster, tmp_path):
    job = write(tmp_path, training={"epochs": 600}, checkpoint={"every_steps": 1000000})
    job_id = submit(client, job)
    status = wait_for_status(client, job_id, running_past(150))
    assert status["state"] == "RUNNING", status
    requeue = cluster.on_host(1, "scontrol", "requeue", status["native_id"], timeout=30)
    assert requeue.returncode == 0, requeue.stderr
    status = wait_for_status(client, job_id, lambda s: s["state"] in FINISHED, timeout=240)
    logs = client("logs", job_id).stdout
    assert status["state"] == "SUCCEEDED", (status, logs)
    assert "requeued (restart 1)" in logs and "resuming from" in logs
    assert "stopped by SIGTERM after step" in logs             # the first run checkpointed, not killed
    assert_same_as_uninterrupted_mpi_run(job, status["run_dir"], tmp_path)


def test_a_job_on_two_nodes_needs_the_network_interface_named(client, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_dict()))
    r = client("submit", str(path), "--cluster", client.profile)
    assert r.returncode == 2 and "scaling.interface" in r.stderr and "2 nodes" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
