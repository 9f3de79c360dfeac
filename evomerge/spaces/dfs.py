"""The DFS (data-flow space) genome of Sakana's evolutionary model merge: a path through layers
(space kind ``dfs``).

Sakana's DFS (Akiba et al. 2024, "Evolutionary Optimization of Model Merging Recipes")
lays out all layers of the layer sources -- here the ``n`` sources' ``L`` blocks each, one model
after another: ``M = n * L`` *layers*, layer ``(i, b)`` = block ``b`` of source ``i`` -- and
repeats that sequence ``r`` times: ``T = M * r`` slots. The genome holds

* one inclusion value per slot (in [-1, 1]; a slot is on the path when its value is > 0; the
  paper's indicator ``I``), so the path visits the included slots in slot order -- a layer may
  appear several times, once per repeat;
* hop scales (``scales``, below): the hidden state is multiplied by a scale on entering each path
  position. :func:`evomerge.merge.layerstack.fold_scales` turns these into per-slice residual
  scales, carried as the family's :class:`~evomerge.recipe.layers.HopForm` says: output
  projections (pre-norm decoders: Llama, Mistral, Qwen2/3, Phi-3, Gemma, GPT-2, GPT-NeoX),
  post-branch norms (Gemma 2/3 sandwich norms) or post-branch norms and branch inputs (OLMo 2/3),
  so the decoded recipe is a plain ``slices`` config of real tensors (mergekit's ``scale`` except
  for Gemma's ``(1 + w)`` norms; see :mod:`evomerge.merge.layerstack`).

Hop scales (``scales:``)
------------------------
``layers`` -- **Sakana's W, indexed by layers.** The paper's ``W`` in R^{M x M}: ``W[i, j]``
    scales the input that goes from layer ``i`` to layer ``j`` (so ``M^2`` entries; the ``r``
    repeats share it: ``W`` is over the ``M`` layers, not the ``T`` slots). Every hop of the
    path is scaled, an ordinary step inside one model (``a.2 -> a.3``) and a repeat re-entering
    a layer (``a.3 -> a.3``) included. The input of the *first* path block comes from no layer
    but from the embeddings; the paper's ``M x M`` matrix has no entry for it, and scaling it
    is not the identity (it weighs the embedding against everything the blocks add, see
    :mod:`evomerge.merge.layerstack`). So ours adds one row, the *embedding* row: the first
    path block, layer ``j``, has its input (the embedding output of ``j``'s model, where the
    stack's embeddings come from) multiplied by ``W[embed, j]``. ``W`` is ``(M + 1) x M``:
    its layer rows are exactly the paper's ``W``; with the embedding row at 1 (its start) the
    function is the paper's. Why a row and not ``W[j, j]``: the diagonal already scales a repeat
    re-entering the same layer, another hop. Genome names ``W[embed->a.0]``, ``W[a.3->b.0]``.
``factored`` -- **ours, a small parametrisation of the layer-indexed W** for large ``M`` (the
    paper suggests producing ``W`` by a small network then; it does not say which): ``W[i, j] =
    P[model(i), model(j)] * q[j]`` and ``W[embed, j] = P[embed, model(j)] * q[j]``, with ``P``
    ``(n + 1) x n`` (a scale per pair of models, plus the embedding row) and ``q`` one scale per
    layer entered: ``(n + 1) n + M`` coordinates instead of ``(M + 1) M``. Both factors lie in
    ``scale_bounds`` (so ``W`` in ``[low^2, high^2]``); all ones is ``W = 1``.
``model_pairs`` -- **ours, not Sakana's**: the form this module first had. One scale per *pair of
    models* (``n x n``, row = model left, column = model entered): ``W[model(i), model(j)]`` on
    every hop after the first (an ordinary step inside model ``a`` gets ``W[a->a]``); the first
    block's input is not scaled. Genome names ``W[a->b]``.
``none`` -- no scales: the path alone (any architecture).

``true`` means the default and ``false`` means ``none``. The default (``scales`` unset or
``true``) is ``layers`` while its ``W`` has at most :data:`LAYER_SCALES_LIMIT` entries, else
``factored`` (e.g. two 32-block 7B models: ``M = 64``, 4,160 entries -> ``factored``, 70); the
bound space's ``scales`` says which. An explicit ``layers`` is honoured at any size.

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
      scales: layers              # layers | factored | model_pairs | none (true: default)
      scale_bounds: [0.5, 1.5]
      start: ps                   # default: the first layer source
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import ConfigDict, Field, field_validator

from evomerge.merge.layerstack import fold_scales
from evomerge.recipe import LayerRecipe, LayerSlice, MergeRecipe, RecipeError
from evomerge.recipe.layers import HOP_FORMS, HopForm, hop_form
from evomerge.spaces.base import BindTarget, Bound, KindedSpace, short_names

__all__ = ["LAYER_SCALES_LIMIT", "SCALE_FORMS", "BoundDfsSpace", "DfsSpace", "hop_matrix",
           "scale_names"]

ScaleForm = Literal["layers", "factored", "model_pairs", "none"]
#: the ``scales`` values (see the module docstring)
SCALE_FORMS: tuple[str, ...] = ("layers", "factored", "model_pairs", "none")
#: the default ``scales``: ``layers`` up to this many entries of W ((M + 1) x M), else ``factored``
LAYER_SCALES_LIMIT = 4096
#: the row of W (and of P) for the first block's input: the embedding output
EMBED = "embed"


def default_scales(n_models: int, num_layers: int) -> ScaleForm:
    """What ``scales`` unset (or ``true``) means for ``n_models`` layer sources of
    ``num_layers`` blocks: the paper's layer-indexed W unless it is over the limit."""
    m = n_models * num_layers
    return "layers" if (m + 1) * m <= LAYER_SCALES_LIMIT else "factored"


