"""The one bind protocol every space kind follows: a definition, bound to models, answers the
same questions.

An experiment's ``space`` is a catalog name or file (a parameter space, kind ``ps``) or a mapping;
a mapping's ``kind`` (default ``ps``) picks the definition class in :data:`SPACE_KINDS`. Every
definition is read by ``from_config(config)`` and bound by ``bind_to(target)`` to a
:class:`BindTarget` (the experiment's models as their checkpoints describe them), giving a
:class:`Bound` space: ``names``, ``lower``/``upper``, ``dim``, ``bounds``, ``method``,
``start_point`` (None when the kind has none), ``decode(x, meta)``, ``source_points()``,
``model_names()`` and ``implied_options()``. The driver binds one way and never asks which kind
it holds; the strategies see only bounds and options (:func:`strategy_options`), never recipes.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Protocol, get_args

import numpy as np
from pydantic import BaseModel, ValidationError

from evomerge.config_io import format_errors
from evomerge.registry import Registry

__all__ = ["SPACE_KINDS", "BindTarget", "Bound", "KindedSpace", "SpaceDefinition", "SpaceError",
           "parse_space", "space_kind", "strategy_options"]


class SpaceError(ValueError):
    """A search space that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class BindTarget:
    """What a space is bound to: the experiment's models as their checkpoints describe them, and
    the run's budget (the weights kind bounds its records' parent steps by it)."""

    base: str | None
    #: source name -> model path, in the experiment's order
    sources: Mapping[str, str]
    #: the checkpoints' tensor headers (name -> ``evomerge.merge.checkpoints.TensorMeta``)
    tensors: Mapping[str, Any]
    model_type: str | None
    budget: int

    @property
    def paths(self) -> list[str]:
        """Every model the workers hold: the base (if any), then the sources."""
        return ([self.base] if self.base else []) + [str(p) for p in self.sources.values()]

    @cached_property
    def _layers(self) -> list[int | None]:
        from evomerge.merge.engine import layer_group  # engine imports torch; keep it lazy

        return [layer_group(n).layer for n in self.tensors]

    @property
    def num_layers(self) -> int:
        """The number of transformer blocks (0 for a model without blocks)."""
        return 1 + max((i for i in self._layers if i is not None), default=-1)

    @property
    def non_layer_tensors(self) -> list[str]:
        """The names of every tensor outside the blocks (embeddings, final norm, head)."""
        return [n for n, i in zip(self.tensors, self._layers) if i is None]


class Bound(ABC):
    """A space bound to concrete models (any kind): what the driver, the store and the strategies
    ask of it."""

    #: the registered kind (``ps``, ``dfs``, ``weights``)
    kind: ClassVar[str]
    #: one readable name per coordinate: the trials' parameter names
    names: tuple[str, ...]
    lower: np.ndarray
    upper: np.ndarray
    #: where a search that takes a start (CMA-ES's ``x0``) starts; None: the kind has none
    start_point: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return len(self.names)

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.lower, self.upper

    @property
    @abstractmethod
    def method(self) -> str:
        """The merge method of the recipes it decodes (``dfs``, ``segments`` for the others)."""

    @abstractmethod
    def decode(self, x: Sequence[float], meta: Mapping[str, Any] | None = None) -> Any:
        """The recipe of a candidate: its point ``x`` and the strategy's ``meta`` (only the
        weights kind reads it: a crossover child's member)."""

    @abstractmethod
    def source_points(self) -> list[np.ndarray]:
        """One point per source that decodes to that source alone (M2N2's ``init: sources``);
        ValueError when the space has no such point."""

    @abstractmethod
    def model_names(self) -> dict[str, str]:
        """Model reference -> its short name in the space (the names its parameters carry)."""

    def implied_options(self) -> dict[str, Any]:
        """Strategy options the space implies, given to strategies that take them and whose
        experiment leaves them unset: by default its start point as ``x0``."""
        return {} if self.start_point is None else {"x0": self.start_point.tolist()}


class SpaceDefinition(Protocol):
    """A space kind's definition, as :data:`SPACE_KINDS` holds it (a class)."""

    @classmethod
    def from_config(cls, config: Any) -> SpaceDefinition: ...

    def bind_to(self, target: BindTarget) -> Bound: ...


class KindedSpace(BaseModel):
    """A definition written as a mapping that names its ``kind`` (``dfs``, ``weights``; the
    subclass declares ``kind: Literal[...]``)."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "space") -> Any:
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            kind = get_args(cls.model_fields["kind"].annotation)[0]
            raise ValueError(f"{where}: invalid {kind} space:\n{format_errors(exc)}") from None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Any:
        return cls.from_dict(config)


#: space kind -> its definition class (``kind:`` in an experiment's space; ``ps`` when absent)
SPACE_KINDS: Registry[type[SpaceDefinition]] = Registry("space kind", "evomerge.spaces", {
    "ps": "evomerge.spaces.ps:SearchSpace",
    "dfs": "evomerge.spaces.dfs:DfsSpace",
    "weights": "evomerge.spaces.weights:WeightSpace",
})


def space_kind(config: Any) -> str:
    """The kind of an experiment's ``space``: a mapping's ``kind``, else ``ps`` (a catalog name,
    a file, or a mapping with ``method``)."""
    return str(config.get("kind", "ps")) if isinstance(config, Mapping) else "ps"


def parse_space(config: str | Path | Mapping[str, Any]) -> SpaceDefinition:
    """An experiment's ``space``, validated by its kind's definition (no models needed)."""
    kind = space_kind(config)
    if kind not in SPACE_KINDS:
        raise SpaceError(f"space.kind: unknown space kind {kind!r}; known: "
                         f"{', '.join(SPACE_KINDS.names())}")
    return SPACE_KINDS[kind].from_config(config)


def strategy_options(space: Bound, options: Mapping[str, Any],
                     factory: Callable[..., Any]) -> dict[str, Any]:
    """The options a strategy is built with: the experiment's, ``init: sources`` replaced by the
    space's source points, plus each option the space implies (:meth:`Bound.implied_options`)
    that ``factory`` takes by name and the experiment leaves unset."""
    out = dict(options)
    if out.get("init") == "sources":  # M2N2: each source alone
        try:
            out["init"] = [p.tolist() for p in space.source_points()]
        except ValueError as exc:
            raise ValueError(f"strategy.init: sources: {exc}") from None
    implied = space.implied_options()
    if implied:
        takes = inspect.signature(factory).parameters
        out |= {k: v for k, v in implied.items() if k in takes and k not in out}
    return out


def short_names(refs: Sequence[str], labels: Sequence[str]) -> dict[str, str]:
    """Model reference -> label, for the references their label shortens."""
    return {ref: label for ref, label in zip(refs, labels) if ref != label}
