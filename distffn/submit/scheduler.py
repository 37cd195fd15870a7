"""What every kind of cluster offers ``distffn submit``, ``status``, ``logs`` and ``stop``: the
:class:`Scheduler` interface, the job states (Ray Jobs' words, for SLURM too), and
:data:`SCHEDULERS`, the registry of cluster kinds (a profile's ``kind``)."""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Iterator, Optional

from ..registry import Registry

PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED = "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"
STATES = (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)
FINISHED = frozenset({SUCCEEDED, FAILED, STOPPED})

# set for a submitted run: the command that continues it, for the run's "stopped by SIGTERM" line
RESUME_COMMAND_ENV = "DISTFFN_RESUME_COMMAND"

# profile kind -> Scheduler subclass
SCHEDULERS = Registry("cluster kind", "kind")


@dataclass
class JobState:
    """Where a submitted job is: one of :data:`STATES`, and the cluster's own words for it."""
    state: str
    detail: str = ""            # e.g. "SLURM job 12 COMPLETED, exit code 0:0"


class Scheduler:
    """One cluster profile's job system. A subclass sets ``Profile`` (a dataclass: the profile's
    keys, typed), checks them in ``validate``, and implements the five verbs on a record
    (:class:`~.records.JobRecord`)."""

    name = "?"
    Profile: type = object

    def __init__(self, profile, source: str, raw: Optional[dict] = None):
        self.profile, self.source = profile, source
        self.raw = raw or {}             # the profile as written, kept in each job's record

    @classmethod
    def validate(cls, profile, source: str):
        """Raise :class:`~distffn.errors.UserError` for a value the cluster cannot take."""

    def where(self) -> str:
        """The cluster in a few words, for messages: ``ray at http://127.0.0.1:8265``."""
        raise NotImplementedError

    def adapt(self, job):
        """The job as this cluster will run it (e.g. SLURM's tasks decide the workers); it is
        validated again by whoever changes it."""
        return job

    def submit(self, record, job) -> str:
        """Start ``record``'s run on the cluster; the cluster's own id for it."""
        raise NotImplementedError

    def status(self, record) -> JobState:
        raise NotImplementedError

    def logs(self, record) -> str:
        """Everything the run has printed so far."""
        raise NotImplementedError

    def follow(self, record) -> Iterator[str]:
        """The run's output as it comes, until the job has finished."""
        raise NotImplementedError

    def stop(self, record) -> None:
        """Ask the cluster to stop the job (SIGTERM first: the run checkpoints and exits)."""
        raise NotImplementedError


def resume_command(record) -> str:
    """``distffn submit`` of the same job into the same run directory, with ``--resume``."""
    args = ["distffn", "submit", record.job_path, "--cluster", record.profile_path, "--out", record.run_dir]
    for o in record.overrides:
        args += ["--set", o]
    return shlex.join(args + ["--resume"])


def run_command(command: str, job_path: str, run_dir: str, resume: bool = False,
                overrides: Optional[list[str]] = None) -> str:
    """The ``distffn run`` line a cluster executes for a submission."""
    args = [*shlex.split(command), "run", job_path, "--out", run_dir, "--no-progress"]
    for o in overrides or []:
        args += ["--set", o]
    return shlex.join(args + (["--resume"] if resume else []))
