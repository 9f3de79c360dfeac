"""One registry type for every pluggable axis: merge methods, strategies, fitnesses, executors,
estimators, samplers and space kinds.

A :class:`Registry` maps names to objects. An entry is either the object itself or a lazy
``"module:object"`` target, imported on first lookup, so that naming one built-in (``local``
executor, ``digits`` fitness) imports only its own module, and a registry's home imports none of
its plugins. Third-party packages add entries without being imported by evomerge through entry
points of group ``evomerge.<axis>`` (for example, in a plugin's ``pyproject.toml``)::

    [project.entry-points."evomerge.fitnesses"]
    my_fitness = "my_package.fitness:MyFitness"

Entry points are read once, on the first miss or listing, and resolved like any lazy target.
Lookup errors name the axis and the known names (``unknown strategy 'x'; known: a, b``); a
plugin whose import fails is named in the error rather than breaking lookups of the others.

This module imports nothing of evomerge (the arrows point into it, never out).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")

__all__ = ["Registry", "import_object", "is_object_name"]


def is_object_name(name: Any) -> bool:
    """Whether ``name`` is a ``"module:qualname"`` target (what :func:`evomerge.run` records for
    an object it was given, and how lazy entries are written) rather than a registered name."""
    return isinstance(name, str) and ":" in name


def import_object(target: str) -> Any:
    """The object a ``"module:qualname"`` target names (ImportError saying what is missing)."""
    module, _, qualname = target.partition(":")
    try:
        found: Any = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"{target!r} cannot be imported here ({exc})") from None
    return found


class Registry(Generic[T]):
    """Names -> objects of one axis (``kind``, as errors say it: "merge method", "strategy").

    ``entries`` are the built-ins, objects or lazy ``"module:object"`` targets (a registry of
    plain strings is therefore not possible: a string entry always means a target). ``group``
    is the entry-point group third-party plugins register under.

    Iteration, ``len`` and ``in`` see names only and import nothing; ``reg[name]``,
    ``values()`` and ``items()`` resolve targets.
    """

    def __init__(self, kind: str, group: str, entries: Mapping[str, T | str] | None = None):
        self.kind = kind
        self.group = group
        self._entries: dict[str, T | str] = {}
        self._plugins_loaded = False
        for name, target in (entries or {}).items():
            self.register(name, target)

    # -- registration ---------------------------------------------------------------------

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, target: T | str) -> T | str: ...

    def register(self, name: str, target: Any = None) -> Any:
        """Add ``target`` (an object or a ``"module:object"`` string) under ``name``; with no
        target, a decorator that registers what it decorates and returns it unchanged.
        A name already taken is refused (ValueError): a plugin must not silently replace a
        built-in."""
        if target is None:
            def decorate(obj: T) -> T:
                self.register(name, obj)
                return obj
            return decorate
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if isinstance(target, str) and not is_object_name(target):
            raise ValueError(f"{self.kind} {name!r}: a string target must read 'module:object', "
                             f"got {target!r}")
        self._entries[name] = target
        return target

    # -- lookup ---------------------------------------------------------------------------

    def __getitem__(self, name: str) -> T:
        if name not in self:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        target = self._entries[name]
        if isinstance(target, str):
            try:
                obj = import_object(target)
            except ImportError as e:
                raise ImportError(f"{self.kind} {name!r}: {e}") from e
            except Exception as e:  # a plugin's module failing as it runs is named too
                raise ImportError(f"{self.kind} {name!r}: {target!r} failed on import "
                                  f"({type(e).__name__}: {e})") from e
            self._entries[name] = target = obj
        return target  # type: ignore[return-value]

    def __contains__(self, name: object) -> bool:
        if name not in self._entries:
            self._load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self._load_plugins()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self._load_plugins()
        return len(self._entries)

    def names(self) -> list[str]:
        """The registered names, sorted (what errors and help texts list)."""
        return sorted(self)

    def values(self) -> list[T]:
        return [self[name] for name in self]

    def items(self) -> list[tuple[str, T]]:
        return [(name, self[name]) for name in self]

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.group!r}, names={list(self._entries)})"

    def _load_plugins(self) -> None:
        """Add the entry points of ``group`` as lazy targets, once. A plugin whose name is
        taken by a built-in is ignored (built-ins win, as documented in the README)."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self.group):
            self._entries.setdefault(ep.name, ep.value)
