"""The verbs of ``distffn submit | status | logs | stop | jobs``: a job spec validated here before
anything reaches the cluster, the record that lets later calls find it by id, and its state
with the progress read from its run directory."""
from __future__ import annotations

import json
import os
import threading
import time
from datetime import datetime, timezone
from typing import Iterator, Optional

from ..errors import UserError
from ..files import write_atomic
from ..jobspec import load_job
from ..training.metrics import read_progress
from ..training.run_folder import check_run_dir
from . import records
from .profile import from_dict, load_profile
from .records import JobRecord
from .scheduler import FINISHED, UNKNOWN, JobState, check_text

STOP_WAIT_S = 120           # how long `stop` waits for the cluster to report the job ended
JOBS_TIMEOUT_S = 5          # `distffn jobs`: each cluster's answer about a job


def submit_job(job_path: str, cluster: str, out: Optional[str] = None,
               overrides: Optional[list[str]] = None, resume: bool = False) -> JobRecord:
    """Validate ``job_path`` (with ``--set`` ``overrides``) and the profile ``cluster``, start
    the run there, and record it. Every mistake is a :class:`UserError` raised before the
    cluster sees anything; a submission the cluster refuses leaves no record and no files."""
    # every one of these reaches a shell line or a batch script on the cluster
    for value, field in ((job_path, "JOB.yaml"), (cluster, "--cluster"), (out, "--out"),
                         *((o, "--set") for o in overrides or [])):
        if value is not None:
            check_text(value, field, "path" if field != "--set" else "SECTION.KEY=VALUE")
    job = load_job(job_path, overrides)
    scheduler = load_profile(cluster)
    job = scheduler.adapt(job)
    job_id = records.new_id(job.name)
    # like `distffn run`'s runs/<name>: relative to where the command is given
    run_dir = os.path.abspath(os.path.expanduser(out or os.path.join(scheduler.profile.runs, job_id)))
    field = "--out" if out else f"{cluster}: runs"
    # a Ray cluster may see a run folder this machine does not (no shared filesystem)
    check_run_dir(run_dir, resume, elsewhere_ok=scheduler.name == "ray")
    record = JobRecord(id=job_id, kind=scheduler.name, profile_path=scheduler.source,
                       profile=scheduler.raw, run_dir=run_dir, job_path=os.path.abspath(job_path),
                       submitted=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       overrides=list(overrides or []), resume=resume)
    scheduler.check(record, field)
    _check_data(job, scheduler)
    _check_not_in_use(run_dir, field)
    try:
        _stage(record, job)
        record.native_id = scheduler.submit(record, job)
        records.save(record)
    except BaseException:
        records.discard(record.id)
        raise
    return record


def _check_data(job, scheduler) -> None:
    """``data.path`` must exist where the cluster will read it, as far as this machine can
    tell (a shared filesystem, or the folder Ray uploads); a missing one would only fail there."""
    if not job.data.path:
        return
    local, where = scheduler.data_path(job.data.path)
    if local is not None and not os.path.exists(local):
        raise UserError(f"data.path: {local}: no such file or folder ({where})")


def _check_not_in_use(run_dir: str, field: str) -> None:
    """Refuse a run directory that a job submitted from here still writes (or may: its
    cluster cannot say): two runs in one folder mix their checkpoints and metrics."""
    for other in records.all_records():
        if other.run_dir != run_dir:
            continue
        try:
            state = scheduler_of(other).status(other)
        except UserError as e:
            state = JobState(UNKNOWN, str(e))
        if state.state not in FINISHED:
            raise UserError(f"{field}: {run_dir} is the run directory of job {other.id}, which is "
                            f"{state.state}; stop it first (distffn stop {other.id}) or choose "
                            f"another run directory")


def _stage(record: JobRecord, job) -> None:
    """The resolved job spec, as the cluster will run it, in the job's own folder; a relative
    ``data.path`` becomes absolute (it meant the submitter's working folder)."""
    folder = records.make_stage_dir(record.id)
    if job.data.path:
        job.data.path = os.path.abspath(os.path.expanduser(job.data.path))
    write_atomic(os.path.join(folder, "job.yaml"), job.to_yaml(), records.PRIVATE_FILE)


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
        if state.state == UNKNOWN:
            raise UserError(f"{job_id}: asked to stop, but cannot tell whether it stopped: {state.detail}")
        if time.monotonic() > deadline:
            raise UserError(f"{job_id}: still {state.state} {wait_s:.0f} s after the stop request "
                            f"({state.detail})")
        time.sleep(0.5)


def list_jobs() -> list[JobRecord]:
    """Every job submitted from here, newest first."""
    return records.all_records()


def job_states(recs: list[JobRecord], timeout_s: float = JOBS_TIMEOUT_S) -> list[tuple[JobRecord, JobState, str]]:
    """(record, state, cluster label) of each record, every cluster asked at once with
    ``timeout_s`` per question; a cluster that does not answer in time gives UNKNOWN for all
    its jobs, so listing never waits on it for long."""
    groups: dict[str, list[JobRecord]] = {}
    for r in recs:
        groups.setdefault(json.dumps([r.kind, r.profile_path, r.profile], sort_keys=True, default=str), []).append(r)
    answers: dict[str, tuple[JobState, str]] = {}

    def ask(group: list[JobRecord]):
        try:
            scheduler = scheduler_of(group[0])
        except UserError as e:
            answers.update({r.id: (JobState(UNKNOWN, str(e)), group[0].kind) for r in group})
            return
        scheduler.timeout_s = timeout_s
        for r in group:
            try:
                state = scheduler.status(r)
            except UserError as e:
                state = JobState(UNKNOWN, str(e))
            if state.state == UNKNOWN:           # the next job's answer would be the same
                answers.update({o.id: (state, scheduler.label()) for o in group if o.id not in answers})
                return
            answers[r.id] = (state, scheduler.label())

    threads = [threading.Thread(target=ask, args=(g,), daemon=True) for g in groups.values()]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 2 * timeout_s + 1   # a connection, then one question
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    late = JobState(UNKNOWN, f"no answer within {2 * timeout_s + 1:g} s")
    return [(r, *answers.get(r.id, (late, r.kind))) for r in recs]
