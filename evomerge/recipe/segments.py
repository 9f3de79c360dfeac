"""SegmentRecipe: an M2N2 weight-space member as plain data (evomerge's own recipe kind).

Over K fixed sources every child of M2N2's crossovers is a per-segment linear combination of the
sources (:mod:`evomerge.merge.segments` derives it and builds it): boundaries ``0 = b_0 < ... <
b_S = D`` of the flattened float parameters (the :class:`Layout`, whose sha256 makes a recipe
checkable against the models it is built from) and coefficients ``C[S, K]`` (:class:`Member`).
mergekit cannot express sub-tensor segments: ``evomerge merge`` materialises such a file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from evomerge.recipe.base import FlowListDumper, RecipeError

METHOD = "segments"
ORDER = "float tensors in sorted name order, each flattened row-major"
#: the first lines of a segment recipe file
NOTE = ("# segments: evomerge's own recipe kind (M2N2's weight-space crossover): on each segment\n"
        "# [boundaries[s], boundaries[s+1]) of the models' flattened float parameters the weights\n"
        "# are sum_k coefficients[s][k] * models[k]. mergekit cannot express sub-tensor segments;\n"
        "# materialise this file with `evomerge merge`.\n")


# ---- the layout ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The flattened parameter vector: ``names[i]`` occupies ``[offsets[i], offsets[i+1])``."""

    names: tuple[str, ...]
    numels: tuple[int, ...]

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.numels, dtype=np.int64)])

    @property
    def size(self) -> int:
        return int(sum(self.numels))

    @property
    def sha256(self) -> str:
        """A digest of the names and sizes in order (what a recipe records)."""
        text = "".join(f"{n}:{k}\n" for n, k in zip(self.names, self.numels))
        return hashlib.sha256(text.encode()).hexdigest()


def layout_of(numels: Mapping[str, int]) -> Layout:
    """The layout of float tensors given as ``name -> numel``: sorted by name, empty ones out."""
    names = tuple(sorted(n for n, k in numels.items() if k > 0))
    return Layout(names, tuple(int(numels[n]) for n in names))


# ---- members -----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Member:
    """``bounds`` (int64, ``S + 1``, from 0 to ``D``, increasing) and ``coefs`` (float64,
    ``[S, K]``): the weights on ``[bounds[s], bounds[s+1])`` are ``sum_k coefs[s, k] x_k``."""

    bounds: np.ndarray
    coefs: np.ndarray

    @property
    def size(self) -> int:
        return int(self.bounds[-1])

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Member) and np.array_equal(self.bounds, other.bounds)
                and np.array_equal(self.coefs, other.coefs))

    __hash__ = None  # type: ignore[assignment]


