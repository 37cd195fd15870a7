"""Hostile YAML: size, nesting and alias expansion are bounded, errors stay one short line,
and only plain data is ever built."""
from __future__ import annotations

import os
import time

import pytest

from distffn.bounded_yaml import MAX_BYTES, load_file, loads, short
from distffn.errors import UserError

from helpers import user_error

BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
model: {layers: *h}
"""


def timed_user_error(capsys, tmp_path, text, *needles, name="job.yaml"):
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    t0 = time.monotonic()
    err = user_error(capsys, ["run", str(p)], *needles)
    assert time.monotonic() - t0 < 1.0, "refused, but not within a second"
    assert len(err) < 400
    return err


def test_alias_bomb_is_refused_within_a_second(tmp_path, capsys):
    assert len(BOMB) < 600                      # 9^9 values from a few hundred bytes
    timed_user_error(capsys, tmp_path, BOMB, "expands to more than 100,000 values", "job.yaml")


def test_deep_nesting_is_refused_within_a_second(tmp_path, capsys):
    deep = "model: {layers: " + "[" * 100_000 + "]" * 100_000 + "}\n"
    timed_user_error(capsys, tmp_path, deep, "nested more than 64 levels", "job.yaml")


def test_a_document_that_contains_itself_is_refused(tmp_path, capsys):
    timed_user_error(capsys, tmp_path, "model: {layers: &a [1, *a]}\n", "contains itself", "job.yaml")


def test_oversized_file_is_refused_before_parsing(tmp_path, capsys):
    timed_user_error(capsys, tmp_path, "# " + "x" * MAX_BYTES + "\n", "larger than 1024 KiB", "job.yaml")


def test_python_objects_are_never_built(tmp_path, capsys):
    timed_user_error(capsys, tmp_path, "name: !!python/object/apply:os.system ['true']\n",
                     "malformed YAML", "could not determine a constructor", "job.yaml")


def test_binary_file_and_folder_and_symlink_loop(tmp_path, capsys):
    timed_user_error(capsys, tmp_path, b"\xff\xfe\x00garbage", "not a text file", "job.yaml")
    user_error(capsys, ["run", str(tmp_path)], "is a folder")
    loop = tmp_path / "loop.yaml"
    os.symlink(loop, loop)
    user_error(capsys, ["run", str(loop)], "loop.yaml", "cannot read")


def test_a_huge_value_is_not_repeated_in_the_message(tmp_path, capsys):
    p = tmp_path / "job.yaml"
    p.write_text("model: {layers: ['a', " + ", ".join(map(str, range(1, 5_000))) + "]}\n")
    err = user_error(capsys, ["run", str(p)], "model.layers", "['a', 1, 2, 3, 4, 5, ...]")
    assert len(err) < 300 and "4999" not in err


def test_short_cuts_values_to_a_line():
    assert len(short("x" * 10_000)) < 80 and len(short(list(range(10_000)))) < 80
    assert "\n" not in short("a\nb" * 100)


def test_plain_yaml_still_reads():
    assert loads("a: [1, 2, {b: c}]\nd: &x 3\ne: *x\n", "t") == {"a": [1, 2, {"b": "c"}], "d": 3, "e": 3}
    assert loads("", "t") is None


def test_errors_name_line_and_column(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("a: [1,\nb: }\n")
    with pytest.raises(UserError, match=r"bad.yaml: malformed YAML \(line \d+, column \d+\)"):
        load_file(str(p))
