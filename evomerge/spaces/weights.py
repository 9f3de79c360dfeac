"""The weights space (kind ``weights``): M2N2's crossover on the sources' flattened parameters
(issue 15).

Not a box of merge coefficients (:mod:`evomerge.spaces.ps`) nor a layer path
(:mod:`evomerge.spaces.dfs`):
a candidate is a *member*, a per-segment linear combination of the experiment's K sources over
their float parameters laid out in one fixed order (:mod:`evomerge.merge.segments`). The space
gives the search what it needs and nothing of the models:

* ``geometry``: the sources' Gram oracle (:class:`~evomerge.merge.segments.PrefixGram`; loaded
  and computed on first use, in one pass over the memory-mapped sources), from which M2N2 takes
  inner products and norms of members for slerp's angle over the *whole* weight vectors;
* ``x``: the fixed-length record of a member's making (:data:`~evomerge.merge.segments.RECORD`:
  ``source, parent_a, parent_b, split, mix``), the store's named parameters and what a resume
  compares; the member itself reaches the driver in ``Candidate.meta["member"]``;
* :meth:`BoundWeightSpace.decode`: a candidate (its record and its member) ->
  :class:`~evomerge.recipe.SegmentRecipe` (plain data; workers build it with the resident sources,
  ``evomerge merge`` exports it).

It pairs with M2N2 only (``strategy: {name: m2n2, crossover: weights}``; the bound space implies
``crossover: weights`` and its ``geometry``), and refuses an IRT-``reduced:`` fitness:
calibration scores a design of a space's points, and a record names parents rather than a point
(:func:`pairing_problems`).

Experiment syntax::

    space:
      kind: weights
      block: 65536        # prefix-Gram granularity in parameters (default 2^16)
      dtype: float32      # optional: build dtype of the recipes (default: the sources' own)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import ConfigDict, Field

from evomerge.merge.segments import RECORD, PrefixGram, source_member, source_record
from evomerge.recipe.segments import Layout, Member, SegmentRecipe, layout_of
from evomerge.spaces.base import BindTarget, Bound, KindedSpace, short_names, space_kind

__all__ = ["BoundWeightSpace", "WeightSpace", "pairing_problems"]

FLOAT_CODES = ("F64", "F32", "F16", "BF16")


def pairing_problems(space: Any, strategy: str, options: Mapping[str, Any],
                     fitness_options: Mapping[str, Any]) -> list[str]:
    """Every mismatch between an experiment's ``space`` (the weights kind or another), M2N2's
    crossover and the fitness, one line each, each naming both ways out."""
    weights = space_kind(space) == "weights"
    crossover = options.get("crossover")
    problems = []
    if weights and strategy != "m2n2":
        problems.append(f"space: kind weights holds M2N2's weight-space members; use strategy: "
                        f"{{name: m2n2, crossover: weights}}, or a coefficient space (method: "
                        f"...) for {strategy}")
    elif weights and crossover not in (None, "weights"):
        problems.append(f"strategy.crossover: {crossover} crosses a coefficient space's x; with "
                        "space: {kind: weights} use crossover: weights, or keep crossover: "
                        f"{crossover} with a coefficient space (method: ...)")
    if not weights and strategy == "m2n2" and crossover == "weights":
        problems.append("strategy.crossover: weights crosses the sources' flattened weights and "
                        "needs space: {kind: weights}; set it, or use crossover: coefficients "
                        "with this space")
    if weights and "reduced" in fitness_options:
        problems.append("fitness.reduced: IRT calibration scores a design of the space's points, "
                        "and a weights-space record names parents, not a point; remove "
                        "fitness.reduced (M2N2 then competes on every search item), or use a "
                        "coefficient space")
    return problems


class WeightSpace(KindedSpace):
    """A weights space definition (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["weights"]
    block: int = Field(1 << 16, ge=1, description="prefix-Gram block, in parameters")
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    description: str = ""

    def bind_to(self, target: BindTarget) -> BoundWeightSpace:
        """The space over an experiment's models (the protocol of :mod:`evomerge.spaces.base`)."""
        return self.bind(target.sources, target.budget, target.tensors)

    def bind(self, sources: Mapping[str, str], budget: int,
             tensors: Mapping[str, Any]) -> BoundWeightSpace:
        """Over the experiment's named sources (name -> path); ``tensors``: the checkpoints'
        tensor headers (name -> :class:`~evomerge.merge.checkpoints.TensorMeta`), which fix the
        layout; ``budget`` bounds the parents' steps in the records."""
        numels = {n: m.numel for n, m in tensors.items() if m.dtype in FLOAT_CODES}
        layout = layout_of(numels)
        problems = []
        if not sources:
            problems.append("models.sources: at least one source")
        if layout.size < 2:
            problems.append(f"the models have {layout.size} float parameters; a crossover needs "
                            "at least 2")
        if problems:
            raise ValueError("cannot bind weights space:\n  " + "\n  ".join(problems))
        return BoundWeightSpace(self, list(sources), [str(p) for p in sources.values()], layout,
                                budget)


class BoundWeightSpace(Bound):
    """The weights space over concrete sources: record names and bounds, the geometry, and
    members decoded into recipes."""

    kind = "weights"

    def __init__(self, space: WeightSpace, labels: Sequence[str], refs: Sequence[str],
                 layout: Layout, budget: int) -> None:
        self.space = space
        self.labels, self.refs = tuple(labels), tuple(refs)
        self.layout = layout
        k = len(self.refs)
        self.names = RECORD
        self.lower = np.array([-1.0, -1.0, -1.0, 0.0, 0.0])
        self.upper = np.array([float(k - 1), budget - 1.0, budget - 1.0, float(layout.size),
                               1.0])
        self._geometry: PrefixGram | None = None

    @property
    def method(self) -> str:
        return "segments"

    def model_names(self) -> dict[str, str]:
        return short_names(self.refs, self.labels)

    def implied_options(self) -> dict[str, Any]:
        """M2N2 crosses members with the space's Gram oracle (loaded on first use)."""
        return {"crossover": "weights", "geometry": self.geometry}

    @property
    def geometry(self) -> PrefixGram:
        """The sources' Gram oracle; the sources load (memory-mapped) at its first use."""
        if self._geometry is None:
            from evomerge.merge.checkpoints import load_state_dict

            self._geometry = PrefixGram(lambda: [load_state_dict(p) for p in self.refs],
                                        self.layout, block=self.space.block,
                                        n_sources=len(self.refs))
        return self._geometry

    def source_points(self) -> list[np.ndarray]:
        """One record per source: that source alone (``init: sources``)."""
        return [source_record(k) for k in range(len(self.refs))]

    def _member_recipe(self, member: Member) -> SegmentRecipe:
        """The recipe of a member (its coefficients in source order)."""
        if member.size != self.layout.size or member.coefs.shape[1] != len(self.refs):
            raise ValueError(f"member: {member.size} parameters over {member.coefs.shape[1]} "
                             f"sources, the space {self.layout.size} over {len(self.refs)}")
        return SegmentRecipe.of_member(member, self.refs, self.layout, self.space.dtype)

    def decode(self, x: Sequence[float], meta: Mapping[str, Any] | None = None) -> SegmentRecipe:
        """The recipe of a candidate: its member (``meta["member"]``, which M2N2 makes and passes
        in ``Candidate.meta``) when it has one; else its record ``x``, which decodes alone only
        for a source's record (a child's names parents)."""
        if meta and "member" in meta:
            return self._member_recipe(meta["member"])
        x = np.asarray(x, dtype=float)
        k = x[0] if x.shape == (len(RECORD),) else -1
        if k != int(k) or not 0 <= k < len(self.refs) or np.any(x[1:] != [-1, -1, 0, 0]):
            raise ValueError(f"x: {x.tolist()} is the record of a crossover child; it decodes "
                             "from its member (Candidate.meta['member']), made by M2N2 from the "
                             "archive")
        return self._member_recipe(source_member(int(k), len(self.refs), self.layout.size))

    def __repr__(self) -> str:
        return (f"BoundWeightSpace(sources={list(self.labels)}, "
                f"parameters={self.layout.size})")
