"""``m2n2``: Model Merging of Natural Niches (M2N2; Sakana's ``natural_niches`` reference code).

The algorithm, as small pure functions (each formula below is what its function computes):

* **Resource competition.** An archive of ``archive`` members and their per-item scores
  ``S[k, j]`` (1 = member ``k`` is right on training item ``j``; graded scores work too). Item ``j``
  is a resource of total value 1 shared by those that solve it: ``z_j = sum_k S[k, j]`` (``z_j = 0
  -> 1``), ``f_i = sum_j S[i, j] / z_j^alpha`` (:func:`shared_fitness`). ``alpha = 1`` is M2N2,
  ``alpha = 0`` the plain-accuracy GA baseline. Empty slots score all zeros (``f = 0``).
* **Parents.** ``A ~ f / sum f``; with the matchmaker ``B ~ g(A, .)`` where ``g(A, B) = sum_j
  max(0, S[B, j] / z_j^alpha - S[A, j] / z_j^alpha)`` (:func:`attraction`: B is strong where A is
  weak), without it ``B ~ f / sum f`` too. ``z`` is over the archive. Where the reference would
  divide by zero (every ``f`` zero, or no member attracted to ``A``) we draw from ``f`` / uniformly
  instead (:func:`probabilities`).
* **Crossover.** Split point ``s ~ randint[0, D)``, mix ``w ~ U(0, 1)``; ``t_k = w`` for ``k < s``,
  ``1 - w`` for ``k >= s`` (:func:`split_mix`); child = slerp(``t_k``, A, B) with ``Omega`` from
  the whole vectors, lerp when ``sin Omega <= 1e-6`` (:func:`slerp_split`).
* **Mutation.** ``+ N(0, mutation_std^2)`` on every coordinate (from scratch only; 0 = none).
* **Replacement.** ``f`` over archive ∪ {child} (``z`` includes the child); the arg-min member is
  replaced by the child, unless the child itself is the arg-min (:func:`replacement`; ties go to
  the lowest index, so empty slots fill first, as ``jnp.argmin`` does in the reference).

**Steady state in a generational driver.** The reference makes one child per step and inserts it
before the next is made. Here a *generation* is ``popsize`` children made from the same archive
state, then inserted one after another in asked order (each insertion sees the previous ones).
``popsize: 1`` (the default) is exactly the reference's steady state; a larger popsize lets
workers evaluate children in parallel at the price of children not seeing their batch-mates.
Every child draws its randomness from its own generator ``default_rng([seed, step])`` (``step`` =
the child's index in the run), so a child depends only on the seed, its step and the archive
state, and a replay re-creates it bit for bit.

Three modes:

a1. **Experts, coefficients** (strategy ``m2n2``, ``crossover: coefficients``, the default; ours,
   an adaptation). The genome is the search space's ``x``: merge coefficients over the experts
   the workers already hold, so only ``x`` crosses processes. Generation 0 asks the ``init``
   points (e.g. each expert alone; default two uniform points in the box); then ``popsize``
   children per generation, clipped to the box. The strategy needs the per-item scores of every
   trial (``needs_item_scores``): the driver tells every strategy ``tell(..., item_scores=[...])``
   (the trials' stored correctness vectors, all tasks concatenated in sorted task order; ``None``
   for a failed trial, which scores zero), in replay too, so resume works as for every strategy.
   Crossover acts on coefficients: for a linear/task-arithmetic space a lerp of coefficients is
   the lerp of the merged weights, but the split point can only fall between the space's
   coordinates ((layer x source) groups: the fixed partition M2N2 was made to remove), slerp's
   angle is that of the coefficient vectors, and for TIES/DARE spaces the crossover means
   nothing in weight space.

a2. **Experts, weights** (``crossover: weights`` with ``space: {kind: weights}``; the paper's
   operator on the parameters themselves, as the reference crosses its flat genomes). A genome is
   a *member*: a per-segment linear combination of the K resident sources over their flattened
   float parameters (:mod:`evomerge.merge.segments`); the experts are one segment with a unit
   coefficient, empty slots the zero member. The split point runs over all ``D`` parameters and
   slerp's ``Omega`` comes from the whole weight vectors, through the space's Gram oracle
   (``geometry``: ``<A, B> = sum_s C_A[s]^T G[s] C_B[s]``), so a child is exactly
   :func:`slerp_split` of its parents' flattened weights and again a member. ``x`` is the child's
   fixed-length record ``[source, parent A's step, parent B's step, split, mix]`` (what the store
   keeps as named parameters; the driver's resume compares it); the member itself travels in
   ``Candidate.meta["member"]`` to the driver, whose space decodes it into a segments recipe.
   Archive members are replayed (recomputed from records and scores), never stored as weights.
   No mutation (members stay combinations of the sources). For the digits MLP,
   :func:`scratch_search` with ``init`` = the two experts and ``mutation_std=0`` (config ``init:
   experts``) is the same operator on the reference's own flat genome.

b. **From scratch** (:func:`scratch_search`; the digits setting of the paper: 19,210 MLP weights,
   archive 20, init ``N(0, 0.01^2)``, mutation std 0.01, 50,000 evaluations). 50k Optuna trials
   carrying 19,210 params each would cost far more than the search (10-80 ms per trial here), so:

   * *Compact record.* A child is a deterministic function of the archive state and
     ``default_rng([seed, step])``; its record is :class:`ChildRecord` ``(step, parent A's step,
     parent B's step, split, mix)`` plus its packed correctness bits (180 bytes for 1,437 items).
     Weights are never stored: replay recomputes them (slerp + mutation, ~0.3 ms per child) and
     checks every recomputed record against the stored one (a mismatch is an error, as in the
     driver's resume).
   * *In-process batched evaluation.* The children of a generation are evaluated by one batched
     forward (:class:`FlatDigitsMLP`), no merge engine, no queue.
   * *Batched writes.* The caller's ``on_batch`` receives every evaluated generation; the
     from-scratch runner's :func:`evomerge.reproductions.scratch.run_scratch` buffers them and
     writes one Optuna trial per ``record_every`` evaluations (default 500: 100 trials for 50k
     evaluations) holding all their records and bits, on Optuna's journal file (2.4 ms per
     trial measured here, SQLite 20 ms). Each evaluation is recorded; a crash loses at most the
     unwritten buffer, which resume evaluates again (deterministically: same children, same
     scores).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from evomerge.merge.segments import RECORD, SLERP_EPS, source_member, source_record, zero_member
from evomerge.merge.segments import crossover as crossover_members
from evomerge.search.base import Candidate, Direction, Result, Strategy, register

__all__ = [
    "M2N2", "ChildRecord", "FlatDigitsMLP", "Niches", "attraction", "probabilities",
    "reference_digits", "replacement", "scratch_search", "shared_fitness", "slerp_split",
    "split_mix", "train_reference_experts",
]



# ---- the algorithm as pure functions ------------------------------------------------------------


def _weights(scores: np.ndarray, alpha: float) -> np.ndarray:
    """``S[k, j] / z_j^alpha`` with ``z_j = sum_k S[k, j]`` (``z_j = 0 -> 1``)."""
    z = scores.sum(axis=0)
    z = np.where(z > 0, z, 1.0) ** alpha
    return scores / z[None, :]


def shared_fitness(scores: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """``f_i = sum_j S[i, j] / z_j^alpha``: an item's reward is divided among those solving it,
    so a member is fit when it solves what few others solve (its niche)."""
    return _weights(np.asarray(scores, dtype=float), alpha).sum(axis=1)


def attraction(scores: np.ndarray, a: int, alpha: float = 1.0) -> np.ndarray:
    """``g(A, B) = sum_j max(0, S[B, j]/z_j^alpha - S[A, j]/z_j^alpha)`` for every B: how much B
    brings where A is weak (``g(A, A) = 0``)."""
    w = _weights(np.asarray(scores, dtype=float), alpha)
    return np.maximum(0.0, w - w[a][None, :]).sum(axis=1)


def probabilities(weights: np.ndarray, fallback: np.ndarray | None = None) -> np.ndarray:
    """``weights / sum(weights)``; when they sum to zero (the reference would divide by zero),
    ``fallback``'s distribution, else uniform."""
    weights = np.asarray(weights, dtype=float)
    total = weights.sum()
    if total > 0:
        return weights / total
    if fallback is not None:
        return probabilities(fallback)
    return np.full(len(weights), 1.0 / len(weights))


