"""``kind: ray``: jobs on a Ray cluster through its job server (the Ray Jobs SDK,
``ray.job_submission.JobSubmissionClient``), with Ray's token authentication.

The token is read as Ray reads it (``RAY_AUTH_TOKEN``, else the file at ``RAY_AUTH_TOKEN_PATH``,
else ``~/.ray/auth_token``) and sent as a bearer header, so it works whatever
``RAY_AUTH_MODE`` says on this machine. The job's files reach the cluster as Ray's
``runtime_env`` ``working_dir``: the profile's own, or else a folder holding just the resolved
job spec (then ``data.path`` and the run directory must be on a filesystem the cluster shares).

Every request to the job server is bounded (:data:`CONNECT_TIMEOUT_S`, :data:`READ_TIMEOUT_S`);
a server that does not answer ends in one line naming the address, and makes a job's state
``UNKNOWN``.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Iterator, Optional

from ..errors import UserError
from ..parallel.resources import note
from .records import stage_dir
from .scheduler import (
    FAILED,
    PENDING,
    RESUME_COMMAND_ENV,
    RUNNING,
    SCHEDULERS,
    STATES,
    UNKNOWN,
    JobState,
    Scheduler,
    ended_state,
    resume_command,
    run_command,
)

TOKEN_ENV, TOKEN_PATH_ENV, TOKEN_FILE = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token"
AGENT_WAIT_S = 60          # for the job agent of a head that has just started
CONNECT_TIMEOUT_S = 10     # each request to the job server: connecting ...
# ... and each wait for its answer (`distffn jobs` asks with 5 s for both); an upload of a
# large working_dir is bounded per chunk, not in all
READ_TIMEOUT_S = 60
# the tail of Ray's message for a failed job, whose logs we do not repeat in a status line
_LOGS_TAIL = re.compile(r",?\s*last available logs \(truncated to [\d,]+ chars\):\s*$")
RUNTIME_ENV_KEYS = ("working_dir", "pip", "env_vars", "excludes", "py_modules")

try:
    # what Ray's SDK speaks HTTP with
    from requests.exceptions import RequestException, Timeout
except ImportError:                 # no SDK either: the client property says how to install it
    RequestException = Timeout = ConnectionError


class _Unreachable(UserError):
    """No job server answers at the profile's address (in time)."""


class _UnknownJob(UserError):
    """The job server does not know the submission id (the cluster was restarted)."""


def _local_folder(working_dir: str, profile_path: str) -> str:
    """A local ``runtime_env.working_dir`` as an absolute path: ``~`` expanded, relative to the
    profile's folder."""
    return os.path.abspath(os.path.join(os.path.dirname(profile_path), os.path.expanduser(working_dir)))


@dataclass
class RayProfile:
    address: str = "http://127.0.0.1:8265"      # the job server (the dashboard's port)
    runtime_env: Optional[dict] = None          # working_dir, pip, env_vars (Ray's runtime_env)
    entrypoint_num_cpus: Optional[float] = None  # default: the job's workers if they run in the driver
    entrypoint_num_gpus: Optional[float] = None
    entrypoint_resources: Optional[dict] = None
    command: str = "distffn"                    # how the cluster's nodes run distffn
    runs: str = "runs"                          # run directories go to RUNS/<job id> unless --out


