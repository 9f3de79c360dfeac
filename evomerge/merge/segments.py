"""Segment members: models as per-segment linear combinations of K sources (M2N2 in weight space).

M2N2's crossover (Sakana's ``natural_niches``: split point ``s ~ randint[0, D)``, mix ``w ~ U(0,
1)``, ``t_k = w`` before ``s`` and ``1 - w`` from ``s`` on, child = slerp(``t_k``, A, B) with
``Omega`` from the whole vectors; see :func:`evomerge.search.m2n2.slerp_split`) acts on a model's
flattened parameters. Over K fixed sources every child of such crossovers stays *a per-segment
linear combination of the sources*, so a member is data, never weights (ours):

* **Layout.** The float tensors of the checkpoints in sorted name order, each flattened row-major,
  concatenated: ``D`` numbers (:class:`Layout`; its sha256 makes a recipe checkable against the
  models it is built from). Non-float tensors (buffers) are not parameters: they pass through when
  every source holds the same values, as ``linear`` merging does.
* **Member.** Boundaries ``0 = b_0 < ... < b_S = D`` and coefficients ``C[S, K]``: on segment
  ``[b_s, b_{s+1})`` the member's weights are ``sum_k C[s, k] x_k`` (:class:`Member`). A source
  alone is one segment with a unit coefficient; an empty archive slot is the zero member.
* **Crossover** (:func:`crossover`). On each segment of the common refinement of A's and B's
  boundaries plus ``s``, the child's coefficients are ``alpha(t) C_A + beta(t) C_B`` with
  ``alpha = sin((1 - t) O)/sin O``, ``beta = sin(t O)/sin O`` (``1 - t``, ``t`` when ``sin O <=
  1e-6``): exactly the slerp of the flattened weights, so the child is again a member.
* **Geometry.** ``<A, B> = sum_s C_A[s]^T G(b_s, b_{s+1}) C_B[s]`` with ``G(a, b)`` the K x K Gram
  matrix of the sources restricted to ``[a, b)``, in float64 (:func:`inner`). :class:`PrefixGram`
  answers ``G(a, b) = P(b) - P(a)`` exactly for any segment: ``P(x)``, the Gram of ``[0, x)``, is
  a prefix sum of block Grams computed once in one pass over the sources, plus the partial block
  up to ``x`` read directly. (The subtraction loses ``~1e-16 |P(D)|`` absolutely, which is what
  the whole-vector angle can feel; the crossover needs nothing finer.)
* **Recipe** (:class:`~evomerge.recipe.segments.SegmentRecipe`): the member as plain data
  (YAML/JSON), built tensor by tensor into a target (:func:`build_member`: each tensor's flat
  view cut at the segment boundaries and at ``chunk`` elements, ``sum_k C[s, k] source_k``
  accumulated in the engine's work dtype, rounded once). mergekit cannot express sub-tensor
  segments: ``evomerge merge`` materialises such a file.

The layout, the member and the recipe are plain data in :mod:`evomerge.recipe.segments`; this
module is their algebra and their building.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import numpy as np

from evomerge.recipe.base import RecipeError
from evomerge.recipe.segments import Layout, Member, SegmentRecipe, layout_of

if TYPE_CHECKING:
    import torch

__all__ = [
    "RECORD", "PrefixGram", "angle", "build_into", "build_member", "canonical", "coefficients_on",
    "crossover", "dense", "inner", "refinement", "slerp_weights", "source_member", "source_record",
    "zero_member",
]

#: the fixed-length record of how a member was made (the store's parameters in weights mode):
#: an initial member is ``[k, -1, -1, 0, 0]`` (source ``k`` alone); a child ``[-1, A, B, split,
#: mix]`` with ``A``, ``B`` the steps that made its parents (-1: an empty slot, the zero member)
RECORD = ("source", "parent_a", "parent_b", "split", "mix")
SLERP_EPS = 1e-6  # the reference's threshold on sin(Omega) below which slerp falls back to lerp


# ---- members: pure algebra -----------------------------------------------------------------------


def canonical(bounds: Sequence[int] | np.ndarray, coefs: np.ndarray) -> Member:
    """The member with adjacent segments of equal coefficients joined (same weights)."""
    bounds = np.asarray(bounds, dtype=np.int64)
    coefs = np.asarray(coefs, dtype=np.float64)
    keep = np.ones(len(coefs), dtype=bool)
    keep[1:] = np.any(coefs[1:] != coefs[:-1], axis=1)
    starts = bounds[:-1][keep]
    return Member(np.append(starts, bounds[-1]), coefs[keep].copy())


def source_record(k: int) -> np.ndarray:
    """The :data:`RECORD` of source ``k`` alone as an initial member."""
    return np.array([float(k), -1.0, -1.0, 0.0, 0.0])


def source_member(k: int, n_sources: int, size: int) -> Member:
    """Source ``k`` alone: one segment, coefficient 1 on ``k``."""
    return Member(np.array([0, size], dtype=np.int64), np.eye(n_sources)[[k]])


def zero_member(n_sources: int, size: int) -> Member:
    """The zero vector (an empty archive slot, as the reference's zero genomes)."""
    return Member(np.array([0, size], dtype=np.int64), np.zeros((1, n_sources)))


def refinement(*bounds: np.ndarray, cuts: Sequence[int] = ()) -> np.ndarray:
    """The common refinement: every boundary of every member plus ``cuts`` inside ``(0, D)``."""
    size = int(bounds[0][-1])
    inner_cuts = [c for c in cuts if 0 < c < size]
    return np.unique(np.concatenate([*bounds, np.asarray(inner_cuts, dtype=np.int64)]))


def coefficients_on(member: Member, bounds: np.ndarray) -> np.ndarray:
    """The member's coefficient rows on each segment of a refinement ``bounds`` of its own."""
    rows = np.searchsorted(member.bounds, bounds[:-1], side="right") - 1
    return member.coefs[rows]


GramOracle = Callable[[np.ndarray], np.ndarray]
"""``grams(bounds) -> [S, K, K]``: the sources' Gram matrix on each segment of ``bounds``."""


def inner(a: Member, b: Member, grams: GramOracle) -> float:
    """``<A, B> = sum_s C_A[s]^T G[s] C_B[s]`` over the common refinement (float64)."""
    r = refinement(a.bounds, b.bounds)
    g = grams(r)
    return float(np.einsum("si,sij,sj->", coefficients_on(a, r), g, coefficients_on(b, r)))


def slerp_weights(t: np.ndarray, omega: float | None) -> tuple[np.ndarray, np.ndarray]:
    """``(alpha, beta)`` with ``slerp(t, a, b) = alpha a + beta b``: ``sin((1-t) O)/sin O`` and
    ``sin(t O)/sin O``; ``1 - t`` and ``t`` when ``omega`` is None (lerp)."""
    if omega is None:
        return 1.0 - t, t
    s = np.sin(omega)
    return np.sin((1.0 - t) * omega) / s, np.sin(t * omega) / s


def angle(a: Member, b: Member, grams: GramOracle) -> float | None:
    """``Omega = arccos(<A/|A|, B/|B|>)``, or None where slerp is lerp (a zero vector, or
    ``sin Omega <= 1e-6``), as :func:`evomerge.search.m2n2.slerp_split` decides it. The three
    inner products share one refinement and one Gram lookup."""
    r = refinement(a.bounds, b.bounds)
    g, ca, cb = grams(r), coefficients_on(a, r), coefficients_on(b, r)
    ga, gb = np.einsum("si,sij->sj", ca, g), np.einsum("si,sij->sj", cb, g)
    na = np.sqrt(max(float(np.sum(ga * ca)), 0.0))
    nb = np.sqrt(max(float(np.sum(gb * cb)), 0.0))
    if na == 0 or nb == 0:
        return None
    omega = float(np.arccos(np.clip(float(np.sum(ga * cb)) / (na * nb), -1.0, 1.0)))
    return None if np.sin(omega) <= SLERP_EPS else omega


def crossover(a: Member, b: Member, split: int, mix: float, grams: GramOracle) -> Member:
    """The child ``slerp(t, A, B)`` with ``t = mix`` on ``[0, split)`` and ``1 - mix`` from
    ``split`` on, ``Omega`` from the whole weight vectors: a member over the refinement of both
    parents' boundaries plus ``split``."""
    if a.size != b.size or a.coefs.shape[1] != b.coefs.shape[1]:
        raise ValueError(f"crossover: members of {a.size} and {b.size} parameters over "
                         f"{a.coefs.shape[1]} and {b.coefs.shape[1]} sources")
    r = refinement(a.bounds, b.bounds, cuts=[split])
    t = np.where(r[:-1] < split, mix, 1.0 - mix)
    alpha, beta = slerp_weights(t, angle(a, b, grams))
    coefs = alpha[:, None] * coefficients_on(a, r) + beta[:, None] * coefficients_on(b, r)
    return canonical(r, coefs)


def dense(member: Member, flat_sources: np.ndarray) -> np.ndarray:
    """The member's weight vector from the sources' flattened weights ``[K, D]`` (a reference
    for small models; builds go through :func:`build_member`)."""
    per_coordinate = np.repeat(member.coefs, np.diff(member.bounds), axis=0)  # [D, K]
    return np.einsum("dk,kd->d", per_coordinate, flat_sources)


# ---- the Gram oracle -----------------------------------------------------------------------------


class PrefixGram:
    """Exact Gram matrices of the sources on any segment: ``G(a, b) = P(b) - P(a)``.

    ``sources``: each source's tensors by name (memory-mapped safetensors are fine), in the
    members' source order, or a function that loads them on first use (then ``n_sources`` says
    how many). Block prefixes ``P(i * block)`` are computed once, in one pass, on
    first use; ``P(x)`` adds the partial block ``[floor(x / block) * block, x)`` read directly
    (memoised: a run's boundaries recur in every descendant).
    """

    def __init__(self, sources: Sequence[Mapping[str, Any]]
                 | Callable[[], Sequence[Mapping[str, Any]]], layout: Layout, *,
                 block: int = 1 << 16, n_sources: int | None = None) -> None:
        if block < 1:
            raise ValueError(f"block: a positive number of parameters, got {block}")
        if callable(sources) and n_sources is None:
            raise ValueError("n_sources: needed when the sources load lazily")
        self._load = sources if callable(sources) else None
        self._sources = None if callable(sources) else list(sources)
        self.n_sources = len(self._sources) if self._sources is not None else int(n_sources)
        self.layout, self.block = layout, int(block)
        self._offsets = layout.offsets
        self._blocks: np.ndarray | None = None
        self._memo: dict[int, np.ndarray] = {}

    @property
    def size(self) -> int:
        """``D``: the range of split points."""
        return self.layout.size

    @property
    def sources(self) -> list[Mapping[str, Any]]:
        if self._sources is None:
            assert self._load is not None
            self._sources = list(self._load())
            if len(self._sources) != self.n_sources:
                raise ValueError(f"sources: {len(self._sources)} loaded, {self.n_sources} "
                                 "expected")
        return self._sources

    def read(self, a: int, b: int) -> np.ndarray:
        """The sources' flattened weights on ``[a, b)``: float64 ``[K, b - a]``."""
        import torch

        out = np.empty((self.n_sources, b - a))
        sources = self.sources
        first = int(np.searchsorted(self._offsets, a, side="right") - 1)
        pos = a
        for i in range(first, len(self.layout.names)):
            lo = int(self._offsets[i])
            if lo >= b:
                break
            hi = min(int(self._offsets[i + 1]), b)
            name = self.layout.names[i]
            for k, state in enumerate(sources):
                piece = state[name].reshape(-1)[pos - lo:hi - lo]
                out[k, pos - a:hi - a] = piece.to(torch.float64).cpu().numpy()
            pos = hi
        return out

    def _gram(self, a: int, b: int) -> np.ndarray:
        x = self.read(a, b)
        return x @ x.T

    def block_prefixes(self) -> np.ndarray:
        """``P(i * block)`` for ``i = 0 .. ceil(D / block)`` (the one pass over the sources)."""
        if self._blocks is None:
            size, k = self.layout.size, self.n_sources
            n = -(-size // self.block)
            prefixes = np.zeros((n + 1, k, k))
            for i in range(n):
                lo = i * self.block
                prefixes[i + 1] = prefixes[i] + self._gram(lo, min(lo + self.block, size))
            self._blocks = prefixes
        return self._blocks

    def prefix(self, x: int) -> np.ndarray:
        """``P(x)``: the Gram matrix of ``[0, x)``."""
        x = int(x)
        if not 0 <= x <= self.layout.size:
            raise ValueError(f"prefix: {x} is outside [0, {self.layout.size}]")
        if x not in self._memo:
            i = x // self.block
            p = self.block_prefixes()[i]
            self._memo[x] = p + self._gram(i * self.block, x) if x > i * self.block else p
        return self._memo[x]

    def __call__(self, bounds: np.ndarray) -> np.ndarray:
        """``[S, K, K]``: ``G(bounds[s], bounds[s+1])`` for each segment."""
        p = np.stack([self.prefix(x) for x in bounds])
        return p[1:] - p[:-1]


# ---- building ------------------------------------------------------------------------------------


def build_member(member: Member, layout: Layout, sources: Sequence[Mapping[str, torch.Tensor]],
                 targets: Mapping[str, torch.Tensor], chunk: int = 1 << 20) -> None:
    """Write the member into ``targets`` (tensors by checkpoint name; names missing there are
    skipped), tensor by tensor: each flat piece between segment boundaries and ``chunk`` steps is
    ``sum_k C[s, k] source_k`` accumulated in the work dtype (float64 for float32 inputs, float32
    for 16-bit ones) and rounded once; a unit coefficient copies its source exactly."""
    import torch

    from evomerge.merge.methods import work_dtype

    offsets = layout.offsets
    with torch.inference_mode():
        for i, name in enumerate(layout.names):
            if name not in targets:
                continue
            lo, n = int(offsets[i]), int(layout.numels[i])
            out = targets[name].view(-1)
            flats = [state[name].reshape(-1) for state in sources]
            work = work_dtype(flats[0].dtype)
            inside = member.bounds[(member.bounds > lo) & (member.bounds < lo + n)] - lo
            cuts = np.unique(np.concatenate([[0, n], inside, np.arange(0, n, chunk)]))
            for p, q in pairwise(cuts):
                row = member.coefs[int(np.searchsorted(member.bounds, lo + p, "right")) - 1]
                acc = torch.zeros(int(q - p), dtype=work, device=out.device)
                for c, flat in zip(row, flats):
                    if c != 0:
                        acc.add_(flat[p:q].to(device=out.device, dtype=work), alpha=float(c))
                out[p:q].copy_(acc)


def build_into(recipe: SegmentRecipe, merger: Any,
               into: torch.nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Build a segment recipe with a :class:`~evomerge.merge.engine.Merger` holding its models
    into ``into`` (a model or tensors by checkpoint name); the tensors by checkpoint name.
    Non-float tensors come from the first model and must be equal in every model."""
    import torch

    states = [merger.state(m) for m in recipe.models]
    layout = layout_of({n: t.numel() for n, t in states[0].items() if t.is_floating_point()})
    problems = []
    if (layout.size, layout.sha256) != (recipe.parameters, recipe.layout_sha256):
        problems.append(f"the models' float tensors ({layout.size} parameters, layout "
                        f"{layout.sha256[:12]}) are not the layout the recipe was made for "
                        f"({recipe.parameters}, {recipe.layout_sha256[:12]})")
    differ = [n for n, t in states[0].items() if not t.is_floating_point()
              and any(not torch.equal(t, s[n]) for s in states[1:])]
    if differ:
        problems.append(f"non-float tensors differ between the models: {', '.join(differ)}")
    if problems:
        raise RecipeError("cannot build segments recipe:\n  " + "\n  ".join(problems))
    targets = merger.copy(recipe.models[0], into=into)  # the non-float tensors, the target names
    build_member(recipe.member, layout, states, targets, chunk=merger.chunk)
    return targets