# ---- the recipe ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentRecipe:
    """A member as plain data: ``models`` (the K sources, in coefficient order), the layout it
    was made for (``parameters`` = D and ``layout_sha256``), ``boundaries``, ``coefficients``
    (one row of K per segment) and the ``dtype`` to build in (None: the models' own)."""

    models: tuple[str, ...]
    parameters: int
    layout_sha256: str
    boundaries: tuple[int, ...]
    coefficients: tuple[tuple[float, ...], ...]
    dtype: str | None = None

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise RecipeError("invalid segments recipe:\n  " + "\n  ".join(problems))

    @classmethod
    def of_member(cls, member: Member, models: Sequence[str], layout: Layout,
                  dtype: str | None = None) -> SegmentRecipe:
        return cls(tuple(str(m) for m in models), layout.size, layout.sha256,
                   tuple(int(b) for b in member.bounds),
                   tuple(tuple(float(c) for c in row) for row in member.coefs), dtype)

    @property
    def member(self) -> Member:
        return Member(np.array(self.boundaries, dtype=np.int64),
                      np.array(self.coefficients, dtype=np.float64).reshape(
                          len(self.boundaries) - 1, len(self.models)))

    @property
    def merge_method(self) -> str:
        return METHOD

    def model_paths(self) -> list[str]:
        return list(self.models)

    def with_models(self, mapping: Mapping[str, str]) -> SegmentRecipe:
        """The same recipe with model references renamed (``mapping``: old -> new)."""
        return SegmentRecipe(tuple(mapping.get(m, m) for m in self.models), self.parameters,
                             self.layout_sha256, self.boundaries, self.coefficients, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "merge_method": METHOD, "models": list(self.models), "order": ORDER,
            "parameters": self.parameters, "layout_sha256": self.layout_sha256,
            "boundaries": list(self.boundaries),
            "coefficients": [list(row) for row in self.coefficients]}
        if self.dtype:
            out["dtype"] = self.dtype
        return out

    def to_yaml(self) -> str:
        return NOTE + yaml.dump(self.to_dict(), Dumper=FlowListDumper, sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "recipe") -> SegmentRecipe:
        """Every problem of the mapping in one RecipeError naming its fields."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"{where}: expected a mapping")
        problems = []
        if data.get("merge_method") != METHOD:
            problems.append(f"merge_method: expected {METHOD!r}, got {data.get('merge_method')!r}")
        known = {"merge_method", "models", "order", "parameters", "layout_sha256", "boundaries",
                 "coefficients", "dtype"}
        unknown = sorted(set(data) - known)
        if unknown:
            problems.append(f"unknown key(s) {', '.join(map(str, unknown))}")
        missing = sorted(k for k in known - {"dtype", "order"} - set(data))
        if missing:
            problems.append(f"missing key(s) {', '.join(missing)}")
        if data.get("order", ORDER) != ORDER:
            problems.append(f"order: this evomerge lays parameters out as {ORDER!r}, got "
                            f"{data.get('order')!r}")
        if problems:
            raise RecipeError(f"{where}: " + "; ".join(problems))
        try:
            models = data["models"]
            if isinstance(models, (str, bytes)) or not isinstance(models, Sequence):
                raise TypeError("models: a list of model references")
            rows = [tuple(float(c) for c in row) for row in data["coefficients"]]
            recipe = cls(tuple(str(m) for m in models), int(data["parameters"]),
                         str(data["layout_sha256"]),
                         tuple(_integer(b, "boundaries") for b in data["boundaries"]),
                         tuple(rows), data.get("dtype"))
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"{where}: {exc}") from None
        except RecipeError as exc:
            raise RecipeError(f"{where}: {exc}") from None
        return recipe

    @classmethod
    def from_yaml(cls, path: str | Path) -> SegmentRecipe:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise RecipeError(f"{path}: cannot read: {exc}") from None
        return cls.from_dict(data, where=str(path))


def _integer(value: Any, field: str) -> int:
    if isinstance(value, bool) or int(value) != value:
        raise ValueError(f"{field}: {value!r} is not an integer")
    return int(value)


def _problems(recipe: SegmentRecipe) -> list[str]:
    """Every inconsistency of a recipe's fields."""
    problems = []
    k, b = len(recipe.models), np.asarray(recipe.boundaries)
    if k < 1:
        problems.append("models: at least one model")
    if len(set(recipe.models)) != k:
        problems.append(f"models: listed twice: {list(recipe.models)}")
    if recipe.parameters < 1:
        problems.append(f"parameters: {recipe.parameters} is not positive")
    if len(b) < 2 or b[0] != 0 or b[-1] != recipe.parameters or np.any(np.diff(b) <= 0):
        problems.append(f"boundaries: must rise strictly from 0 to parameters "
                        f"({recipe.parameters})")
    if len(recipe.coefficients) != max(len(b) - 1, 0):
        problems.append(f"coefficients: {len(recipe.coefficients)} rows for "
                        f"{max(len(b) - 1, 0)} segments")
    bad = [i for i, row in enumerate(recipe.coefficients)
           if len(row) != k or not all(np.isfinite(row))]
    if bad:
        problems.append(f"coefficients: rows {bad[:5]} need {k} finite numbers (one per model)")
    if recipe.dtype not in (None, "float32", "float16", "bfloat16"):
        problems.append(f"dtype: float32, float16 or bfloat16, got {recipe.dtype!r}")
    return problems
