"""Parameter spaces (kind ``ps``): a real vector ``x`` in box bounds <-> a
:class:`~evomerge.recipe.MergeRecipe`.

A :class:`SearchSpace` is the genome *definition*, independent of any model: a merge method, the
method parameters that are searched (each at a granularity, with bounds), and the parameters held
fixed. Binding it to concrete models (a base, the sources, the number of transformer blocks and
the names of the tensors outside the blocks) gives a :class:`BoundSpace` with a dimension, box
bounds, one readable name per coordinate, and the pure maps ``decode(x) -> MergeRecipe`` and
``encode(recipe) -> x``.

Granularities (``per``) and the mergekit settings they decode to:

``global``  one value; written to the recipe's global ``parameters``.
``source``  one value per source model (a ``source``-scoped method parameter such as ``weight`` or
            ``density``); written to each model's own ``parameters``.
``layer``   one value per transformer block plus one value for every tensor outside the blocks
            (embeddings, final norm, head), *for each source* when the parameter is per-source::

                density:
                  - {filter: model.embed_tokens.weight, value: a}
                  - {filter: model.norm.weight, value: a}
                  - {filter: lm_head.weight, value: a}
                  - {value: [v0, v1, ..., v(L-1)]}

            The filters are the exact names of the non-block tensors (a filter matches a tensor
            whose name contains it, first match wins), so non-block tensors read ``a`` whatever
            their gradient position; block tensors fall through to the gradient, which has exactly
            L entries, so block i (position ``t = i / (L - 1)``) reads ``v_i``.
``filter``  one value per filter (a substring of tensor names, e.g. ``self_attn``, ``mlp``) plus a
            ``rest`` value for tensors that match none (``rest: false`` leaves them to ``fixed`` or
            the method's default), per source for per-source parameters::

                weight: [{filter: self_attn, value: a}, {filter: mlp, value: b}, {value: c}]

Every setting is plain mergekit syntax, so a decoded recipe runs unchanged in mergekit 0.1.5.

Caveat of mergekit's gradient arithmetic (which the engine reproduces on purpose): block i reads
the gradient at ``scaled = (i / (L - 1)) * (L - 1)``, which for some (L, i) (the first is L = 23,
i = 15) is one ulp below ``i``; that block then reads ``v_i - ulp(i) * (v_i - v_(i-1))``, off by
at most ~``i * 2.2e-16 * |v_i - v_(i-1)|`` (1e-14 relative at 80 layers). For L <= 22 every
block reads its value exactly.

The catalog: ``search_spaces/<name>.yaml`` at the top of a source checkout, loaded by
:func:`load_space` by name (``load_space("ties_per_source")``) or by path (always works, also when
evomerge is installed from a wheel, which does not ship the catalog).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from evomerge.merge.methods import METHODS, MergeMethod, get_method
from evomerge.config_io import format_errors, read_yaml
from evomerge.spaces.base import BindTarget, Bound, SpaceError
from evomerge.recipe.mergekit_config import (
    DTYPES,
    Conditional,
    MergeRecipe,
    ModelEntry,
    Setting,
    _check_params,
)

__all__ = [
    "Axis",
    "BoundSpace",
    "CATALOG_DIR",
    "SearchSpace",
    "SpaceError",
    "catalog",
    "load_space",
]

#: The catalog of reusable spaces (a source checkout's top-level ``search_spaces/``).
CATALOG_DIR = Path(__file__).resolve().parents[2] / "search_spaces"

Per = Literal["global", "source", "layer", "filter"]


# --------------------------------------------------------------------------------------------
# Definition
# --------------------------------------------------------------------------------------------


class Axis(BaseModel):
    """One searched method parameter: at which granularity, within which bounds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    per: Per
    bounds: tuple[float, float]
    #: per: filter only: substrings of tensor names, first match wins (e.g. [self_attn, mlp]).
    filters: tuple[str, ...] | None = None
    #: per: filter only: one more value for tensors that match no filter.
    rest: bool = True
    #: per-source parameters only: search it for these sources (model references as bound, or
    #: indices into the bound sources); the others take ``fixed`` or the method's default.
    sources: tuple[str | int, ...] | None = None
    #: starting value of every coordinate of this axis (default: the middle of the bounds).
    init: float | None = None

    @field_validator("bounds")
    @classmethod
    def _bounds(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"bounds must be finite, got [{lo}, {hi}]")
        if not lo < hi:
            raise ValueError(f"lower bound {lo} must be below upper bound {hi}")
        return value

    @field_validator("filters")
    @classmethod
    def _filters(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("give at least one filter (a substring of tensor names)")
        for f in value:
            if not f or f == "*":
                raise ValueError(f"{f!r} is not a usable filter (it would match every tensor); "
                                 "use the rest value instead")
        if len(set(value)) != len(value):
            raise ValueError(f"filters repeat: {list(value)}")
        return value

    @field_validator("sources")
    @classmethod
    def _sources(cls, value: tuple[str | int, ...] | None) -> tuple[str | int, ...] | None:
        if value is not None:
            if not value:
                raise ValueError("give at least one source (or leave 'sources' out for all)")
            if len(set(value)) != len(value):
                raise ValueError(f"sources repeat: {list(value)}")
        return value

    @model_validator(mode="after")
    def _shape(self) -> "Axis":
        problems = []
        if self.per == "filter" and self.filters is None:
            problems.append("filters: per: filter needs 'filters' (e.g. [self_attn, mlp])")
        if self.per != "filter" and self.filters is not None:
            problems.append(f"filters: only used with per: filter (this axis is per: {self.per})")
        if self.per != "filter" and not self.rest:
            problems.append(f"rest: only used with per: filter (this axis is per: {self.per})")
        if self.init is not None and not self.bounds[0] <= self.init <= self.bounds[1]:
            problems.append(f"init: {self.init} is outside bounds {list(self.bounds)}")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def partial(self) -> bool:
        """Whether some tensors or sources get no value from this axis."""
        return self.sources is not None or (self.per == "filter" and not self.rest)


class SearchSpace(BaseModel):
    """A genome definition: method, searched parameters (axes) and fixed parameters.

    Validation names the field of every problem (``params[1].bounds: ...``). Model-dependent
    checks (sources exist, the method's input count, filters that match nothing) happen in
    :meth:`bind` / :meth:`BoundSpace.from_merger`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str
    params: tuple[Axis, ...] = ()
    #: method parameters at fixed values, written to the recipe's global ``parameters``
    #: (any mergekit setting: scalar, gradient, conditionals).
    fixed: dict[str, Setting] = {}
    #: seeds DARE/DELLA masks (``MergeRecipe.seed``): fixed, not searched.
    seed: int = 0
    dtype: str | None = None
    description: str = ""

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown merge method {value!r}; known: {', '.join(sorted(METHODS))}")
        return value

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"seed must be >= 0, got {value}")
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in DTYPES:
            raise ValueError(f"{value!r} is not one of {', '.join(DTYPES)}")
        return value

    @model_validator(mode="after")
    def _check(self) -> "SearchSpace":
        problems = _check_space(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    # ---- construction ------------------------------------------------------------------------

    @property
    def merge_method(self) -> MergeMethod:
        return get_method(self.method)

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "search space") -> "SearchSpace":
        """Validate parsed YAML/JSON; one :class:`SpaceError` naming every bad field."""
        if not isinstance(data, Mapping):
            raise SpaceError(f"{where}: expected a mapping with 'method' and 'params', "
                             f"got {type(data).__name__}")
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise SpaceError(f"{where}: invalid search space:\n{_format_errors(exc)}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "SearchSpace":
        data = read_yaml(path, SpaceError, "search-space")
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_config(cls, config: str | Path | Mapping[str, Any]) -> "SearchSpace":
        """An experiment's ``space``: a catalog name or file (:func:`load_space`), or a mapping
        (its ``kind: ps``, if written, dropped)."""
        if not isinstance(config, Mapping):
            return load_space(config)
        return cls.from_dict({k: v for k, v in config.items() if k != "kind"}, where="space")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_defaults=True) | {"method": self.method}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # ---- binding -----------------------------------------------------------------------------

    def bind(self, base_model: str | Path | None, sources: Sequence[str | Path], num_layers: int,
             non_layer_tensors: Sequence[str], *,
             tensor_names: Sequence[str] | None = None) -> "BoundSpace":
        """This space over concrete models.

        ``num_layers`` is the number of transformer blocks (``Merger.num_layers``);
        ``non_layer_tensors`` the names of every tensor outside them (embeddings, final norm,
        head). ``tensor_names`` (all tensor names, optional) enables checks that need them: a
        ``per: filter`` filter that matches no tensor, a non-block name that is part of a block
        tensor's name.
        """
        return BoundSpace(self, base_model, sources, num_layers, non_layer_tensors,
                          tensor_names=tensor_names)

    def bind_to(self, target: BindTarget) -> "BoundSpace":
        """The space over an experiment's models (the protocol of :mod:`evomerge.spaces.base`)."""
        return self.bind(target.base, list(target.sources.values()), target.num_layers,
                         target.non_layer_tensors)


def _check_space(space: SearchSpace) -> list[str]:
    method = space.merge_method
    problems: list[str] = []
    searched: dict[str, int] = {}
    for i, axis in enumerate(space.params):
        where = f"params[{i}]"
        spec = method.param(axis.name)
        if spec is None:
            valid = [p.name for p in method.params if p.type is float]
            problems.append(f"{where}.name: {axis.name!r} is not a parameter of {method.name}; "
                            f"searchable: {', '.join(valid) or '(none)'}")
            continue
        if spec.type is not float:
            problems.append(f"{where}.name: {axis.name!r} is a {spec.type.__name__} parameter of "
                            f"{method.name}; only float parameters can be searched "
                            "(fix it instead)")
            continue
        if axis.name in searched:
            problems.append(f"{where}.name: {axis.name!r} is already searched by "
                            f"params[{searched[axis.name]}]")
            continue
        searched[axis.name] = i
        if spec.scope == "shared":
            if axis.per == "source":
                problems.append(f"{where}.per: {axis.name!r} is one value shared by all models in "
                                f"{method.name}; it cannot be per: source (use global, layer or "
                                "filter)")
            if axis.sources is not None:
                problems.append(f"{where}.sources: {axis.name!r} is shared by all models in "
                                f"{method.name}; it has no per-source values")
        elif axis.per == "global" and axis.sources is not None:
            problems.append(f"{where}.sources: per: global writes one value for every source; "
                            "use per: source to search a subset")
        lo, hi = axis.bounds
        if (spec.low is not None and lo < spec.low) or (spec.high is not None and hi > spec.high):
            problems.append(f"{where}.bounds: [{lo}, {hi}] is outside the range of "
                            f"{method.name}.{axis.name}: [{spec.low}, {spec.high}]")
        if axis.name in space.fixed and not axis.partial:
            problems.append(f"fixed.{axis.name}: also searched by {where}; remove one")
    problems += _check_params(space.fixed, "global", "fixed", method)
    for spec in method.params:
        if not spec.required or spec.name in space.fixed:
            continue
        if spec.name not in searched:
            problems.append(f"params: {method.name} requires {spec.name!r}; search it (params) or "
                            f"fix it (fixed)")
            continue
        i = searched[spec.name]
        axis = space.params[i]
        if axis.sources is not None:
            problems.append(f"params[{i}].sources: {method.name} requires {spec.name!r} for every "
                            f"source; the sources outside this subset need fixed.{spec.name}")
        elif axis.per == "filter" and not axis.rest:
            problems.append(f"params[{i}].rest: {method.name} requires {spec.name!r} for every "
                            f"tensor; with rest: false the tensors matching no filter need "
                            f"fixed.{spec.name}")
    return problems


def _format_errors(exc: ValidationError) -> str:
    """One line per problem, led by its field: ``params[0].bounds: ...``."""
    def line(field: str, msg: str) -> str:
        head, sep, tail = msg.partition(": ")
        if field and sep and head in _AXIS_FIELDS:  # an Axis-level check naming its sub-field
            return f"{field}.{head}: {tail}"
        return f"{field}: {msg}" if field else msg

    return format_errors(exc, line)


_AXIS_FIELDS = frozenset(Axis.model_fields)


# --------------------------------------------------------------------------------------------
# Catalog
# --------------------------------------------------------------------------------------------


def catalog() -> list[str]:
    """Names of the spaces in the catalog (empty outside a source checkout)."""
    return sorted(p.stem for p in CATALOG_DIR.glob("*.yaml")) if CATALOG_DIR.is_dir() else []


def load_space(name_or_path: str | Path) -> SearchSpace:
    """A catalog space by name (``"ties_per_source"``) or a space file by path."""
    ref = str(name_or_path)
    looks_like_path = (isinstance(name_or_path, Path) or ref.endswith((".yaml", ".yml"))
                       or "/" in ref or "\\" in ref)
    if looks_like_path:
        return SearchSpace.from_yaml(Path(ref).expanduser())
    path = CATALOG_DIR / f"{ref}.yaml"
    if not path.is_file():
        names = catalog()
        known = (f"known: {', '.join(names)}" if names else
                 f"no catalog at {CATALOG_DIR} (catalog names need a source checkout; pass a path)")
        raise SpaceError(f"search space {ref!r}: not in the catalog and not a file; {known}")
    return SearchSpace.from_yaml(path)


# --------------------------------------------------------------------------------------------
# Bound space
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slot:
    """One setting written by one axis: where it goes, its shape, and its coordinates."""

    axis: int
    param: str
    model: int | None  # index into the recipe's models, None: global parameters
    kind: str  # "scalar" | "layer" | "filter"
    start: int
    size: int

    def where(self) -> str:
        loc = "parameters" if self.model is None else f"models[{self.model}].parameters"
        return f"{loc}.{self.param}"


class BoundSpace(Bound):
    """A :class:`SearchSpace` over concrete models: ``dim``, bounds, names, decode and encode.

    ``inputs`` are the models that carry per-source values, in recipe order: the sources, plus,
    for methods where the base is an ordinary weighted input (``linear``), the base when it is not
    already a source (mergekit's semantics; bind with ``base_model=None`` to leave it out).
    """

    kind = "ps"

    def __init__(self, space: SearchSpace, base_model: str | Path | None,
                 sources: Sequence[str | Path], num_layers: int,
                 non_layer_tensors: Sequence[str], *,
                 tensor_names: Sequence[str] | None = None) -> None:
        method = space.merge_method
        self.space = space
        self.base_model = None if base_model is None else str(base_model)
        if isinstance(sources, (str, Path)):
            raise ValueError("sources: expected a list of model references, got one string")
        self.sources: tuple[str, ...] = tuple(str(s) for s in sources)
        self.num_layers = int(num_layers)
        self.non_layer_tensors: tuple[str, ...] = tuple(non_layer_tensors)
        problems = []
        if not self.sources:
            problems.append("sources: at least one source model is needed")
        if len(set(self.sources)) != len(self.sources):
            problems.append(f"sources: listed twice: {list(self.sources)}")
        if method.base == "required" and self.base_model is None:
            problems.append(f"base_model: {method.name} needs a base model")
        if method.base == "required" and self.base_model in self.sources:
            problems.append(f"sources: the base model {self.base_model} is also listed as a source")
        if self.num_layers < 0:
            problems.append(f"num_layers: {num_layers} is negative")
        if self.num_layers == 0 and not self.non_layer_tensors:
            problems.append("non_layer_tensors: a model with no blocks needs some tensors")
        if len(set(self.non_layer_tensors)) != len(self.non_layer_tensors):
            problems.append("non_layer_tensors: names repeat")
        if problems:
            raise ValueError("cannot bind search space:\n  " + "\n  ".join(problems))

        inputs = list(self.sources)
        if method.base == "optional" and self.base_model and self.base_model not in inputs:
            inputs.append(self.base_model)
        self.inputs: tuple[str, ...] = tuple(inputs)
        self.labels: tuple[str, ...] = _labels(self.inputs)
        self._non_layer_label = "+".join(dict.fromkeys(
            _group_name(n) for n in self.non_layer_tensors)) or "non_layer"
        if tensor_names is not None:
            self._check_names(list(tensor_names))

        slots, names, lower, upper, init = [], [], [], [], []
        for a, axis in enumerate(space.params):
            spec = method.param(axis.name)
            kind = {"global": "scalar", "source": "scalar", "layer": "layer",
                    "filter": "filter"}[axis.per]
            if spec.scope == "source" and axis.per != "global":
                models = self._subset(a, axis)
            else:
                models = [None]
            for m in models:
                suffixes = self._suffixes(axis, kind)
                prefix = axis.name if m is None else f"{axis.name}[{self.labels[m]}]"
                slots.append(_Slot(a, axis.name, m, kind, len(names), len(suffixes)))
                names += [prefix + s for s in suffixes]
                lower += [axis.bounds[0]] * len(suffixes)
                upper += [axis.bounds[1]] * len(suffixes)
                lo, hi = axis.bounds
                mid = axis.init if axis.init is not None else 0.5 * (lo + hi)
                init += [mid] * len(suffixes)
        self._slots: tuple[_Slot, ...] = tuple(slots)
        self.names: tuple[str, ...] = tuple(names)
        self.lower = _frozen(lower)
        self.upper = _frozen(upper)
        self.x0 = _frozen(init)
        # the method's own contract (input counts, required values): decode one point now
        try:
            self.decode(self.x0)
        except ValueError as exc:
            raise ValueError(f"cannot bind search space ({space.method}): {exc}") from None

    @classmethod
    def from_merger(cls, space: SearchSpace, merger: Any, base_model: str | Path | None,
                    sources: Sequence[str | Path]) -> "BoundSpace":
        """Bind to models that a :class:`~evomerge.merge.engine.Merger` holds (checked)."""
        refs = [("base_model", base_model)] if base_model is not None else []
        refs += [(f"sources[{i}]", s) for i, s in enumerate(sources)]
        for field, ref in refs:
            try:
                merger.state(ref)
            except (KeyError, ValueError):
                loaded = ", ".join(str(p) for p in merger.paths)
                raise ValueError(f"{field}: {ref} is not loaded in this Merger "
                                 f"(loaded: {loaded})") from None
        non_layer = [n for n in merger.names if merger.groups[n].layer is None]
        return cls(space, base_model, sources, merger.num_layers, non_layer,
                   tensor_names=merger.names)

    # ---- geometry ----------------------------------------------------------------------------

    @property
    def method(self) -> str:
        return self.space.method

    def clip(self, x: Sequence[float]) -> np.ndarray:
        """``x`` moved into the box (for strategies whose proposals may overshoot by rounding)."""
        return np.clip(np.asarray(x, dtype=float), self.lower, self.upper)

    def __repr__(self) -> str:
        return (f"BoundSpace({self.space.method}, dim={self.dim}, inputs={list(self.labels)}, "
                f"num_layers={self.num_layers})")

    # ---- decode / encode ---------------------------------------------------------------------

    def decode(self, x: Sequence[float], meta: Mapping[str, Any] | None = None) -> MergeRecipe:
        """The recipe at point ``x`` (pure: no state is read or written besides ``x``; ``meta``
        is not read)."""
        x = self._check_x(x)
        space, method = self.space, self.space.merge_method
        global_params: dict[str, Any] = copy.deepcopy(dict(space.fixed))
        model_params: list[dict[str, Any]] = [{} for _ in self.inputs]
        for slot in self._slots:
            values = [float(v) for v in x[slot.start: slot.start + slot.size]]
            setting = self._setting(slot, values)
            target = global_params if slot.model is None else model_params[slot.model]
            target[slot.param] = setting
        if method.base == "optional":
            models = list(self.inputs)
        else:
            models = list(self.sources)
        entries = tuple(ModelEntry(model=m, parameters=model_params[i] or None)
                        for i, m in enumerate(models))
        return MergeRecipe(
            merge_method=space.method,
            base_model=self.base_model,
            models=entries,
            parameters=global_params or None,
            dtype=space.dtype,
            seed=space.seed,
        )

    def source_points(self) -> list[np.ndarray]:
        """One point per source that decodes to that source alone (M2N2's ``init: sources``):
        its ``weight`` coordinates 1, every other input's 0, ``density`` 1 (nothing dropped).

        Exact for methods that mix task vectors or models by a per-source weight (linear,
        task arithmetic, TIES/DARE/DELLA/breadcrumbs families); refused for spaces that search
        anything else or leave some source's weight unsearched, since no point of them is
        known to be one source alone.
        """
        other = sorted({s.param for s in self._slots} - {"weight", "density"})
        if other:
            raise ValueError(f"the space searches {', '.join(other)}: no point is known to be "
                             "one source alone (give the points as a list)")
        weighted = {s.model for s in self._slots if s.param == "weight"}
        if None in weighted or weighted != set(range(len(self.inputs))):
            raise ValueError("needs a per-source weight searched for every input "
                             f"({', '.join(self.labels)})")
        points = []
        for k in range(len(self.sources)):
            x = self.x0.copy()
            for slot in self._slots:
                value = 1.0 if (slot.param == "density" or slot.model == k) else 0.0
                lo, hi = self.lower[slot.start], self.upper[slot.start]
                if not lo <= value <= hi:
                    raise ValueError(f"{slot.where()}: {value} is outside the bounds [{lo}, {hi}]")
                x[slot.start: slot.start + slot.size] = value
            points.append(x)
        return points

    def model_names(self) -> dict[str, str]:
        names = dict(zip(self.inputs, self.labels))
        if self.base_model and self.base_model not in names:
            names[self.base_model] = Path(self.base_model).name or self.base_model
        return names

    def encode(self, recipe: MergeRecipe) -> np.ndarray:
        """The point whose decode is ``recipe``; ValueError naming the field that does not fit."""
        if recipe.merge_method != self.space.method:
            raise ValueError(f"merge_method: recipe uses {recipe.merge_method}, this space "
                             f"{self.space.method}")
        if recipe.base_model != self.base_model:
            raise ValueError(f"base_model: recipe has {recipe.base_model}, this space is bound to "
                             f"{self.base_model}")
        optional_base = self.space.merge_method.base == "optional"
        want = list(self.inputs) if optional_base else list(self.sources)
        have = [e.model for e in recipe.models]
        if have != want:
            raise ValueError(f"models: recipe merges {have}, this space is bound to {want}")
        x = np.empty(self.dim)
        for slot in self._slots:
            scope = (recipe.parameters if slot.model is None
                     else recipe.models[slot.model].parameters) or {}
            if slot.param not in scope:
                raise ValueError(f"{slot.where()}: missing; this space searches it "
                                 f"({self.names[slot.start]}...)")
            x[slot.start: slot.start + slot.size] = self._read(slot, scope[slot.param])
        outside = np.flatnonzero((x < self.lower) | (x > self.upper) | ~np.isfinite(x))
        if outside.size:
            i = int(outside[0])
            raise ValueError(f"{self._slot_of(i).where()}: value {x[i]} of coordinate {i} "
                             f"({self.names[i]}) is outside [{self.lower[i]}, {self.upper[i]}]")
        diff = _first_difference(_canon(recipe.to_dict()), _canon(self.decode(x).to_dict()))
        if diff is not None:
            path, theirs, ours = diff
            raise ValueError(f"{path}: the recipe has {theirs!r} where this space writes "
                             f"{ours!r}; the recipe is not in this space")
        return x

    # ---- helpers -----------------------------------------------------------------------------

    def _subset(self, a: int, axis: Axis) -> list[int]:
        if axis.sources is None:
            return list(range(len(self.inputs)))
        picked = []
        for ref in axis.sources:
            if isinstance(ref, int):
                if not 0 <= ref < len(self.inputs):
                    raise ValueError(f"params[{a}].sources: index {ref} is out of range for "
                                     f"{len(self.inputs)} inputs {list(self.inputs)}")
                picked.append(ref)
                continue
            matches = [k for k, (m, lab) in enumerate(zip(self.inputs, self.labels))
                       if ref in (m, lab)]
            if not matches:
                raise ValueError(f"params[{a}].sources: {ref!r} is not one of the inputs "
                                 f"{list(self.inputs)}")
            picked.append(matches[0])
        if len(set(picked)) != len(picked):
            raise ValueError(f"params[{a}].sources: names the same model twice")
        return sorted(picked)

    def _suffixes(self, axis: Axis, kind: str) -> list[str]:
        if kind == "scalar":
            return [""]
        if kind == "filter":
            return [f"[{f}]" for f in axis.filters] + (["[rest]"] if axis.rest else [])
        out = [f"[layers.{i}]" for i in range(self.num_layers)]
        if self.non_layer_tensors:
            out.append(f"[{self._non_layer_label}]")
        return out

    def _setting(self, slot: _Slot, values: list[float]) -> Any:
        if slot.kind == "scalar":
            return values[0]
        if slot.kind == "filter":
            axis = self.space.params[slot.axis]
            conds = [Conditional(filter=f, value=v) for f, v in zip(axis.filters, values)]
            if axis.rest:
                conds.append(Conditional(value=values[-1]))
            return conds
        L = self.num_layers
        if L == 0:
            return values[0]
        if not self.non_layer_tensors:
            return values
        a = values[L]
        return [Conditional(filter=n, value=a) for n in self.non_layer_tensors] + [
            Conditional(value=values[:L])]

    def _read(self, slot: _Slot, setting: Any) -> list[float]:
        where = slot.where()

        def number(v: Any) -> float:
            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                raise ValueError(f"{where}: expected a number, got {v!r}")
            try:
                return float(v)
            except ValueError:
                raise ValueError(f"{where}: expected a number, got {v!r}") from None

        def conds(s: Any, n: int) -> list[Conditional]:
            s = [s] if isinstance(s, Conditional) else s
            if not (isinstance(s, list) and len(s) == n
                    and all(isinstance(c, Conditional) for c in s)):
                raise ValueError(f"{where}: expected a list of {n} {{filter, value}} entries, "
                                 f"got {_short(s)}")
            return s

        if slot.kind == "scalar":
            return [number(setting)]
        if slot.kind == "filter":
            axis = self.space.params[slot.axis]
            cs = conds(setting, len(axis.filters) + axis.rest)
            return [number(c.value) for c in cs]
        L = self.num_layers
        if L == 0:
            return [number(setting)]
        if self.non_layer_tensors:
            cs = conds(setting, len(self.non_layer_tensors) + 1)
            gradient, a = cs[-1].value, [number(cs[0].value)]
        else:
            gradient, a = setting, []
        if not isinstance(gradient, list) or len(gradient) != L:
            raise ValueError(f"{where}: expected a gradient of exactly {L} values (one per block), "
                             f"got {_short(gradient)}")
        return [number(v) for v in gradient] + a

    def _check_x(self, x: Sequence[float]) -> np.ndarray:
        try:
            arr = np.asarray(x, dtype=float)
        except (TypeError, ValueError):
            raise ValueError(f"x: expected {self.dim} numbers, got {_short(x)}") from None
        if arr.ndim != 1 or arr.shape[0] != self.dim:
            raise ValueError(f"x: expected a vector of length {self.dim} (the space's dim), "
                             f"got shape {arr.shape}")
        bad = np.flatnonzero(~np.isfinite(arr) | (arr < self.lower) | (arr > self.upper))
        if bad.size:
            i = int(bad[0])
            more = f" (and {bad.size - 1} more)" if bad.size > 1 else ""
            raise ValueError(f"x[{i}] ({self.names[i]}) = {arr[i]} is outside "
                             f"[{self.lower[i]}, {self.upper[i]}]{more}")
        return arr

    def _slot_of(self, i: int) -> _Slot:
        return next(s for s in self._slots if s.start <= i < s.start + s.size)

    def _check_names(self, names: list[str]) -> None:
        blocks = [n for n in names if n not in set(self.non_layer_tensors)]
        problems = []
        for n in self.non_layer_tensors:
            if n not in names:
                problems.append(f"non_layer_tensors: {n} is not a tensor of the models")
            clash = next((b for b in blocks if n in b), None)
            if clash is not None:
                problems.append(f"non_layer_tensors: {n} is part of block tensor {clash}'s name, "
                                "so a filter on it cannot single it out")
        for a, axis in enumerate(self.space.params):
            for f in axis.filters or ():
                if not any(f in n for n in names):
                    problems.append(f"params[{a}].filters: {f!r} matches no tensor of the models")
        if problems:
            raise ValueError("cannot bind search space:\n  " + "\n  ".join(problems))


def _frozen(values: list[float]) -> np.ndarray:
    arr = np.asarray(values, dtype=float).reshape(-1)
    arr.flags.writeable = False
    return arr


def _labels(refs: Sequence[str]) -> tuple[str, ...]:
    """Short readable names: the directory name, unless two models share it."""
    short = [Path(r).name or r for r in refs]
    return tuple(s if short.count(s) == 1 else r for s, r in zip(short, refs))


def _group_name(tensor_name: str) -> str:
    from evomerge.merge.engine import layer_group  # engine imports torch; keep it lazy

    return layer_group(tensor_name).name


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _canon(value: Any) -> Any:
    """Plain data for comparing recipes: numbers as floats, empty parameter dicts dropped."""
    if isinstance(value, dict):
        return {k: _canon(v) for k, v in value.items() if v not in (None, {})}
    if isinstance(value, list):
        return [_canon(v) for v in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def _first_difference(a: Any, b: Any, path: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            sub = f"{path}.{key}" if path else str(key)
            u, v = a.get(key, _ABSENT), b.get(key, _ABSENT)
            if u is _ABSENT and isinstance(v, dict):
                u = {}  # name the first missing entry, not the whole section
            if v is _ABSENT and isinstance(u, dict):
                v = {}
            found = _first_difference(u, v, sub)
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (u, v) in enumerate(zip(a, b)):
            found = _first_difference(u, v, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if a == b else (path or "recipe", a, b)
