"""The batch script `distffn submit` renders for SLURM, with hostile values in every field a
user controls: nothing they hold becomes a shell command or an #SBATCH directive, and no
directive is lost. Checked with `bash -n`, with sbatch's own reading of #SBATCH lines (a port of
its `_get_argument`), and by running the script's shell with a stand-in for distffn (no SLURM
needed here; tests/submit/test_slurm.py submits such a run directory to a real one)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from distffn.errors import UserError
from distffn.jobspec import load_job
from distffn.submit.profile import from_dict
from distffn.submit.records import JobRecord

from helpers import write_job

# quotes of both kinds, a comment sign, command substitutions, a separator, a glob, spaces
HOSTILE = "a b#c'd\"e $(touch PWNED) `touch PWNED`; touch PWNED &* {x,y} ~"


def sbatch_argument(line: str) -> tuple[str, str]:
    """One argument of an #SBATCH line and the rest of the line, as sbatch reads it
    (src/sbatch/opt.c, _get_argument): quotes group, a backslash escapes the next character
    (inside quotes too), an unquoted # ends the line."""
    line = line.lstrip()
    arg, quote, i = [], None, 0
    while i < len(line) and (quote or not line[i].isspace()) and line[i] != "\n":
        c = line[i]
        if c == "\\":
            i += 1
            if i < len(line):
                arg.append(line[i])
        elif quote:
            if c == quote:
                quote = None
            else:
                arg.append(c)
        elif c in "\"'":
            quote = c
        elif c == "#":
            break
        else:
            arg.append(c)
        i += 1
    assert quote is None, f"sbatch would refuse an unmatched quote: {line!r}"
    return "".join(arg), line[i:]


def sbatch_directives(script: str) -> list[str]:
    """The options sbatch takes from a script: #SBATCH lines up to the first command."""
    options = []
    for line in script.splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break                      # sbatch stops at the first command
        if line.startswith("#SBATCH"):
            rest = line[len("#SBATCH"):]
            while True:
                arg, rest = sbatch_argument(rest)
                if not arg:
                    break
                options.append(arg)
                if rest.startswith("#"):
                    break
    return options


@pytest.fixture
def hostile(tmp_path):
    """A scheduler, record and job whose paths, names and commands are all hostile but legal."""
    folder = tmp_path / f"profiles {HOSTILE}"
    folder.mkdir()
    template_name = f"my job {HOSTILE}.sbatch"
    from distffn.submit import slurm
    (folder / template_name).write_text(open(slurm.TEMPLATE).read())
    # the run's "distffn": prints the arguments it was given and the resume command it was told
    command = (f"{sys.executable} -c 'import json, os, sys; print(json.dumps([sys.argv[1:], "
               f"os.environ[\"DISTFFN_RESUME_COMMAND\"]]))'")
    raw = {"kind": "slurm", "partition": "debug", "account": "proj-1", "qos": "normal", "nodes": 1,
           "tasks_per_node": 2, "cpus_per_task": 3, "time": "1-02:03:04", "template": template_name,
           "setup": ["greeting='hello # not a comment'", 'echo "$greeting" > setup.out'],
           "command": command, "runs": str(tmp_path / f"runs {HOSTILE}")}
    source = str(folder / "slurm profile.yaml")
    scheduler = from_dict(raw, source)
    job_path = write_job(tmp_path, name=f"job {HOSTILE}.yaml")
    run_dir = str(tmp_path / f"run {HOSTILE}")
    record = JobRecord(id="small-abc123", kind="slurm", profile_path=source, profile=raw, run_dir=run_dir,
                       job_path=job_path, submitted="2026-12-04T00:00:00+00:00",
                       overrides=[f"data.path={HOSTILE}"])
    return scheduler, record, load_job(job_path), tmp_path


def test_hostile_values_become_neither_commands_nor_directives(hostile, monkeypatch):
    scheduler, record, job, tmp_path = hostile
    monkeypatch.setenv("DISTFFN_HOME", str(tmp_path / "home"))
    script = scheduler.render(record, job)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, syntax.stderr

    assert sbatch_directives(script) == [
        "--job-name=small-abc123", f"--output={record.run_dir}/slurm-%j.out", "--open-mode=append",
        "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=3", "--time=1-02:03:04",
        "--signal=B:TERM@60", "--requeue", "--partition=debug", "--account=proj-1", "--qos=normal"]

    # the shell of the batch script: the run gets the run directory as one argument, the setup
    # lines run as written, and nothing else runs
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=60, cwd=work, env=env)
    assert r.returncode == 0, r.stderr
    args, resume = json.loads(r.stdout)
    stage = os.path.join(str(tmp_path / "home"), "jobs", record.id, "job.yaml")
    assert args == ["run", stage, "--out", record.run_dir, "--no-progress"]
    import shlex
    assert shlex.split(resume) == ["distffn", "submit", record.job_path, "--cluster", record.profile_path,
                                   "--out", record.run_dir, "--set", f"data.path={HOSTILE}", "--resume"]
    assert (work / "setup.out").read_text() == "hello # not a comment\n"
    assert sorted(os.listdir(work)) == ["setup.out"], "something ran that the profile did not say"
    assert not list(tmp_path.rglob("PWNED"))


