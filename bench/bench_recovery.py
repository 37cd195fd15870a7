#!/usr/bin/env python
"""Recovery times of distffn after failures: a SIGKILLed worker (with and without
failure.max_failures), a SIGKILLed driver, SIGTERM to the driver, and a full disk.

Every scenario runs ``python -m distffn run JOB --no-progress --out DIR`` in a session of its
own (``start_new_session``) on the tests' equivalence job (tests/helpers.py: digits,
data.limit_train 101, 64-24-10 tanh, batch 50: 3 steps per epoch) made long enough, with
``checkpoint.every_steps: 30`` and ``scaling.timeout_s: 5``. (distffn checkpoints at the end
of every epoch as well, here every 3 steps, so at most 2 steps can be lost.) Lines of the run's stdout and
stderr are read in threads and time-stamped (``time.monotonic()``); a monitor thread polls the
run folder (checkpoints/, metrics.jsonl) every 20 ms. Only pids of the run's own session are
ever signalled (the driver, worker 1 from RUN_DIR/workers.json, or, when cleaning up, the
run's process group and its session's members).

Scenarios (backends: local = LocalBackend, ray-central / ray-allreduce = embedded Ray with 2
actors, mpi = the mpiexec -n 2 distffn starts itself):

  restart     worker 1 SIGKILLed once >= 3 checkpoint files exist and the newest is at step
              >= 90 (every kill and signal below waits for the same), max_failures 1:
              kill -> the "restart 1 of 1" line; kill -> training progresses (the first
              epoch record of metrics.jsonl after the restarted attempt's "start" record);
              kill -> a checkpoint beyond the restored one; steps lost (the newest step
              recorded before the restart minus the step of "resuming from ... (step N)");
              exit code (expect 0)
  failfast    the same kill with max_failures 0: kill -> process exit, exit code (expect 1)
  driver-kill SIGKILL to the driver pid only: kill -> no process of the run's session (nor a
              descendant the driver had just before the kill) left, bounded at 30 s
  sigterm     SIGTERM to the driver: signal -> exit, exit code (expect 143), and whether the
              newest checkpoint's step equals the step at exit (summary.json "step", else
              the "after step N" of the message)
  full-disk   the run folder on a 192 KiB tmpfs (``unshare --mount``, root), a checkpoint
              every step: from the "No space left on device" line (printed by the process
              whose write failed, right after it) to exit, and, as an upper bound, from the
              newest checkpoint that was written (seen through /proc/PID/root) to exit;
              exit code (expect 1)

Each scenario x backend runs --rounds times; the table gives median and max seconds. The
machine is shared (2 cores), so absolute times are inflated; --budget-s stops starting new
rounds when the next one would not fit.

    python bench/bench_recovery.py --rounds 3 --json /tmp/recovery.json       # ~15-20 min on 2 busy cores
    python bench/bench_recovery.py --rounds 1 --scenarios restart --backends mpi   # one case, ~30 s
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import benchlib
import yaml
from benchlib import REPO, log

sys.path.insert(0, os.path.join(REPO, "tests"))
from distffn.parallel.watchdog import descendants, process_table
from distffn.training import checkpoint as ckpt

from helpers import MPIEXEC, job_dict, processes_in_sessions

PY = sys.executable
BACKENDS = {  # name -> scaling section
    "local": {"backend": "local", "num_workers": 1},
    "ray-central": {"backend": "ray", "num_workers": 2, "aggregation": "central"},
    "ray-allreduce": {"backend": "ray", "num_workers": 2, "aggregation": "allreduce"},
    "mpi": {"backend": "mpi", "num_workers": 2, "aggregation": "allreduce"},
}
SCENARIOS = {  # name -> backends it runs on
    "restart": ["ray-central", "ray-allreduce", "mpi"],
    "failfast": ["ray-central", "ray-allreduce", "mpi"],
    "driver-kill": ["ray-allreduce", "mpi"],
    "sigterm": ["local", "ray-allreduce", "mpi"],
    "full-disk": ["local", "ray-allreduce", "mpi"],
}
LABELS = {
    "restart": "worker SIGKILL, max_failures 1",
    "failfast": "worker SIGKILL, max_failures 0",
    "driver-kill": "driver SIGKILL",
    "sigterm": "SIGTERM to the driver",
    "full-disk": "full disk (192 KiB tmpfs)",
}
EVERY = 30                 # checkpoint.every_steps
POLL_S = 0.02
LAST_SESSION = [None]      # the session id of the newest run (kept in the results, for checks)
RESUMING = re.compile(r"resuming from (\S+) \(step (\d+)\)")
AFTER_STEP = re.compile(r"after step (\d+)")


def epochs_for(backend: str, long: bool) -> int:
    """Epochs of the job: a run that must finish gets roughly 10-15 s of training on this
    machine (Ray steps are several times slower than MPI's); one that is stopped never ends
    first."""
    if backend.startswith("ray"):
        return 3000 if long else 400
    return 30000 if long else 600


def write_job(folder: str, backend: str, *, long: bool, max_failures: int = 0,
              every: int = EVERY, keep: int = 2) -> str:
    job = job_dict(training={"epochs": epochs_for(backend, long)},
                   checkpoint={"every_steps": every, "num_to_keep": keep},
                   scaling={**BACKENDS[backend], "timeout_s": 5},
                   failure={"max_failures": max_failures})
    path = os.path.join(folder, "job.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(job, f)
    return path


# ---------------------------------------------------------------- one run

class Run:
    """A `distffn run` in a session of its own, its output lines time-stamped by reader
    threads and its run folder watched by a monitor thread."""

    def __init__(self, cmd, run_dir, view_root=""):
        self.run_dir = run_dir
        self.view_root = view_root          # "/proc/PID/root" for a run in another mount namespace
        self.lines: list = []               # (t, stream, text)
        self.ckpt_seen: dict = {}           # step -> first time seen
        self.records: list = []             # (t first seen, record) of metrics.jsonl
        self.ckpt_sizes: dict = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.t_start = time.monotonic()
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                  start_new_session=True)
        if view_root == "PID":
            self.view_root = f"/proc/{self.p.pid}/root"
        self.session = self.p.pid
        LAST_SESSION[0] = self.session
        self.threads = [threading.Thread(target=self._read, args=(self.p.stdout, "out"), daemon=True),
                        threading.Thread(target=self._read, args=(self.p.stderr, "err"), daemon=True),
                        threading.Thread(target=self._monitor, daemon=True)]
        for t in self.threads:
            t.start()
        self.t_exit = None

    def _read(self, pipe, stream):
        for raw in iter(pipe.readline, b""):
            t = time.monotonic()
            with self._lock:
                self.lines.append((t, stream, raw.decode(errors="replace").rstrip("\n")))
        pipe.close()

    def path(self, *parts):
        return self.view_root + os.path.join(self.run_dir, *parts)

    def _monitor(self):
        offset, partial = 0, b""
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                for step, p in ckpt.list_checkpoints(self.path("checkpoints")):
                    if step not in self.ckpt_seen:
                        self.ckpt_seen[step] = t
                        try:
                            self.ckpt_sizes[step] = os.path.getsize(p)
                        except OSError:
                            pass
            except OSError:
                pass
            try:
                with open(self.path("metrics.jsonl"), "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk)
                partial += chunk
                *done, partial = partial.split(b"\n")
                for line in done:
                    try:
                        self.records.append((t, json.loads(line)))
                    except ValueError:
                        pass
            except OSError:
                pass
            time.sleep(POLL_S)

    # ---- queries
    def checkpoints_now(self) -> list:
        try:
            return ckpt.list_checkpoints(self.path("checkpoints"))
        except OSError:
            return []

    def find_line(self, needle, after=0.0, stream=None):
        with self._lock:
            for t, s, text in self.lines:
                if t >= after and (stream is None or s == stream) and (
                        needle in text if isinstance(needle, str) else needle.search(text)):
                    return t, text
        return None

    def wait_until(self, cond, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return True
            if self.p.poll() is not None:
                return bool(cond())
            time.sleep(POLL_S / 2)
        return False

    def wait_checkpoints(self, n: int, timeout: float, min_step: int = 3 * EVERY) -> bool:
        """At least ``n`` checkpoint files, the newest at step >= ``min_step`` (steady
        training, past three checkpoint.every_steps intervals), and workers.json."""
        def ready():
            found = self.checkpoints_now()
            return (len(found) >= n and found[-1][0] >= min_step
                    and os.path.exists(self.path("workers.json")))
        return self.wait_until(ready, timeout)

    def worker_pid(self, rank: int) -> int:
        with open(self.path("workers.json")) as f:
            return int(json.load(f)[rank]["pid"])

    def wait_exit(self, timeout: float):
        try:
            self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        if self.t_exit is None:
            self.t_exit = time.monotonic()
        return self.p.returncode

    def newest_step_seen(self, before: float) -> int | None:
        """The newest step the run recorded (metrics.jsonl or a checkpoint) before ``before``."""
        steps = [r.get("step") for t, r in self.records if t < before and isinstance(r.get("step"), int)]
        steps += [s for s, t in self.ckpt_seen.items() if t < before]
        return max(steps) if steps else None

    def text(self, stream="err", last=None) -> str:
        with self._lock:
            lines = [x for _, s, x in self.lines if s == stream]
        return "\n".join(lines[-last:] if last else lines)

    def finish(self, settle_s=10.0) -> list:
        """End the run and whatever of its session is left (by process group, then by pid of
        its session's members); returns the pids that were still there after ``settle_s``."""
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.wait_exit(30)
        left = processes_in_sessions({self.session}, within_s=settle_s)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if left:
            processes_in_sessions({self.session}, within_s=10)
        self._stop.set()
        for t in self.threads:
            t.join(timeout=5)
        return left


def still_alive(known: dict) -> list:
    table = process_table()
    return [pid for pid, start in known.items()
            if pid in table and table[pid].start == start and table[pid].state != "Z"]


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "?"


def distffn_cmd(job, out):
    return [PY, "-m", "distffn", "run", job, "--no-progress", "--out", out]


def last_error(run: Run) -> str:
    errs = [x for x in run.text("err").splitlines() if x.startswith("distffn")]
    return errs[-1][:300] if errs else run.text("err", last=3)[-300:]


# ---------------------------------------------------------------- scenarios

def start_run(folder: str, backend: str, **job) -> "Run":
    """`distffn run` of a job written by :func:`write_job` into ``folder/run``."""
    job_path = write_job(folder, backend, **job)
    run_dir = os.path.join(folder, "run")
    return Run(distffn_cmd(job_path, run_dir), run_dir)


def under_way(run: "Run", timeout: float, res: dict) -> bool:
    """Whether training got past 3 checkpoints within ``timeout``; if not, ``res`` says why."""
    if run.wait_checkpoints(3, timeout):
        return True
    res["error"] = f"training did not reach step {3 * EVERY} (exit {run.p.poll()}): {last_error(run)}"
    return False


def exited(run: "Run", timeout: float, res: dict) -> bool:
    """Whether the run exited within ``timeout``; ``res`` gets its exit code (None) or why not."""
    res["exit_code"] = run.wait_exit(timeout)
    if res["exit_code"] is None:
        res["error"] = "did not exit in time"
        return False
    return True


def scenario_worker_kill(folder, backend, max_failures, timeout):
    run = start_run(folder, backend, long=False, max_failures=max_failures)
    res = {"max_failures": max_failures}
    try:
        if not under_way(run, timeout, res):
            return res
        victim = run.worker_pid(1)
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        res.update(victim=victim, startup_s=t_kill - run.t_start)
        if not exited(run, timeout, res):
            return res
        res["kill_to_exit_s"] = run.t_exit - t_kill
        time.sleep(3 * POLL_S)
        first_note = run.find_line("distffn:", after=t_kill, stream="err")
        if first_note:
            res["kill_to_first_notice_s"] = first_note[0] - t_kill
            res["first_notice"] = first_note[1][:300]
        res["last_error"] = last_error(run)
        restart = run.find_line("restart 1 of 1", after=t_kill, stream="err")
        if restart:
            res["kill_to_restart_line_s"] = restart[0] - t_kill
            res["restart_line"] = restart[1][:300]
            # the restarted attempt's "start" record, then its first epoch record
            starts = [t for t, r in run.records if t >= t_kill and r.get("event") == "start"]
            t_new = starts[0] if starts else restart[0]
            res["step_at_kill"] = run.newest_step_seen(t_new)
            resumed = run.find_line(RESUMING, after=t_kill)
            if resumed:
                r_step = int(RESUMING.search(resumed[1]).group(2))
                res["resumed_from_step"] = r_step
                res["resuming_line_s"] = resumed[0] - t_kill
            else:
                r_step = None
            if starts:
                new_start = next(r for t, r in run.records if t == t_new and r.get("event") == "start")
                res["restarted_start_step"] = new_start.get("start_step")
                r_step = r_step if r_step is not None else new_start.get("start_step")
            epochs = [t for t, r in run.records if t >= t_new and r.get("event") == "epoch"]
            if epochs:
                res["kill_to_progress_s"] = epochs[0] - t_kill
            if r_step is not None:
                later = [t for s, t in run.ckpt_seen.items() if s > r_step and t >= t_kill]
                if later:
                    res["kill_to_new_checkpoint_s"] = min(later) - t_kill
                if res["step_at_kill"] is not None:
                    res["steps_lost"] = res["step_at_kill"] - r_step
        return res
    finally:
        res["left_after_exit"] = run.finish()


def scenario_driver_kill(folder, backend, timeout, bound_s=30.0):
    run = start_run(folder, backend, long=True)
    res = {}
    try:
        if not under_way(run, timeout, res):
            return res
        known = descendants(run.p.pid)
        session_before = processes_in_sessions({run.session})
        res["processes_before"] = len(set(known) | set(session_before))
        outside = sorted(set(known) - set(session_before))
        res["descendants_outside_session"] = {pid: cmdline(pid) for pid in outside}
        t_kill = time.monotonic()
        os.kill(run.p.pid, signal.SIGKILL)
        run.wait_exit(10)                       # reap the driver: our child
        left = []
        while time.monotonic() - t_kill < bound_s:
            left = sorted(set(processes_in_sessions({run.session})) | set(still_alive(known)))
            if not left:
                break
            time.sleep(0.05)
        t_gone = time.monotonic()
        res["exit_code"] = run.p.returncode
        if left:
            res["left_at_bound"] = left
            res["error"] = f"{len(left)} process(es) still there {bound_s:.0f} s after the kill"
        else:
            res["kill_to_none_left_s"] = t_gone - t_kill
        return res
    finally:
        res["left_after_exit"] = run.finish(settle_s=0.5)


def scenario_sigterm(folder, backend, timeout):
    run = start_run(folder, backend, long=True)
    res = {}
    try:
        if not under_way(run, timeout, res):
            return res
        t_sig = time.monotonic()
        res["step_at_signal"] = run.newest_step_seen(t_sig)
        os.kill(run.p.pid, signal.SIGTERM)
        if not exited(run, timeout, res):
            return res
        res["signal_to_exit_s"] = run.t_exit - t_sig
        res["last_error"] = last_error(run)
        cks = ckpt.list_checkpoints(os.path.join(run.run_dir, "checkpoints"))
        res["newest_checkpoint_step"] = cks[-1][0] if cks else None
        try:
            with open(os.path.join(run.run_dir, "summary.json")) as f:
                res["summary_step"] = json.load(f).get("step")
        except (OSError, ValueError):
            res["summary_step"] = None
        m = AFTER_STEP.search(res["last_error"])
        res["message_step"] = int(m.group(1)) if m else None
        exit_step = res["summary_step"] if res["summary_step"] is not None else res["message_step"]
        res["exit_step"] = exit_step
        res["checkpoint_at_exit_step"] = exit_step is not None and res["newest_checkpoint_step"] == exit_step
        return res
    finally:
        res["left_after_exit"] = run.finish()


def scenario_full_disk(folder, backend, timeout, size="192k"):
    job = write_job(folder, backend, long=False, every=1, keep=10_000)
    mnt = os.path.join(folder, "mnt")
    os.makedirs(mnt)
    run_dir = os.path.join(mnt, "run")
    script = f'mount -t tmpfs -o size={size} tmpfs "{mnt}" && exec "$@"'
    cmd = ["unshare", "--mount", "sh", "-c", script, "sh", *distffn_cmd(job, run_dir)]
    # unshare and sh exec: the pid is the driver's, inside the private mount namespace
    run = Run(cmd, run_dir, view_root="PID")
    res = {"tmpfs": size}
    try:
        if not exited(run, timeout, res):
            return res
        time.sleep(3 * POLL_S)
        res["last_error"] = last_error(run)
        res["checkpoints_written"] = len(run.ckpt_seen)
        if run.ckpt_seen:
            newest = max(run.ckpt_seen)
            t_last = run.ckpt_seen[newest]
            res["newest_checkpoint_step"] = newest
            res["last_checkpoint_to_exit_s"] = run.t_exit - t_last
        err = run.find_line("No space left", stream="err")
        if err:
            res["error_line_to_exit_s"] = run.t_exit - err[0]
        res["no_space_named"] = bool(err)
        return res
    finally:
        res["left_after_exit"] = run.finish()


def run_case(scenario, backend, base, timeout):
    folder = tempfile.mkdtemp(prefix=f"{scenario}-{backend}-", dir=base)
    t0 = time.monotonic()
    if scenario == "restart":
        res = scenario_worker_kill(folder, backend, 1, timeout)
    elif scenario == "failfast":
        res = scenario_worker_kill(folder, backend, 0, timeout)
    elif scenario == "driver-kill":
        res = scenario_driver_kill(folder, backend, timeout)
    elif scenario == "sigterm":
        res = scenario_sigterm(folder, backend, timeout)
    else:
        res = scenario_full_disk(folder, backend, timeout)
    res["case_wall_s"] = time.monotonic() - t0
    res["session"] = LAST_SESSION[0]
    res["loadavg_end"] = list(os.getloadavg())
    shutil.rmtree(folder, ignore_errors=True)
    return res


# ---------------------------------------------------------------- report

METRICS = {  # scenario -> [(result key, row label, expected exit code)]
    "restart": [("kill_to_restart_line_s", "kill → \"restart 1 of 1\" line", 0),
                ("kill_to_progress_s", "kill → training progresses (new epoch record)", 0),
                ("kill_to_new_checkpoint_s", "kill → a checkpoint beyond the restored one", 0)],
    "failfast": [("kill_to_exit_s", "kill → exit", 1)],
    "driver-kill": [("kill_to_none_left_s", "kill → nothing of the session left", -9)],
    "sigterm": [("signal_to_exit_s", "SIGTERM → exit", 143)],
    "full-disk": [("error_line_to_exit_s", "failing write (its error line) → exit", 1)],
}


def fmt(x):
    return "—" if x is None else f"{x:.2f}"


def notes_for(scenario, rows) -> str:
    ok = [r for r in rows if "error" not in r]
    notes = []
    if scenario == "restart":
        notes.append("steps lost " + ", ".join(str(r.get("steps_lost", "?")) for r in ok))
        notes.append("resumed from step " + ", ".join(str(r.get("resumed_from_step", "?")) for r in ok))
    if scenario == "sigterm":
        notes.append("ckpt step = step at exit: " + ", ".join(
            f"{r.get('newest_checkpoint_step')}={r.get('exit_step')}" if r.get("checkpoint_at_exit_step")
            else f"NO ({r.get('newest_checkpoint_step')} vs {r.get('exit_step')})" for r in ok))
        if any(r.get("summary_step") is None for r in ok):
            notes.append("no summary.json: step from the message")
    if scenario == "full-disk":
        notes.append("last good checkpoint → exit " + ", ".join(fmt(r.get("last_checkpoint_to_exit_s")) for r in ok) + " s")
        notes.append("checkpoints before full " + ", ".join(str(r.get("checkpoints_written")) for r in ok))
        if not all(r.get("no_space_named") for r in ok):
            notes.append("'No space left' NOT on stderr in some round")
    if scenario == "failfast":
        notes.append("kill → first notice " + ", ".join(fmt(r.get("kill_to_first_notice_s")) for r in ok) + " s")
    left = [r["left_after_exit"] for r in rows if r.get("left_after_exit")]
    if left:
        notes.append(f"LEFT after exit (killed by the bench): {left}")
    errs = [r["error"] for r in rows if "error" in r]
    if errs:
        notes.append(f"FAILED {len(errs)}: {errs[0][:120]}")
    return "; ".join(notes)


def table(results: dict) -> list:
    out = ["| scenario | backend | median s | max s | exit code | notes |",
           "| --- | --- | --- | --- | --- | --- |"]
    for scenario, per_backend in results.items():
        for backend, rows in per_backend.items():
            codes = [r.get("exit_code") for r in rows]
            code_txt = ", ".join(str(c) for c in codes)
            for i, (key, label, expected) in enumerate(METRICS[scenario]):
                vals = [r[key] for r in rows if r.get(key) is not None]
                med = statistics.median(vals) if vals else None
                mx = max(vals) if vals else None
                unexpected = [c for c in codes if c != expected]
                exit_txt = code_txt + ("" if not unexpected else f" (expected {expected})")
                out.append(f"| {LABELS[scenario]}: {label} | {backend} | {fmt(med)} | {fmt(mx)} | "
                           f"{exit_txt if i == 0 else '〃'} | {notes_for(scenario, rows) if i == 0 else f'n={len(vals)}'} |")
    return out


# ---------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS),
                    help="restrict every scenario to these backends")
    ap.add_argument("--timeout", type=float, default=180, help="seconds per wait in one run (default 180)")
    ap.add_argument("--budget-s", type=float, default=1080,
                    help="start no new round that would end past this many seconds (by the longest "
                         "round so far; default 1080)")
    ap.add_argument("--json", default=None, help="write raw results here")
    args = ap.parse_args(argv)
    cmd = benchlib.command_line(argv, "bench/bench_recovery.py")
    if "mpi" in args.backends and not os.access(MPIEXEC, os.X_OK):
        ap.error(f"no mpiexec at {MPIEXEC} (the mpi extra)")
    env = benchlib.base_environment(git=benchlib.git_rev(), cpu_model=benchlib.cpu_model())
    plan = [(s, b) for s in args.scenarios for b in SCENARIOS[s] if b in args.backends]
    results: dict = {s: {b: [] for b in SCENARIOS[s] if b in args.backends} for s in args.scenarios}
    base = tempfile.mkdtemp(prefix="bench-recovery-")
    t_all, round_s = time.monotonic(), []
    try:
        for rnd in range(args.rounds):
            elapsed = time.monotonic() - t_all
            if round_s and elapsed + max(round_s) > args.budget_s:
                log(f"stopping after {rnd} round(s): another would end past --budget-s {args.budget_s:.0f}")
                break
            t_round = time.monotonic()
            for scenario, backend in plan:
                res = run_case(scenario, backend, base, args.timeout)
                res["round"] = rnd
                results[scenario][backend].append(res)
                key = METRICS[scenario][0][0]
                log(f"round {rnd + 1}/{args.rounds} {scenario:11s} {backend:13s} {key} {fmt(res.get(key))} "
                    f"exit {res.get('exit_code')} ({res['case_wall_s']:.0f} s)"
                    + (f"  ERROR {res['error']}" if "error" in res else ""))
            round_s.append(time.monotonic() - t_round)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    env["loadavg_end"] = list(os.getloadavg())
    env["wall_s"] = time.monotonic() - t_all
    env["rounds_done"] = len(round_s)
    lines = ["", f"# Recovery times ({len(round_s)} round(s); 2 shared cores: absolute times are inflated)", "",
             benchlib.machine_line(env), *benchlib.context_lines(env, cmd), "", *table(results), ""]
    print("\n".join(lines))
    if args.json:
        benchlib.write_json(args.json, {"environment": env, "command": cmd,
                                        "config": {"rounds": args.rounds, "every_steps": EVERY, "timeout_s": 5,
                                                   "epochs": {b: {"short": epochs_for(b, False), "long": epochs_for(b, True)}
                                                              for b in BACKENDS}},
                                        "results": results}, indent=1)
    failed = any("error" in r for per in results.values() for rows in per.values() for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
