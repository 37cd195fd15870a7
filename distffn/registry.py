"""One registry per extensible kind (activations, objectives, initialisers, optimizers,
schedules, datasets, backends, target metrics, learning-rate rules, network presets).

A registry is the only list of a kind's names: job-spec validation, the "expected one of ..."
messages, ``distffn --help`` texts and the README tables are all read from it, so adding an
entry is its code plus one ``register`` call.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

from .bounded_yaml import short
from .errors import UserError


class Registry:
    """Named entries of one kind, in registration order.

    ``field`` is the job-spec field that names an entry (``model.activation``); lookups of an
    unknown name raise :class:`UserError` naming it and listing the choices.
    """

    def __init__(self, kind: str, field: str):
        self.kind, self.field = kind, field
        self._entries: dict[str, Any] = {}
        self._docs: dict[str, str] = {}

    def register(self, name: str, obj: Any = None, *, doc: Optional[str] = None):
        """Register ``obj`` under ``name``; without ``obj``, a decorator.

        ``doc`` is the one-line description shown in the README table; by default the first
        line of ``obj``'s docstring.
        """
        def add(entry):
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            text = doc if doc is not None else (getattr(entry, "__doc__", None) or "")
            self._docs[name] = text.strip().splitlines()[0] if text.strip() else ""
            return entry
        return add if obj is None else add(obj)

    def named(self, name: str):
        """Class decorator: set ``cls.name`` and register the class under it."""
        def add(cls):
            cls.name = name
            return self.register(name, cls)
        return add

    def get(self, name: str, field: Optional[str] = None):
        """The entry called ``name``; an unknown name is the user's mistake in ``field``."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UserError(f"{field or self.field}: expected one of {self.choices()}; got {short(name)}") from None

    def check(self, name: str, field: Optional[str] = None, where: Callable[[Any], bool] = None):
        """Raise :class:`UserError` unless ``name`` is registered (and ``where(entry)`` holds)."""
        entry = self.get(name, field)
        if where is not None and not where(entry):
            raise UserError(f"{field or self.field}: expected one of {self.choices(where)}; got {short(name)}")
        return entry

    def names(self, where: Callable[[Any], bool] = None) -> list[str]:
        return [n for n, e in self._entries.items() if where is None or where(e)]

    def choices(self, where: Callable[[Any], bool] = None) -> str:
        """The names as a message lists them: ``a, b, c``."""
        return ", ".join(self.names(where))

    def doc(self, name: str) -> str:
        return self._docs[name]

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(list(self._entries.items()))

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)
