"""Fixtures shared by the tests."""
from __future__ import annotations

import glob
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from distffn.data import idx

from helpers import ADAM, REPO, free_port, processes_in_sessions, run_group, train_in_process

RAY_HEAD = os.path.join(REPO, "cluster", "ray-head.sh")
SLURM_CLUSTER = os.path.join(REPO, "cluster", "slurm", "local-cluster.sh")


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


# ---------------------------------------------------------------- clusters for `distffn submit`
# One of each per test session (each takes seconds to start); every test submits with a
# $DISTFFN_HOME and run folders of its own.

@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A Ray head of the session's own (`cluster/ray-head.sh up` on 127.0.0.1, token auth),
    stopped by its process session; yields (state dir, session id, env for clients)."""
    state = tmp_path_factory.mktemp("ray-head")
    env = {**os.environ, "RAY_HEAD_PORT": str(free_port()), "RAY_DASHBOARD_PORT": str(free_port()),
           "RAY_AGENT_PORT": str(free_port()), "START_TIMEOUT_S": "240",
           "RAY_HEAD_CPUS": "4", "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    up = run_group([RAY_HEAD, "up", str(state)], timeout=300, env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    session = int((state / "head.pgid").read_text())
    try:
        yield state, session, env
    finally:
        down = run_group([RAY_HEAD, "down", str(state)], timeout=60, env=env)
        assert down.returncode == 0, down.stderr
        assert processes_in_sessions({session}, within_s=20) == []


@pytest.fixture
def ray_client(ray_head, tmp_path):
    """Runs `distffn ARGS` as a user with the head's token and a $DISTFFN_HOME of its own;
    ``.profile`` is a `kind: ray` profile whose runs go under tmp_path."""
    state, _, env = ray_head
    profile = tmp_path / "ray.yaml"
    profile.write_text(f"kind: ray\naddress: http://127.0.0.1:{env['RAY_DASHBOARD_PORT']}\n"
                       f"runs: {tmp_path / 'runs'}\n")
    user = {**env, "DISTFFN_HOME": str(tmp_path / "home"), "HOME": str(tmp_path),
            "RAY_AUTH_TOKEN_PATH": str(state / "auth_token")}

    def distffn(*args, timeout=120, **env_changes):
        e = {k: v for k, v in {**user, **env_changes}.items() if v is not None}
        return run_group([sys.executable, "-m", "distffn", *map(str, args)], timeout=timeout, env=e)
    distffn.profile = profile
    distffn.env = user
    return distffn


@pytest.fixture(scope="session")
def slurm_cluster():
    """A single-node SLURM of the session's own (`cluster/slurm/local-cluster.sh up`: munged,
    slurmctld, slurmd), stopped by its pid files; yields the environment its clients need."""
    assert shutil.which("slurmctld") and shutil.which("munged"), \
        "SLURM's daemons are missing: apt-get install -y slurm-wlm munge (.ci/run does)"
    # munged wants every folder above its socket searchable by all (pytest's are 0700)
    state = pathlib.Path(tempfile.mkdtemp(prefix="distffn-slurm-", dir="/tmp"))
    state.chmod(0o755)
    env = {**os.environ, "DISTFFN_SLURMCTLD_PORT": str(free_port()), "DISTFFN_SLURMD_PORT": str(free_port()),
           "DISTFFN_SRUN_PORTS": "18820-18899", "DISTFFN_SLURM_KILLWAIT": "20",
           "DISTFFN_SLURM_CRED_EXPIRE": "5",
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    up = run_group([SLURM_CLUSTER, "up", str(state)], timeout=90, env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    env["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield env
    finally:
        down = run_group([SLURM_CLUSTER, "down", str(state)], timeout=120, env=env)
        assert down.returncode == 0, down.stdout + down.stderr
        status = run_group([SLURM_CLUSTER, "status", str(state)], timeout=30, env=env)
        assert "running" not in status.stdout.replace("not running", ""), status.stdout
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def slurm_client(slurm_cluster, tmp_path):
    """Runs `distffn ARGS` as a user of this SLURM, with a $DISTFFN_HOME of its own;
    ``.profile`` is a `kind: slurm` profile (1 node, 2 tasks) whose runs go under tmp_path."""
    profile = tmp_path / "slurm.yaml"
    profile.write_text(f"kind: slurm\npartition: debug\nnodes: 1\ntasks_per_node: 2\ntime: '00:10:00'\n"
                       f"command: {sys.executable} -m distffn\nruns: {tmp_path / 'runs'}\n")
    user = {**slurm_cluster, "DISTFFN_HOME": str(tmp_path / "home")}

    def distffn(*args, timeout=120):
        return run_group([sys.executable, "-m", "distffn", *map(str, args)], timeout=timeout, env=user)
    distffn.profile = profile
    distffn.env = user
    return distffn


# ---------------------------------------------------------------- test hosts (network namespaces)

TEST_HOSTS = os.path.join(REPO, "cluster", "test-hosts.sh")


class HostSet:
    """``make(n)`` brings up n test hosts (`cluster/test-hosts.sh`: network namespaces on a private
    bridge, 198.18.0.i on eth0, each with its own hostname, IPC and /dev/shm) and returns
    ``[(name, address), ...]``; ``run(i, *cmd, timeout)`` runs a command on host i, ``popen``
    starts one, ``lose(i)`` kills every process of host i, ``listeners(i)`` lists its sockets."""

    def __init__(self, state):
        self.state_dir = state
        self.env = {**os.environ, "HOSTS_STATE": str(state)}

    def make(self, n: int):
        up = run_group([TEST_HOSTS, "up", str(n), str(self.state_dir)], timeout=60, env=self.env)
        assert up.returncode == 0, up.stdout + up.stderr
        rows = (self.state_dir / "hosts").read_text().split("\n")
        self.hosts = [tuple(r.split()[1:3]) for r in rows if r.strip()]
        return self.hosts

    def run(self, i: int, *cmd, timeout: float = 60):
        return run_group([TEST_HOSTS, "run", str(i), *map(str, cmd)], timeout=timeout, env=self.env)

    def lose(self, i: int):
        """Every process of host i SIGKILLed at once, as when the machine is lost."""
        r = run_group([TEST_HOSTS, "lose", str(i)], timeout=30, env=self.env)
        assert r.returncode == 0, r.stdout + r.stderr

    def popen(self, i: int, *cmd, **kwargs):
        return subprocess.Popen([TEST_HOSTS, "run", str(i), *map(str, cmd)], env={**self.env, **kwargs.pop("env", {})},
                                start_new_session=True, **kwargs)

    def listeners(self, i: int) -> set:
        """Every TCP/UDP socket listening on host i now: {(address:port, process name, pid)}."""
        out = self.run(i, "ss", "-ltunpH", timeout=30).stdout
        return {(line.split()[4], name, int(pid)) for line in out.splitlines()
                for name, pid in re.findall(r'\("([^"]+)",pid=(\d+)', line)}

    def down(self):
        down = run_group([TEST_HOSTS, "down", str(self.state_dir)], timeout=60, env=self.env)
        assert down.returncode == 0, down.stdout + down.stderr


@pytest.fixture
def test_hosts(tmp_path_factory):
    """Test hosts (:class:`HostSet`) removed after the test, also when it fails."""
    yield from _host_set(tmp_path_factory)


@pytest.fixture(scope="module")
def module_hosts(tmp_path_factory):
    """The same, shared by a module's tests (a cluster on them starts once)."""
    yield from _host_set(tmp_path_factory)


def _host_set(tmp_path_factory):
    hosts = HostSet(tmp_path_factory.mktemp("hosts") / "state")
    try:
        yield hosts
    finally:
        hosts.down()
