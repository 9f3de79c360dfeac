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

from evomerge.search.base import Candidate, Direction, Strategy, register


@register("random")
class RandomSearch(Strategy):
    """Uniform samples in ``[lower, upper)``."""

    def __init__(self, lower: Sequence[float], upper: Sequence[float],
                 directions: Sequence[Direction], *, seed: int = 0, popsize: int | None = None,
                 **options: Any) -> None:
        super().__init__(lower, upper, directions, seed=seed, popsize=popsize)
        self._reject_options(options, ())
        popsize = 8 if popsize is None else popsize
        if isinstance(popsize, bool) or not isinstance(popsize, (int, np.integer)) or popsize < 1:
            raise ValueError(f"popsize: a positive integer, got {popsize!r}")
        self._popsize = int(popsize)
        self._rng = np.random.default_rng(self.seed)
        self._asked = 0
        self._told: set[int] = set()

    @property
    def popsize(self) -> int:
        return self._popsize

    def ask(self, n: int | None = None) -> list[Candidate]:
        n = self._popsize if n is None else n
        if n < 1:
            raise ValueError(f"random ask: n must be >= 1, got {n}")
        # One uniform draw per coordinate, row by row: the stream does not depend on grouping.
        X = self.lower + self._rng.random((n, self.dim)) * (self.upper - self.lower)
        out = [Candidate(x=np.minimum(x, np.nextafter(self.upper, self.lower)),
                         generation=self.generation, index=i,
                         meta={"serial": self._asked + i}) for i, x in enumerate(X)]
        self._asked += n
        self.generation += 1
        return out

    def tell(self, candidates: Sequence[Candidate],
             values: Sequence[Sequence[float] | None]) -> None:
        self._check_tell(candidates, values)
        serials = [c.meta.get("serial") for c in candidates]
        bad = [s for s in serials if s is None or not 0 <= s < self._asked or s in self._told]
        if bad or len(set(serials)) != len(serials):
            raise ValueError(f"random tell: candidates {bad or serials} were not asked or were "
                             "told twice (meta['serial'] identifies them)")
        self._told.update(serials)
        self._note_values(values)
