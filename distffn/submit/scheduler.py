"""What every kind of cluster offers ``distffn submit``, ``status``, ``logs`` and ``stop``: the
:class:`Scheduler` interface, the job states (Ray Jobs' words, for SLURM too), and
:data:`SCHEDULERS`, the registry of cluster kinds (a profile's ``kind``)."""
from __future__ import annotations

import json
import os
import shlex
import unicodedata
from dataclasses import dataclass
from typing import Iterator, Optional

from ..errors import UserError
from ..registry import Registry

PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED = "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"
# the cluster could not be asked (its controller or job server does not answer): not an end,
# since the job may well be running there
UNKNOWN = "UNKNOWN"
STATES = (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED, UNKNOWN)
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
    # seconds one question to the cluster may take; `distffn jobs` asks with a shorter bound
    timeout_s: float = 30

    def __init__(self, profile, source: str, raw: Optional[dict] = None):
        self.profile, self.source = profile, source
        self.raw = raw or {}             # the profile as written, kept in each job's record

    @classmethod
    def validate(cls, profile, source: str):
        """Raise :class:`~distffn.errors.UserError` for a value the cluster cannot take."""

    def where(self) -> str:
        """The cluster in a few words, for messages: ``ray at http://127.0.0.1:8265``."""
        raise NotImplementedError

    def label(self) -> str:
        """The cluster in one word, for the ``distffn jobs`` table: ``ray:127.0.0.1:8265``."""
        return self.name

    def native_name(self, native_id: str) -> str:
        """The cluster's id for a job in its own words: ``SLURM job 12``."""
        return f"{self.name} job {native_id}"

    def check(self, record, field: str) -> None:
        """Raise :class:`~distffn.errors.UserError` for a record this cluster cannot take (its
        run directory, named ``field`` in messages), before anything is staged."""

    def data_path(self, path: str) -> tuple[Optional[str], str]:
        """Where this machine can see the job's ``data.path`` as the cluster will read it (None
        where it cannot tell), and how the cluster reads it, for the message."""
        return (os.path.abspath(os.path.expanduser(path)),
                "the cluster reads this path, on a filesystem it shares with this machine")

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


def ended_state(run_dir: str) -> tuple[str, str]:
    """(state, how it was told) of a job its cluster no longer lists, from the run directory's
    ``summary.json``: a run stopped by a signal (``"stopped": "SIGTERM received"``) is STOPPED,
    any other summary (finished, or stopped early at its target) SUCCEEDED, none FAILED."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    except FileNotFoundError:
        return FAILED, "the run directory holds no summary.json: the run did not finish"
    except (OSError, ValueError) as e:
        return FAILED, f"the run directory's summary.json is unreadable ({getattr(e, 'strerror', None) or e})"
    stopped = summary.get("stopped") if isinstance(summary, dict) else None
    if isinstance(stopped, str) and stopped.endswith(" received"):
        return STOPPED, f"the run directory's summary says it stopped ({stopped})"
    return SUCCEEDED, "the run directory's summary says it finished" + (f" ({stopped})" if stopped else "")


def resume_command(record) -> str:
    """``distffn submit`` of the same job into the same run directory, with ``--resume``."""
    args = ["distffn", "submit", record.job_path, "--cluster", record.profile_path, "--out", record.run_dir]
    for o in record.overrides:
        args += ["--set", o]
    return shlex.join(args + ["--resume"])


def check_text(value: str, field: str, what: str = "text") -> None:
    """Refuse a value with a control character (a newline, a carriage return, a tab...): it
    lands in a batch script or a shell line, where a newline starts a command of its own."""
    bad = next((c for c in value if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise UserError(f"{field}: {value!r} holds a control character ({bad!r}); expected a "
                        f"{what} on one line, without control characters")


def split_command(command: str, field: str) -> list[str]:
    """A profile's ``command`` as words, the way a shell would split it."""
    check_text(command, field, "command")
    try:
        words = shlex.split(command)
    except ValueError as e:               # "No closing quotation", "No escaped character"
        raise UserError(f"{field}: {command!r}: {str(e).lower()}; expected a command line "
                        f"such as: python -m distffn") from None
    if not words:
        raise UserError(f"{field}: empty; expected how the nodes run distffn, e.g. distffn")
    return words


def run_command(command: str, job_path: str, run_dir: str, resume: bool = False,
                overrides: Optional[list[str]] = None) -> str:
    """The ``distffn run`` line a cluster executes for a submission."""
    args = [*split_command(command, "command"), "run", job_path, "--out", run_dir, "--no-progress"]
    for o in overrides or []:
        args += ["--set", o]
    return shlex.join(args + (["--resume"] if resume else []))
