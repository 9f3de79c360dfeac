"""The one ask/tell interface every search strategy implements, as a template.

A strategy knows only vectors: it proposes points ``x`` inside box bounds and learns from their
objective values. It never sees recipes, models or the store (Optuna's layering: a sampler never
touches a storage). Determinism is part of the contract: a strategy built with the same
arguments and told the same values in the same order asks the same candidates again. Resume
relies on it: the driver re-creates the strategy and replays the stored results into it instead
of pickling optimizer state.

The public :meth:`Strategy.ask` and :meth:`Strategy.tell` do every check once (popsize, the
pending generation, a whole generation told in asked order, one value per candidate, the
failure penalty); a strategy implements only the algorithm. A subclass:

* calls ``super().__init__(lower, upper, directions, seed=seed, popsize=popsize)`` first, then
  ``self._reject_options(options, known)`` if it takes ``**options``;
* sets the class attributes that differ from the defaults: ``default_popsize`` (8; a property
  where it depends on the bounds, as cma's does), ``min_popsize`` (1), ``generational``
  (``True``: ``tell`` takes exactly the generation last asked, in asked order, and ``ask``
  refuses while one is pending; ``False``: any asked candidates, in any grouping, matched by the
  ``meta["serial"]`` the base adds), ``needs_item_scores`` (``False``; ``True``: ``tell``
  refuses a call without them);
* implements ``_ask(n)``: the next ``n`` points, each ``x`` or ``(x, meta)`` (``meta``: what
  the strategy wants back with the candidate; a generational strategy is always asked for
  ``n = popsize`` and may return fewer);
* implements ``_tell(candidates, results)``: learn from one :class:`Result` per candidate, the
  candidates as they were asked, failures already given the penalty.

The base numbers the candidates (``generation``, ``index``), keeps the pending generation and
counts generations: one per ``tell`` for a generational strategy, one per ``ask`` otherwise.

For example, a uniform random search::

    class Uniform(Strategy):
        generational = False

        def __init__(self, lower, upper, directions, *, seed=0, popsize=None):
            super().__init__(lower, upper, directions, seed=seed, popsize=popsize)
            self.rng = np.random.default_rng(self.seed)

        def _ask(self, n):
            return list(self.lower + self.rng.random((n, self.dim)) * (self.upper - self.lower))

        def _tell(self, candidates, results):
            pass  # learns nothing
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from evomerge.registry import Registry

Direction = Literal["maximize", "minimize"]

#: What ``_ask`` returns per candidate: a point, or a point and the metadata to carry with it.
Proposal = np.ndarray | tuple[np.ndarray, dict[str, Any]]


@dataclass(frozen=True)
class Candidate:
    """A point to evaluate: ``x`` in the space's bounds plus bookkeeping the strategy needs back."""

    x: np.ndarray
    generation: int
    index: int  # position within its generation
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Result:
    """What a strategy learns about one evaluated candidate.

    ``values`` are in ``directions`` order, the penalty (:meth:`Strategy.penalty`) when the
    evaluation ``failed`` (``None`` or a non-finite value was told). ``item_scores`` is the
    per-item score vector of the evaluation (every task's items concatenated, tasks in sorted
    name order), ``None`` when it failed or none was told: M2N2 selects per item."""

    values: list[float]
    failed: bool
    item_scores: np.ndarray | None = None


