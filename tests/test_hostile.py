"""Hostile input through the command line: planted symbolic links, folders that are not run
folders, duplicate and non-string YAML keys, a torn metrics line, a Ray address that never
answers. Each case: exit 2 and one line naming the field or file (or, for a torn line, the
repair said once), and nothing outside the run written, followed or deleted.

The submission cases (batch-script injection, job records, cluster profiles) are in
tests/submit/test_hostile_submit.py."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading

import pytest

from distffn.cli import main
from distffn.errors import StorageFailed
from distffn.files import append_line, drop_torn_tail, write_atomic

from helpers import final_model, run_cli, run_group, user_error, write_equiv_job, write_job


def tree_digest(root) -> dict:
    """{relative path: sha256 or link target} of everything under ``root``, links not followed."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(folder, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "-> " + os.readlink(p)
            elif os.path.isfile(p):
                out[rel] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture
def victim(tmp_path):
    """A file of the user's that no run may touch."""
    path = tmp_path / "victim.txt"
    path.write_text("precious\n")
    return path


@pytest.fixture
def finished_run(tmp_path):
    """A finished 2-epoch run folder of the equivalence job: (job file, run folder)."""
    job = write_equiv_job(tmp_path)
    out = tmp_path / "run"
    assert run_cli(job, "--out", str(out)) == 0
    return job, out


# ---------------------------------------------------------------- planted symbolic links

@pytest.mark.parametrize("name", [".lock", "job.yaml", "metrics.jsonl", "summary.json", "workers.json"])
def test_a_link_planted_in_a_run_folder_is_refused_and_never_followed(tmp_path, capsys, victim, finished_run, name):
    job, out = finished_run
    (out / name).unlink(missing_ok=True)
    (out / name).symlink_to(victim)
    before = tree_digest(out)
    user_error(capsys, ["run", job, "--out", str(out), "--resume", "--set", "training.epochs=3", "--no-progress"],
               str(out / name), "symbolic link")
    assert victim.read_text() == "precious\n"
    assert tree_digest(out) == before


def test_a_link_planted_at_the_lock_of_a_new_folder_is_refused(tmp_path, capsys, victim):
    out = tmp_path / "new"
    out.mkdir()
    (out / ".lock").symlink_to(victim)
    user_error(capsys, ["run", write_equiv_job(tmp_path), "--out", str(out), "--no-progress"], ".lock",
               "symbolic link")
    assert victim.read_text() == "precious\n"
    assert os.listdir(out) == [".lock"]


def test_a_checkpoint_folder_or_a_checkpoint_that_is_a_link_is_refused(tmp_path, capsys, finished_run):
    job, out = finished_run
    elsewhere = tmp_path / "elsewhere"
    (out / "checkpoints").rename(elsewhere)
    (out / "checkpoints").symlink_to(elsewhere)
    user_error(capsys, ["run", job, "--out", str(out), "--resume", "--no-progress"], "checkpoints", "symbolic link")
    (out / "checkpoints").unlink()
    (out / "checkpoints").mkdir()
    newest = sorted(elsewhere.iterdir())[-1]
    (out / "checkpoints" / newest.name).symlink_to(newest)
    user_error(capsys, ["run", job, "--out", str(out), "--resume", "--no-progress"], newest.name, "symbolic link")