def scale_names(form: str, labels: Sequence[str], num_layers: int) -> list[str]:
    """The genome's scale coordinates, in order (row-major over (from, to)):
    ``layers``: ``W[embed->a.0] ... W[a.3->b.0] ...``; ``factored``: ``P[embed->a] ...
    P[a->b] ...`` then ``q[a.0] ...``; ``model_pairs``: ``W[a->b] ...``; ``none``: none."""
    layers = [f"{label}.{b}" for label in labels for b in range(num_layers)]
    if form == "layers":
        return [f"W[{i}->{j}]" for i in (EMBED, *layers) for j in layers]
    if form == "factored":
        return ([f"P[{a}->{b}]" for a in (EMBED, *labels) for b in labels]
                + [f"q[{j}]" for j in layers])
    if form == "model_pairs":
        return [f"W[{a}->{b}]" for a in labels for b in labels]
    return []


def hop_matrix(form: str, coords: np.ndarray, n_models: int, num_layers: int) -> np.ndarray:
    """The hop scales as one ``(M + 1) x M`` matrix over layers (``M = n_models * num_layers``,
    layer ``(i, b)`` at index ``i * num_layers + b``): row 0 is the first block's input (the
    embedding row), row ``1 + k`` the hops out of layer ``k``; the column is the layer entered.

    ``layers``: the coordinates themselves; ``factored``: ``P[row model, model(j)] * q[j]``
    (row 0 of ``P`` the embedding's); ``model_pairs``: ``W[model(i), model(j)]``, row 0 all 1
    (the first block's input unscaled); ``none``: all 1."""
    m = n_models * num_layers
    model_of = np.repeat(np.arange(n_models), num_layers)
    if form == "layers":
        return coords.reshape(m + 1, m)
    if form == "factored":
        p = coords[:(n_models + 1) * n_models].reshape(n_models + 1, n_models)
        q = coords[(n_models + 1) * n_models:]
        rows = np.concatenate([[0], 1 + model_of])
        return p[rows][:, model_of] * q[None, :]
    out = np.ones((m + 1, m))
    if form == "model_pairs":
        out[1:] = coords.reshape(n_models, n_models)[model_of][:, model_of]
    return out