@pytest.mark.parametrize("key, value, expected", [
    ("runs", "/tmp/runs\ntouch /tmp/PWNED #", "runs: '/tmp/runs\\ntouch /tmp/PWNED #' holds a control character"),
    ("command", "distffn\r\n#SBATCH --uid=0", "command: 'distffn\\r\\n#SBATCH --uid=0' holds a control character"),
    ("command", "python -m 'distffn", "command: \"python -m 'distffn\": no closing quotation"),
    ("command", "  ", "command: empty"),
    ("setup", ["module load x\n#SBATCH --uid=0"], "setup: 'module load x\\n#SBATCH --uid=0' holds a control"),
    ("setup", ["a\x1b[2Jb"], "setup: 'a\\x1b[2Jb' holds a control character"),
    ("template", "my\njob.sbatch", "template: "),
    ("partition", "debug\n#SBATCH --uid=0", "partition: expected a SLURM name"),
])
def test_a_control_character_anywhere_is_refused_naming_the_key(tmp_path, key, value, expected):
    if key == "template":
        (tmp_path / value).write_text("#!/bin/bash\n")     # the file exists: its name is the problem
    source = str(tmp_path / "p.yaml")
    with pytest.raises(UserError) as e:
        from_dict({"kind": "slurm", key: value}, source)
    assert str(e.value).startswith(f"{source}: {expected}"), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("run_dir", ["/tmp/run-100%", "/tmp/run\\x"])
def test_a_run_directory_sbatch_would_read_as_a_pattern_is_refused(tmp_path, run_dir):
    scheduler = from_dict({"kind": "slurm"}, str(tmp_path / "p.yaml"))
    record = JobRecord(id="x-1", kind="slurm", profile_path="p", profile={}, run_dir=run_dir, job_path="j",
                       submitted="")
    with pytest.raises(UserError, match=r"^--out: .*SLURM reads '[%\\]+' in its output file name"):
        scheduler.check(record, "--out")


def test_a_job_on_several_nodes_must_name_its_network_interface(tmp_path):
    scheduler = from_dict({"kind": "slurm", "nodes": 2}, str(tmp_path / "p.yaml"))
    with pytest.raises(UserError, match=r"^scaling.interface: a job on 2 nodes .* name the network interface"):
        scheduler.adapt(load_job(write_job(tmp_path)))


# the run's "distffn" for the next test: each call takes the next exit code from OUTCOMES; a
# code with "+" writes a start line first (the workers came up), as a real run does
FAKE_RUN = """
import os, sys
calls = os.path.join(os.environ["WORK"], "calls")
n = len(open(calls).read()) if os.path.exists(calls) else 0
open(calls, "a").write("x")
code = os.environ["OUTCOMES"].split()[n]
run_dir = sys.argv[sys.argv.index("--out") + 1]
if code.endswith("+"):
    os.makedirs(run_dir, exist_ok=True)
    open(os.path.join(run_dir, "metrics.jsonl"), "a").write('{"event": "start"}\\n')
sys.exit(int(code.rstrip("+")))
"""


@pytest.mark.parametrize("nodes, outcomes, calls, code", [
    (2, "9 0+", 2, 0),          # the MPI world did not form: srun again, then the run went through
    (2, "9 9 9 0+", 3, 9),      # twice again at most
    (2, "0+ 1+", 1, 0),
    (2, "1+ 0+", 1, 1),         # a run that failed after its workers started is not started again
    (2, "2 0+", 1, 2),          # nor one that refused its input
    (1, "9 0+", 1, 9),          # on one node distffn's own mpiexec starts the ranks
])
def test_ranks_that_end_before_their_workers_start_are_started_again(tmp_path, nodes, outcomes, calls, code):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nwhile [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"\n')
    (bin_dir / "srun").chmod(0o755)
    (tmp_path / "fake_run.py").write_text(FAKE_RUN)
    raw = {"kind": "slurm", "nodes": nodes, "tasks_per_node": 1, "command": f"{sys.executable} {tmp_path / 'fake_run.py'}"}
    scheduler = from_dict(raw, str(tmp_path / "p.yaml"))
    record = JobRecord(id="r-1", kind="slurm", profile_path="p", profile=raw, run_dir=str(tmp_path / "run"),
                       job_path="j", submitted="")
    script = tmp_path / "job.sbatch"
    script.write_text(scheduler.render(record, load_job(write_job(tmp_path, scaling={"interface": "eth0"}))))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "WORK": str(tmp_path), "OUTCOMES": outcomes,
           "DISTFFN_HOME": str(tmp_path / "home")}
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert (r.returncode, len((tmp_path / "calls").read_text())) == (code, calls), r.stdout + r.stderr
    again = [line for line in r.stdout.splitlines() if "starting them again" in line]
    assert len(again) == calls - 1, r.stdout
