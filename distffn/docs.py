"""The README's tables of names (activations, losses, optimizers, ...) rendered from the
registries, so the documentation cannot list a name the code does not know, or miss one.

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


def _names(registry, where=None) -> list[list[str]]:
    return [[f"`{name}`", registry.doc(name)] for name in registry.names(where)]


def tables() -> dict[str, str]:
    """Markdown for each registry block the README holds."""
    return {
        "activations": _table(["`model.activation`", "a = f(z)"], _names(ACTIVATIONS)),
        "objectives": _table(["`model.output`", "`model.loss`", "per sample"],
                             [[f"`{cls.output}`", f"`{cls.loss}`", OBJECTIVES.doc(name)]
                              for name, cls in OBJECTIVES.items()]),
        "initializers": _table(["`model.init`", "W drawn from"], _names(INITIALIZERS)),
        "optimizers": _table(["`optimizer.name`", "update", "state (flat buffers)"],
                             [[f"`{name}`", OPTIMIZERS.doc(name), ", ".join(f"`{b}`" for b in cls.buffers)]
                              for name, cls in OPTIMIZERS.items()]),
        "schedules": _table(["`optimizer.schedule`", "ε_t"], _names(SCHEDULES)),
        "datasets": _table(["`data.dataset`", "what"], _names(DATASETS)),
        "backends": _table(["`scaling.backend`", "workers", "`scaling.aggregation`"],
                           [[f"`{name}`", BACKENDS.doc(name), ", ".join(f"`{m}`" for m in modes)]
                            for name, modes in BACKENDS.items()]),
        "clusters": _table(["cluster profile `kind`", "jobs go to", "keys (default)"],
                           [[f"`{name}`", SCHEDULERS.doc(name), ", ".join(
                               f"`{f.name}` ({_default(f)})" for f in dataclasses.fields(cls.Profile))]
                            for name, cls in SCHEDULERS.items()]),
        "target-metrics": _table(["`target.metric` / `training.target_metric`", "reached when"],
                                 _names(TARGET_METRICS)),
        "lr-rules": _table(["`lr.rule`", "learning rate at batch size B"], _names(LR_RULES)),
        "networks": _table(["`network`", "α (latency), β (time per byte) and their sources"], _names(NETWORKS)),
        "kernels": _table(["`scaling.kernels`", "the CPU step's elementwise work"], _names(KERNELS)),
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m distffn.docs", description=__doc__.splitlines()[0])
    p.add_argument("path", nargs="?", default="README.md")
    p.add_argument("--check", action="store_true", help="exit 1 if a block is out of date; write nothing")
    args = p.parse_args(argv)
    with open(args.path, encoding="utf-8") as f:
        text = f.read()
    new = update(text)
    if args.check:
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
