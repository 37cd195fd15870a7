#!/usr/bin/env python
"""Two test hosts: their link (round trip, bandwidth) and step times of 2 workers on one host
against 2 workers across the two, per aggregation, with the α-β projection fitted to them.

Two test hosts (`cluster/test-hosts.sh up 2`, HOSTS_SUBNET 198.19.5 unless --subnet says
otherwise, a state folder of this run's own, removed at the end whatever happens): network
namespaces joined by veth pairs on a private bridge, sharing this machine's cores.

1. The link, each round: a TCP ping-pong of --rtt-bytes messages (TCP_NODELAY, --rtt-count
   round trips after 200 untimed ones; the per-round median) and a bulk TCP stream of
   --bulk-mib MiB in 1 MiB writes (seconds from the first write to the receiver's
   acknowledgement of the last byte), host 1 → host 2 over eth0 and, for reference, over
   loopback inside host 1; then MPI between two ranks (mpi4py, MPICH over UCX): a ping-pong of
   8 bytes and an Allreduce of the Fashion-MNIST model's ΔΘ (814,090 float32, 3.26 MB), on one
   host and across the two.
2. Step times: `distffn run jobs/fashion-mnist-mlp.yaml` (constant lr 0.05, μ 0.9) with
   epochs of --steps steps (data.limit_train = B × steps), 1 untimed epoch and 2 timed ones, at
   each batch size, on 1 worker (host 1, one BLAS thread) and on 2 workers placed on one host or
   across two: plain MPI (MPICH's hydra `mpiexec -f HOSTFILE` with the test hosts' ssh
   launcher, `allreduce`), Ray `central` and Ray `allreduce` (a Ray head on host 1 and a node
   on host 2, started once, declaring 2 and 1 CPUs: one CPU per worker either way;
   `scaling.placement: pack` or `spread`). Every worker computes with one BLAS thread (MPI:
   `-genv OMP_NUM_THREADS 1`, as each test host counts the machine's 2 cores as its own); every
   run's MPI keeps to eth0 (`scaling.interface`). Step time = a timed epoch's
   training time (evaluation excluded) / its steps, the median of the two; configurations
   alternate (their order rotates every round); medians, and medians of per-round ratios.
3. The fit: the step-time model of distffn.sweep.projection (fixed + per-sample compute from
   the 1-worker runs) with the measured link (α = half the TCP round trip, β = 1 / the TCP
   bandwidth) and, per aggregation, the `sync` term fitted to the cross-host runs; the
   projection to --most-workers workers beside the measured points: a figure (--png) and the
   table printed and written to --json.

    python bench/bench_hosts.py --rounds 5 --json bench/results/hosts.json --png bench/results/hosts_step_time.png
    python bench/bench_hosts.py --rounds 1 --batch-sizes 512 --steps 10 --bulk-mib 64   # smoke test, ~2 min
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import benchlib
from benchlib import GRAD_FLOATS, JOB, REPO, log

TEST_HOSTS = os.path.join(REPO, "cluster", "test-hosts.sh")
SSH = os.path.join(REPO, "cluster", "test-hosts-ssh.sh")
RAY_HEAD = os.path.join(REPO, "cluster", "ray-head.sh")
BIN = os.path.dirname(sys.executable)
MPIEXEC = os.path.join(BIN, "mpiexec")
LINK_PORT, GCS, DASHBOARD, AGENT = 5201, 26379, 28265, 25236
N_BYTES = 4 * GRAD_FLOATS
EPOCHS = 2                      # timed epochs per run, after an untimed first one
# one BLAS thread per worker everywhere (Ray gives each worker its one CPU's share)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# name -> (label, kind, placement, aggregation)
CONFIGS = {
    "one": ("1 worker", "local", None, None),
    "mpi-1host": ("MPI allreduce, one host", "mpi", "pack", "allreduce"),
    "mpi-2hosts": ("MPI allreduce, two hosts", "mpi", "spread", "allreduce"),
    "ray-central-1host": ("Ray central, one host", "ray", "pack", "central"),
    "ray-central-2hosts": ("Ray central, two hosts", "ray", "spread", "central"),
    "ray-allreduce-1host": ("Ray allreduce, one host", "ray", "pack", "allreduce"),
    "ray-allreduce-2hosts": ("Ray allreduce, two hosts", "ray", "spread", "allreduce"),
}
PAIRS = [("MPI allreduce", "mpi-1host", "mpi-2hosts"),
         ("Ray central", "ray-central-1host", "ray-central-2hosts"),
         ("Ray allreduce", "ray-allreduce-1host", "ray-allreduce-2hosts")]


# ---------------------------------------------------------------- the two ends of the link (run on a host)

def serve(address: str, seconds: float):
    """Answer ping-pong ('p') and bulk ('b') connections on ``address`` for ``seconds``."""
    host, port = address.rsplit(":", 1)
    srv = socket.create_server((host, int(port)))
    srv.settimeout(seconds)
    buf = bytearray(1 << 20)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            conn, _ = srv.accept()
        except socket.timeout:
            break
        with conn:
            conn.settimeout(60)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            mode = conn.recv(1)
            if mode == b"p":
                size = int.from_bytes(_recv_exact(conn, 4), "big")
                while True:
                    msg = _recv_exact(conn, size, eof_ok=True)
                    if msg is None:
                        break
                    conn.sendall(msg)
            elif mode == b"b":
                got, view = 0, memoryview(buf)
                while True:
                    n = conn.recv_into(view)
                    if not n:
                        break
                    got += n
                conn.sendall(got.to_bytes(8, "big"))


def _recv_exact(conn, n: int, eof_ok: bool = False):
    out = bytearray()
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            if eof_ok and not out:
                return None
            raise ConnectionError("connection closed")
        out += chunk
    return bytes(out)


def _connect(address: str, within_s: float = 20.0):
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + within_s
    while True:
        try:
            s = socket.create_connection((host, int(port)), timeout=10)
            s.settimeout(60)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def client(address: str, rtt_bytes: int, rtt_count: int, bulk_mib: int):
    """Print {"rtt_s": [...], "bulk_bytes", "bulk_s"} of one ping-pong and one bulk stream."""
    with _connect(address) as s:
        s.sendall(b"p" + rtt_bytes.to_bytes(4, "big"))
        msg, rtts = b"x" * rtt_bytes, []
        for i in range(200 + rtt_count):
            t0 = time.perf_counter()
            s.sendall(msg)
            _recv_exact(s, rtt_bytes)
            if i >= 200:
                rtts.append(time.perf_counter() - t0)
    chunk = b"\0" * (1 << 20)
    with _connect(address) as s:
        s.sendall(b"b")
        t0 = time.perf_counter()
        for _ in range(bulk_mib):
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        got = int.from_bytes(_recv_exact(s, 8), "big")
        bulk_s = time.perf_counter() - t0
    assert got == bulk_mib << 20, got
    print(json.dumps({"rtt_s": rtts, "bulk_bytes": got, "bulk_s": bulk_s}))


def mpi_probe(reps: int):
    """Under mpiexec with 2 ranks: rank 0 prints the 8-byte ping-pong's and ΔΘ's Allreduce's times."""
    import numpy as np
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    other = 1 - comm.rank
    small, rtts = np.zeros(1, np.float64), []
    for i in range(100 + 10 * reps):
        t0 = time.perf_counter()
        if comm.rank == 0:
            comm.Send(small, dest=other)
            comm.Recv(small, source=other)
        else:
            comm.Recv(small, source=other)
            comm.Send(small, dest=other)
        if i >= 100:
            rtts.append(time.perf_counter() - t0)
    grad, allreduce = np.ones(GRAD_FLOATS, np.float32), []
    for i in range(5 + reps):
        comm.Barrier()
        t0 = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, grad, op=MPI.SUM)
        if i >= 5:
            allreduce.append(time.perf_counter() - t0)
    if comm.rank == 0:
        print(json.dumps({"rtt_s": statistics.median(rtts), "allreduce_s": statistics.median(allreduce),
                          "hosts": comm.allgather(socket.gethostname())}))
    else:
        comm.allgather(socket.gethostname())


