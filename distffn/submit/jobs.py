"""The verbs of ``distffn submit | status | logs | stop | jobs``: a job spec validated here before
anything reaches the cluster, the record that lets later calls find it by id, and its state
with the progress read from its run directory."""
from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from typing import Iterator, Optional

from ..errors import UserError
from ..jobspec import load_job
from ..training.metrics import read_progress
from ..training.trainer import check_run_dir
from . import records
from .profile import from_dict, load_profile
from .records import JobRecord
from .scheduler import FINISHED, JobState

STOP_WAIT_S = 120           # how long `stop` waits for the cluster to report the job ended


def submit_job(job_path: str, cluster: str, out: Optional[str] = None,
               overrides: Optional[list[str]] = None, resume: bool = False) -> JobRecord:
    """Validate ``job_path`` (with ``--set`` ``overrides``) and the profile ``cluster``, start
    the run there, and record it. Every mistake is a :class:`UserError` raised before the
    cluster sees anything."""
    job = load_job(job_path, overrides)
    scheduler = load_profile(cluster)
    job = scheduler.adapt(job)
    job_id = records.new_id(job.name)
    # like `distffn run`'s runs/<name>: relative to where the command is given
    run_dir = os.path.abspath(os.path.expanduser(out or os.path.join(scheduler.profile.runs, job_id)))
    check_run_dir(run_dir, resume)
    record = JobRecord(id=job_id, kind=scheduler.name, profile_path=scheduler.source,
                       profile=scheduler.raw, run_dir=run_dir, job_path=os.path.abspath(job_path),
                       submitted=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       overrides=list(overrides or []), resume=resume)
    _stage(record, job)
    record.native_id = scheduler.submit(record, job)
    records.save(record)
    return record


def _stage(record: JobRecord, job) -> None:
    """The resolved job spec, as the cluster will run it, in the job's own folder; a relative
    ``data.path`` becomes absolute (it meant the submitter's working folder)."""
    folder = records.stage_dir(record.id)
    os.makedirs(folder, exist_ok=True)
    if job.data.path:
        job.data.path = os.path.abspath(os.path.expanduser(job.data.path))
    with open(os.path.join(folder, "job.yaml"), "w") as f:
        f.write(job.to_yaml())


def scheduler_of(record: JobRecord):
    """The scheduler a record was submitted to, from the profile as it was at submission."""
    return from_dict(record.profile, record.profile_path)


def job_status(job_id: str) -> dict:
    """State word, the cluster's detail, and the run's progress (step, epoch, newest metrics)."""
    record = records.load(job_id)
    state = scheduler_of(record).status(record)
    return {"id": record.id, "state": state.state, "detail": state.detail, "kind": record.kind,
            "native_id": record.native_id, "run_dir": record.run_dir, "submitted": record.submitted,
            **read_progress(record.run_dir)}


def job_logs(job_id: str, follow: bool = False) -> Iterator[str]:
    """The job's output: all of it so far, or (``follow``) as it comes until the job ends."""
    record = records.load(job_id)
    scheduler = scheduler_of(record)
    if follow:
        yield from scheduler.follow(record)
    else:
        yield scheduler.logs(record)


def stop_job(job_id: str, wait_s: float = STOP_WAIT_S) -> JobState:
    """Ask the cluster to stop the job (SIGTERM: the run checkpoints, then exits) and wait until
    the cluster reports it ended; the state it ended in."""
    record = records.load(job_id)
    scheduler = scheduler_of(record)
    scheduler.stop(record)
    deadline = time.monotonic() + wait_s
    while True:
        state = scheduler.status(record)
        if state.state in FINISHED:
            return state
        if time.monotonic() > deadline:
            raise UserError(f"{job_id}: still {state.state} {wait_s:.0f} s after the stop request "
                            f"({state.detail})")
        time.sleep(0.5)


def list_jobs() -> list[JobRecord]:
    """Every job submitted from here, newest first."""
    return records.all_records()