class DfsSpace(KindedSpace):
    """A DFS genome definition (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["dfs"]
    repeats: int = Field(2, ge=1, description="r: how many times the layer sequence repeats")
    layers_from: tuple[str, ...] | None = None
    merged: dict[str, str] = {}
    scales: ScaleForm | None = Field(None, description="hop scales: layers (Sakana's W over "
                                     "layers), factored, model_pairs, none; unset or true: "
                                     "the default (module docstring); false: none")
    scale_bounds: tuple[float, float] = (0.5, 1.5)
    start: str | None = None
    dtype: str | None = None
    description: str = ""

    @field_validator("scales", mode="before")
    @classmethod
    def _scales(cls, value: Any) -> Any:
        if value is True or value is None:
            return None
        if value is False:
            return "none"
        if value not in SCALE_FORMS:
            raise ValueError(f"expected one of {', '.join(SCALE_FORMS)} (or true: the default, "
                             f"false: none), got {value!r}")
        return value

    @field_validator("scale_bounds")
    @classmethod
    def _bounds(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"scale_bounds [{lo}, {hi}] must satisfy 0 < low <= 1 <= high "
                             "(1 = no scaling must be reachable)")
        return value

    def bind_to(self, target: BindTarget) -> BoundDfsSpace:
        """The space over an experiment's models (the protocol of :mod:`evomerge.spaces.base`)."""
        return self.bind(target.sources, target.num_layers, target.model_type,
                         loaded=target.paths)

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
        scales = self.scales or default_scales(len(names), max(num_layers, 1))
        if scales == "factored" and EMBED in names:
            problems.append(f"layers_from: {EMBED!r} names the embedding row of the factored "
                            "scales; rename that source")
        form: HopForm | None = None
        if scales != "none":
            form = hop_form(model_type)
            if form is None:
                problems.append(f"scales: hop scales are supported for the families whose "
                                f"blocks can carry them (model_type one of "
                                f"{', '.join(HOP_FORMS)}), not {model_type!r}; set "
                                "scales: none to search the path alone")
        if problems:
            raise ValueError("cannot bind dfs space:\n  " + "\n  ".join(problems))
        refs = [str(sources[n]) if n in sources else n for n in names]
        return BoundDfsSpace(self, scales, names, refs, num_layers, form, merged)


def _resolved(path: str) -> str:
    """One spelling per model directory, as the merge engine keys its resident models."""
    return str(Path(path).expanduser().resolve())


class BoundDfsSpace(Bound):
    """A DFS space over concrete layer sources: ``dim``, bounds, names, ``x0`` and ``decode``.
    ``scales`` is the hop-scale form in use (the space's, or the default resolved)."""

    kind = "dfs"

    def __init__(self, space: DfsSpace, scales: str, labels: Sequence[str], refs: Sequence[str],
                 num_layers: int, form: HopForm | None,
                 merged: Mapping[str, MergeRecipe]) -> None:
        self.space = space
        self.scales = scales
        self.labels, self.refs = tuple(labels), tuple(refs)
        self.num_layers = num_layers
        #: how the family carries the hop scales (None: ``scales: none``)
        self.form = form
        self.merged = dict(merged)
        m, layers, r = len(self.refs), num_layers, space.repeats
        self.slots = [(k, i, b) for k in range(r) for i in range(m) for b in range(layers)]
        names = [f"in[r{k}.{self.labels[i]}.{b}]" for k, i, b in self.slots]
        lower, upper = [-1.0] * len(names), [1.0] * len(names)
        start = self.labels.index(space.start) if space.start else 0
        x0 = [0.5 if (k == 0 and i == start) else -0.5 for k, i, _ in self.slots]
        extra = scale_names(scales, self.labels, layers)
        lo, hi = space.scale_bounds
        names += extra
        lower += [lo] * len(extra)
        upper += [hi] * len(extra)
        x0 += [1.0] * len(extra)
        self.names = tuple(names)
        self.lower, self.upper = np.array(lower), np.array(upper)
        #: the start model's own blocks in order, no scaling (strategies that take ``x0``)
        self.start_point = np.array(x0)

    @property
    def method(self) -> str:
        return "dfs"

    def model_names(self) -> dict[str, str]:
        return short_names(self.refs, self.labels)

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
                f"layers={self.num_layers}, repeats={self.space.repeats}, "
                f"scales={self.scales})")

    def path(self, x: Sequence[float]) -> list[tuple[int, int, float]]:
        """``(source index, block, hidden-state scale on entering it)`` per path position: the
        first position's scale is ``W[embed, j]``, a later one's ``W[i, j]`` for the layer
        ``i`` left and ``j`` entered (:func:`hop_matrix`)."""
        x = np.asarray(x, dtype=float)
        if x.shape != (self.dim,) or not np.all(np.isfinite(x)):
            raise ValueError(f"x: expected {self.dim} finite numbers, got shape {x.shape}")
        t = len(self.slots)
        on = [s for s in range(t) if x[s] > 0] or [int(np.argmax(x[:t]))]
        w = hop_matrix(self.scales, x[t:], len(self.refs), self.num_layers)
        out, row = [], 0
        for s in on:
            _, i, b = self.slots[s]
            layer = i * self.num_layers + b
            out.append((i, b, float(w[row, layer])))
            row = 1 + layer
        return out

    def decode(self, x: Sequence[float], meta: Mapping[str, Any] | None = None) -> LayerRecipe:
        """The layer stack of path ``x`` (``meta`` is not read)."""
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
