"""Ray across two test hosts (network namespaces with their own hostname, IPC and /dev/shm, on a
private bridge: `cluster/test-hosts.sh`): a head on host 1 at 198.18.0.1 with token auth, a
worker node on host 2, each with 2 CPUs, started once for the module.

`distffn run` with workers spread over both hosts (or packed on one) in both aggregation modes
(`allreduce`: MPI between the actors over eth0) trains the 1-worker model; `distffn submit` to
the head's job server works with status, logs and stop; while the runs run, every listening
socket on both hosts is on the host's own address or loopback, or is Ray's behind its token.
Losing host 2 mid-run ends the run at once naming it (failure.max_failures: 0), or the run goes
on once the host is back and ends bit for bit as an uninterrupted one (max_failures: 1), or
goes on at once on host 1's workers with the same model (failure.min_workers)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import yaml

from helpers import REPO, assert_model_of_one, assert_same_model, final_params, job_dict

HEAD = os.path.join(REPO, "cluster", "ray-head.sh")
GCS, DASHBOARD, AGENT = 26379, 28265, 25236          # outside Ray's worker port range (10002-19999)
A = "198.18.0.1"
LONG = dict(training={"epochs": 100}, checkpoint={"every_steps": 30, "num_to_keep": 2})   # 300 steps


class TwoHostRay:
    """The module's cluster: a Ray head on host 1, a node on host 2 (restarted by
    :meth:`ensure_node` after a test lost the host); :meth:`distffn` runs the CLI on host 1."""

    def __init__(self, hosts, tmp):
        self.hosts, self.tmp = hosts, tmp
        (self.h1, self.a1), (self.h2, self.a2) = hosts.make(2)
        self.state = tmp / "head"
        self.head_env = {"RAY_HEAD_HOST": self.a1, "RAY_HEAD_PORT": str(GCS), "RAY_DASHBOARD_PORT": str(DASHBOARD),
                         "RAY_AGENT_PORT": str(AGENT), "START_TIMEOUT_S": "240", "RAY_HEAD_CPUS": "2", "STOP_GRACE_S": "3",
                         "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
        self.client = {"PATH": self.head_env["PATH"], "RAY_AUTH_MODE": "token",
                       "RAY_AUTH_TOKEN_PATH": str(self.state / "auth_token"), "RAY_USAGE_STATS_ENABLED": "0"}
        self.node = self.node_temp = self.node_log = None

    def head(self, action: str):
        r = self.hosts.run(1, "env", *(f"{k}={v}" for k, v in self.head_env.items()), HEAD, action, self.state,
                           timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr

    def ensure_node(self):
        """The node on host 2 up (again): `ray start --block` there, joined to the head."""
        if self.node is not None and self.node.poll() is None:
            return
        self.stop_node()
        self.node_temp = tempfile.mkdtemp(prefix="dfn-node-", dir="/tmp")     # Ray's sockets: ≤ 107 bytes a path
        log_path = self.tmp / "node.log"
        self.node_log = open(log_path, "w")
        self.node = self.hosts.popen(2, os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--block",
                                     f"--address={self.a1}:{GCS}", "--num-cpus=2", f"--temp-dir={self.node_temp}",
                                     "--disable-usage-stats", env={**os.environ, **self.client},
                                     stdout=self.node_log, stderr=self.node_log)
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log_path.read_text():
            assert self.node.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)

    def stop_node(self):
        if self.node is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.node.pid, sig)
                    self.node.wait(20)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
            self.node_log.close()
            shutil.rmtree(self.node_temp, ignore_errors=True)
        self.node = None

    def cli(self, *args) -> list:
        """`distffn ARGS` on host 1 with the head's token."""
        return ["env", *(f"{k}={v}" for k, v in self.client.items()), sys.executable, "-m", "distffn", *map(str, args)]

    def run_args(self, job, out, *sets) -> list:
        return self.cli("run", job, "--out", out, "--no-progress", "--set", "scaling.backend=ray",
                        "--set", f"scaling.address={A}:{GCS}", *(x for s in sets for x in ("--set", s)))


@pytest.fixture(scope="module")
def cluster(module_hosts, tmp_path_factory):
    c = TwoHostRay(module_hosts, tmp_path_factory.mktemp("two-host-ray"))
    c.head("up")
    try:
        c.ensure_node()
        yield c
    finally:
        c.stop_node()
        c.head("down")
        # the hosts' `down` ends whatever else runs on them


