"""``random``: uniform random search in the box, the baseline every other strategy must beat.

Options: ``popsize`` (candidates per ``ask()``), default 8 — the size of a driver generation
only; random search learns nothing, so the value changes no candidate, only how many are asked
(and evaluated in parallel) at a time.

Determinism: the points come from the strategy's own ``numpy.random.default_rng(seed)``; the
k-th candidate asked is the same whatever values were told and however the asks were grouped
(``ask(3)`` then ``ask(5)`` gives the points of one ``ask(8)``). Told values only feed the
failure penalty bookkeeping shared by every strategy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from evomerge.search.base import Candidate, Direction, Result, Strategy, register


@register("random")
class RandomSearch(Strategy):
    """Uniform samples in ``[lower, upper)``."""

    generational = False

    def __init__(self, lower: Sequence[float], upper: Sequence[float],
                 directions: Sequence[Direction], *, seed: int = 0, popsize: int | None = None,
                 **options: Any) -> None:
        super().__init__(lower, upper, directions, seed=seed, popsize=popsize)
        self._reject_options(options, ())
        self._rng = np.random.default_rng(self.seed)

    def _ask(self, n: int) -> list[np.ndarray]:
        # One uniform draw per coordinate, row by row: the stream does not depend on grouping.
        X = self.lower + self._rng.random((n, self.dim)) * (self.upper - self.lower)
        return [np.minimum(x, np.nextafter(self.upper, self.lower)) for x in X]

    def _tell(self, candidates: list[Candidate], results: list[Result]) -> None:
        """Learns nothing (the base's penalty bookkeeping has seen the values)."""
