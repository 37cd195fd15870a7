"""``kind: slurm``: jobs through a SLURM queue: ``sbatch --parsable`` of a batch script rendered
from a template (``cluster/slurm/job.sbatch``, which users may copy and change), state from
``scontrol show job`` (a finished job stays there for ``MinJobAge``), then ``sacct`` (where
accounting exists), and ``scancel`` to stop.

The run directory, the staged job spec and ``data.path`` must be on a filesystem the nodes
share (the usual SLURM setup); the batch script's output goes to ``RUN_DIR/slurm-<jobid>.out``.
Every client command is bounded (:data:`COMMAND_TIMEOUT_S`); one that reaches no controller
ends in one line naming it (from ``$SLURM_CONF``) and the fix, and makes a job's state
``UNKNOWN`` (not an ending: a job SLURM no longer lists is read from its run directory).
On one node the run starts distffn's own ``mpiexec`` (so ``failure.max_failures`` can restart
its ranks); across nodes ``srun`` starts one rank per task, MPI between them on
``scaling.interface`` (which such a job must name).
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

from ..errors import UserError
from ..files import write_atomic
from ..jobspec import validate
from ..parallel.resources import note
from .records import PRIVATE_FILE, stage_dir
from .scheduler import (
    FAILED,
    FINISHED,
    PENDING,
    RUNNING,
    SCHEDULERS,
    STOPPED,
    SUCCEEDED,
    UNKNOWN,
    JobState,
    Scheduler,
    check_text,
    ended_state,
    resume_command,
    run_command,
)

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slurm_job.sbatch")
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$")       # SLURM's --time forms
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
COMMAND_TIMEOUT_S = 30           # each sbatch, scontrol, sacct, scancel (`distffn jobs`: 5 s)
DEFAULT_CONF = "/etc/slurm/slurm.conf"

# SLURM's job states in Ray Jobs' words
_STATES = {
    "PENDING": PENDING, "CONFIGURING": PENDING, "REQUEUED": PENDING, "REQUEUE_HOLD": PENDING,
    "REQUEUE_FED": PENDING, "RESV_DEL_HOLD": PENDING,
    "SUSPENDED": RUNNING, "STOPPED": RUNNING,          # SLURM's STOPPED is a pause (SIGSTOP), not an end
    "RESIZING": RUNNING, "RUNNING": RUNNING, "COMPLETING": RUNNING, "SIGNALING": RUNNING,
    "STAGE_OUT": RUNNING, "COMPLETED": SUCCEEDED, "CANCELLED": STOPPED, "PREEMPTED": STOPPED,
    "FAILED": FAILED, "TIMEOUT": FAILED, "NODE_FAIL": FAILED, "OUT_OF_MEMORY": FAILED,
    "BOOT_FAIL": FAILED, "DEADLINE": FAILED, "REVOKED": FAILED, "SPECIAL_EXIT": FAILED,
}


@dataclass
class SlurmProfile:
    partition: Optional[str] = None       # default: the cluster's default partition
    nodes: int = 1
    tasks_per_node: int = 1               # one rank (worker) per task
    cpus_per_task: int = 1
    time: str = "01:00:00"                # [days-]hours:minutes:seconds
    gpus_per_node: int = 0                # --gres=gpu:N when the job sets scaling.use_gpu
    account: Optional[str] = None
    qos: Optional[str] = None
    setup: list = field(default_factory=list)   # shell lines run first (module load, source venv)
    template: Optional[str] = None        # your copy of cluster/slurm/job.sbatch
    command: str = "distffn"              # how the nodes run distffn
    runs: str = "runs"                    # run directories go to RUNS/<job id> unless --out


class Unreachable(UserError):
    """SLURM's client commands cannot reach a controller (none configured, or it does not
    answer): nothing is known about the job, which is not the same as SLURM forgetting it."""

    def __init__(self, what: str, detail: str):
        super().__init__(f"{what}: {detail}")
        self.detail = detail


def controller() -> str:
    """The controller this machine's SLURM clients ask, from the slurm.conf they read
    (``$SLURM_CONF``, else ``/etc/slurm/slurm.conf``): ``127.0.0.1:6817``."""
    conf = os.environ.get("SLURM_CONF") or DEFAULT_CONF
    try:
        with open(conf, errors="replace") as f:
            text = f.read(1 << 20)
    except OSError:
        return f"? (no slurm.conf at {conf})"
    host = re.search(r"^\s*(?:SlurmctldHost|ControlMachine)\s*=\s*([^\s(#]+)(?:\(([^)\s]+)\))?", text,
                     re.M | re.I)
    port = re.search(r"^\s*SlurmctldPort\s*=\s*(\d+)", text, re.M | re.I)
    name = (host.group(2) or host.group(1)) if host else "?"
    return f"{name}:{port.group(1) if port else 6817}"


def _unreachable(what: str, reason: str) -> Unreachable:
    conf = os.environ.get("SLURM_CONF")
    if not conf and not os.path.isfile(DEFAULT_CONF):
        return Unreachable(what, f"no SLURM cluster configured here: SLURM_CONF is unset and there is no "
                                 f"{DEFAULT_CONF}; export SLURM_CONF=<the cluster's slurm.conf> "
                                 f"(cluster/slurm/local-cluster.sh up prints it)")
    if conf and not os.path.isfile(conf):
        return Unreachable(what, f"SLURM_CONF={conf}: no such file; export SLURM_CONF=<the cluster's "
                                 f"slurm.conf>")
    return Unreachable(what, f"controller unreachable at {controller()} ({reason}); start slurmctld "
                             f"(cluster/slurm/local-cluster.sh up) or set SLURM_CONF to the cluster's "
                             f"slurm.conf (now {conf or DEFAULT_CONF})")


# what SLURM's clients print when they reach no controller, or none is configured
_NO_CONTROLLER = ("Unable to contact slurm controller", "Could not establish a configuration source",
                  "Unable to process configuration file", "resolve_ctls_from_dns_srv",
                  "Munge encode failed", "Zero Bytes were transmitted", "Socket timed out")


def _run(args: list[str], what: str, timeout_s: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess:
    """A SLURM client command, bounded by ``timeout_s``; a missing one is named, and one that
    reaches no controller (or hangs) raises :class:`Unreachable`, never a traceback."""
    if shutil.which(args[0]) is None:
        raise UserError(f"{what}: {args[0]} not found on PATH; run distffn where SLURM's client "
                        f"commands are (a login node), or install slurm-client")
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise _unreachable(what, f"{args[0]} did not answer within {timeout_s:g} s") from None
    if r.returncode != 0:
        said = next((ln for ln in r.stderr.splitlines() if any(m in ln for m in _NO_CONTROLLER)), None)
        if said:
            raise _unreachable(what, f"{args[0]}: {_error_text(said)}")
    return r


def _make_dirs(path: str) -> list[str]:
    """``path`` and the folders above it that are missing; those it created, deepest first."""
    created, folder = [], path
    while not os.path.exists(folder) and folder != os.path.dirname(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    os.makedirs(path, exist_ok=True)
    return created


def _error_text(line: str) -> str:
    """A client's error line without its ``sbatch: error:`` prefix."""
    return re.sub(r"^(\w+: )?(error|fatal): ", "", line.strip())[:300]


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return _error_text(lines[0]) if lines else ""


