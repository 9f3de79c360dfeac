"""The one ask/tell interface every search strategy implements.

A strategy knows only vectors: it proposes points ``x`` inside box bounds and learns from their
objective values. It never sees recipes, models or the store (Optuna's layering: a sampler never
touches a storage). Determinism is part of the contract: a strategy built with the same
arguments and told the same values in the same order asks the same candidates again. Resume
relies on it: the driver re-creates the strategy and replays the stored results into it instead
of pickling optimizer state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

Direction = Literal["maximize", "minimize"]


@dataclass(frozen=True)
class Candidate:
    """A point to evaluate: ``x`` in the space's bounds plus bookkeeping the strategy needs back."""

    x: np.ndarray
    generation: int
    index: int  # position within its generation
    meta: dict[str, Any] = field(default_factory=dict)


class Strategy(ABC):
    """Ask/tell optimiser over a box.

    ``tell`` receives one entry per candidate, in the order asked: a list of objective values in
    ``directions`` order, or ``None`` for a failed evaluation (the strategy then applies
    :meth:`penalty`). Strategies that work in generations (CMA-ES, NSGA-II) expect a whole
    generation per ``tell``; a driver that stops at an exact evaluation budget evaluates only the
    first candidates of its last generation and simply never tells that partial generation.
    """

    name: ClassVar[str] = ""  # the registry name, set by :func:`register`

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
        self.generation = 0

    @property
    def dim(self) -> int:
        return len(self.lower)

    @property
    @abstractmethod
    def popsize(self) -> int:
        """Candidates per generation (what ``ask()`` returns by default)."""

    @abstractmethod
    def ask(self, n: int | None = None) -> list[Candidate]:
        """The next ``n`` (default: one generation of) candidates, inside the bounds."""

    @abstractmethod
    def tell(self, candidates: Sequence[Candidate],
             values: Sequence[Sequence[float] | None]) -> None:
        """Learn from evaluated candidates (``None`` = failed)."""

    def penalty(self) -> list[float]:
        """Objective values given to a failed candidate: the worst finite value seen so far per
        objective (or 0 before any), so a failure never looks better than a real result."""
        worst = getattr(self, "_worst", None)
        return list(worst) if worst is not None else [0.0] * len(self.directions)

    def _note_values(self, values: Sequence[Sequence[float] | None]) -> list[list[float]]:
        """Fill failures with the penalty and track the worst value per objective.

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
        filled = []
        for v in values:
            if v is not None and all(np.isfinite(v)):
                worst = getattr(self, "_worst", None)
                pick = [min if d == "maximize" else max for d in self.directions]
                self._worst = list(v) if worst is None else [
                    f(a, b) for f, a, b in zip(pick, worst, v)]
        for v in values:
            filled.append(list(v) if v is not None and all(np.isfinite(v)) else self.penalty())
        return filled


    def _check_tell(self, candidates: Sequence[Candidate],
                    values: Sequence[Sequence[float] | None]) -> None:
        if len(candidates) != len(values):
            raise ValueError(f"{self.name} tell: {len(candidates)} candidates but {len(values)} "
                             "values (give one entry per candidate, None for a failure)")

    def _reject_options(self, options: dict[str, Any], known: Sequence[str]) -> None:
        """Raise for option names the strategy does not know (typos must not pass silently)."""
        if options:
            raise ValueError(f"{self.name} options: unknown {', '.join(sorted(options))}; "
                             f"known: popsize, {', '.join(known)}")


STRATEGIES: dict[str, Callable[..., Strategy]] = {}


def register(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator: make a strategy available to experiments by name."""
    def wrap(cls: type[Strategy]) -> type[Strategy]:
        if name in STRATEGIES:
            raise ValueError(f"strategy {name!r} is already registered")
        cls.name = name
        STRATEGIES[name] = cls
        return cls
    return wrap


def make_strategy(name: str, **kwargs: Any) -> Strategy:
    """Build a registered strategy: ``make_strategy("cmaes", lower=..., upper=...,
    directions=[...], seed=0, popsize=None, **options)``."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        known = ", ".join(sorted(STRATEGIES))
        raise KeyError(f"unknown strategy {name!r}; known: {known}") from None
    return cls(**kwargs)
