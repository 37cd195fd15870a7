"""Where each submitted job went: one JSON record per job id under ``$DISTFFN_HOME/jobs``
(default ``~/.distffn``), so ``status``, ``logs`` and ``stop`` need only the id."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from typing import Optional

from ..errors import UserError
from ..files import write_json

HOME_ENV = "DISTFFN_HOME"
# records and staged files hold the user's paths, commands and environment: theirs alone
PRIVATE_FILE, PRIVATE_DIR = 0o600, 0o700
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class JobRecord:
    """One submission: its id, the cluster (kind and the profile as it was), the cluster's own
    id for it, and the run directory the job writes."""
    id: str
    kind: str
    profile_path: str
    profile: dict
    run_dir: str
    job_path: str
    submitted: str                       # ISO 8601, UTC
    native_id: Optional[str] = None      # Ray's submission id, SLURM's job id
    overrides: list = field(default_factory=list)
    resume: bool = False                 # continue the run directory's newest checkpoint
    command: str = ""                    # what the cluster runs


def home() -> str:
    return os.path.expanduser(os.environ.get(HOME_ENV) or "~/.distffn")


def jobs_dir() -> str:
    return os.path.join(home(), "jobs")


def stage_dir(job_id: str) -> str:
    """A folder of the job's own for what the submitter hands the cluster (the resolved job
    spec, a rendered batch script)."""
    return os.path.join(jobs_dir(), job_id)


def make_private_dir(path: str) -> None:
    """``path`` (under ``$DISTFFN_HOME/jobs``) created 0700, like ``$DISTFFN_HOME`` when it
    is new; the jobs folder is made 0700 also when an older distffn created it open to others."""
    try:
        os.makedirs(home(), mode=PRIVATE_DIR, exist_ok=True)
        os.makedirs(path, mode=PRIVATE_DIR, exist_ok=True)
        for folder in {jobs_dir(), path}:
            if os.stat(folder).st_uid == os.getuid():
                os.chmod(folder, PRIVATE_DIR)
    except OSError as e:
        raise UserError(f"${HOME_ENV}: cannot write {e.filename or path} ({e.strerror or e}); set "
                        f"{HOME_ENV} to a folder of yours (default ~/.distffn)") from None


def make_stage_dir(job_id: str) -> str:
    """The job's stage folder, new and private."""
    folder = stage_dir(job_id)
    make_private_dir(jobs_dir())
    os.mkdir(folder, PRIVATE_DIR)
    return folder


def discard(job_id: str) -> None:
    """What a submission that failed left: its stage folder and its record."""
    shutil.rmtree(stage_dir(job_id), ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_path(job_id))


def new_id(name: str) -> str:
    """``<job name>-<6 hex digits>``, not yet taken here."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:100] or "job"
    while True:
        job_id = f"{base}-{secrets.token_hex(3)}"
        if not os.path.exists(_path(job_id)) and not os.path.exists(stage_dir(job_id)):
            return job_id


def _path(job_id: str) -> str:
    return os.path.join(jobs_dir(), f"{job_id}.json")


def save(record: JobRecord) -> None:
    make_private_dir(jobs_dir())
    write_json(_path(record.id), dataclasses.asdict(record), PRIVATE_FILE)


def load(job_id: str) -> JobRecord:
    """The record of ``job_id``; an id nobody submitted from here is the user's mistake."""
    path = _path(job_id) if _ID.match(job_id or "") else None
    if path is None or not os.path.isfile(path):
        raise UserError(f"{job_id}: no such job; `distffn jobs` lists the jobs submitted from here "
                        f"(records in {jobs_dir()}, ${HOME_ENV})")
    try:
        with open(path) as f:
            raw = json.load(f)
        return JobRecord(**{k: raw[k] for k in (f.name for f in dataclasses.fields(JobRecord)) if k in raw})
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{path}: not a readable job record ({e})") from None


def all_records() -> list[JobRecord]:
    """Every record here, newest first."""
    try:
        names = [n[:-5] for n in os.listdir(jobs_dir()) if n.endswith(".json")]
    except FileNotFoundError:
        return []
    except OSError as e:
        raise UserError(f"${HOME_ENV}: cannot read {jobs_dir()} ({e.strerror or e}); set {HOME_ENV} "
                        f"to a folder of yours (default ~/.distffn)") from None
    records = []
    for job_id in names:
        try:
            records.append(load(job_id))
        except UserError:
            continue                    # a damaged record does not hide the others
    return sorted(records, key=lambda r: r.submitted, reverse=True)
