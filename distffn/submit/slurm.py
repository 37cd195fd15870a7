"""``kind: slurm``: jobs through a SLURM queue: ``sbatch --parsable`` of a batch script rendered
from a template (``cluster/slurm/job.sbatch``, which users may copy and change), state from
``scontrol show job`` (a finished job stays there for ``MinJobAge``), then ``sacct`` (where
accounting exists), and ``scancel`` to stop.

The run directory, the staged job spec and ``data.path`` must be on a filesystem the nodes
share (the usual SLURM setup); the batch script's output goes to ``RUN_DIR/slurm-<jobid>.out``.
On one node the run starts distffn's own ``mpiexec`` (so ``failure.max_failures`` can restart
its ranks); across nodes ``srun`` starts one rank per task.
"""
from __future__ import annotations

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
from ..jobspec import validate
from ..parallel.resources import note
from .records import stage_dir
from .scheduler import (
    FAILED,
    FINISHED,
    PENDING,
    RUNNING,
    SCHEDULERS,
    STOPPED,
    SUCCEEDED,
    JobState,
    Scheduler,
    resume_command,
    run_command,
)

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slurm_job.sbatch")
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$")       # SLURM's --time forms
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
COMMAND_TIMEOUT_S = 30

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


def _run(args: list[str], what: str) -> subprocess.CompletedProcess:
    """A SLURM client command; a missing one or a hang is named, never a traceback."""
    if shutil.which(args[0]) is None:
        raise UserError(f"{what}: {args[0]} not found on PATH; run distffn where SLURM's client "
                        f"commands are (a login node), or install slurm-client")
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UserError(f"{what}: {args[0]} did not answer within {COMMAND_TIMEOUT_S} s; is slurmctld "
                        f"up ({os.environ.get('SLURM_CONF', 'the default slurm.conf')})?") from None


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[0][:300] if lines else ""


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
        for key in ("partition", "account", "qos"):
            value = getattr(p, key)
            if value is not None and not re.match(r"^[\w.,-]+$", value):
                raise UserError(f"{source}: {key}: expected a SLURM name, got {value!r}")
        if p.template is not None and not os.path.isfile(cls._template_path(p, source)):
            raise UserError(f"{source}: template: {p.template}: no such file")

    @staticmethod
    def _template_path(p: SlurmProfile, source: str) -> str:
        if p.template is None:
            return TEMPLATE
        return os.path.join(os.path.dirname(os.path.abspath(source)), os.path.expanduser(p.template))

    def where(self) -> str:
        return f"slurm ({self.profile.partition or 'default partition'})"

    # ---------------------------------------------------------------- submit
    @property
    def ranks(self) -> int:
        return self.profile.nodes * self.profile.tasks_per_node

    def adapt(self, job):
        """The allocation decides the workers: one MPI rank per task."""
        s, n = job.scaling, self.ranks
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
        # of one). srun answers SIGTERM by SIGKILLing its tasks but passes SIGUSR1 on, and the
        # run takes SIGUSR1 as a forwarded SIGTERM
        launch = run if p.nodes == 1 else f"srun --kill-on-bad-exit=1 --mpi=pmi2 {run}"
        forward = "TERM" if p.nodes == 1 else "USR1"
        values = {"job_id": record.id, "template": path, "run_dir": record.run_dir, "nodes": p.nodes,
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
        with open(script, "w") as f:
            f.write(self.render(record, job))
        os.makedirs(record.run_dir, exist_ok=True)        # slurmd writes its output file there
        record.command = f"sbatch --parsable {shlex.quote(script)}"
        r = _run(["sbatch", "--parsable", script], "submit")
        if r.returncode != 0:
            raise UserError(f"{self.source}: sbatch refused the job: "
                            f"{_first_line(r.stderr) or _first_line(r.stdout)}")
        job_id = r.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise UserError(f"submit: sbatch answered {r.stdout.strip()!r}, not a job id")
        return job_id

    # ---------------------------------------------------------------- state
    def _native_state(self, job_id: str) -> tuple[Optional[str], str]:
        """(SLURM's state word, exit code once it ended) from ``scontrol show job`` (which also
        keeps finished jobs, for ``MinJobAge``), else ``sacct``; (None, "") when no record of the
        job is left."""
        r = _run(["scontrol", "show", "job", "-o", job_id], "status")
        if r.returncode == 0 and "JobState=" in r.stdout:
            fields = dict(re.findall(r"(\w+)=(\S*)", r.stdout))
            state = fields.get("JobState")
            return state, fields.get("ExitCode", "") if _STATES.get(state) in FINISHED else ""
        if shutil.which("sacct"):
            r = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,ExitCode"], "status")
            line = r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else ""
            if "|" in line:
                state, code = line.split("|", 1)
                return state.split()[0], code
        return None, ""

    def status(self, record) -> JobState:
        native, code = self._native_state(record.native_id)
        if native is None:
            # SLURM forgot it (MinJobAge passed, no accounting): the run directory tells
            ok = os.path.isfile(os.path.join(record.run_dir, "summary.json"))
            return JobState(SUCCEEDED if ok else FAILED,
                            f"SLURM job {record.native_id} is no longer listed (no accounting); "
                            f"state read from the run directory")
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
            done = self.status(record).state in FINISHED
            try:
                with open(self._output(record), errors="replace") as f:
                    f.seek(offset)
                    chunk = f.read()
                    offset = f.tell()
            except FileNotFoundError:
                chunk = ""
            if chunk:
                yield chunk
            if done:
                return
            time.sleep(0.5)

    def stop(self, record) -> None:
        # plain scancel: SIGTERM to the batch script and every step, SIGKILL after KillWait
        r = _run(["scancel", record.native_id], "stop")
        if r.returncode != 0:
            raise UserError(f"{record.id}: scancel {record.native_id}: {_first_line(r.stderr)}")