@SCHEDULERS.named("slurm")
class Slurm(Scheduler):
    """a SLURM queue: sbatch, scontrol/sacct, scancel"""

    Profile = SlurmProfile

    @classmethod
    def validate(cls, p: SlurmProfile, source: str):
        for key in ("nodes", "tasks_per_node", "cpus_per_task"):
            if getattr(p, key) < 1:
                raise UserError(f"{source}: {key}: expected a positive integer, got {getattr(p, key)}")
        if p.gpus_per_node < 0:
            raise UserError(f"{source}: gpus_per_node: expected 0 or more, got {p.gpus_per_node}")
        if not _TIME.match(p.time):
            raise UserError(f"{source}: time: expected SLURM's [days-]hours:minutes:seconds, e.g. "
                            f"01:30:00 or 2-00:00:00, got {p.time!r}")
        if not all(isinstance(line, str) for line in p.setup):
            raise UserError(f"{source}: setup: expected a list of shell lines (strings)")
        for line in p.setup:            # one shell line each: a newline would hide another
            check_text(line, f"{source}: setup", "shell line")
        for key in ("partition", "account", "qos"):
            value = getattr(p, key)
            if value is not None and not re.match(r"^[\w.,-]+$", value):
                raise UserError(f"{source}: {key}: expected a SLURM name, got {value!r}")
        if p.template is not None:
            # its path is written into the batch script's comment
            check_text(cls._template_path(p, source), f"{source}: template", "file name")
            if not os.path.isfile(cls._template_path(p, source)):
                raise UserError(f"{source}: template: {p.template}: no such file")

    @staticmethod
    def _template_path(p: SlurmProfile, source: str) -> str:
        if p.template is None:
            return TEMPLATE
        return os.path.join(os.path.dirname(os.path.abspath(source)), os.path.expanduser(p.template))

    def where(self) -> str:
        return f"slurm ({self.profile.partition or 'default partition'})"

    def label(self) -> str:
        return f"slurm:{self.profile.partition}" if self.profile.partition else "slurm"

    def native_name(self, native_id: str) -> str:
        return f"SLURM job {native_id}"

    def check(self, record, field: str) -> None:
        # `#SBATCH --output=RUN_DIR/slurm-%j.out` is a file name pattern: SLURM replaces %x
        # and a backslash turns the replacing off, so the output would land elsewhere
        bad = next((c for c in record.run_dir if c in "%\\"), None)
        if bad:
            raise UserError(f"{field}: {record.run_dir}: SLURM reads {bad!r} in its output file name as "
                            f"a pattern character; choose a run directory without % or \\")

    # ---------------------------------------------------------------- submit
    @property
    def ranks(self) -> int:
        return self.profile.nodes * self.profile.tasks_per_node

    def adapt(self, job):
        """The allocation decides the workers: one MPI rank per task."""
        s, n = job.scaling, self.ranks
        if self.profile.nodes > 1 and not s.interface:
            # the ranks send their gradients between nodes by MPI: over a network the user names,
            # never a guessed one (each rank keeps UCX to it: parallel.launch)
            raise UserError(f"scaling.interface: a job on {self.profile.nodes} nodes ({self.source}) "
                            f"moves its gradients by MPI between them; name the network interface "
                            f"it may use on the nodes (e.g. eth0 or ib0)")
        if n > 1 and (s.backend != "mpi" or s.num_workers != n):
            note(f"slurm: {n} workers as MPI ranks (nodes {self.profile.nodes} × tasks_per_node "
                 f"{self.profile.tasks_per_node}); the job spec said {s.num_workers} on {s.backend}")
            s.backend, s.num_workers = "mpi", n
        if s.use_gpu and self.profile.gpus_per_node < 1:
            raise UserError(f"{self.source}: gpus_per_node: the job sets scaling.use_gpu, so the "
                            f"allocation needs GPUs; set gpus_per_node")
        return validate(job)

    def render(self, record, job) -> str:
        """The batch script for ``record``: the template with its ``{{...}}`` filled in."""
        p = self.profile
        path = self._template_path(p, self.source)
        directives = [f"#SBATCH --{k}={v}" for k, v in (("partition", p.partition), ("account", p.account),
                                                          ("qos", p.qos)) if v]
        if p.gpus_per_node and job.scaling.use_gpu:
            directives.append(f"#SBATCH --gres=gpu:{p.gpus_per_node}")
        run = run_command(p.command, os.path.join(stage_dir(record.id), "job.yaml"), record.run_dir)
        # on one node distffn starts its own mpiexec (and can restart ranks); across nodes srun
        # does, with --mpi=pmi2 (the pip MPICH speaks PMI-2; without it each task is an MPI world
        # of one). srun answers SIGTERM by ending the step (its tasks SIGKILLed after KillWait)
        # without passing it on, but passes SIGUSR1 on, and the run takes SIGUSR1 as a forwarded
        # SIGTERM (scancel and requeue also SIGTERM the tasks themselves, through their slurmstepd)
        launch = run if p.nodes == 1 else f"srun --kill-on-bad-exit=1 --mpi=pmi2 {run}"
        forward = "TERM" if p.nodes == 1 else "USR1"
        # quoted as a shell word, which sbatch's #SBATCH parser also reads as one argument
        # (quotes and backslashes as in a shell; an unquoted # would start a comment there)
        values = {"job_id": record.id, "template": shlex.quote(path), "run_dir": shlex.quote(record.run_dir),
                  "nodes": p.nodes,
                  "tasks_per_node": p.tasks_per_node, "cpus_per_task": p.cpus_per_task, "time": p.time,
                  "directives": "\n".join(directives), "setup": "\n".join(p.setup), "launch": launch,
                  "resume": "--resume" if record.resume else '""', "forward_signal": forward,
                  "resume_command": shlex.quote(resume_command(record))}
        with open(path) as f:
            text = f.read()
        missing = sorted(set(_PLACEHOLDER.findall(text)) - set(values))
        if missing:
            raise UserError(f"{path}: {{{{{missing[0]}}}}} is not a placeholder distffn fills in "
                            f"(expected: {', '.join(values)})")
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)

    def submit(self, record, job) -> str:
        script = os.path.join(stage_dir(record.id), "job.sbatch")
        write_atomic(script, self.render(record, job), PRIVATE_FILE)
        created = _make_dirs(record.run_dir)              # slurmd writes its output file there
        record.command = f"sbatch --parsable {shlex.quote(script)}"
        try:
            r = _run(["sbatch", "--parsable", script], "submit", self.timeout_s)
            if r.returncode != 0:
                raise UserError(f"{self.source}: sbatch refused the job: "
                                f"{_first_line(r.stderr) or _first_line(r.stdout)}")
            job_id = r.stdout.strip().split(";")[0]
            if not job_id.isdigit():
                raise UserError(f"submit: sbatch answered {r.stdout.strip()!r}, not a job id")
        except BaseException:
            for folder in created:        # a refused job leaves no empty run directory behind
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
            raise
        return job_id

    # ---------------------------------------------------------------- state
    def _native_state(self, job_id: str) -> tuple[Optional[str], str]:
        """(SLURM's state word, exit code once it ended) from ``scontrol show job`` (which also
        keeps finished jobs, for ``MinJobAge``), else ``sacct``; (None, "") when no record of the
        job is left."""
        r = _run(["scontrol", "show", "job", "-o", job_id], "status", self.timeout_s)
        if r.returncode == 0 and "JobState=" in r.stdout:
            fields = dict(re.findall(r"(\w+)=(\S*)", r.stdout))
            state = fields.get("JobState")
            return state, fields.get("ExitCode", "") if _STATES.get(state) in FINISHED else ""
        if r.returncode != 0 and "Invalid job id" not in r.stderr:    # not "forgotten": unsaid
            raise Unreachable("status", f"scontrol could not say: {_first_line(r.stderr) or 'no answer'}")
        if shutil.which("sacct"):
            r = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,ExitCode"], "status", self.timeout_s)
            line = r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else ""
            if "|" in line:
                state, code = line.split("|", 1)
                return state.split()[0], code
        return None, ""

    def status(self, record) -> JobState:
        try:
            native, code = self._native_state(record.native_id)
        except Unreachable as e:
            return JobState(UNKNOWN, e.detail)
        if native is None:
            # SLURM forgot it (MinJobAge passed, no accounting): the run directory tells
            state, how = ended_state(record.run_dir)
            return JobState(state, f"SLURM job {record.native_id} is no longer listed (no accounting); "
                                   f"{how}")
        state = _STATES.get(native.rstrip("+"), FAILED)
        return JobState(state, f"SLURM job {record.native_id} {native}"
                        + (f", exit code {code}" if code else ""))

    # ---------------------------------------------------------------- logs, stop
    def _output(self, record) -> str:
        return os.path.join(record.run_dir, f"slurm-{record.native_id}.out")

    def logs(self, record) -> str:
        try:
            with open(self._output(record), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            if self.status(record).state == PENDING:
                return ""
            found = glob.glob(os.path.join(record.run_dir, "slurm-*.out"))
            raise UserError(f"{record.id}: no output at {self._output(record)}"
                            + (f" (there is {found[0]})" if found else
                               "; is the run directory on a filesystem this machine shares with the nodes?"))

    def follow(self, record) -> Iterator[str]:
        offset = 0
        while True:
            state = self.status(record)
            try:
                with open(self._output(record), errors="replace") as f:
                    f.seek(offset)
                    chunk = f.read()
                    offset = f.tell()
            except FileNotFoundError:
                chunk = ""
            if chunk:
                yield chunk
            if state.state == UNKNOWN:       # what there is, then say why it ends here
                raise UserError(f"{record.id}: stopped following: {state.detail}")
            if state.state in FINISHED:
                return
            time.sleep(0.5)

    def stop(self, record) -> None:
        # plain scancel: SIGTERM to the batch script and every step, SIGKILL after KillWait
        r = _run(["scancel", record.native_id], "stop", self.timeout_s)
        if r.returncode != 0:
            raise UserError(f"{record.id}: scancel {record.native_id}: {_first_line(r.stderr)}")
