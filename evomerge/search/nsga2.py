"""``nsga2``: NSGA-II from pymoo, driven through pymoo's own ask/tell.

One objective per task; the non-dominated set of everything evaluated is the result (the store
computes it). Works for a single objective too (rank-and-crowding then reduces to truncation
selection with a diversity tie-break). pymoo minimises, so maximised objectives are negated.

Options (experiment YAML ``strategy.options``):

``popsize``       population size and offspring per generation (pymoo ``pop_size`` =
                  ``n_offsprings``); default 20. pymoo's default of 100 assumes cheap evaluations;
                  a merge costs seconds and budgets are hundreds of evaluations, and 20 still
                  gives a front of up to 20 points after 10+ generations at 200-500 evaluations.
``sampling``      initial population: ``random`` (uniform, pymoo's default) or ``lhs`` (Latin
                  hypercube; spreads the first generation more evenly in few samples).
``crossover_eta`` SBX distribution index, default 15 (pymoo's); ``crossover_prob`` the chance a
                  mating pair is crossed at all, default 0.9 (pymoo's).
``mutation_eta``  polynomial-mutation index, default 20 (pymoo's); ``mutation_prob`` the
                  per-variable mutation probability, default None = pymoo's 1/d.
``eliminate_duplicates`` default true (pymoo's): offspring identical to an existing point are
                  re-drawn. In a continuous space that almost never fires; if pymoo still cannot
                  fill a generation after its 100 mating attempts it returns fewer offspring, and
                  ``ask()`` then returns fewer than ``popsize`` candidates: drivers should count
                  ``len(ask())``, not ``popsize``.

Determinism: pymoo 0.6.2 draws every random number from ``algorithm.random_state``, a
``numpy.random.Generator`` that ``setup(seed=...)`` creates; the global ``np.random`` state is
not used (checked in the tests by disturbing it between asks). Every operator object is
constructed fresh per strategy (pymoo's ``NSGA2`` uses shared default-argument instances). The
ask/tell sequence here reproduces ``pymoo.optimize.minimize(problem, NSGA2(pop_size=...),
('n_gen', G), seed=s)`` population for population.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from evomerge.search.base import Candidate, Direction, Result, Strategy, register


@register("nsga2")
class NSGA2Strategy(Strategy):
    """NSGA-II (pymoo); see the module docstring for options."""

    default_popsize = 20
    min_popsize = 2

    def __init__(self, lower: Sequence[float], upper: Sequence[float],
                 directions: Sequence[Direction], *, seed: int = 0, popsize: int | None = None,
                 sampling: str = "random", crossover_eta: float = 15.0,
                 crossover_prob: float = 0.9, mutation_eta: float = 20.0,
                 mutation_prob: float | None = None, eliminate_duplicates: bool = True,
                 **options: Any) -> None:
        super().__init__(lower, upper, directions, seed=seed, popsize=popsize)
        self._reject_options(options, ("sampling", "crossover_eta", "crossover_prob",
                                       "mutation_eta", "mutation_prob", "eliminate_duplicates"))
        from pymoo.algorithms.moo.nsga2 import NSGA2, RankAndCrowding, binary_tournament
        from pymoo.core.problem import Problem
        from pymoo.operators.crossover.sbx import SBX
        from pymoo.operators.mutation.pm import PM
        from pymoo.operators.sampling.lhs import LHS
        from pymoo.operators.sampling.rnd import FloatRandomSampling
        from pymoo.operators.selection.tournament import TournamentSelection

        samplers = {"random": FloatRandomSampling, "lhs": LHS}
        if sampling not in samplers:
            raise ValueError(f"sampling: {sampling!r} is not one of {', '.join(samplers)}")
        for key, val in (("crossover_eta", crossover_eta), ("mutation_eta", mutation_eta)):
            if not (isinstance(val, (int, float)) and val > 0):
                raise ValueError(f"{key}: a positive number, got {val!r}")
        for key, val in (("crossover_prob", crossover_prob), ("mutation_prob", mutation_prob)):
            if val is not None and not (isinstance(val, (int, float)) and 0 <= val <= 1):
                raise ValueError(f"{key}: a probability in [0, 1], got {val!r}")

        self._problem = Problem(n_var=self.dim, n_obj=len(self.directions),
                                xl=self.lower.copy(), xu=self.upper.copy())
        self._algorithm = NSGA2(
            pop_size=self.popsize,
            sampling=samplers[sampling](),
            selection=TournamentSelection(func_comp=binary_tournament),
            crossover=SBX(eta=crossover_eta, prob=crossover_prob),
            mutation=PM(eta=mutation_eta, prob_var=mutation_prob),
            survival=RankAndCrowding(),
            eliminate_duplicates=bool(eliminate_duplicates),
        )
        # A termination that never fires: the driver stops at its evaluation budget.
        self._algorithm.setup(self._problem, seed=self.seed, termination=("n_gen", 2**62))
        self._sign = np.array([-1.0 if d == "maximize" else 1.0 for d in self.directions])
        self._population = None  # the pymoo Population last asked

    def _ask(self, n: int) -> list[np.ndarray]:
        self._population = self._algorithm.ask()
        X = np.asarray(self._population.get("X"), dtype=float)
        return [np.clip(x, self.lower, self.upper) for x in X]

    def _tell(self, candidates: list[Candidate], results: list[Result]) -> None:
        from pymoo.core.evaluator import Evaluator
        from pymoo.problems.static import StaticProblem

        F = np.asarray([r.values for r in results], dtype=float) * self._sign
        # pymoo's documented ask/tell evaluation: a StaticProblem hands back the given F and
        # sets the feasibility bookkeeping (CV, FEAS) that survival reads.
        Evaluator().eval(StaticProblem(self._problem, F=F), self._population)
        self._algorithm.tell(infills=self._population)
