"""Ray across two test hosts (network namespaces with their own hostname, IPC and /dev/shm, on a
private bridge: `cluster/test-hosts.sh`): a head on host 1 at 198.18.0.1 with token auth, a
worker node on host 2, and `distffn run` with 2 workers, one per host, in both aggregation
modes (`allreduce`: MPI between the actors over eth0). The model equals the 1-worker run's
within the N-vs-1 bound, and the workers ran on both hosts. Losing host 2 mid-run ends the run
at once, naming it."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from helpers import REPO, assert_same_model, job_dict

HEAD = os.path.join(REPO, "cluster", "ray-head.sh")
GCS, DASHBOARD, AGENT = 26379, 28265, 25236          # outside Ray's worker port range (10002-19999)


@pytest.fixture
def two_host_ray(test_hosts, tmp_path):
    """A Ray head on host 1 and a node on host 2; yields (env for clients on host 1, host names)."""
    (h1, a1), (h2, _) = test_hosts.make(2)
    state = tmp_path / "head"
    env = {"RAY_HEAD_HOST": a1, "RAY_HEAD_PORT": str(GCS), "RAY_DASHBOARD_PORT": str(DASHBOARD),
           "RAY_AGENT_PORT": str(AGENT), "START_TIMEOUT_S": "240", "RAY_HEAD_CPUS": "1",
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    up = test_hosts.run(1, "env", *(f"{k}={v}" for k, v in env.items()), HEAD, "up", state, timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    client = {**os.environ, "PATH": env["PATH"], "RAY_AUTH_MODE": "token",
              "RAY_AUTH_TOKEN_PATH": str(state / "auth_token"), "RAY_USAGE_STATS_ENABLED": "0"}
    node_temp = tempfile.mkdtemp(prefix="dfn-node-", dir="/tmp")    # Ray's sockets: ≤ 107 bytes a path
    log = open(tmp_path / "node.log", "w")
    node = test_hosts.popen(2, os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--block",
                            f"--address={a1}:{GCS}", "--num-cpus=1", f"--temp-dir={node_temp}",
                            "--disable-usage-stats", env=client, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in (tmp_path / "node.log").read_text():
            assert node.poll() is None and time.monotonic() < deadline, (tmp_path / "node.log").read_text()
            time.sleep(0.2)
        yield client, (h1, h2)
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(node.pid, sig)
                node.wait(20)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()
        shutil.rmtree(node_temp, ignore_errors=True)
        down = test_hosts.run(1, "env", *(f"{k}={v}" for k, v in env.items()), HEAD, "down", state, timeout=60)
        assert down.returncode == 0, down.stderr
        # the fixture's `down` ends whatever else runs on the hosts


@pytest.mark.parametrize("mode", ["central", "allreduce"])
def test_two_workers_on_two_hosts_train_the_model_of_one(two_host_ray, test_hosts, tmp_path, reference, mode):
    client, hosts = two_host_ray
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_dict()))
    out = tmp_path / "run"
    r = test_hosts.run(1, "env", *(f"{k}={v}" for k, v in client.items() if k.startswith(("RAY_", "PATH"))),
                       sys.executable, "-m", "distffn", "run", job, "--out", out, "--no-progress",
                       "--set", "scaling.backend=ray", "--set", "scaling.num_workers=2",
                       "--set", f"scaling.address=198.18.0.1:{GCS}", "--set", f"scaling.aggregation={mode}",
                       "--set", "scaling.interface=eth0", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    workers = json.loads((out / "workers.json").read_text())
    assert sorted(w["host"] for w in workers) == sorted(hosts)          # one worker on each host
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["aggregation"] == mode and len(set(start["placement"])) == 2
    assert_same_model(reference, out)


def test_a_lost_host_ends_the_run_within_the_step_timeout_naming_it(two_host_ray, test_hosts, tmp_path):
    """failure.max_failures: 0 (the default): every process of host 2 killed mid-run ends the run
    with exit 1 within scaling.timeout_s + 10 s and one line naming host 2's worker."""
    client, (_, h2) = two_host_ray
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_dict(training={"epochs": 100_000})))
    out = tmp_path / "run"
    run = test_hosts.popen(1, "env", *(f"{k}={v}" for k, v in client.items() if k.startswith(("RAY_", "PATH"))),
                           sys.executable, "-m", "distffn", "run", job, "--out", out, "--no-progress",
                           "--set", "scaling.backend=ray", "--set", "scaling.num_workers=2",
                           "--set", f"scaling.address=198.18.0.1:{GCS}", "--set", "scaling.aggregation=central",
                           "--set", "scaling.timeout_s=20", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoints" / "step-00000000.npz").exists() or not (out / "workers.json").exists():
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()[1]
            time.sleep(0.2)
        assert h2 in [w["host"] for w in json.loads((out / "workers.json").read_text())]
        lost_at = time.monotonic()
        test_hosts.lose(2)
        _, err = run.communicate(timeout=20 + 10 + 30)
        took = time.monotonic() - lost_at
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(10)
    assert run.returncode == 1, err
    errors = [line for line in err.splitlines() if line.startswith("distffn: error:")]
    assert len(errors) == 1 and h2 in errors[0], err
    assert took <= 20 + 10, took
