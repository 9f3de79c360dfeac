"""``cmaes``: CMA-ES from the ``cma`` package (pycma), behind the ask/tell interface.

The search runs in the normalised box ``[0, 1]^d``: ``x = lower + z * (upper - lower)``, so
``sigma0`` and ``x0``'s spread are relative to each coordinate's range and every coordinate is
equally sensitive to the step size. Bounds are cma's own ``bounds=[0, 1]`` (its default
``BoundTransform``: samples are mapped smoothly into the box, never rejected or clipped hard).

Options (experiment YAML ``strategy.options``):

``popsize``  candidates per generation; default cma's ``4 + floor(3 ln d)`` (8 at d = 5, 15 at
             d = 50). Larger helps on noisy or multimodal fitness (IPOP doubles it) at the cost of
             fewer generations per budget.
``sigma0``   initial step size as a fraction of each coordinate's range; default 0.25. pycma's
             guidance is "about 1/4th of the search domain width" (``cma.fmin``) with the optimum
             expected within ``x0 +- 3 sigma0``: from the centre, 0.25 reaches the whole box at
             2 sigma without piling samples onto the bounds. (Optuna's CmaEsSampler uses 1/6.)
``x0``       initial mean in the space's own coordinates (a list of ``d`` numbers or one number
             for all); default the box centre.
``diagonal`` ``true`` for separable CMA-ES (cma's ``CMA_diagonal=True``: a diagonal covariance,
             O(d) per sample instead of O(d^2) and a faster-learning step size per coordinate);
             worth it above ~100 dimensions. An integer keeps the covariance diagonal for that
             many generations, then goes full. Default ``false`` (full covariance).
``cma_options`` any other ``cma.CMAOptions`` entry (e.g. ``CMA_active``, ``CMA_mirrors``),
             passed through; the ones this wrapper owns (bounds, seed, randn, popsize, verbosity,
             logging) are refused.

Determinism: cma draws its normal samples through its ``randn`` option; this wrapper gives it the
bound ``randn`` of its own ``numpy.random.RandomState(seed)`` and sets cma's ``seed`` option to
NaN ("do nothing"). So the global ``np.random`` state is neither read nor written, other code
that uses ``np.random`` in between cannot change the candidates, and seed 0 is an ordinary seed
(cma itself treats ``seed=0`` as "seed from the clock"). Because ``RandomState(s).randn`` is the
stream that cma's own ``seed=s`` produces through ``np.random.seed(s)``, a run with seed ``s >= 1``
asks exactly the points a bare ``cma.CMAEvolutionStrategy(z0, sigma0, {'seed': s, ...})`` would.
Bit-for-bit replay holds on one machine and numpy/BLAS build (cma's eigendecomposition goes
through LAPACK).

cma's own stopping criteria (tolfun, tolx, ...) are not consulted: the driver stops at its
evaluation budget. Nothing is printed and no ``outcmaes/`` files or ``cma_signals.in`` lookups
happen (``verbose=-9``, ``verb_log=0``, ``verb_disp=0``, ``signals_filename=''``).

Single objective only; use ``nsga2`` or ``optuna`` (nsgaii, tpe, gp) for several objectives.

Dimension 1: pycma 4.5 fails in ``tell`` for a 1-D problem with bounds (``_stds_into_limits`` on
a one-element scaling vector raises "not yet initialized"), so a 1-D space runs as 2-D with a
second, fitness-free coordinate that is dropped from every candidate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from evomerge.search.base import Candidate, Direction, Result, Strategy, register

# cma options this wrapper sets itself; cma_options may not override them.
_OWNED = ("bounds", "seed", "randn", "popsize", "CMA_diagonal", "verbose", "verb_log",
          "verb_disp", "verb_filenameprefix", "verb_append", "signals_filename")


@register("cmaes")
class CMAES(Strategy):
    """CMA-ES (pycma) in the normalised box; see the module docstring for options."""

    min_popsize = 2

    @property
    def default_popsize(self) -> int:  # type: ignore[override]
        """cma's ``4 + floor(3 ln d)``, for the padded dimension (see "Dimension 1")."""
        return 4 + math.floor(3 * math.log(max(self.dim, 2)))

    def __init__(self, lower: Sequence[float], upper: Sequence[float],
                 directions: Sequence[Direction], *, seed: int = 0, popsize: int | None = None,
                 sigma0: float = 0.25, x0: float | Sequence[float] | None = None,
                 diagonal: bool | int = False, cma_options: dict[str, Any] | None = None,
                 **options: Any) -> None:
        super().__init__(lower, upper, directions, seed=seed, popsize=popsize)
        self._reject_options(options, ("sigma0", "x0", "diagonal", "cma_options"))
        if len(self.directions) != 1:
            raise ValueError(f"directions: cmaes optimises one objective, got "
                             f"{len(self.directions)} {self.directions}; use nsga2 or optuna "
                             "(sampler: nsgaii, tpe or gp) for several")
        import cma  # imported here: pycma pulls in scipy.stats and matplotlib (~1 s)

        d = self.dim
        n = max(d, 2)  # see "Dimension 1" in the module docstring
        if not (isinstance(sigma0, (int, float)) and 0 < sigma0 <= 1):
            raise ValueError(f"sigma0: a fraction of each coordinate's range in (0, 1], "
                             f"got {sigma0!r}")
        z0 = np.full(n, 0.5)
        if x0 is not None:
            x0a = np.broadcast_to(np.asarray(x0, dtype=float), (d,))
            outside = (x0a < self.lower) | (x0a > self.upper)
            if outside.any():
                i = int(np.argmax(outside))
                raise ValueError(f"x0[{i}]: {x0a[i]} is outside the bounds "
                                 f"[{self.lower[i]}, {self.upper[i]}]")
            z0[:d] = (x0a - self.lower) / (self.upper - self.lower)
        if not isinstance(diagonal, (bool, int, np.integer)) or diagonal < 0:
            raise ValueError(f"diagonal: true, false or a number of generations, got {diagonal!r}")
        extra = dict(cma_options or {})
        owned = sorted(set(extra) & set(_OWNED))
        if owned:
            raise ValueError(f"cma_options: {', '.join(owned)} are set by the cmaes strategy "
                             "(use its own options popsize, diagonal, seed)")
        known = cma.CMAOptions()
        unknown = sorted(k for k in extra if k not in known)
        if unknown:
            raise ValueError(f"cma_options: unknown cma option(s) {', '.join(unknown)} "
                             "(see cma.CMAOptions())")

        self._rng = np.random.RandomState(self.seed)
        opts = {
            **extra,
            "bounds": [0.0, 1.0],
            "popsize": self.popsize,
            "CMA_diagonal": diagonal,
            "seed": float("nan"),  # cma: "NaN means do nothing"; sampling uses randn below
            "randn": self._rng.randn,
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
            "signals_filename": "",
        }
        self.sigma0 = float(sigma0)
        self._es = cma.CMAEvolutionStrategy(z0, self.sigma0, opts)
        self._sign = -1.0 if self.directions[0] == "maximize" else 1.0
        self._asked_z: list[np.ndarray] = []  # the pending generation in cma's [0, 1] box

    @property
    def sigma(self) -> float:
        """The current overall step size (normalised units)."""
        return float(self._es.sigma)

    def _ask(self, n: int) -> list[np.ndarray]:
        self._asked_z = [np.asarray(z) for z in self._es.ask()]
        span = self.upper - self.lower
        return [np.clip(self.lower + z[:self.dim] * span, self.lower, self.upper)
                for z in self._asked_z]

    def _tell(self, candidates: list[Candidate], results: list[Result]) -> None:
        self._es.tell(self._asked_z, [self._sign * r.values[0] for r in results])
