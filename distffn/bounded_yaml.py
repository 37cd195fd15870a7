"""YAML from users, read with bounds: a size cap, a nesting-depth cap, and a cap on the size
the document would have with every alias expanded (a 400-byte "billion laughs" file expands
to 9^9 elements). Only plain data comes back (``yaml.SafeLoader``: no Python objects), and
every mapping has string keys, each once: PyYAML lets a repeated key silently win
(``{lr: 0.05, lr: 5.0}`` trains at 5.0) and reads ``on:`` or ``1:`` as a bool or an int."""
from __future__ import annotations

import os
import reprlib

import yaml

from .errors import UserError

MAX_BYTES = 1 << 20         # a job spec is a page of text
MAX_DEPTH = 64              # nesting of mappings and lists
MAX_NODES = 100_000         # scalars, lists and mappings, counted with every alias expanded

_short = reprlib.Repr()
_short.maxlevel, _short.maxlist, _short.maxdict, _short.maxstring, _short.maxother = 2, 6, 6, 60, 60


def short(value) -> str:
    """``repr(value)`` cut to one short line, for error messages about users' values."""
    return _short.repr(value).replace("\n", " ")


class NotYaml(UserError):
    """The text does not parse as YAML at all (``--set`` then takes it as a plain string)."""


class _TooDeep(Exception):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents nested deeper than :data:`MAX_DEPTH` while composing
    (before Python's own recursion limit is hit)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooDeep
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            _check_keys(node, self)
        return super().construct_mapping(node, deep=deep)


class _Recursive(Exception):
    pass


class _BadKey(Exception):
    """A mapping key that is repeated or not a string: (message, the key's node)."""


def _check_keys(node: yaml.MappingNode, constructor) -> None:
    """Every key of ``node`` a string, none twice (``<<`` merges are YAML's overrides, not
    repeats: only the mapping's own keys count)."""
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = constructor.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            kind = {bool: "a boolean", int: "an integer", float: "a number", list: "a list",
                    dict: "a mapping"}.get(type(key), f"a {type(key).__name__}")
            written = key_node.value if isinstance(key_node, yaml.ScalarNode) else short(key)
            quote = f" (quote it: '{written}')" if isinstance(key_node, yaml.ScalarNode) else ""
            raise _BadKey(f"key {written} is read as {kind}, expected a name{quote}", key_node)
        if key in seen:
            raise _BadKey(f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1}); a key "
                          f"may appear once in a mapping", key_node)
        seen[key] = key_node


def _expanded_size(root) -> int:
    """Nodes in the document with aliases expanded, counted without expanding them: each
    node's size is computed once (aliases share node objects), iteratively. A node that
    contains itself (``&a [*a]``) raises :class:`_Recursive`."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = 1
            continue
        kids = [k for pair in node.value for k in pair] if isinstance(node, yaml.MappingNode) else node.value
        if children_done:
            open_nodes.discard(id(node))
            sizes[id(node)] = min(1 + sum(sizes[id(k)] for k in kids), MAX_NODES + 1)
            continue
        if id(node) in open_nodes:
            raise _Recursive
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in sizes)
    return sizes[id(root)]


def loads(text: str, source: str):
    """Parse ``text`` (named ``source`` in errors) with the bounds above."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_NODES:
            raise UserError(f"{source}: the YAML expands to more than {MAX_NODES:,} values (aliases "
                            f"included); a job spec is far smaller")
        return loader.construct_document(node)
    except _TooDeep:
        raise UserError(f"{source}: the YAML is nested more than {MAX_DEPTH} levels deep") from None
    except _Recursive:
        raise UserError(f"{source}: the YAML contains itself through an alias; expected plain data") from None
    except _BadKey as e:
        message, node = e.args
        mark = node.start_mark
        raise UserError(f"{source}: line {mark.line + 1}, column {mark.column + 1}: {message}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise NotYaml(f"{source}: malformed YAML{where}: {problem}") from None
    finally:
        loader.dispose()


def load_file(path: str, what: str = "YAML file"):
    """Read and parse the file at ``path``; every problem is a one-line :class:`UserError`."""
    try:
        if os.path.isdir(path):
            raise UserError(f"{path}: is a folder, expected a {what}")
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what}") from None
    except OSError as e:               # a symlink loop, no permission, ...
        raise UserError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    if len(data) > MAX_BYTES:
        raise UserError(f"{path}: larger than {MAX_BYTES // 1024} KiB; expected a {what}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file; expected a {what}") from None
    return loads(text, path)