# ---------------------------------------------------------------- the hosts, and commands on them

class Hosts:
    """Two test hosts of this run's own (`cluster/test-hosts.sh`), and a Ray cluster on them."""

    def __init__(self, subnet: str, state: str, timeout: float):
        self.state, self.timeout = state, timeout
        self.env = {**os.environ, "HOSTS_SUBNET": subnet, "HOSTS_STATE": state,
                    "PATH": f"{BIN}:{os.environ['PATH']}"}
        self.names = self.addresses = None
        self.ray_state = os.path.join(state + "-ray", "head")
        self.node = self.node_log = None
        self.node_temp = None

    def up(self):
        r = subprocess.run([TEST_HOSTS, "up", "2", self.state], env=self.env, capture_output=True, text=True,
                           timeout=120)
        if r.returncode:
            raise SystemExit(f"test hosts: {r.stdout}{r.stderr}")
        rows = [ln.split() for ln in open(os.path.join(self.state, "hosts")) if ln.strip()]
        self.names, self.addresses = [r[1] for r in rows], [r[2] for r in rows]
        self.hostfile = os.path.join(self.state, "hostfile")
        with open(self.hostfile, "w") as f:
            f.write("".join(f"{n}:1\n" for n in self.names))
        self.hostfile_one = os.path.join(self.state, "hostfile-one")
        with open(self.hostfile_one, "w") as f:
            f.write(f"{self.names[0]}:2\n")

    def down(self):
        self.ray_down()
        subprocess.run([TEST_HOSTS, "down", self.state], env=self.env, capture_output=True, timeout=120)

    def on(self, i: int, *cmd) -> list:
        return [TEST_HOSTS, "run", str(i), *map(str, cmd)]

    def run(self, i: int, *cmd, env=None, timeout=None):
        """Run ``cmd`` on host ``i`` in a session of its own, killed (group) on a timeout."""
        p = subprocess.Popen(self.on(i, *cmd), env={**self.env, **(env or {})}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = p.communicate(timeout=timeout or self.timeout)
        except subprocess.TimeoutExpired:
            out, err = "", f"timed out after {timeout or self.timeout:g} s"
        finally:
            _kill_group(p)
        return p.returncode, out, err

    # the Ray cluster: a head on host 1 (token auth) declaring 2 CPUs, a node on host 2 declaring 1,
    # so that each of 2 workers gets one core's share (1 BLAS thread), packed on host 1 or spread
    # (2 CPUs on each would give a spread worker 2 threads: 4 on this machine's 2 cores)
    @property
    def ray_client(self) -> dict:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": os.path.join(self.ray_state, "auth_token"),
                "RAY_USAGE_STATS_ENABLED": "0"}

    def ray_up(self):
        os.makedirs(os.path.dirname(self.ray_state), exist_ok=True)
        head = {"RAY_HEAD_HOST": self.addresses[0], "RAY_HEAD_PORT": str(GCS), "RAY_DASHBOARD_PORT": str(DASHBOARD),
                "RAY_AGENT_PORT": str(AGENT), "START_TIMEOUT_S": "240", "RAY_HEAD_CPUS": "2"}
        code, out, err = self.run(1, RAY_HEAD, "up", self.ray_state, env=head, timeout=300)
        if code:
            raise RuntimeError(f"Ray head: {out}{err}")
        self.node_temp = tempfile.mkdtemp(prefix="dfn-bh-", dir="/tmp")     # Ray's socket paths are short
        log_path = os.path.join(self.node_temp, "node.log")
        self.node_log = open(log_path, "w")
        self.node = subprocess.Popen(
            self.on(2, os.path.join(BIN, "ray"), "start", "--block", f"--address={self.addresses[0]}:{GCS}",
                    "--num-cpus=1", f"--temp-dir={self.node_temp}", "--disable-usage-stats"),
            env={**self.env, **self.ray_client}, stdout=self.node_log, stderr=self.node_log, start_new_session=True)
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in open(log_path).read():
            if self.node.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray node: {open(log_path).read()[-2000:]}")
            time.sleep(0.2)

    def ray_down(self):
        if self.node is not None:
            _kill_group(self.node)
            self.node_log.close()
            self.node = None
        if os.path.exists(os.path.join(self.ray_state, "head.pgid")):
            self.run(1, RAY_HEAD, "down", self.ray_state, timeout=120)
        if self.node_temp:
            shutil.rmtree(self.node_temp, ignore_errors=True)
        shutil.rmtree(os.path.dirname(self.ray_state), ignore_errors=True)