def find_token() -> tuple[Optional[str], str]:
    """(token, where it came from) in Ray's order of precedence; (None, "") if there is none."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token, f"${TOKEN_ENV}"
    path = os.environ.get(TOKEN_PATH_ENV)
    if path:
        try:
            with open(os.path.expanduser(path)) as f:
                token = f.read().strip()
        except OSError as e:
            raise UserError(f"{TOKEN_PATH_ENV}: cannot read {path} ({e.strerror}); it should hold the "
                            f"cluster's token, or set {TOKEN_ENV}") from None
        if not token:
            raise UserError(f"{TOKEN_PATH_ENV}: {path} is empty; it should hold the cluster's token")
        return token, path
    default = os.path.expanduser(TOKEN_FILE)
    try:
        with open(default) as f:
            token = f.read().strip()
        return (token, default) if token else (None, "")
    except OSError:
        return None, ""


@contextlib.contextmanager
def _without_env(*names):
    """Ray's SDK lets $RAY_ADDRESS and $RAY_API_SERVER_ADDRESS override the address it is given;
    the profile names the cluster, so neither may redirect a submission."""
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@SCHEDULERS.named("ray")
class RayJobs(Scheduler):
    """a Ray cluster's job server (Ray Jobs), token authentication"""

    Profile = RayProfile

    @classmethod
    def validate(cls, p: RayProfile, source: str):
        if not p.address.startswith(("http://", "https://")):
            raise UserError(f"{source}: address: expected the job server's URL, e.g. "
                            f"http://127.0.0.1:8265 (the dashboard port), got {p.address!r}")
        env = p.runtime_env or {}
        unknown = sorted(set(env) - set(RUNTIME_ENV_KEYS))
        if unknown:
            raise UserError(f"{source}: runtime_env.{unknown[0]}: not supported here "
                            f"(expected: {', '.join(RUNTIME_ENV_KEYS)})")
        wd = env.get("working_dir")
        if wd is not None and (not isinstance(wd, str) or ("://" not in wd and not os.path.isdir(
                _local_folder(wd, source)))):
            raise UserError(f"{source}: runtime_env.working_dir: expected a folder (relative to the "
                            f"profile) or a remote URI, got {wd!r}")
        if not isinstance(env.get("env_vars", {}), dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in env.get("env_vars", {}).items()):
            raise UserError(f"{source}: runtime_env.env_vars: expected a mapping of names to strings")
        for key in ("entrypoint_num_cpus", "entrypoint_num_gpus"):
            if (getattr(p, key) or 0) < 0:
                raise UserError(f"{source}: {key}: expected a non-negative number")
        pip = env.get("pip")
        if pip is not None and not (isinstance(pip, str) or _strings(pip) or (
                isinstance(pip, dict) and _strings(pip.get("packages")) and set(pip) <= {"packages", "pip_check", "pip_version"})):
            raise UserError(f"{source}: runtime_env.pip: expected a list of packages (strings), the "
                            f"path of a requirements file, or a mapping with packages: [...], got {pip!r}")
        for key in ("excludes", "py_modules"):
            if env.get(key) is not None and not _strings(env[key]):
                raise UserError(f"{source}: runtime_env.{key}: expected a list of "
                                f"{'paths or patterns' if key == 'excludes' else 'module folders or URIs'} "
                                f"(strings), got {env[key]!r}")
        res = p.entrypoint_resources
        if res is not None and not all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                                       and v >= 0 for k, v in res.items()):
            raise UserError(f"{source}: entrypoint_resources: expected a mapping of resource names to "
                            f"non-negative numbers, got {res!r}")

    def where(self) -> str:
        return f"ray at {self.profile.address}"

    def label(self) -> str:
        return f"ray:{self.profile.address.split('://', 1)[-1].rstrip('/')}"

    def native_name(self, native_id: str) -> str:
        return f"Ray job {native_id}"

    def data_path(self, path: str) -> tuple[Optional[str], str]:
        wd = (self.profile.runtime_env or {}).get("working_dir")
        if wd is None:
            return super().data_path(path)
        path = os.path.expanduser(path)
        if "://" in wd or os.path.isabs(path):
            return None, ""               # read where the cluster unpacks it, or on its nodes
        wd = _local_folder(wd, self.source)
        return (os.path.join(wd, path),
                f"relative to runtime_env.working_dir {wd}, the folder the cluster receives")

    def _unreachable(self, e: Exception) -> UserError:
        connect, read = self._timeouts()
        how = (f"no answer within {read:g} s" if isinstance(e, Timeout)
               else f"cannot connect within {connect:g} s")
        return _Unreachable(f"{self.source}: address: no Ray job server answers at {self.profile.address} "
                            f"({how}); is the cluster up (cluster/ray-head.sh up), and is this its "
                            f"dashboard address?")

    def _timeouts(self) -> tuple[float, float]:
        """(connect, read) seconds for one request; a short ``timeout_s`` bounds both."""
        t = self.timeout_s
        return (CONNECT_TIMEOUT_S, READ_TIMEOUT_S) if t >= Scheduler.timeout_s else (min(CONNECT_TIMEOUT_S, t), t)

    # ---------------------------------------------------------------- the SDK client
    @functools.cached_property
    def client(self):
        """One SDK client per command: connecting checks the server's version and the token,
        which `stop` and `logs --follow` would otherwise repeat at every poll of the state."""
        try:
            from ray.exceptions import AuthenticationError
            from ray.job_submission import JobSubmissionClient
        except ImportError:
            raise UserError(f"{self.source}: kind ray needs Ray's job SDK; install it with "
                            f"pip install -e \".[cluster]\" (ray[default])") from None
        # the SDK's INFO lines ("Uploading package ...") are not the user's business
        for name in ("ray", "ray.dashboard.modules.dashboard_sdk"):   # the SDK sets its own level
            logging.getLogger(name).setLevel(logging.WARNING)
        token, origin = find_token()
        headers = {"Authorization": f"Bearer {token}"} if token else None
        address = self.profile.address
        try:
            with _without_env("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
                client = _bounded(JobSubmissionClient, self._timeouts())(address, headers=headers)
            client.list_jobs() if not token else None   # an open server answers without a token
        except AuthenticationError:
            if token:
                raise UserError(f"{TOKEN_ENV}: the job server at {address} refused the token from "
                                f"{origin}; set {TOKEN_ENV} (or {TOKEN_PATH_ENV}) to this cluster's "
                                f"token") from None
            raise UserError(f"{TOKEN_ENV}: the job server at {address} requires a token and none is "
                            f"set; export {TOKEN_ENV} (or {TOKEN_PATH_ENV}, or put it in {TOKEN_FILE}); "
                            f"cluster/ray-head.sh prints where its token is") from None
        except (ConnectionError, RequestException) as e:
            raise self._unreachable(e) from None
        if not token:
            note(f"warning: the job server at {address} accepts jobs without a token: anyone who can "
                 f"reach it can run code there (CVE-2023-48022); start it with RAY_AUTH_MODE=token "
                 f"(cluster/ray-head.sh does)")
        return client

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except RuntimeError as e:        # the SDK's answer to a 4xx/5xx
            raise self._refused(what, e) from None
        except (ConnectionError, RequestException) as e:
            raise self._unreachable(e) from None

    def _refused(self, what: str, e: RuntimeError) -> UserError:
        text = str(e)
        if "does not exist" in text or "404" in text:
            return _UnknownJob(f"{what}: the cluster at {self.profile.address} does not know this "
                             f"job (was the cluster restarted?)")
        return UserError(f"{what}: the job server at {self.profile.address} refused: "
                         f"{text.splitlines()[0][:300]}")

    # ---------------------------------------------------------------- the verbs
    def submit(self, record, job) -> str:
        p = self.profile
        env = dict(p.runtime_env or {})
        if "working_dir" in env:
            # the user's project travels: the job spec as they wrote it, their --set on top
            wd = env["working_dir"]
            if "://" not in wd:
                env["working_dir"] = wd = _local_folder(wd, self.source)
                rel = os.path.relpath(os.path.abspath(record.job_path), wd)
                if rel.startswith(".."):
                    raise UserError(f"{record.job_path}: outside runtime_env.working_dir {wd}; the "
                                    f"cluster sees only that folder, so keep the job spec in it")
                job_arg, overrides = rel, record.overrides
            else:
                job_arg, overrides = record.job_path, record.overrides
        else:
            # the resolved spec alone travels, as the job's working_dir
            env["working_dir"] = stage_dir(record.id)
            job_arg, overrides = "job.yaml", []
        env["env_vars"] = {**env.get("env_vars", {}), RESUME_COMMAND_ENV: resume_command(record)}
        if p.entrypoint_num_cpus is not None:
            cpus = p.entrypoint_num_cpus
        else:                           # a local or MPI backend computes where the driver runs
            cpus = 0 if job.scaling.backend == "ray" else job.scaling.num_workers
        record.command = run_command(p.command, job_arg, record.run_dir, record.resume, overrides)
        client = self.client
        kwargs = {}
        if p.entrypoint_num_gpus is not None or job.scaling.use_gpu and job.scaling.backend != "ray":
            kwargs["entrypoint_num_gpus"] = (p.entrypoint_num_gpus if p.entrypoint_num_gpus is not None
                                             else job.scaling.num_workers)
        if p.entrypoint_resources:
            kwargs["entrypoint_resources"] = p.entrypoint_resources
        kwargs.update(entrypoint=record.command, submission_id=record.id, runtime_env=env,
                      entrypoint_num_cpus=cpus, metadata={"distffn_run_dir": record.run_dir})
        # a head that has just started answers before its job agent is up ("No available agent
        # to submit job, please try again later"): wait for it, a while
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return client.submit_job(**kwargs)
            except RuntimeError as e:
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise self._refused("submit", e) from None
            time.sleep(1)

    def status(self, record) -> JobState:
        try:
            info = self._call(record.id, self.client.get_job_info, record.native_id)
        except _UnknownJob:              # a restarted cluster: the run directory tells
            state, how = ended_state(record.run_dir)
            return JobState(state, f"the cluster at {self.profile.address} no longer knows Ray job "
                                   f"{record.native_id} (restarted?); {how}")
        except _Unreachable:
            return JobState(UNKNOWN, f"job server unreachable at {self.profile.address}; start the "
                                     f"cluster (cluster/ray-head.sh up) or fix the profile's address")
        state = getattr(info.status, "value", str(info.status))
        return JobState(state if state in STATES else FAILED, f"Ray job {record.native_id}"
                        + (f": {_message(info.message)}" if _message(info.message) else ""))

    def logs(self, record) -> str:
        return self._call(record.id, self.client.get_job_logs, record.native_id)

    def follow(self, record) -> Iterator[str]:
        client = self.client
        while (state := self.status(record)).state == PENDING:     # nothing to tail before it runs
            time.sleep(1)
        if state.state == UNKNOWN:
            raise UserError(f"{record.id}: cannot follow: {state.detail}")
        loop = asyncio.new_event_loop()
        chunks = client.tail_job_logs(record.native_id)  # its websocket closes when the job ends
        try:
            while True:
                try:
                    chunk = loop.run_until_complete(chunks.__anext__())
                except StopAsyncIteration:
                    return
                except RuntimeError as e:
                    raise UserError(f"{record.id}: lost the log stream from {self.profile.address} "
                                    f"({str(e)[:200]})") from None
                yield chunk
        finally:
            loop.run_until_complete(chunks.aclose())
            loop.close()

    def stop(self, record) -> None:
        state = self.status(record)
        if state.state == UNKNOWN:
            raise UserError(f"{record.id}: cannot stop: {state.detail}")
        if state.state in (PENDING, RUNNING):
            self._call(record.id, self.client.stop_job, record.native_id)


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _message(text: Optional[str]) -> str:
    """Ray's message about a job in one line: for a failed job, its first line without the
    "last available logs" it announces, and the logs' last line (the error) instead."""
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    first = _LOGS_TAIL.sub("", lines[0])
    if first != lines[0]:
        last = lines[-1] if len(lines) > 1 else ""
        return (f"{first}; its last line: {last[:200]}" if last else f"{first} (it printed nothing)")
    return first[:200]


def _bounded(client_class, timeouts: tuple[float, float]):
    """``client_class`` whose every request has ``timeouts`` (the SDK sets none, so a server
    that accepts and never answers would hold the command for ever)."""
    class Bounded(client_class):
        def _do_request(self, method, endpoint, **kwargs):
            kwargs.setdefault("timeout", timeouts)
            return super()._do_request(method, endpoint, **kwargs)
    return Bounded
