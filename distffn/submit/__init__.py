"""Submitting training jobs to a cluster and following them: cluster profiles
(:mod:`.profile`), one :class:`~.scheduler.Scheduler` per kind of cluster (Ray Jobs, SLURM;
:data:`~.scheduler.SCHEDULERS`), the record of every submission (:mod:`.records`), and the
verbs the CLI offers (:mod:`.jobs`)."""
from . import ray_jobs, slurm  # noqa: F401  (they register their kinds)
from .jobs import job_status, list_jobs, stop_job, submit_job
from .scheduler import FINISHED, SCHEDULERS, STATES

__all__ = ["FINISHED", "SCHEDULERS", "STATES", "job_status", "list_jobs", "stop_job", "submit_job"]