def _kill_group(p):
    """SIGTERM, then SIGKILL after 5 s, to the session ``p`` leads (started with start_new_session)."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        try:
            p.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------- the link

def measure_link(h: Hosts, args) -> dict:
    """One round: TCP across (host 1 → host 2) and over loopback, MPI on one host and across."""
    me = [sys.executable, os.path.abspath(__file__)]
    out = {}
    for label, server_host, address in (("tcp_across", 2, f"{h.addresses[1]}:{LINK_PORT}"),
                                        ("tcp_loopback", 1, f"127.0.0.1:{LINK_PORT}")):
        server = subprocess.Popen(h.on(server_host, *me, "--serve", address, "--serve-s", "120"), env=h.env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            code, text, err = h.run(1, *me, "--client", address, "--rtt-bytes", args.rtt_bytes,
                                    "--rtt-count", args.rtt_count, "--bulk-mib", args.bulk_mib, timeout=120)
        finally:
            _kill_group(server)
        if code:
            raise RuntimeError(f"{label}: {err[-2000:]}")
        r = json.loads(text.strip().splitlines()[-1])
        out[label] = {"rtt_median_s": statistics.median(r["rtt_s"]), "rtt_min_s": min(r["rtt_s"]),
                      "bandwidth_B_per_s": r["bulk_bytes"] / r["bulk_s"]}
    for label, hostfile in (("mpi_across", h.hostfile), ("mpi_one_host", h.hostfile_one)):
        code, text, err = h.run(1, *mpiexec(h, hostfile, [*me, "--mpi-probe", "--mpi-reps", args.mpi_reps]),
                                timeout=120)
        if code:
            raise RuntimeError(f"{label}: {err[-2000:]}")
        r = json.loads(text.strip().splitlines()[-1])
        out[label] = {"rtt_median_s": r["rtt_s"], "allreduce_median_s": r["allreduce_s"], "hosts": r["hosts"]}
    return out


def mpiexec(h: Hosts, hostfile: str, cmd: list, env: dict | None = None) -> list:
    """hydra's mpiexec of two ranks over ``hostfile`` with the test hosts' ssh launcher, MPI over
    eth0, one BLAS thread a rank (each test host counts the machine's 2 cores as its own)."""
    env = {"UCX_TLS": "self,sm,tcp", "UCX_NET_DEVICES": "eth0", **ONE_THREAD, **(env or {})}
    genv = [x for k, v in env.items() for x in ("-genv", k, v)]
    return [MPIEXEC, "-f", hostfile, "-launcher", "ssh", "-launcher-exec", SSH, "-iface", "eth0", *genv,
            "-n", "2", *cmd]


# ---------------------------------------------------------------- step times

def distffn_run(config: str, batch: int, steps: int, out: str, h: Hosts) -> tuple[int, list]:
    """(host, command) of one timed `distffn run`."""
    _, kind, placement, agg = CONFIGS[config]
    # epochs of ``steps`` steps each: the first one (start-up, warm-up) is not timed
    sets = (f"training.batch_size={batch}", f"training.epochs={1 + EPOCHS}")
    run = ["-m", "distffn", "run", JOB, "--out", out, "--no-progress",
           *(x for o in benchlib.job_overrides(batch * steps, extra=sets) for x in ("--set", o))]
    if kind == "local":
        return 1, ["env", *(f"{k}={v}" for k, v in ONE_THREAD.items()), sys.executable, *run]
    if kind == "mpi":
        hostfile = h.hostfile if placement == "spread" else h.hostfile_one
        return 1, mpiexec(h, hostfile, [sys.executable, *run, "--set", "scaling.backend=mpi",
                                        "--set", "scaling.interface=eth0"])
    return 1, ["env", *(f"{k}={v}" for k, v in h.ray_client.items()), sys.executable, *run,
               "--set", "scaling.backend=ray", "--set", "scaling.num_workers=2",
               "--set", f"scaling.address={h.addresses[0]}:{GCS}", "--set", f"scaling.aggregation={agg}",
               "--set", f"scaling.placement={placement}", "--set", "scaling.interface=eth0"]


def step_record(out: str) -> dict:
    """Step time of a finished run, the median over its epochs after the first (epoch time
    excludes evaluations), its time per step by phase, and where its workers ran."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        epochs = [r for r in map(json.loads, f) if r.get("event") == "epoch" and r["epoch"] >= 2]
    with open(os.path.join(out, "workers.json")) as f:
        hosts = [w["host"] for w in json.load(f)]
    per = lambda k: med([1e3 * e[f"time_{k}_s"] / e["time_steps"] for e in epochs])
    return {"step_s": med([e["epoch_time_s"] / e["time_steps"] for e in epochs]), "epochs_timed": len(epochs),
            "steps_per_epoch": epochs[0]["time_steps"], "hosts": hosts,
            "compute_ms": per("compute"), "communication_ms": per("communication"),
            "update_ms": per("update"), "waiting_ms": per("waiting")}


def time_config(config: str, batch: int, steps: int, h: Hosts, tmp: str, tag: str) -> dict:
    out = os.path.join(tmp, tag)
    host, cmd = distffn_run(config, batch, steps, out, h)
    t0 = time.perf_counter()
    code, text, err = h.run(host, *cmd)
    if code:
        raise RuntimeError(f"{config} B={batch}: exit {code}: {err[-3000:]}")
    rec = step_record(out)
    rec["wall_s"] = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return rec


# ---------------------------------------------------------------- summary, fit, figure

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize_link(rounds: list) -> dict:
    s = {}
    for label in rounds[0]:
        keys = [k for k in rounds[0][label] if k.endswith(("_s", "_B_per_s"))]
        s[label] = {k: med([r[label][k] for r in rounds]) for k in keys}
        s[label].update({f"{k}_range": [min(r[label][k] for r in rounds), max(r[label][k] for r in rounds)]
                         for k in keys})
    return s


def summarize_steps(records: list, batch_sizes: list, configs: list) -> dict:
    out = {}
    for b in batch_sizes:
        row = {}
        for c in configs:
            rs = [r for r in records if r["config"] == c and r["batch_size"] == b]
            if rs:
                row[c] = {"step_ms_median": 1e3 * med([r["step_s"] for r in rs]),
                          "step_ms_range": [1e3 * min(r["step_s"] for r in rs), 1e3 * max(r["step_s"] for r in rs)],
                          "communication_ms_median": med([r["communication_ms"] for r in rs]),
                          "compute_ms_median": med([r["compute_ms"] for r in rs]),
                          "hosts": sorted({len(set(r["hosts"])) for r in rs}), "rounds": len(rs)}
        ratios = {}
        for label, one, two in PAIRS:
            per_round = []
            for rnd in sorted({r["round"] for r in records}):
                a = [r["step_s"] for r in records if r["config"] == one and r["batch_size"] == b and r["round"] == rnd]
                z = [r["step_s"] for r in records if r["config"] == two and r["batch_size"] == b and r["round"] == rnd]
                if a and z:
                    per_round.append(z[0] / a[0])
            if per_round:
                ratios[label] = {"two_hosts_over_one_host_per_round_median": med(per_round),
                                 "per_round": per_round}
        out[str(b)] = {"configs": row, "ratios": ratios}
    return out


def fit(steps: dict, link: dict, batch_sizes: list, most: int) -> dict:
    """The step model (compute from 1 worker), the measured link as the network, and per
    aggregation the sync fitted to the cross-host runs; projected step times to ``most`` workers."""
    from distffn.sweep import projection
    one = {b: steps[str(b)]["configs"]["one"]["step_ms_median"] / 1e3 for b in batch_sizes}
    base = projection.fit_step_model(one, N_BYTES)
    tcp = link["tcp_across"]
    net = projection.Network(tcp["rtt_median_s"] / 2, 1.0 / tcp["bandwidth_B_per_s"])
    result = {"compute": {"fixed_s": base.fixed, "per_sample_s": base.per_sample, "n_bytes": N_BYTES},
              "network": {"alpha_s": net.alpha, "beta_s_per_B": net.beta}, "aggregations": {}}
    for label, _, two in PAIRS:
        agg = CONFIGS[two][3]
        measured = {(b, 2): steps[str(b)]["configs"][two]["step_ms_median"] / 1e3 for b in batch_sizes
                    if two in steps[str(b)]["configs"]}
        if not measured:
            continue
        model = projection.fit_sync(copy.copy(base), measured, net=net, aggregation=agg)
        result["aggregations"][label] = {
            "aggregation": agg, "sync_s": model.sync,
            "link_s_at_2": projection.communication_seconds(N_BYTES, 2, net, agg),
            "checks": {str(b): {"measured_s": s, "model_s": model.step_seconds(b, 2, net, agg)}
                       for (b, _), s in measured.items()},
            "projected_s": {str(b): {str(n): model.step_seconds(b, n, net, agg)
                                     for n in projection.worker_counts(b, most)} for b in batch_sizes}}
    return result


COLOURS = {"MPI allreduce": "tab:blue", "Ray central": "tab:red", "Ray allreduce": "tab:green"}


def figure(steps: dict, fitted: dict, batch_sizes: list, path: str, title: str) -> str:
    """Step time against workers, one panel per batch size: measured (markers) and projected (dashed)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogLocator

    from distffn.files import write_figure
    from distffn.plot import plain_log_axes
    fig = Figure(figsize=(5.0 * len(batch_sizes), 5.6), layout="constrained")
    axes = fig.subplots(1, len(batch_sizes), squeeze=False)[0]
    for ax, b in zip(axes, batch_sizes):
        row = steps[str(b)]["configs"]
        if "one" in row:
            ax.plot([1], [row["one"]["step_ms_median"]], "ks", ms=7, label="measured, 1 worker")
        for label, one, two in PAIRS:
            colour = COLOURS[label]
            proj = fitted["aggregations"].get(label, {}).get("projected_s", {}).get(str(b))
            if proj:
                ns = sorted(int(n) for n in proj)
                ax.plot(ns, [1e3 * proj[str(n)] for n in ns], "--", color=colour, lw=1.2,
                        label=f"{label}: projection (veth-local)")
            if one in row:
                ax.plot([2], [row[one]["step_ms_median"]], "o", mfc="white", color=colour, ms=7,
                        label=f"{label}: measured, one host")
            if two in row:
                ax.plot([2], [row[two]["step_ms_median"]], "o", color=colour, ms=7,
                        label=f"{label}: measured, two hosts")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=2, numticks=16))
        ax.set_xlabel("workers N")
        ax.set_ylabel("ms per step")
        ax.set_title(f"global batch {b}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        plain_log_axes(ax)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=7)
    fig.suptitle(title, fontsize=10)
    return write_figure(fig, path, 100)


def print_report(env, cmd, link, steps, fitted, batch_sizes):
    p = print
    p("distffn across two test hosts (network namespaces on one machine, veth pairs on a bridge)")
    p(benchlib.machine_line(env))
    for line in benchlib.context_lines(env, cmd):
        p(line)
    p("")
    p("link (medians over rounds; range in brackets):")
    for label in ("tcp_across", "tcp_loopback"):
        r = link[label]
        p(f"  {label:<14} RTT {1e6 * r['rtt_median_s']:7.1f} µs [{1e6 * r['rtt_median_s_range'][0]:.1f}–"
          f"{1e6 * r['rtt_median_s_range'][1]:.1f}]   bandwidth {r['bandwidth_B_per_s'] / 1e9:6.2f} GB/s "
          f"[{r['bandwidth_B_per_s_range'][0] / 1e9:.2f}–{r['bandwidth_B_per_s_range'][1] / 1e9:.2f}]")
    for label in ("mpi_one_host", "mpi_across"):
        r = link[label]
        p(f"  {label:<14} 8 B ping-pong RTT {1e6 * r['rtt_median_s']:7.1f} µs   Allreduce of ΔΘ (3.26 MB) "
          f"{1e3 * r['allreduce_median_s']:.3f} ms")
    p("")
    p(f"{'ms per step (median)':<28}" + "".join(f"{'B=' + str(b):>26}" for b in batch_sizes))
    for c, (label, *_) in CONFIGS.items():
        cells = []
        for b in batch_sizes:
            r = steps[str(b)]["configs"].get(c)
            cells.append("—" if r is None else
                         f"{r['step_ms_median']:.2f} ({r['step_ms_range'][0]:.2f}–{r['step_ms_range'][1]:.2f})")
        p(f"  {label:<26}" + "".join(f"{x:>26}" for x in cells))
    p("two hosts / one host (median of per-round ratios):")
    for label, *_ in PAIRS:
        p(f"  {label:<26}" + "".join(
            f"{steps[str(b)]['ratios'].get(label, {}).get('two_hosts_over_one_host_per_round_median', float('nan')):>25.2f}×"
            for b in batch_sizes))
    p("")
    c, n = fitted["compute"], fitted["network"]
    p(f"fit: compute {1e3 * c['fixed_s']:.3f} ms + {1e6 * c['per_sample_s']:.2f} µs per sample; link α "
      f"{1e6 * n['alpha_s']:.1f} µs, β {1e9 * n['beta_s_per_B']:.3f} ns/B")
    for label, a in fitted["aggregations"].items():
        proj = a["projected_s"]
        p(f"  {label:<14} sync {1e3 * a['sync_s']:.2f} ms (link at N=2: {1e3 * a['link_s_at_2']:.2f} ms); "
          + "; ".join(f"B={b}: " + ", ".join(f"N={k} {1e3 * v:.2f}" for k, v in proj[str(b)].items()) + " ms"
                      for b in batch_sizes))


# ---------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--steps", type=int, nargs="+", default=None,
                    help="steps per epoch (data.limit_train = B × steps): one value, or one per batch size "
                         "(default 100 at 128, 40 at 512)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--rtt-bytes", type=int, default=64)
    ap.add_argument("--rtt-count", type=int, default=2000)
    ap.add_argument("--bulk-mib", type=int, default=256)
    ap.add_argument("--mpi-reps", type=int, default=50)
    ap.add_argument("--most-workers", type=int, default=64, help="project to this many workers (default 64)")
    ap.add_argument("--subnet", default="198.19.5", help="the test hosts' /24 (default 198.19.5)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per command (default 300)")
    ap.add_argument("--wait-idle", type=float, default=3.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    # the ends of the link and the MPI probe, run on the hosts by this script itself
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--serve-s", type=float, default=120, help=argparse.SUPPRESS)
    ap.add_argument("--client", help=argparse.SUPPRESS)
    ap.add_argument("--mpi-probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        return serve(args.serve, args.serve_s)
    if args.client:
        return client(args.client, args.rtt_bytes, args.rtt_count, args.bulk_mib)
    if args.mpi_probe:
        return mpi_probe(args.mpi_reps)

    steps_of = benchlib.steps_per_batch(ap, args.steps, args.batch_sizes) if args.steps else \
        {b: {128: 100, 512: 40}.get(b, max(10, round(20480 / b))) for b in args.batch_sizes}
    cmd, env = benchlib.run_record(argv, "bench_hosts.py")
    configs = list(dict.fromkeys(args.configs))
    state = tempfile.mkdtemp(prefix="bench-hosts-")
    h = Hosts(args.subnet, os.path.join(state, "hosts"), args.timeout)
    link_rounds, records, failures, loads = [], [], [], []
    t_start = time.perf_counter()
    try:
        h.up()
        log(f"test hosts up: {dict(zip(h.names, h.addresses))}")
        if any(CONFIGS[c][1] == "ray" for c in configs):
            h.ray_up()
            log("Ray head on host 1, node on host 2")
        for rnd in range(args.rounds):
            loads.append(os.getloadavg()[0])
            benchlib.wait_idle(args.wait_idle)
            link_rounds.append(measure_link(h, args))
            lr = link_rounds[-1]
            log(f"[round {rnd + 1}/{args.rounds}] link: RTT {1e6 * lr['tcp_across']['rtt_median_s']:.1f} µs, "
                f"{lr['tcp_across']['bandwidth_B_per_s'] / 1e9:.2f} GB/s; MPI Allreduce across "
                f"{1e3 * lr['mpi_across']['allreduce_median_s']:.2f} ms")
            order = configs[rnd % len(configs):] + configs[:rnd % len(configs)]
            bsz = args.batch_sizes if rnd % 2 == 0 else args.batch_sizes[::-1]
            for c in order:
                for b in bsz:
                    benchlib.wait_idle(args.wait_idle)
                    try:
                        rec = time_config(c, b, steps_of[b], h, state, f"r{rnd}-{c}-b{b}")
                    except RuntimeError as e:
                        failures.append({"round": rnd, "config": c, "batch_size": b, "error": str(e)})
                        log(f"[round {rnd + 1}/{args.rounds}] {c} B={b} FAILED: {e}")
                        continue
                    records.append({"round": rnd, "config": c, "batch_size": b, **rec})
                    log(f"[round {rnd + 1}/{args.rounds}] {c:<22} B={b:<5} {1e3 * rec['step_s']:8.2f} ms/step "
                        f"(comm {rec['communication_ms']:.2f} ms; hosts {len(set(rec['hosts']))}; "
                        f"{time.perf_counter() - t_start:.0f} s)")
    finally:
        h.down()
        shutil.rmtree(state, ignore_errors=True)
    env["loadavg_end"] = list(os.getloadavg())
    env["loadavg_1min_per_round"] = loads
    link = summarize_link(link_rounds)
    steps = summarize_steps(records, args.batch_sizes, configs)
    fitted = fit(steps, link, args.batch_sizes, args.most_workers) if "one" in configs else None
    print_report(env, cmd, link, steps, fitted, args.batch_sizes) if fitted else print(json.dumps(steps, indent=1))
    if args.png and fitted:
        path = figure(steps, fitted, args.batch_sizes, args.png,
                      "Fashion-MNIST 784-1024-10, step time: measured on two test hosts, projected over "
                      "their veth link (α-β, sync fitted across hosts)")
        log(f"wrote {path}")
    if args.json:
        benchlib.write_json(args.json, {
            "command": cmd, "environment": env,
            "config": {"job": JOB, "batch_sizes": args.batch_sizes, "steps": {str(b): s for b, s in steps_of.items()},
                       "rounds": args.rounds, "configs": {c: CONFIGS[c][0] for c in configs},
                       "rtt_bytes": args.rtt_bytes, "rtt_count": args.rtt_count, "bulk_mib": args.bulk_mib,
                       "mpi_reps": args.mpi_reps, "subnet": args.subnet},
            "link_rounds": link_rounds, "link": link, "records": records, "steps": steps, "fit": fitted,
            "failures": failures, "bench_seconds": time.perf_counter() - t_start}, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