def write_job(tmp_path, **sections):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_dict(**sections)))
    return job


def run_listing(cluster, cmd, timeout=300):
    """Run ``cmd`` on host 1 and list, every 0.5 s while it runs, every listening socket on both
    hosts. Returns (CompletedProcess, {host index: {(address:port, process, whose)}}), ``whose``
    being "ray" for Ray's own processes (their command line runs Ray's code), else "run"."""
    seen = {1: set(), 2: set()}
    done = threading.Event()

    def sample():
        while not done.is_set():
            for i in seen:
                seen[i] |= {(address, name, whose(pid)) for address, name, pid in cluster.hosts.listeners(i)}
            done.wait(0.5)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        r = cluster.hosts.run(1, *cmd, timeout=timeout)
    finally:
        done.set()
        sampler.join(60)
    return r, seen


def whose(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return "gone"
    return "ray" if any(b"/ray/" in a or a.startswith(b"ray::") or a.endswith((b"/raylet", b"/gcs_server"))
                        for a in argv) else "run"


RAY_WORKER_PORTS = range(10002, 20000)      # Ray's core workers (the driver's and actors') listen here


def assert_listening_only_where_named(listening: dict, own: dict, mpi: bool):
    """On each host: its own address or loopback, or a port of Ray's (a core worker's, in any
    process; any port of Ray's own processes), which the cluster's token guards. MPI's
    listeners (in the rank actors, outside Ray's ports) bind the named interface's address."""
    for i, found in listening.items():
        assert found, f"nothing listened on host {i}?"
        for address, process, owner in found:
            host, port = address.rsplit(":", 1)
            host = host.strip("[]").removeprefix("::ffff:")
            assert host in (own[i], "127.0.0.1") or owner in ("ray", "gone") or int(port) in RAY_WORKER_PORTS, \
                (i, address, process, owner, sorted(found))
    ranks = {(a, i) for i, found in listening.items() for a, p, _ in found
             if p.startswith("ray::_RankActor") and int(a.rsplit(":", 1)[1]) not in RAY_WORKER_PORTS}
    if mpi:
        assert ranks and all(a.startswith(own[i] + ":") for a, i in ranks), ranks
    else:
        assert not ranks, ranks


def starts(out) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"start"' in line]


# ---------------------------------------------------------------- equivalence and placement

@pytest.mark.parametrize("mode", ["central", "allreduce"])
def test_two_workers_on_two_hosts_train_the_model_of_one_listening_only_where_named(cluster, tmp_path, reference,
                                                                                     mode):
    cluster.ensure_node()
    out = tmp_path / "run"
    r, listening = run_listing(cluster, cluster.run_args(write_job(tmp_path), out, "scaling.num_workers=2",
                                                         f"scaling.aggregation={mode}", "scaling.interface=eth0"))
    assert r.returncode == 0, r.stdout + r.stderr
    workers = json.loads((out / "workers.json").read_text())
    assert sorted(w["host"] for w in workers) == sorted([cluster.h1, cluster.h2])     # one worker on each host
    start = starts(out)[0]
    assert start["aggregation"] == mode and len(set(start["placement"])) == 2
    assert start["placement_strategy"] == "spread"                   # auto on two nodes
    assert yaml.safe_load((out / "job.yaml").read_text())["scaling"]["placement"] == "spread"
    assert_same_model(reference, out)
    assert_listening_only_where_named(listening, {1: cluster.a1, 2: cluster.a2}, mpi=mode == "allreduce")


def test_pack_places_both_workers_on_one_host(cluster, tmp_path, reference):
    cluster.ensure_node()
    out = tmp_path / "run"
    r = cluster.hosts.run(1, *cluster.run_args(write_job(tmp_path), out, "scaling.num_workers=2",
                                               "scaling.aggregation=central", "scaling.placement=pack"), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len({w["host"] for w in json.loads((out / "workers.json").read_text())}) == 1
    assert starts(out)[0]["placement_strategy"] == "pack"
    assert_same_model(reference, out)


NO_TOKEN = """
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=10)
    print("answered")
except urllib.error.HTTPError as e:
    print(e.code)
import ray
ray.init(address=sys.argv[2], logging_level="error")
print("connected")
"""


def test_a_client_without_the_token_is_refused(cluster):
    """From host 1, without the token: the job server answers 401, and ray.init fails."""
    r = cluster.hosts.run(1, "env", "-u", "RAY_AUTH_TOKEN", "-u", "RAY_AUTH_TOKEN_PATH", "-u", "RAY_AUTH_MODE",
                          f"PATH={cluster.client['PATH']}", "RAY_USAGE_STATS_ENABLED=0", "HOME=/nonexistent",
                          sys.executable, "-c", NO_TOKEN, f"http://{A}:{DASHBOARD}/api/jobs/", f"{A}:{GCS}",
                          timeout=120)
    lines = r.stdout.split()
    assert lines[:1] == ["401"] and "connected" not in lines and r.returncode != 0, r.stdout + r.stderr
    assert "Authentication token is missing or incorrect" in r.stderr, r.stderr[-2000:]


# ---------------------------------------------------------------- the job server on host 1

def test_submit_to_the_job_server_on_host_1_then_status_logs_and_stop(cluster, tmp_path):
    cluster.ensure_node()
    profile = tmp_path / "ray.yaml"
    profile.write_text(f"kind: ray\naddress: http://{A}:{DASHBOARD}\nruns: {tmp_path / 'runs'}\n")
    home = {"DISTFFN_HOME": str(tmp_path / "home"), "HOME": str(tmp_path)}

    def distffn(*args, timeout=120):
        return cluster.hosts.run(1, "env", *(f"{k}={v}" for k, v in home.items()), *cluster.cli(*args),
                                 timeout=timeout)
    job = write_job(tmp_path, training={"epochs": 100_000}, checkpoint={"every_steps": 1_000_000},
                    scaling={"backend": "ray", "num_workers": 2, "aggregation": "central"})
    r = distffn("submit", job, "--cluster", profile)
    assert r.returncode == 0, r.stdout + r.stderr
    job_id = r.stdout.strip().splitlines()[-1]
    deadline = time.monotonic() + 180
    while True:
        status = json.loads(distffn("status", job_id, "--json").stdout)
        if status["state"] == "RUNNING" and (status.get("step") or 0) >= 30:
            break
        assert status["state"] in ("PENDING", "RUNNING") and time.monotonic() < deadline, status
        time.sleep(1)
    run_dir = status["run_dir"]
    assert sorted(w["host"] for w in json.load(open(os.path.join(run_dir, "workers.json")))) == \
        sorted([cluster.h1, cluster.h2])
    assert distffn("status", job_id).stdout.startswith("RUNNING ")
    assert "2 worker(s) on ray" in distffn("logs", job_id).stdout
    stop = distffn("stop", job_id)
    assert stop.returncode == 0 and stop.stdout.startswith("STOPPED "), stop.stdout + stop.stderr
    steps = sorted(int(n[5:13]) for n in os.listdir(os.path.join(run_dir, "checkpoints")))
    assert steps[-1] > 0 and steps[-1] == json.load(open(os.path.join(run_dir, "summary.json")))["step"]
    assert "stopped by SIGTERM" in distffn("logs", job_id).stdout


# ---------------------------------------------------------------- losing host 2

def lose_host_2_mid_run(cluster, cmd, out, timeout=300, then=None, then_after=None):
    """Start ``cmd`` on host 1; once it has 3 checkpoints and workers on host 2, kill every
    process of host 2, then call ``then`` (once the run's stderr says ``then_after``, where
    given). Returns (returncode, stderr, seconds from the loss to the end). Its output goes
    to a file (a pipe nobody reads could fill and stall it)."""
    log = out.parent / f"{out.name}.stderr"
    with open(log, "w") as err:
        run = cluster.hosts.popen(1, *cmd, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + timeout
        ckpts = out / "checkpoints"
        while not (out / "workers.json").exists() or not ckpts.is_dir() or len(os.listdir(ckpts)) < 3:
            if run.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the run ended or took over {timeout} s before its third checkpoint: {log.read_text()}")
            time.sleep(0.1)
        assert cluster.h2 in [w["host"] for w in json.loads((out / "workers.json").read_text())]
        lost_at = time.monotonic()
        cluster.hosts.lose(2)
        while then_after is not None and then_after not in log.read_text():
            if run.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the run ended or took over {timeout} s before saying {then_after!r}: {log.read_text()}")
            time.sleep(0.1)
        if then is not None:
            then()
        run.wait(timeout=max(1.0, deadline - time.monotonic()))
        return run.returncode, log.read_text(), time.monotonic() - lost_at
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(10)


def test_a_lost_host_ends_the_run_within_the_step_timeout_naming_it(cluster, tmp_path):
    """failure.max_failures: 0 (the default): every process of host 2 killed mid-run ends the run
    with exit 1 within scaling.timeout_s + 10 s and one line naming host 2's worker."""
    cluster.ensure_node()
    out = tmp_path / "run"
    cmd = cluster.run_args(write_job(tmp_path, **LONG), out, "scaling.num_workers=2", "scaling.aggregation=central",
                           "scaling.timeout_s=20")
    code, err, took = lose_host_2_mid_run(cluster, cmd, out)
    assert code == 1, err
    errors = [line for line in err.splitlines() if line.startswith("distffn: error:")]
    assert len(errors) == 1 and cluster.h2 in errors[0], err
    assert took <= 20 + 10, took


def test_with_max_failures_the_run_goes_on_when_the_host_is_back_and_ends_bit_for_bit(cluster, tmp_path):
    """failure.max_failures: 1: host 2 lost mid-run and brought back (its Ray node started again):
    the run places its 2 workers again, goes on from the newest checkpoint and ends with the
    model of an uninterrupted run, bit for bit."""
    cluster.ensure_node()
    job = write_job(tmp_path, **LONG, failure={"max_failures": 1})
    sets = ("scaling.num_workers=2", "scaling.aggregation=central", "scaling.timeout_s=90")
    full, cut = tmp_path / "full", tmp_path / "cut"
    r = cluster.hosts.run(1, *cluster.run_args(job, full, *sets), timeout=300)
    assert r.returncode == 0, r.stderr
    # the host comes back once the run has noticed its loss, as a rebooted machine would: a
    # node started again at once can register while the head still counts the lost one alive
    code, err, took = lose_host_2_mid_run(cluster, cluster.run_args(job, cut, *sets), cut, then=cluster.ensure_node,
                                          then_after="restart 1 of 1")
    assert code == 0, err + "\nhost 2's Ray node:\n" + (cluster.tmp / "node.log").read_text()[-3000:]
    assert "restart 1 of 1 (failure.max_failures) from the newest checkpoint" in err and cluster.h2 in err
    lives = starts(cut)
    assert [s["num_workers"] for s in lives] == [2, 2] and len(set(lives[1]["placement"])) == 2
    print(f"host lost and back: {lives[1]['restarted_after']}, {took:.1f} s from the loss to the end")
    a, b = final_params(full), final_params(cut)
    assert a[1]["step"] == b[1]["step"] == 300
    for name in a[0]:
        assert (a[0][name] == b[0][name]).all(), name


def test_elastic_a_run_that_loses_a_host_goes_on_with_the_other_ones_workers(cluster, tmp_path):
    """failure.min_workers: 2 with 4 workers, 2 on each host: host 2 lost mid-run; the run goes
    on at once with host 1's 2 workers from the newest checkpoint (no replacement awaited), the
    global batch unchanged, and trains the 1-worker model within the N-vs-1 bound."""
    cluster.ensure_node()
    job = write_job(tmp_path, **LONG, failure={"min_workers": 2})
    out = tmp_path / "run"
    cmd = cluster.run_args(job, out, "scaling.num_workers=4", "scaling.aggregation=central", "scaling.timeout_s=20")
    code, err, took = lose_host_2_mid_run(cluster, cmd, out)
    assert code == 0, err
    assert "going on with the 2 workers left of 4 (failure.min_workers: 2)" in err, err
    lives = starts(out)
    assert [s["num_workers"] for s in lives] == [4, 2]
    assert {w["host"] for w in json.loads((out / "workers.json").read_text())} == {cluster.h1}
    cost = lives[1]["restarted_after"]
    assert cost["num_workers_before"] == 4 and cost["down_s"] > 0
    found, bound = assert_model_of_one(out, tmp_path, workers=(4, 2), **LONG)
    print(f"elastic: {cost}; |Θ - Θ_1| = {found:.2e} (bound {bound:.2e}); {took:.1f} s from the loss to the end")
