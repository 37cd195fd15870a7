"""Every ```sh and ```python block of README.md runs here, so the walkthroughs cannot go stale.

The blocks run in README order, in one scratch workspace (``jobs/`` linked from the repository,
``cluster/`` copied), each in a fresh ``bash -e`` the way a reader pastes them into a terminal:
files carry over from block to block, shell variables do not. The README's text is run as it
stands; what keeps the whole file to a few minutes on 2 cores is a short prelude of bash
functions that stand in for three commands:

- ``distffn`` runs the real command with overrides appended (a later ``--set`` wins): ``run``
  gets :data:`SHORT_RUN` (1 epoch on 5,000 samples), ``submit`` :data:`SHORT_SUBMIT` (6 epochs:
  long enough to be stopped after the second, as the walkthroughs do), ``sweep``
  :data:`SHORT_SWEEP` (2 batch sizes × 2 rates, 4 epochs; the trial folders the README names
  stay those of the full sweep). Every other subcommand runs unchanged.
- ``pip`` runs the real pip in the repository root (``pip install -e .`` reinstalls this
  checkout; its dependencies are already there).
- ``apt-get`` is checked, not run (it needs root and the network): ``install`` asserts that every
  package it names is installed, ``update`` does nothing. The block with the test command is
  not run either (it would start this suite inside itself): it must be what ``.ci/run`` runs.

The cluster walkthroughs start a real Ray head and a real single-node SLURM through the scripts
in ``cluster/``, on free ports (``RAY_HEAD_PORT``, ``RAY_DASHBOARD_PORT``, ``RAY_AGENT_PORT``,
``DISTFFN_SLURMCTLD_PORT``, ...) with ``TMPDIR`` pointing into the workspace, so the state
folders the README exports (``${TMPDIR:-/tmp}/distffn-ray-head``, ``.../distffn-slurm``) are the
test's own; the copied ``cluster/ray-local.yaml`` names the free job-server port instead of 8265.
After every block nothing it started may be left running (found by the blocks' ``TMPDIR`` in a
process's environment); should a walkthrough fail before its ``down`` line, the module's teardown
runs the scripts' ``down`` (by process session and pid files) and checks their processes gone.

The ```yaml blocks are checked against the code instead: the job spec block must be
``jobs/fashion-mnist-mlp.yaml`` with every field, the sweep block a valid sweep naming every key.
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from distffn.jobspec import from_dict, load_job
from distffn.sweep import load_sweep
from distffn.sweep.spec import _KEYS as SWEEP_KEYS

from helpers import REPO, free_port, processes_in_sessions, run_group

README = os.path.join(REPO, "README.md")
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.DOTALL | re.MULTILINE)

SHORT_RUN = ["--set", "training.epochs=1", "--set", "data.limit_train=5000"]
SHORT_SUBMIT = ["--set", "training.epochs=6"]
SHORT_SWEEP = ["--set", "batch_sizes=[64,256]", "--set", "lr=[0.05,0.1]", "--set", "max_epochs=4",
               "--set", "timing_repeats=1", "--set", "timing_steps=10", "--set", "noise_batches=10"]
BLOCK_TIMEOUT_S = 600


def blocks(language: str) -> list[tuple[int, str]]:
    """(line number, text) of every fenced block of README.md in ``language``."""
    text = open(README, encoding="utf-8").read()
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in BLOCK.finditer(text)
            if m.group(1) == language]


def _words(args: list[str]) -> str:
    return " ".join(f"'{a}'" for a in args)


PRELUDE = f"""
set -e
distffn() {{
    case "$1" in
        run) command distffn "$@" {_words(SHORT_RUN)} ;;
        submit) command distffn "$@" {_words(SHORT_SUBMIT)} ;;
        sweep) command distffn "$@" {_words(SHORT_SWEEP)} ;;
        *) command distffn "$@" ;;
    esac
}}
pip() {{ (cd "$README_REPO" && command python -m pip "$@"); }}
apt-get() {{
    [ "$1" = update ] && return 0
    local p
    for p in "$@"; do
        case "$p" in install|-*) ;; *)
            dpkg-query -W -f='${{Status}}\\n' "$p" 2>/dev/null | grep -q "ok installed" \\
                || {{ echo "README test: package $p is not installed" >&2; return 1; }} ;;
        esac
    done
}}
"""


def is_test_command(text: str) -> bool:
    return re.search(r"(^|&& )pytest\b", text) is not None


@pytest.fixture(scope="module")
def workspace():
    """The scratch folder the blocks run in, the environment they see, and the cluster cleanup."""
    # munged wants every folder above its socket searchable by all (pytest's are 0700)
    ws = pathlib.Path(tempfile.mkdtemp(prefix="distffn-readme-", dir="/tmp"))
    ws.chmod(0o755)
    tmp = ws / "tmp"
    tmp.mkdir(mode=0o755)
    tmp.chmod(0o755)
    (ws / "jobs").symlink_to(os.path.join(REPO, "jobs"))
    shutil.copytree(os.path.join(REPO, "cluster"), ws / "cluster", symlinks=False)
    ports = {name: str(free_port()) for name in
             ("RAY_HEAD_PORT", "RAY_DASHBOARD_PORT", "RAY_AGENT_PORT", "DISTFFN_SLURMCTLD_PORT", "DISTFFN_SLURMD_PORT")}
    profile = ws / "cluster" / "ray-local.yaml"
    text = profile.read_text()
    assert "127.0.0.1:8265" in text, "cluster/ray-local.yaml no longer names the job server at port 8265"
    profile.write_text(text.replace("127.0.0.1:8265", f"127.0.0.1:{ports['RAY_DASHBOARD_PORT']}"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "SLURM_CONF",
                        "PYTHONUNBUFFERED", "DISTFFN_DATA")}
    env.update(ports, TMPDIR=str(tmp), DISTFFN_HOME=str(ws / "home"), README_REPO=REPO,
               DISTFFN_SRUN_PORTS="18900-18979", START_TIMEOUT_S="240",
               PATH=f"{os.path.dirname(sys.executable)}:{env['PATH']}")
    try:
        yield ws, env
    finally:
        _stop_clusters(ws, tmp, env)
        shutil.rmtree(ws, ignore_errors=True)


def _stop_clusters(ws, tmp, env):
    """What the walkthroughs started, stopped whether or not they got to their `down` line."""
    head = tmp / "distffn-ray-head"
    if (head / "head.pgid").exists():
        session = int((head / "head.pgid").read_text())
        run_group([str(ws / "cluster" / "ray-head.sh"), "down", str(head)], timeout=60, env=env)
        assert processes_in_sessions({session}, within_s=20) == []
    slurm = tmp / "distffn-slurm"
    pids = [int(p.read_text()) for p in (slurm / "run").glob("*.pid")] if (slurm / "run").is_dir() else []
    if slurm.is_dir():
        run_group([str(ws / "cluster" / "slurm" / "local-cluster.sh"), "down", str(slurm)], timeout=120, env=env)
    assert [pid for pid in pids if _alive(pid)] == []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _run(cmd, ws, env) -> subprocess.CompletedProcess:
    p = subprocess.Popen(cmd, cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        out, _ = p.communicate()
        pytest.fail(f"timed out after {BLOCK_TIMEOUT_S} s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, "")


SHELL = blocks("sh")
PYTHON = blocks("python")


def test_readme_has_the_blocks_this_test_runs():
    assert SHELL and PYTHON
    langs = {m.group(1) for m in BLOCK.finditer(open(README, encoding="utf-8").read())}
    assert langs <= {"sh", "python", "yaml", "text"}, f"a block this test does not run: {langs}"


@pytest.mark.parametrize("line,text", SHELL + PYTHON, ids=[f"line{n}" for n, _ in SHELL + PYTHON])
def test_readme_block(workspace, line, text):
    ws, env = workspace
    if (line, text) in PYTHON:
        script = ws / f"block-{line}.py"
        script.write_text(text)
        r = _run([sys.executable, str(script)], ws, env)
    elif is_test_command(text):
        _check_test_command(text, ws, env)
        return
    else:
        r = _run(["bash", "-c", PRELUDE + text], ws, env)
    assert r.returncode == 0, f"README.md line {line}: exit {r.returncode}\n{r.stdout[-6000:]}"
    if "distffn stop" in text:         # the job was still running when the walkthrough stopped it
        assert "STOPPED" in r.stdout, r.stdout[-6000:]
    # pasted in full, a block leaves nothing running (a cluster walkthrough ends with `down`)
    assert started_by_blocks(env["TMPDIR"], within_s=30) == [], f"README.md line {line} left processes behind"


def started_by_blocks(tmpdir: str, within_s: float) -> list[int]:
    """Live processes whose environment has the blocks' TMPDIR (everything a block starts,
    daemons included, inherits it), waiting up to ``within_s`` for them to end."""
    mark = f"TMPDIR={tmpdir}".encode()
    deadline = time.monotonic() + within_s
    while True:
        found = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if mark in f.read().split(b"\0") and _alive(int(entry)):
                        found.append(int(entry))
            except (OSError, ValueError):
                continue
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.5)


def _check_test_command(text, ws, env):
    """The tests' command is .ci/run's (which CI runs, quieter), and its packages are installed."""
    ci = open(os.path.join(REPO, ".ci", "run"), encoding="utf-8").read().replace("\\\n", " ")
    quiet = re.compile(r"\s+(-q|-qq|>/dev/null)(?=\s|$)")
    ci_words = " ".join(quiet.sub("", ci).split())
    assert " ".join(text.split()) in ci_words, f".ci/run no longer runs README's test command:\n{text}"
    apt = text.split("&& pip")[0]
    r = _run(["bash", "-c", PRELUDE + apt], ws, env)
    assert r.returncode == 0, r.stdout


def test_job_spec_block_is_the_fashion_job_with_every_field():
    [spec] = [t for _, t in blocks("yaml") if t.startswith("name: fashion-mnist-mlp")]
    raw = yaml.safe_load(spec)
    job = load_job(os.path.join(REPO, "jobs", "fashion-mnist-mlp.yaml")).to_dict()
    assert from_dict(raw).to_dict() == job
    assert {s: sorted(v) for s, v in raw.items() if isinstance(v, dict)} == \
           {s: sorted(v) for s, v in job.items() if isinstance(v, dict)}, "README's job spec misses a field"


def test_sweep_block_is_a_valid_sweep_naming_every_key(tmp_path):
    [sweep] = [t for _, t in blocks("yaml") if t.startswith("job: ")]
    shutil.copy(os.path.join(REPO, "jobs", "digits-sweep-job.yaml"), tmp_path)
    (tmp_path / "sweep.yaml").write_text(sweep)
    spec, _ = load_sweep(str(tmp_path / "sweep.yaml"))
    assert spec.batch_sizes == yaml.safe_load(sweep)["batch_sizes"]
    written = set(yaml.safe_load(sweep)) | {k for k in SWEEP_KEYS if re.search(rf"^# ?{k}:", sweep, re.M)}
    assert written == set(SWEEP_KEYS), f"README's sweep block misses {set(SWEEP_KEYS) - written}"
