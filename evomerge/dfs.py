"""The DFS (data-flow space) genome of Sakana's evolutionary model merge: a path through layers.

The M layer sources' blocks are laid out one model after another (``L`` blocks each) and the
whole sequence is repeated ``r`` times: ``T = M * L * r`` slots. The genome holds

* one inclusion value per slot (in [-1, 1]; a slot is on the path when its value is > 0), so
  the path visits the included slots in slot order -- a model's block may appear several times;
* when ``scales`` is on, a matrix ``W`` (M x M, row = model left, column = model entered): the
  hidden state is multiplied by ``W[i, j]`` whenever the path goes from a block of model i to a
  block of model j (also i == j). :func:`evomerge.merge.layerstack.fold_scales` turns these into
  per-slice residual scales, carried as the family's :class:`~evomerge.merge.layerstack.HopForm`
  says: output projections (pre-norm decoders: Llama, Mistral, Qwen2/3, Phi-3, Gemma, GPT-2,
  GPT-NeoX), post-branch norms (Gemma 2/3 sandwich norms) or post-branch norms and branch inputs
  (OLMo 2/3), so the decoded recipe is a plain ``slices`` config of real tensors (mergekit's
  ``scale`` except for Gemma's ``(1 + w)`` norms; see :mod:`evomerge.merge.layerstack`).

An all-off genome decodes to the single slot with the largest value (a path is never empty).
The search starts (``x0``) from the ``start`` model's blocks in order with ``W = 1``: exactly that
model, which for PS+DFS is the PS merge.

PS+DFS: ``merged`` names merge recipes over the experiment's models (e.g. the best recipe of a PS
run); each is built once per worker and joins the layer sources (by default first).

Experiment syntax::

    space:
      kind: dfs
      repeats: 2                  # r
      layers_from: [expert_add, expert_sort]   # default: merged names, then every source
      merged: {ps: experiments/recipes/tinylm_ps.yaml}
      scales: true
      scale_bounds: [0.5, 1.5]
      start: ps                   # default: the first layer source
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from evomerge.config_io import format_errors
from evomerge.merge.layerstack import (
    HOP_FORMS,
    HopForm,
    LayerRecipe,
    LayerSlice,
    fold_scales,
    hop_form,
)
from evomerge.recipe import MergeRecipe, RecipeError

__all__ = ["BoundDfsSpace", "DfsSpace"]


class DfsSpace(BaseModel):
    """A DFS genome definition (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["dfs"]
    repeats: int = Field(2, ge=1, description="r: how many times the layer sequence repeats")
    layers_from: tuple[str, ...] | None = None
    merged: dict[str, str] = {}
    scales: bool = True
    scale_bounds: tuple[float, float] = (0.5, 1.5)
    start: str | None = None
    dtype: str | None = None
    description: str = ""

    @field_validator("scale_bounds")
    @classmethod
    def _bounds(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"scale_bounds [{lo}, {hi}] must satisfy 0 < low <= 1 <= high "
                             "(1 = no scaling must be reachable)")
        return value

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "space") -> DfsSpace:
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise ValueError(f"{where}: invalid dfs space:\n{format_errors(exc)}") from None

    def bind(self, sources: Mapping[str, str], num_layers: int, model_type: str | None,
             *, loaded: Sequence[str] = ()) -> BoundDfsSpace:
        """Over the experiment's named sources (name -> path). ``loaded``: every model path the
        workers hold (base included), which the ``merged`` recipes may read."""
        problems = []
        merged: dict[str, MergeRecipe] = {}
        absolute = {_resolved(p) for p in loaded}
        for name, ref in self.merged.items():
            if name in sources:
                problems.append(f"merged.{name}: the name is already a source")
                continue
            try:
                recipe = MergeRecipe.from_yaml(Path(ref).expanduser())
            except (RecipeError, OSError) as exc:
                problems.append(f"merged.{name}: {exc}")
                continue
            unknown = [p for p in recipe.model_paths() if _resolved(p) not in absolute]
            if unknown:
                problems.append(f"merged.{name}: {ref} reads {', '.join(unknown)}, which the "
                                "experiment's models do not include")
                continue
            merged[name] = recipe.with_models({p: _resolved(p) for p in recipe.model_paths()})
        names = list(self.layers_from) if self.layers_from else [*self.merged, *sources]
        for name in names:
            if name not in sources and name not in self.merged:
                problems.append(f"layers_from: {name!r} is neither a source "
                                f"({', '.join(sources)}) nor a merged model")
        if len(set(names)) != len(names):
            problems.append(f"layers_from: names repeat: {names}")
        if self.start is not None and self.start not in names:
            problems.append(f"start: {self.start!r} is not a layer source ({', '.join(names)})")
        if num_layers < 1:
            problems.append("the models have no transformer blocks to route through")
        form: HopForm | None = None
        if self.scales:
            form = hop_form(model_type)
            if form is None:
                problems.append(f"scales: hop scales are supported for the families whose "
                                f"blocks can carry them (model_type one of "
                                f"{', '.join(HOP_FORMS)}), not {model_type!r}; set "
                                "scales: false to search the path alone")
        if problems:
            raise ValueError("cannot bind dfs space:\n  " + "\n  ".join(problems))
        refs = [str(sources[n]) if n in sources else n for n in names]
        return BoundDfsSpace(self, names, refs, num_layers, form, merged)


