"""The documentation is generated from, or checked against, the code: the README's tables of
names come from the registries, the README names every command-line flag, and the examples
of `distffn --help` parse (the cheap ones run). README's blocks run in test_readme.py."""
from __future__ import annotations

import argparse
import os
import shlex

import pytest

from distffn import docs
from distffn.cli import EPILOG, build_parser, main

ROOT = os.path.join(os.path.dirname(__file__), "..")
README = os.path.join(ROOT, "README.md")


def test_readme_tables_are_rendered_from_the_registries():
    text = open(README, encoding="utf-8").read()
    for kind, table in docs.tables().items():
        assert f"<!-- registry:{kind} -->\n{table}\n<!-- /registry:{kind} -->" in text, kind
    assert docs.update(text) == text, "run: python -m distffn.docs README.md"
    assert docs.main([README, "--check"]) == 0


def test_a_stale_table_is_detected(tmp_path):
    stale = tmp_path / "README.md"
    stale.write_text("x\n<!-- registry:optimizers -->\n| `sgd` | gone |\n<!-- /registry:optimizers -->\n")
    assert docs.main([str(stale), "--check"]) == 1
    assert docs.main([str(stale)]) == 0
    assert "`adam`" in stale.read_text() and "`sgd`" not in stale.read_text()


def test_a_block_no_registry_renders_is_reported(tmp_path, capsys):
    stale = tmp_path / "README.md"
    stale.write_text("x\n<!-- registry:gone -->\n| `a` | b |\n<!-- /registry:gone -->\n")
    assert docs.main([str(stale), "--check"]) == 1
    assert "gone" in capsys.readouterr().err


def test_readme_names_every_flag_of_every_command():
    text = open(README, encoding="utf-8").read()
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    for name, sub in subparsers.choices.items():
        assert f"distffn {name}" in text, name
        flags += [o for a in sub._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    missing = sorted({f for f in flags if f not in text})
    assert not missing, f"README.md does not mention {missing}"


def test_architecture_page_names_every_package_and_module():
    text = open(os.path.join(ROOT, "ARCHITECTURE.md"), encoding="utf-8").read()
    pkg = os.path.join(ROOT, "distffn")
    for folder, dirs, files in os.walk(pkg):
        dirs[:] = [d for d in dirs if not d.startswith("__")]
        if folder != pkg:
            assert f"`{os.path.basename(folder)}/`" in text, folder
        for f in files:
            if f.endswith(".py") and not f.startswith("__"):
                assert f"`{f}`" in text, os.path.join(folder, f)


def help_examples() -> list[list[str]]:
    """The command lines of `distffn --help`'s examples, as argv lists without "distffn"."""
    return [shlex.split(line)[1:] for line in EPILOG.splitlines() if line.strip().startswith("distffn ")]


def test_every_help_example_parses():
    parser = build_parser()
    assert len(help_examples()) >= 10
    for argv in help_examples():
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"distffn {shlex.join(argv)}: does not parse")


def test_the_help_examples_on_the_digits_job_run_in_order(tmp_path, monkeypatch):
    """The cheap examples (training the digits job, and what reads its run folders) run as
    listed, from a fresh project folder: each names only files the ones before it wrote."""
    (tmp_path / "jobs").symlink_to(os.path.join(ROOT, "jobs"))
    monkeypatch.chdir(tmp_path)
    cheap = [argv for argv in help_examples()
             if argv[0] in ("run", "eval", "plot", "noise-scale") and not any("fashion" in a for a in argv)]
    assert len(cheap) >= 5
    for argv in cheap:
        assert main(argv) == 0, f"distffn {shlex.join(argv)}"