def test_out_that_is_a_link_is_refused(tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    user_error(capsys, ["run", write_equiv_job(tmp_path), "--out", str(tmp_path / "link"), "--no-progress"],
               "is a symbolic link", str(real))
    assert os.listdir(real) == []


def test_the_writers_replace_or_refuse_a_link_instead_of_following_it(tmp_path, victim):
    target = tmp_path / "summary.json"
    target.symlink_to(victim)
    write_atomic(str(target), "{}")
    assert not target.is_symlink() and target.read_text() == "{}"
    assert victim.read_text() == "precious\n"
    log = tmp_path / "metrics.jsonl"
    log.symlink_to(victim)
    with pytest.raises(StorageFailed, match="symbolic link"):
        append_line(str(log), "{}")
    with pytest.raises(StorageFailed, match="symbolic link"):
        drop_torn_tail(str(log))
    assert victim.read_text() == "precious\n"
    # a temp name guessed in advance is no way in either: it is created fresh (O_EXCL)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_plot_replaces_a_planted_link_instead_of_writing_through_it(tmp_path, victim, finished_run):
    _, out = finished_run
    (out / "curves.png").symlink_to(victim)
    assert main(["plot", str(out)]) == 0
    assert victim.read_text() == "precious\n"
    assert not (out / "curves.png").is_symlink() and (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- --out: someone else's folder

def test_a_folder_of_other_files_is_refused_and_left_as_it_was(tmp_path, capsys):
    out = tmp_path / "thesis"
    (out / "checkpoints").mkdir(parents=True)
    (out / "job.yaml").write_text("my notes: not a job spec\n")
    (out / "summary.json").write_text('{"mine": true}')
    (out / "metrics.jsonl").write_text("line\n")
    (out / "checkpoints" / ".tmp-keep.npz").write_bytes(b"mine")
    before = tree_digest(out)
    for extra in ([], ["--resume"]):
        user_error(capsys, ["run", write_equiv_job(tmp_path), "--out", str(out), "--no-progress", *extra],
                   str(out), "not a distffn run", "new or empty folder")
        assert tree_digest(out) == before


def test_an_empty_folder_is_taken(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert run_cli(write_equiv_job(tmp_path), "--out", str(out)) == 0
    assert (out / "summary.json").is_file()


def test_a_refused_resume_leaves_the_run_folder_as_it_was(tmp_path, capsys, finished_run):
    job, out = finished_run
    before = tree_digest(out)
    user_error(capsys, ["run", job, "--out", str(out), "--resume", "--set", "optimizer.lr=5.0", "--no-progress"],
               "would change the run's trajectory", "optimizer.lr")
    assert tree_digest(out) == before


@pytest.mark.parametrize("make", ["missing", "empty", "no checkpoints"])
def test_resume_without_a_checkpoint_is_refused_instead_of_starting_over(tmp_path, capsys, make):
    out = tmp_path / "typo"
    if make != "missing":
        out.mkdir()
    if make == "no checkpoints":
        (out / "checkpoints").mkdir()
        (out / "job.yaml").write_text(open(write_equiv_job(tmp_path)).read())
    user_error(capsys, ["run", write_equiv_job(tmp_path), "--out", str(out), "--resume", "--no-progress"],
               str(out), "--resume")
    assert not (out / "metrics.jsonl").exists()
    assert out.exists() == (make != "missing")


def test_a_run_refused_for_its_data_leaves_no_folder_behind(tmp_path, capsys):
    out = tmp_path / "never"
    job = write_job(tmp_path, data={"dataset": "npz", "path": str(tmp_path / "missing.npz")},
                    model={"layers": [3, 4, 2]})
    user_error(capsys, ["run", job, "--out", str(out), "--no-progress"], "missing.npz")
    assert not out.exists()


# ---------------------------------------------------------------- YAML keys

DUPLICATES = {
    "job": ("job.yaml", "name: j\ndata: {dataset: digits}\nmodel: {layers: [64, 10]}\n"
                        "optimizer: {lr: 0.05, lr: 5.0}\n", "'lr'"),
    "section": ("job.yaml", "name: j\ndata: {dataset: digits}\nmodel: {layers: [64, 10]}\n"
                            "training: {batch_size: 7}\ntraining: {epochs: 1}\n", "'training'"),
    "sweep": ("sweep.yaml", "job: job.yaml\nbatch_sizes: [8]\nbatch_sizes: [16]\nlr: [0.1]\n"
                            "target: {metric: test_accuracy, value: 0.5}\n", "'batch_sizes'"),
    "profile": ("profile.yaml", "kind: slurm\nnodes: 1\nnodes: 4\n", "'nodes'"),
}
MIXED = {
    "job": ("job.yaml", "name: j\ndata: {dataset: digits}\nmodel: {layers: [64, 10], 1: relu}\n", "key 1"),
    "sweep": ("sweep.yaml", "job: job.yaml\nbatch_sizes: [8]\nlr: [0.1]\n2: x\n", "key 2"),
    "profile": ("profile.yaml", "kind: slurm\non: true\n", "key on"),
}


def _command(tmp_path, kind, path):
    if kind == "job":
        return ["run", path, "--out", str(tmp_path / "run"), "--no-progress"]
    if kind == "sweep":
        return ["sweep", path, "--out", str(tmp_path / "sweep"), "--no-progress"]
    return ["submit", str(tmp_path / "job.yaml"), "--cluster", path]


@pytest.mark.parametrize("table,case", [("dup", k) for k in DUPLICATES] + [("mixed", k) for k in MIXED])
def test_duplicate_and_non_string_keys_are_refused_naming_the_key(tmp_path, capsys, monkeypatch, table, case):
    monkeypatch.setenv("DISTFFN_HOME", str(tmp_path / "home"))
    name, text, needle = (DUPLICATES if table == "dup" else MIXED)[case]
    kind = {"job.yaml": "job", "sweep.yaml": "sweep", "profile.yaml": "profile"}[name]
    path = tmp_path / name
    if kind != "job":
        write_job(tmp_path, name="job.yaml")
    path.write_text(text)
    err = user_error(capsys, _command(tmp_path, kind, str(path)), str(path), needle, "line ")
    assert ("duplicate key" in err) == (table == "dup")
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()
    assert not (tmp_path / "home").exists()


def test_a_duplicate_key_in_a_set_value_is_refused(tmp_path, capsys):
    user_error(capsys, ["run", write_equiv_job(tmp_path), "--set", "model.layers=[{a: 1, a: 2}]", "--no-progress",
                        "--out", str(tmp_path / "run")], "--set model.layers", "duplicate key 'a'")


# ---------------------------------------------------------------- a torn metrics line

def test_a_torn_last_metrics_line_is_dropped_and_said_before_the_next_append(tmp_path, finished_run):
    job, out = finished_run
    metrics = out / "metrics.jsonl"
    whole = metrics.read_bytes()
    torn = b'{"event": "epoch", "epoch": 2, "st'
    metrics.write_bytes(whole + torn)
    r = run_group([sys.executable, "-m", "distffn", "run", job, "--out", str(out), "--resume", "--no-progress",
                   "--set", "training.epochs=3"], timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"dropped an unfinished last line ({len(torn)} bytes)" in r.stderr
    text = metrics.read_bytes()
    assert text.startswith(whole) and text.endswith(b"\n")
    records = [json.loads(line) for line in text.splitlines()]          # every line parses
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [1, 2, 3]


def test_drop_torn_tail_keeps_whole_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    for content, dropped in ((b"", 0), (b"a\n", 0), (b"a\nbc", 2), (b"abc", 3), (b"a\n" * 40000 + b"x" * 70000, 70000)):
        path.write_bytes(content)
        assert drop_torn_tail(str(path)) == dropped
        assert path.read_bytes() == content[:len(content) - dropped]
    assert drop_torn_tail(str(tmp_path / "none.jsonl")) == 0


# ---------------------------------------------------------------- a Ray address that never answers

@pytest.fixture
def silent_server():
    """A loopback TCP port that accepts connections and never says anything."""
    server = socket.create_server(("127.0.0.1", 0))
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield server.getsockname()[1]
    stop.set()
    t.join(5)
    for c in held:
        c.close()
    server.close()


def _ray_run(tmp_path, address, *sets, timeout=120, **env):
    env = {**os.environ, "RAY_ADDRESS": address, **env}
    cmd = [sys.executable, "-m", "distffn", "run", write_equiv_job(tmp_path), "--out", str(tmp_path / "run"),
           "--no-progress", "--set", "scaling.backend=ray", *(x for s in sets for x in ("--set", s))]
    return run_group(cmd, timeout=timeout, env=env)


def test_a_ray_address_where_nothing_listens_is_named_at_once(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]              # closed again below: nothing listens there
    r = _ray_run(tmp_path, f"127.0.0.1:{port}")
    assert r.returncode == 2, r.stderr
    assert f"127.0.0.1:{port}" in r.stderr and "cluster/ray-head.sh up" in r.stderr
    assert not (tmp_path / "run").exists()


def test_a_ray_address_that_never_answers_ends_within_the_connect_timeout(tmp_path, silent_server):
    r = _ray_run(tmp_path, f"127.0.0.1:{silent_server}", "scaling.connect_timeout_s=3", timeout=90)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("distffn: error:")]
    assert len(lines) == 1 and f"127.0.0.1:{silent_server}" in lines[0] and "scaling.connect_timeout_s" in lines[0]
    assert "Traceback" not in r.stderr


def test_a_run_reaches_a_ray_head_on_loopback_at_the_address_given(tmp_path, ray_head):
    state, _, env = ray_head
    address = f"127.0.0.1:{env['RAY_HEAD_PORT']}"
    r = _ray_run(tmp_path, address, "scaling.connect_timeout_s=60", timeout=240,
                 RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(state / "auth_token"))
    assert r.returncode == 0, r.stderr
    assert f"connecting to the Ray cluster at {address}" in r.stderr
    # the run's model is the local one (N workers anywhere train the model of 1)
    local = tmp_path / "local"
    assert run_cli(write_equiv_job(tmp_path), "--out", str(local)) == 0
    a, _ = final_model(tmp_path / "run")
    b, _ = final_model(local)
    for name in a:
        assert abs(a[name] - b[name]).max() <= 2e-6, name
