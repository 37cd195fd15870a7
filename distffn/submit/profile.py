"""Cluster profiles: a YAML file naming a ``kind`` (a :data:`~.scheduler.SCHEDULERS` entry) and
that kind's keys, read with bounds and checked like job specs (exit 2, one line, naming the file
and key)."""
from __future__ import annotations

import os

from .. import bounded_yaml
from ..errors import UserError
from ..jobspec import build_section
from .scheduler import SCHEDULERS, Scheduler, check_text, split_command


def load_profile(path: str) -> Scheduler:
    """The scheduler for the cluster profile at ``path``."""
    raw = bounded_yaml.load_file(path, "cluster profile")
    if not isinstance(raw, dict) or "kind" not in raw:
        raise UserError(f"{path}: expected a cluster profile, a mapping with kind: "
                        f"{' or '.join(SCHEDULERS.names())} and that kind's keys")
    return from_dict(raw, path)


def from_dict(raw: dict, source: str) -> Scheduler:
    """A scheduler from a profile already parsed (a job record keeps its profile this way)."""
    cls = SCHEDULERS.get(raw.get("kind"), f"{source}: kind")
    keys = {k: v for k, v in raw.items() if k != "kind"}
    profile = build_section(cls.Profile, keys, source, key=lambda k: f"{source}: {k}")
    # every kind has these two, and both reach a shell on the cluster
    split_command(profile.command, f"{source}: command")
    check_text(profile.runs, f"{source}: runs", "path")
    cls.validate(profile, source)
    return cls(profile, os.path.abspath(source), raw)
