"""Cluster profiles are checked before anything reaches a cluster: a mistake is exit 2 and one
line naming the file and the key (no Ray head or SLURM needed here)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from distffn.errors import UserError
from distffn.submit.profile import load_profile

from helpers import write_job


def ray_profile(tmp_path, runtime_env: str):
    """A Ray profile with ``runtime_env`` lines (indented) or another top-level key (not)."""
    path = tmp_path / "ray.yaml"
    body = f"runtime_env:\n{runtime_env}" if runtime_env.startswith(" ") else runtime_env
    path.write_text(f"kind: ray\naddress: http://127.0.0.1:1\n{body}")
    return path


@pytest.mark.parametrize("runtime_env, expected", [
    ("  working_dir: no-such-folder\n", "runtime_env.working_dir: expected a folder (relative to the profile)"),
    ("  working_dir: 3\n", "runtime_env.working_dir: expected a folder"),
    ("  env_vars: {A: 1}\n", "runtime_env.env_vars: expected a mapping of names to strings"),
    ("  conda: base\n", "runtime_env.conda: not supported here"),
    ("  pip: 3\n", "runtime_env.pip: expected a list of packages (strings), the path of a requirements file"),
    ("  pip: [numpy, {x: 1}]\n", "runtime_env.pip: expected a list of packages"),
    ("  pip: {packages: numpy}\n", "runtime_env.pip: expected a list of packages"),
    ("  excludes: '*.npz'\n", "runtime_env.excludes: expected a list of paths or patterns (strings)"),
    ("  py_modules: [1]\n", "runtime_env.py_modules: expected a list of module folders or URIs (strings)"),
    ("entrypoint_resources: {accel: fast}\n", "entrypoint_resources: expected a mapping of resource names to "
                                            "non-negative numbers"),
    ("entrypoint_resources: {accel: -1}\n", "entrypoint_resources: expected a mapping"),
])
def test_a_bad_runtime_env_is_exit_2_naming_the_profile_and_key(tmp_path, runtime_env, expected):
    profile = ray_profile(tmp_path, runtime_env)
    r = subprocess.run([sys.executable, "-m", "distffn", "submit", write_job(tmp_path), "--cluster", str(profile)],
                       capture_output=True, text=True, timeout=60, env={"DISTFFN_HOME": str(tmp_path / "home"),
                                                                        "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"distffn: error: {profile}: {expected}"), r.stderr
    assert not (tmp_path / "home" / "jobs").exists() or not any((tmp_path / "home" / "jobs").iterdir())


def test_a_working_dir_is_read_relative_to_the_profile(tmp_path):
    (tmp_path / "project").mkdir()
    assert load_profile(str(ray_profile(tmp_path, "  working_dir: project\n"))).profile.runtime_env == {
        "working_dir": "project"}
    assert load_profile(str(ray_profile(tmp_path, "  working_dir: s3://bucket/project.zip\n")))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(UserError, match="runtime_env.working_dir"):      # relative to the profile, not the cwd
        load_profile(str(ray_profile(elsewhere, "  working_dir: project\n")))


def test_well_formed_runtime_env_values_are_taken(tmp_path):
    env = load_profile(str(ray_profile(tmp_path, "  pip: [numpy, 'scipy>=1']\n  excludes: ['*.npz', runs/]\n"
                                                 "  py_modules: [s3://b/m.zip]\n"))).profile.runtime_env
    assert env == {"pip": ["numpy", "scipy>=1"], "excludes": ["*.npz", "runs/"], "py_modules": ["s3://b/m.zip"]}
    for pip in ("  pip: requirements.txt\n", "  pip: {packages: [numpy], pip_check: false}\n"):
        assert load_profile(str(ray_profile(tmp_path, pip))).profile.runtime_env["pip"]
    assert load_profile(str(ray_profile(tmp_path, "entrypoint_resources: {accel: 1, slot: 0.5}\n"))
                        ).profile.entrypoint_resources == {"accel": 1, "slot": 0.5}