def split_mix(dim: int, split: int, mix: float) -> np.ndarray:
    """Per-coordinate interpolation ``t_k = mix`` for ``k < split``, ``1 - mix`` for the rest."""
    return np.where(np.arange(dim) < split, mix, 1.0 - mix)


def slerp_split(a: np.ndarray, b: np.ndarray, split: int, mix: float) -> np.ndarray:
    """Split-point slerp: ``sin((1 - t_k) O)/sin O * a_k + sin(t_k O)/sin O * b_k`` with
    ``O = arccos(<a/|a|, b/|b|>)`` over the whole vectors; ``(1 - t_k) a_k + t_k b_k`` when
    ``sin O <= 1e-6`` (parallel vectors, where slerp is 0/0)."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    t = split_mix(len(a), split, mix)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    sin_omega = 0.0
    if na > 0 and nb > 0:
        omega = float(np.arccos(np.clip(np.dot(a / na, b / nb), -1.0, 1.0)))
        sin_omega = float(np.sin(omega))
    if sin_omega <= SLERP_EPS:
        return (1.0 - t) * a + t * b
    return (np.sin((1.0 - t) * omega) * a + np.sin(t * omega) * b) / sin_omega


def replacement(scores: np.ndarray, child: np.ndarray, alpha: float = 1.0) -> int | None:
    """The archive row the child replaces: the arg-min of ``f`` over archive ∪ {child} (``z``
    counts the child), or None when the child itself is the worst (it is discarded)."""
    ext = np.vstack([np.asarray(scores, dtype=float), np.asarray(child, dtype=float)[None, :]])
    worst = int(np.argmin(shared_fitness(ext, alpha)))
    return worst if worst < len(scores) else None


# ---- the archive --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChildRecord:
    """How a child was made: its step, its parents' steps (-1 for an initial member), split, mix.

    With the seed and the archive state this determines the child exactly (its mutation noise
    comes from ``default_rng([seed, step])`` after the crossover draws)."""

    step: int
    parent_a: int
    parent_b: int
    split: int
    mix: float

    def as_list(self) -> list[float]:
        return [self.step, self.parent_a, self.parent_b, self.split, self.mix]

    @classmethod
    def from_list(cls, v: Sequence[float]) -> ChildRecord:
        return cls(int(v[0]), int(v[1]), int(v[2]), int(v[3]), float(v[4]))


#: ``crossover(a, b, split, mix) -> child``: :func:`slerp_split` for vectors; for members of the
#: weights space, :func:`evomerge.merge.segments.crossover` with the space's Gram oracle
Crossover = Callable[[Any, Any, int, float], Any]


class Niches:
    """An M2N2 archive: ``size`` genomes, their item scores and the step that made each.

    ``breed(step)`` makes one child from the current state, ``insert`` applies the replacement
    rule. Genomes are ``dim``-vectors crossed by :func:`slerp_split` (empty slots: zero vectors),
    or any value a ``crossover`` function combines, with ``dim`` the range of split points
    (weights mode: segment members, empty slots the zero member). Pure state; knows nothing of
    models, stores or drivers.
    """

    def __init__(self, size: int, dim: int, n_items: int, *, seed: int, alpha: float = 1.0,
                 matchmaker: bool = True, mutation_std: float = 0.0,
                 crossover: Crossover | None = None, empty: Any = None) -> None:
        if size < 2:
            raise ValueError(f"archive: needs at least 2 members, got {size}")
        if alpha < 0:
            raise ValueError(f"alpha: must be >= 0 (1 = M2N2, 0 = plain GA), got {alpha}")
        if mutation_std < 0:
            raise ValueError(f"mutation_std: must be >= 0, got {mutation_std}")
        self.seed, self.alpha, self.matchmaker = seed, float(alpha), bool(matchmaker)
        self.mutation_std = float(mutation_std)
        if crossover is not None and mutation_std > 0:
            raise ValueError("mutation_std: a custom crossover's genomes are not vectors to "
                             "perturb; set it to 0")
        self.dim = int(dim)
        self.crossover: Crossover = crossover or slerp_split
        #: one genome per row: vectors (a 2-D array), or ``empty`` objects for a custom crossover
        self.genomes: np.ndarray | list[Any] = (np.zeros((size, dim)) if crossover is None
                                                else [empty] * size)
        self.scores = np.zeros((size, n_items))
        self.steps = np.full(size, -1, dtype=np.int64)

    def rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, step])

    def parents(self, rng: np.random.Generator) -> tuple[int, int]:
        """Archive rows of parents A ~ f and B ~ attraction to A (or ~ f without matchmaker)."""
        f = shared_fitness(self.scores, self.alpha)
        p = probabilities(f)
        a = int(rng.choice(len(p), p=p))
        if self.matchmaker:
            b = int(rng.choice(len(p), p=probabilities(attraction(self.scores, a, self.alpha), f)))
        else:
            b = int(rng.choice(len(p), p=p))
        return a, b

    def breed(self, step: int) -> tuple[ChildRecord, np.ndarray]:
        """Child number ``step``: parents, split-point slerp, mutation; its record and genome."""
        rng = self.rng(step)
        a, b = self.parents(rng)
        split, mix = int(rng.integers(0, self.dim)), float(rng.random())
        child = self.crossover(self.genomes[a], self.genomes[b], split, mix)
        if self.mutation_std > 0:
            child = child + rng.standard_normal(self.dim) * self.mutation_std
        record = ChildRecord(step, int(self.steps[a]), int(self.steps[b]), split, mix)
        return record, child

    def insert(self, genome: np.ndarray, scores: np.ndarray, step: int) -> int | None:
        """Apply the replacement rule; the row replaced, or None (the child was discarded)."""
        row = replacement(self.scores, scores, self.alpha)
        if row is not None:
            self.genomes[row] = genome
            self.scores[row] = scores
            self.steps[row] = step
        return row

    def best(self) -> int:
        """The row with the highest mean item score (the reference's reported member)."""
        return int(np.argmax(self.scores.mean(axis=1)))


# ---- experts mode: the strategy -----------------------------------------------------------------


@register("m2n2")
class M2N2(Strategy):
    """M2N2 over the experts (modes a1 and a2 of the module docstring).

    Options: ``archive`` (20), ``alpha`` (1.0), ``matchmaker`` (true), ``mutation_std`` (0.0, in
    the space's units; coefficients only), ``init`` (list of starting ``x`` vectors, each a list
    of ``dim`` numbers or one number for all; default two uniform points in the box; in an
    experiment, ``sources`` = each source alone, resolved by the driver from the space),
    ``popsize`` (1 = exact steady state), ``crossover`` (``coefficients``, the default: cross the
    space's ``x``; ``weights``: cross the sources' flattened weights, with ``geometry``, the
    weights space's Gram oracle, which the driver passes; ``init`` then lists records
    ``[source, -1, -1, 0, 0]``, default every source). The objective values are only reported:
    selection uses the per-item scores.
    """

    default_popsize = 1
    needs_item_scores = True

    def __init__(self, lower: Sequence[float], upper: Sequence[float],
                 directions: Sequence[Direction], *, seed: int = 0, popsize: int | None = None,
                 archive: int = 20, alpha: float = 1.0, matchmaker: bool = True,
                 mutation_std: float = 0.0, init: Sequence[Any] | None = None,
                 crossover: str = "coefficients", geometry: Any = None,
                 **options: Any) -> None:
        super().__init__(lower, upper, directions, seed=seed, popsize=popsize)
        self._reject_options(options, ("archive", "alpha", "matchmaker", "mutation_std", "init",
                                       "crossover"))
        problems = crossover_problems(crossover, geometry, mutation_std, self.dim)
        if problems:
            raise ValueError("; ".join(problems))
        self.crossover, self.geometry = crossover, geometry
        if isinstance(archive, bool) or not isinstance(archive, (int, np.integer)):
            raise TypeError(f"archive: an integer >= 2, got {archive!r}")
        self._settings: dict[str, Any] = {
            "size": int(archive), "seed": self.seed, "alpha": float(alpha),
            "matchmaker": bool(matchmaker), "mutation_std": float(mutation_std)}
        Niches(**self._settings, dim=1, n_items=1)  # validates the settings before any compute
        self._init = self._init_points(init)
        if geometry is not None:
            self._sources = [_source_of(x, i, geometry.n_sources) for i, x in enumerate(self._init)]
        if len(self._init) > archive:
            raise ValueError(f"init: {len(self._init)} points for an archive of {archive}")
        self.niches: Niches | None = None  # sized at the first tell (item count unknown before)
        self._step = 0

    def _init_points(self, init: Sequence[Any] | None) -> list[np.ndarray]:
        if init is None and self.geometry is not None:  # weights: every source alone
            return [source_record(k) for k in range(self.geometry.n_sources)]
        if init is None:
            rng = np.random.default_rng([self.seed, 2**31])
            return [self.lower + rng.random(self.dim) * (self.upper - self.lower)
                    for _ in range(2)]
        if isinstance(init, (str, bytes)) or not isinstance(init, Sequence) or not init:
            raise ValueError(f"init: a non-empty list of starting points, got {init!r}")
        points = []
        for i, point in enumerate(init):
            try:
                x = np.broadcast_to(np.asarray(point, dtype=float), (self.dim,)).copy()
            except ValueError:
                raise ValueError(f"init[{i}]: expected {self.dim} numbers or one, got "
                                 f"{np.size(point)}") from None
            outside = (x < self.lower) | (x > self.upper)
            if outside.any():
                k = int(np.argmax(outside))
                raise ValueError(f"init[{i}][{k}]: {x[k]} is outside the bounds "
                                 f"[{self.lower[k]}, {self.upper[k]}]")
            points.append(x)
        return points

    def _ask(self, n: int) -> list[tuple[np.ndarray, dict[str, Any]]]:
        """Generation 0: the init points (however many); then ``n`` children of the archive."""
        if self.generation == 0:
            if self.geometry is None:
                return [(x, {"step": i, "init": True}) for i, x in enumerate(self._init)]
            g = self.geometry  # weights: the member travels to the driver
            return [(x, {"step": i, "init": True,
                         "member": source_member(k, g.n_sources, g.size)})
                    for i, (x, k) in enumerate(zip(self._init, self._sources))]
        assert self.niches is not None
        out = []
        for i in range(n):
            record, child = self.niches.breed(self._step + i)
            if self.geometry is not None:  # x: the record; the member in meta
                x = np.array([-1.0, record.parent_a, record.parent_b, record.split, record.mix])
                out.append((x, {"record": record, "member": child}))
            else:
                out.append((np.clip(child, self.lower, self.upper), {"record": record}))
        return out

    def _tell(self, candidates: list[Candidate], results: list[Result]) -> None:
        """Insert the children one after another in asked order; a failure scores zero."""
        known = [r.item_scores for r in results if r.item_scores is not None]
        if not known and self.niches is None:
            raise ValueError("m2n2 tell: every initial candidate failed; no item count to "
                             "size the archive")
        if self.niches is None:
            self.niches = self._new_niches(len(known[0]))
        n_items = self.niches.scores.shape[1]
        for k, (cand, r) in enumerate(zip(candidates, results)):
            row = np.zeros(n_items) if r.item_scores is None else r.item_scores
            if len(row) != n_items:
                raise ValueError(f"m2n2 tell: item_scores[{k}] has {len(row)} items, the "
                                 f"archive {n_items}")
            genome = cand.meta["member"] if self.geometry is not None else cand.x
            self.niches.insert(genome, row, self._step + k)
        self._step += len(candidates)

    def _new_niches(self, n_items: int) -> Niches:
        """The archive: over ``x`` (coefficients), or over members of the sources' flattened
        weights (weights: split points over all ``D`` parameters, the zero member in empty
        slots, slerp angles from the geometry's Gram matrices)."""
        if self.geometry is None:
            return Niches(**self._settings, dim=self.dim, n_items=n_items)
        g = self.geometry
        return Niches(**self._settings, dim=g.size, n_items=n_items,
                      crossover=lambda a, b, split, mix: crossover_members(a, b, split, mix, g),
                      empty=zero_member(g.n_sources, g.size))


def crossover_problems(crossover: str, geometry: Any, mutation_std: float,
                       dim: int) -> list[str]:
    """What is wrong with M2N2's crossover options (every problem, one line each)."""
    if crossover not in CROSSOVERS:
        return [f"crossover: {', '.join(CROSSOVERS)}, got {crossover!r}"]
    problems = []
    if crossover == "weights" and geometry is None:
        problems.append("crossover: weights crosses the sources' flattened weights and needs "
                        "the weights space (space: {kind: weights}), which supplies their Gram "
                        "geometry; or use crossover: coefficients with a coefficient space")
    if crossover == "coefficients" and geometry is not None:
        problems.append("crossover: coefficients crosses a coefficient space's x, but a "
                        "weights geometry was given; use crossover: weights with the weights "
                        "space, or a coefficient space")
    if crossover == "weights" and mutation_std:
        problems.append(f"mutation_std: {mutation_std} has no meaning for weight-space members "
                        "(linear combinations of the sources); set it to 0")
    if crossover == "weights" and dim != len(RECORD):
        problems.append(f"crossover: weights asks records {list(RECORD)} ({len(RECORD)} numbers), "
                        f"the bounds have {dim}")
    return problems


CROSSOVERS = ("coefficients", "weights")


def _source_of(record: np.ndarray, i: int, n_sources: int) -> int:
    """The source an initial weights-mode record names; ValueError if it is not one."""
    k = record[0]
    if (k != int(k) or not 0 <= k < n_sources
            or not np.array_equal(record, source_record(int(k)))):
        raise ValueError(f"init[{i}]: weight-space members start as sources alone: "
                         f"[k, -1, -1, 0, 0] with k in 0..{n_sources - 1}, got {record.tolist()}")
    return int(k)


# ---- from-scratch mode --------------------------------------------------------------------------


def scratch_search(evaluate: Callable[[np.ndarray], np.ndarray], dim: int, budget: int, *,
                   seed: int, archive: int = 20, alpha: float = 1.0, matchmaker: bool = True,
                   init_std: float = 0.01, mutation_std: float = 0.01, popsize: int = 1,
                   init: Sequence[np.ndarray] | None = None,
                   stored: Iterable[tuple[ChildRecord, np.ndarray]] = (),
                   on_batch: Callable[[list[ChildRecord], np.ndarray], None] | None = None,
                   ) -> Niches:
    """M2N2 from random initialisation for ``budget`` evaluations; the final archive.

    ``evaluate(genomes[B, dim]) -> scores[B, n_items]`` scores a batch. Steps 0 and 1 are two
    ``N(0, init_std^2)`` members (the reference's start), or the ``init`` genomes (e.g. two
    experts, with ``mutation_std=0``: the reference's pre-trained run), then generations of
    ``popsize`` children. ``stored`` (records and scores of a previous run, in step order) are replayed
    without evaluation: each child is recomputed and its record must match. ``on_batch`` gets
    the records and scores of every batch evaluated here (not the replayed ones).
    """
    first = 2 if init is None else len(init)
    if budget < first:
        raise ValueError(f"budget: at least the {first} initial members, got {budget}")
    if init_std <= 0:
        raise ValueError(f"init_std: must be > 0, got {init_std}")
    if isinstance(popsize, bool) or not isinstance(popsize, int) or popsize < 1:
        raise ValueError(f"popsize: an integer >= 1, got {popsize!r}")
    replay = iter(stored)
    niches: Niches | None = None
    step = 0
    while step < budget:
        if niches is None:
            records = [ChildRecord(s, -1, -1, 0, 0.0) for s in range(first)]
            genomes = np.stack([np.random.default_rng([seed, s]).standard_normal(dim) * init_std
                                for s in range(2)] if init is None else
                               [np.asarray(g, dtype=float) for g in init])
        else:
            made = [niches.breed(step + i) for i in range(min(popsize, budget - step))]
            records = [r for r, _ in made]
            genomes = np.stack([g for _, g in made])
        scores, fresh = _replayed(replay, records)
        if fresh:
            new = np.asarray(evaluate(genomes[len(scores):]), dtype=float)
            if on_batch is not None:
                on_batch(records[len(scores):], new)
            scores = scores + list(new)
        if niches is None:
            niches = Niches(archive, dim, len(scores[0]), seed=seed, alpha=alpha,
                            matchmaker=matchmaker, mutation_std=mutation_std)
        for record, genome, s in zip(records, genomes, scores):
            niches.insert(genome, s, record.step)
        step += len(records)
    assert niches is not None
    return niches


def _replayed(replay: Iterator[tuple[ChildRecord, np.ndarray]],
              records: list[ChildRecord]) -> tuple[list[np.ndarray], bool]:
    """Scores of ``records`` taken from the stored run (checked equal), and whether some remain
    to evaluate."""
    scores: list[np.ndarray] = []
    for record in records:
        stored = next(replay, None)
        if stored is None:
            return scores, True
        if stored[0] != record:
            raise ValueError(f"replay: stored child {stored[0]} does not match the recomputed "
                             f"{record}; the run's seed and settings must be those it started "
                             "with")
        scores.append(np.asarray(stored[1], dtype=float))
    return scores, False


# ---- the reference digits setting (from-scratch and two-expert runs) ----------------------------

REF_HIDDEN = 256


def reference_digits() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The reference split: ``load_digits`` unshuffled, first 80 % train (1,437), last 20 % test
    (360), raw pixel values 0-16 (the reference does not rescale). Not the zoo's split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    cut = int(len(x) * 0.8)
    x = x.astype(np.float32)
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


class FlatDigitsMLP:
    """The reference MLP 64-256-10 (ReLU) on flat genomes, batched: 19,210 numbers laid out as
    ``W1[64, 256]`` (row-major, ``h = x @ W1 + b1``), ``b1[256]``, ``W2[256, 10]``, ``b2[10]``.
    The layout matters: the crossover's split point runs over it."""

    dim = 64 * REF_HIDDEN + REF_HIDDEN + REF_HIDDEN * 10 + 10

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        import torch

        self.x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        self.y = torch.as_tensor(np.asarray(y, dtype=np.int64))

    def logits(self, genomes: np.ndarray) -> Any:
        """Logits ``[B, n_items, 10]`` of a batch of genomes ``[B, dim]`` (or one genome)."""
        import torch

        g = torch.as_tensor(np.atleast_2d(np.asarray(genomes, dtype=np.float32)))
        with torch.inference_mode():
            return _forward(self.x, g)

    def __call__(self, genomes: np.ndarray) -> np.ndarray:
        """Correctness ``[B, n_items]`` (1.0 / 0.0) of each genome."""
        return (self.logits(genomes).argmax(dim=2) == self.y).double().numpy()

    def accuracy(self, genome: np.ndarray) -> float:
        return float(self(genome).mean())


def _forward(x: Any, g: Any) -> Any:
    """``relu(x @ W1 + b1) @ W2 + b2`` for flat genomes ``g[B, dim]`` (torch; differentiable)."""
    import torch

    n, h = len(g), REF_HIDDEN
    o1, o2, o3 = 64 * h, 64 * h + h, 64 * h + h + h * 10
    hidden = torch.relu(torch.matmul(x, g[:, :o1].reshape(n, 64, h)) + g[:, None, o1:o2])
    return torch.matmul(hidden, g[:, o2:o3].reshape(n, h, 10)) + g[:, None, o3:]


def train_reference_experts(seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """The reference's two experts: ``N(0, 0.01^2)`` genomes trained on the train split's digits
    0-4 and 5-9 with Adam (lr 3e-3), 10 full-batch steps of cross-entropy. Flat genomes."""
    import torch

    (x, y), _ = reference_digits()
    experts = []
    for k, mask in enumerate((y < 5, y >= 5)):
        gen = torch.Generator().manual_seed(seed * 2 + k)
        g = (torch.randn(FlatDigitsMLP.dim, generator=gen, dtype=torch.float32) * 0.01)
        g.requires_grad_(True)
        model = FlatDigitsMLP(x[mask], y[mask])
        opt = torch.optim.Adam([g], lr=3e-3)
        for _ in range(10):
            logits = _forward(model.x, g[None, :])[0]
            loss = torch.nn.functional.cross_entropy(logits, model.y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        experts.append(g.detach().numpy().astype(np.float64))
    return experts[0], experts[1]