def _resolved(path: str) -> str:
    """One spelling per model directory, as the merge engine keys its resident models."""
    return str(Path(path).expanduser().resolve())


class BoundDfsSpace:
    """A DFS space over concrete layer sources: ``dim``, bounds, names, ``x0`` and ``decode``."""

    def __init__(self, space: DfsSpace, labels: Sequence[str], refs: Sequence[str],
                 num_layers: int, form: HopForm | None,
                 merged: Mapping[str, MergeRecipe]) -> None:
        self.space = space
        self.labels, self.refs = tuple(labels), tuple(refs)
        self.num_layers = num_layers
        #: how the family carries the hop scales (None: ``scales: false``)
        self.form = form
        self.merged = dict(merged)
        m, layers, r = len(self.refs), num_layers, space.repeats
        self.slots = [(k, i, b) for k in range(r) for i in range(m) for b in range(layers)]
        names = [f"in[r{k}.{self.labels[i]}.{b}]" for k, i, b in self.slots]
        lower, upper = [-1.0] * len(names), [1.0] * len(names)
        start = self.labels.index(space.start) if space.start else 0
        x0 = [0.5 if (k == 0 and i == start) else -0.5 for k, i, _ in self.slots]
        if space.scales:
            lo, hi = space.scale_bounds
            names += [f"W[{a}->{b}]" for a in self.labels for b in self.labels]
            lower += [lo] * m * m
            upper += [hi] * m * m
            x0 += [1.0] * m * m
        self.names = tuple(names)
        self.lower, self.upper = np.array(lower), np.array(upper)
        #: the start model's own blocks in order, no scaling (strategies that take ``x0``)
        self.start_point = np.array(x0)

    @property
    def dim(self) -> int:
        return len(self.names)

    @property
    def method(self) -> str:
        return "dfs"

    def source_points(self) -> list[np.ndarray]:
        """One point per layer source: its own blocks in order, W = 1 (that model exactly)."""
        t = len(self.slots)
        points = []
        for source in range(len(self.refs)):
            x = self.start_point.copy()
            x[:t] = [0.5 if (k == 0 and i == source) else -0.5 for k, i, _ in self.slots]
            points.append(x)
        return points

    def __repr__(self) -> str:
        return (f"BoundDfsSpace(dim={self.dim}, sources={list(self.labels)}, "
                f"layers={self.num_layers}, repeats={self.space.repeats})")

    def path(self, x: Sequence[float]) -> list[tuple[int, int, float]]:
        """``(source index, block, hidden-state scale on entering it)`` per path position."""
        x = np.asarray(x, dtype=float)
        if x.shape != (self.dim,) or not np.all(np.isfinite(x)):
            raise ValueError(f"x: expected {self.dim} finite numbers, got shape {x.shape}")
        t = len(self.slots)
        on = [s for s in range(t) if x[s] > 0] or [int(np.argmax(x[:t]))]
        m = len(self.refs)
        w = x[t:].reshape(m, m) if self.space.scales else np.ones((m, m))
        out, prev = [], None
        for s in on:
            _, i, b = self.slots[s]
            out.append((i, b, 1.0 if prev is None else float(w[prev, i])))
            prev = i
        return out

    def decode(self, x: Sequence[float]) -> LayerRecipe:
        path = self.path(x)
        scales = fold_scales([hop for _, _, hop in path])
        slices: list[LayerSlice] = []
        for (i, b, _), scale in zip(path, scales):
            ref = self.refs[i]
            last = slices[-1] if slices else None
            if last and last.model == ref and last.end == b and last.scale == scale:
                slices[-1] = LayerSlice(ref, last.start, b + 1, scale)
            else:
                slices.append(LayerSlice(ref, b, b + 1, scale))
        used = {s.model for s in slices}
        return LayerRecipe.of_form(slices, self.form, self.space.dtype,
                                   {n: r for n, r in self.merged.items() if n in used})
