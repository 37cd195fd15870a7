"""The README's tables of names (activations, losses, optimizers, ...) rendered from the
registries, so the documentation cannot list a name the code does not know, or miss one.
Registries whose names each need one line of description share one table (``names``, grouped
by the key that takes them); those with more columns have a table of their own.

``python -m distffn.docs README.md`` rewrites every block between
``<!-- registry:KIND -->`` and ``<!-- /registry:KIND -->``; ``--check`` only reports
(exit 1) when one is out of date, which a test does.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys

from .data import DATASETS
from .kernels import KERNELS
from .nn.activations import ACTIVATIONS
from .nn.init import INITIALIZERS
from .nn.objectives import OBJECTIVES
from .optim import OPTIMIZERS, SCHEDULES
from .parallel import BACKENDS
from .submit import SCHEDULERS
from .sweep import LR_RULES, NETWORKS
from .targets import TARGET_METRICS


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# (the key a name is written under, its registry): the rows of the shared ``names`` table
NAMED = [("`model.activation`", ACTIVATIONS), ("`model.init`", INITIALIZERS), ("`optimizer.schedule`", SCHEDULES),
         ("`data.dataset`", DATASETS), ("`scaling.kernels`", KERNELS),
         ("`training.target_metric`, sweep `target.metric`", TARGET_METRICS),
         ("sweep `lr.rule`", LR_RULES), ("sweep `network`", NETWORKS)]


def _grouped(groups) -> list[list[str]]:
    """One row per name; the key only on its group's first row."""
    return [[key if i == 0 else "", f"`{name}`", registry.doc(name)]
            for key, registry in groups for i, name in enumerate(registry.names())]


def tables() -> dict[str, str]:
    """Markdown for each registry block the README holds."""
    return {
        "names": _table(["key", "name", "meaning"], _grouped(NAMED)),
        "objectives": _table(["`model.output`", "`model.loss`", "per sample"],
                             [[f"`{cls.output}`", f"`{cls.loss}`", OBJECTIVES.doc(name)]
                              for name, cls in OBJECTIVES.items()]),
        "optimizers": _table(["`optimizer.name`", "update", "state (flat buffers)"],
                             [[f"`{name}`", OPTIMIZERS.doc(name), ", ".join(f"`{b}`" for b in cls.buffers)]
                              for name, cls in OPTIMIZERS.items()]),
        "backends": _table(["`scaling.backend`", "workers", "`scaling.aggregation`"],
                           [[f"`{name}`", BACKENDS.doc(name), ", ".join(f"`{m}`" for m in modes)]
                            for name, modes in BACKENDS.items()]),
        "clusters": _table(["cluster profile `kind`", "jobs go to", "keys (default)"],
                           [[f"`{name}`", SCHEDULERS.doc(name), ", ".join(
                               f"`{f.name}` ({_default(f)})" for f in dataclasses.fields(cls.Profile))]
                            for name, cls in SCHEDULERS.items()]),
    }


def _default(f) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return "required" if value is dataclasses.MISSING else "none" if value is None else str(value)


_BLOCK = re.compile(r"(<!-- registry:([\w-]+) -->\n)(?:.*?\n)?(<!-- /registry:\2 -->)", re.DOTALL)


def update(text: str) -> str:
    """``text`` with every registry block re-rendered (unknown kinds are left alone)."""
    rendered = tables()
    return _BLOCK.sub(lambda m: m.group(1) + rendered[m.group(2)] + "\n" + m.group(3)
                      if m.group(2) in rendered else m.group(0), text)


def unknown_kinds(text: str) -> list[str]:
    """Registry blocks in ``text`` that no table renders (left over from a renamed kind)."""
    rendered = tables()
    return [m.group(2) for m in _BLOCK.finditer(text) if m.group(2) not in rendered]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m distffn.docs", description=__doc__.splitlines()[0])
    p.add_argument("path", nargs="?", default="README.md")
    p.add_argument("--check", action="store_true", help="exit 1 if a block is out of date; write nothing")
    args = p.parse_args(argv)
    with open(args.path, encoding="utf-8") as f:
        text = f.read()
    new = update(text)
    if args.check:
        if unknown_kinds(text):
            print(f"{args.path}: no registry renders the block(s) {', '.join(unknown_kinds(text))}; "
                  f"known: {', '.join(tables())}", file=sys.stderr)
            return 1
        if new != text:
            print(f"{args.path}: registry tables are out of date; run python -m distffn.docs {args.path}",
                  file=sys.stderr)
            return 1
        return 0
    with open(args.path, "w", encoding="utf-8") as f:
        f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