class Strategy(ABC):
    """Ask/tell optimiser over a box (see the module docstring for what a subclass implements).

    ``tell`` receives one entry per candidate, in the order asked: a list of objective values in
    ``directions`` order, or ``None`` for a failed evaluation (the strategy then applies
    :meth:`penalty`), and optionally per-item scores. Generational strategies (CMA-ES, NSGA-II,
    M2N2, MAP) expect a whole generation per ``tell``; a driver that stops at an exact evaluation
    budget evaluates only the first candidates of its last generation and simply never tells
    that partial generation.
    """

    name: ClassVar[str] = ""  # the registry name, set by :func:`register`
    #: candidates per ``ask()`` when the experiment gives no ``popsize``
    default_popsize: ClassVar[int] = 8
    #: the smallest ``popsize`` the algorithm works with
    min_popsize: ClassVar[int] = 1
    #: whole generations: ``tell`` takes exactly the candidates of the last ``ask``, in order
    generational: ClassVar[bool] = True
    #: ``tell`` must be given ``item_scores`` (selection per item, as M2N2's)
    needs_item_scores: ClassVar[bool] = False

    def __init__(self, lower: Sequence[float], upper: Sequence[float],
                 directions: Sequence[Direction], *, seed: int = 0, popsize: int | None = None,
                 **options: Any) -> None:
        self.lower = np.asarray(lower, dtype=float)
        self.upper = np.asarray(upper, dtype=float)
        if self.lower.shape != self.upper.shape or self.lower.ndim != 1:
            raise ValueError("bounds: lower and upper must be 1-D and of equal length")
        if np.any(self.lower >= self.upper):
            bad = int(np.argmax(self.lower >= self.upper))
            raise ValueError(f"bounds[{bad}]: lower {self.lower[bad]} is not below upper "
                             f"{self.upper[bad]}")
        self.directions = list(directions)
        if not self.directions or any(d not in ("maximize", "minimize") for d in self.directions):
            raise ValueError(f"directions: each must be 'maximize' or 'minimize', got {directions}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not (
                0 <= seed < 2**32):
            raise ValueError(f"seed: must be an integer in [0, 2**32), got {seed!r} (a fixed seed "
                             "is what makes a run replayable)")
        self.seed = int(seed)
        self._reject_options(options, ())  # only a subclass with no options of its own passes any
        popsize = self.default_popsize if popsize is None else popsize
        if isinstance(popsize, bool) or not isinstance(popsize, (int, np.integer)) or (
                popsize < self.min_popsize):
            raise ValueError(f"popsize: {self._label} needs an integer >= {self.min_popsize}, "
                             f"got {popsize!r}")
        #: candidates per generation (what ``ask()`` returns by default)
        self.popsize = int(popsize)
        self.generation = 0
        self._worst: list[float] | None = None  # per objective, over every finite value told
        self._pending: list[Candidate] | None = None  # generational: asked, not yet told
        self._asked = 0  # candidates asked so far: the next one's ``meta["serial"]``
        self._untold: set[int] = set()  # free strategies: serials asked, not yet told

    @property
    def dim(self) -> int:
        return len(self.lower)

    @property
    def _label(self) -> str:
        return self.name or type(self).__name__

    # ---- the template ---------------------------------------------------------------------

    def ask(self, n: int | None = None) -> list[Candidate]:
        """The next ``n`` (default: one generation of) candidates, inside the bounds."""
        if self.generational:
            if n is not None and n != self.popsize:
                raise ValueError(f"{self._label} asks whole generations: n must be None or "
                                 f"popsize={self.popsize}, got {n}")
            if self._pending is not None:
                raise RuntimeError(f"{self._label}: generation {self.generation} was asked but "
                                   "not told; tell it before asking the next")
        n = self.popsize if n is None else n
        if n < 1:
            raise ValueError(f"{self._label} ask: n must be >= 1, got {n}")
        cands = []
        for i, proposal in enumerate(self._ask(n)):
            x, meta = proposal if isinstance(proposal, tuple) else (proposal, {})
            if not self.generational:
                meta = {**meta, "serial": self._asked + i}
            cands.append(Candidate(x=np.asarray(x, dtype=float), generation=self.generation,
                                   index=i, meta=meta))
        self._asked += len(cands)
        if self.generational:
            self._pending = cands
        else:
            self._untold.update(c.meta["serial"] for c in cands)
            self.generation += 1
        return list(cands)

    def tell(self, candidates: Sequence[Candidate], values: Sequence[Sequence[float] | None],
             item_scores: Sequence[np.ndarray | None] | None = None) -> None:
        """Learn from evaluated candidates: one value per candidate (``None`` = failed) and,
        optionally, one per-item score vector per candidate (``None`` for a failure)."""
        if len(candidates) != len(values):
            raise ValueError(f"{self._label} tell: {len(candidates)} candidates but {len(values)} "
                             "values (give one entry per candidate, None for a failure)")
        if item_scores is None and self.needs_item_scores:
            raise ValueError(f"{self._label} tell: needs item_scores, one per candidate (None "
                             "for a failure)")
        if item_scores is not None and len(item_scores) != len(candidates):
            raise ValueError(f"{self._label} tell: {len(candidates)} candidates but "
                             f"{len(item_scores)} item_scores (one per candidate, None for a "
                             "failure)")
        told = self._told(candidates)
        filled, failed = self._note_values(values)
        scores = [None] * len(told) if item_scores is None else [
            None if s is None else np.asarray(s, dtype=float).ravel() for s in item_scores]
        self._tell(told, [Result(v, f, s) for v, f, s in zip(filled, failed, scores)])
        if self.generational:
            self._pending = None
            self.generation += 1
        else:
            self._untold.difference_update(c.meta["serial"] for c in told)

    def _told(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        """The candidates as asked, after checking that they may be told now: the whole pending
        generation in asked order, or (free strategies) asked and not yet told, once each."""
        if self.generational:
            if self._pending is None:
                raise RuntimeError(f"{self._label}: tell without a pending generation (ask first)")
            expected = [(c.generation, c.index) for c in self._pending]
            got = [(c.generation, c.index) for c in candidates]
            if got != expected:
                raise ValueError(f"{self._label} tell: expected the whole generation "
                                 f"{self.generation} ({len(expected)} candidates, in asked "
                                 f"order), got {len(got)} with (generation, index) {got[:3]}...")
            return self._pending
        serials = [c.meta.get("serial") for c in candidates]
        bad = [s for s in serials if s not in self._untold]
        if bad or len(set(serials)) != len(serials):
            raise ValueError(f"{self._label} tell: candidates {bad or serials} were not asked or "
                             "were already told (meta['serial'] identifies them)")
        return list(candidates)

    @abstractmethod
    def _ask(self, n: int) -> Sequence[Proposal]:
        """The next ``n`` points (a generational strategy: its next generation, ``n`` =
        ``popsize``, possibly fewer), each ``x`` or ``(x, meta)``, inside the bounds."""

    @abstractmethod
    def _tell(self, candidates: list[Candidate], results: list[Result]) -> None:
        """Learn from one :class:`Result` per candidate (the candidates as they were asked)."""

    # ---- shared helpers -------------------------------------------------------------------

    def penalty(self) -> list[float]:
        """Objective values given to a failed candidate: the worst finite value seen so far per
        objective (or 0 before any), so a failure never looks better than a real result."""
        worst = self._worst
        return list(worst) if worst is not None else [0.0] * len(self.directions)

    def _note_values(self, values: Sequence[Sequence[float] | None]
                     ) -> tuple[list[list[float]], list[bool]]:
        """Fill failures with the penalty and track the worst value per objective; the filled
        values and which entries failed.

        A value counts as failed when it is ``None`` or has a non-finite entry (NaN, inf). The
        penalty is taken after the whole batch is noted, so it is the same whatever the order of
        failures within the batch.
        """
        n_obj = len(self.directions)
        values = [None if v is None else [float(a) for a in np.atleast_1d(v)] for v in values]
        for i, v in enumerate(values):
            if v is not None and len(v) != n_obj:
                raise ValueError(f"values[{i}]: {len(v)} objective value(s) for {n_obj} "
                                 f"direction(s) {self.directions}")
        failed = [v is None or not all(np.isfinite(v)) for v in values]
        pick = [min if d == "maximize" else max for d in self.directions]
        for v, bad in zip(values, failed):
            if not bad:
                self._worst = list(v) if self._worst is None else [
                    f(a, b) for f, a, b in zip(pick, self._worst, v)]
        filled = [self.penalty() if bad else list(v) for v, bad in zip(values, failed)]
        return filled, failed

    def _reject_options(self, options: dict[str, Any], known: Sequence[str]) -> None:
        """Raise for option names the strategy does not know (typos must not pass silently)."""
        if options:
            raise ValueError(f"{self._label} options: unknown {', '.join(sorted(options))}; "
                             f"known: {', '.join(['popsize', *known])}")


#: name -> Strategy class. The built-ins register on import of :mod:`evomerge.search`; plugins:
#: entry-point group ``evomerge.strategies``.
STRATEGIES: Registry[Callable[..., Strategy]] = Registry("strategy", "evomerge.strategies")


def register(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator: make a strategy available to experiments by name (the name its errors
    then carry)."""
    def wrap(cls: type[Strategy]) -> type[Strategy]:
        STRATEGIES.register(name, cls)
        cls.name = name
        return cls
    return wrap


def make_strategy(name: str, **kwargs: Any) -> Strategy:
    """Build a registered strategy: ``make_strategy("cmaes", lower=..., upper=...,
    directions=[...], seed=0, popsize=None, **options)``."""
    return STRATEGIES[name](**kwargs)
