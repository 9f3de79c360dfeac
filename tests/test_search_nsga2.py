"""The ``nsga2`` strategy against pymoo's own ``minimize`` and an analytic Pareto front.

Bi-sphere: f1 = |x - a|^2, f2 = |x - b|^2. Its Pareto set is the segment from a to b, its front
f2 = (sqrt(D) - sqrt(f1))^2 for f1 in [0, D], D = |a - b|^2, so the hypervolume against the
reference point (R, R), R >= D, is R^2 - integral_0^D (sqrt(D) - sqrt(f))^2 df = R^2 - D^2 / 6.
"""

from __future__ import annotations

import numpy as np
import pytest
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.problem import Problem
from pymoo.indicators.hv import HV
from pymoo.optimize import minimize
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from evomerge.search import make_strategy

D_VAR = 3
LOWER, UPPER = np.full(D_VAR, -1.0), np.full(D_VAR, 2.0)
A, B = np.zeros(D_VAR), np.ones(D_VAR)


def bi_sphere(X: np.ndarray) -> np.ndarray:
    X = np.atleast_2d(X)
    return np.stack([np.sum((X - A) ** 2, axis=1), np.sum((X - B) ** 2, axis=1)], axis=1)


class BiSphere(Problem):
    def __init__(self):
        super().__init__(n_var=D_VAR, n_obj=2, xl=LOWER, xu=UPPER)

    def _evaluate(self, X, out, *args, **kwargs):
        out["F"] = bi_sphere(X)


def run(strategy, generations, f):
    """All evaluated (X, F) of a whole-generation ask/tell loop."""
    xs, fs = [], []
    for _ in range(generations):
        cands = strategy.ask()
        X = np.stack([c.x for c in cands])
        F = f(X)
        strategy.tell(cands, F.tolist())
        xs.append(X)
        fs.append(F)
    return np.concatenate(xs), np.concatenate(fs)


def front_hypervolume(F: np.ndarray) -> float:
    R = 1.1 * D_VAR
    nd = F[NonDominatedSorting().do(F, only_non_dominated_front=True)]
    return HV(ref_point=np.array([R, R]))(nd) / (R * R - D_VAR**2 / 6)


def test_asks_exactly_the_offspring_pymoo_minimize_evaluates_with_the_same_seed():
    generations, popsize, seed = 8, 12, 4
    res = minimize(BiSphere(), NSGA2(pop_size=popsize), ("n_gen", generations), seed=seed,
                   save_history=True)
    assert len(res.history) == generations
    strategy = make_strategy("nsga2", lower=LOWER, upper=UPPER,
                             directions=["minimize", "minimize"], seed=seed, popsize=popsize)
    for g, snapshot in enumerate(res.history):
        cands = strategy.ask()
        X = np.stack([c.x for c in cands])
        assert np.array_equal(X, snapshot.off.get("X")), g  # bit for bit
        strategy.tell(cands, bi_sphere(X).tolist())


def test_front_reaches_the_analytic_hypervolume_and_beats_random_search():
    budget_gens, popsize = 25, 20
    for seed in (0, 1):
        nsga2 = make_strategy("nsga2", lower=LOWER, upper=UPPER, seed=seed, popsize=popsize,
                              directions=["minimize", "minimize"])
        rand = make_strategy("random", lower=LOWER, upper=UPPER, seed=seed, popsize=popsize,
                             directions=["minimize", "minimize"])
        hv_nsga2 = front_hypervolume(run(nsga2, budget_gens, bi_sphere)[1])
        hv_random = front_hypervolume(run(rand, budget_gens, bi_sphere)[1])
        assert hv_nsga2 > 0.97, (seed, hv_nsga2)  # measured 0.98-0.99 at 500 evaluations
        assert hv_nsga2 > hv_random + 0.05, (seed, hv_nsga2, hv_random)


@pytest.mark.parametrize("directions", [["maximize", "maximize"], ["maximize", "minimize"]])
def test_maximising_is_minimising_the_negation(directions):
    sign = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    mins = make_strategy("nsga2", lower=LOWER, upper=UPPER, directions=["minimize"] * 2,
                         seed=2, popsize=10)
    maxs = make_strategy("nsga2", lower=LOWER, upper=UPPER, directions=directions,
                         seed=2, popsize=10)
    xa, _ = run(mins, 6, bi_sphere)
    xb, _ = run(maxs, 6, lambda X: bi_sphere(X) * sign)
    assert np.array_equal(xa, xb)


def test_single_objective_converges():
    strategy = make_strategy("nsga2", lower=LOWER, upper=UPPER, directions=["minimize"], seed=0,
                             popsize=20)
    _, F = run(strategy, 30, lambda X: bi_sphere(X)[:, :1])
    assert F.min() < 1e-3  # the sphere's optimum is a, inside the box


def test_latin_hypercube_first_generation_fills_every_stratum():
    strategy = make_strategy("nsga2", lower=LOWER, upper=UPPER, directions=["minimize"] * 2,
                             popsize=10, sampling="lhs")
    X = np.stack([c.x for c in strategy.ask()])
    strata = np.floor((X - LOWER) / (UPPER - LOWER) * 10).astype(int)
    assert all(sorted(strata[:, j]) == list(range(10)) for j in range(D_VAR))


@pytest.mark.parametrize("options,message", [
    ({"popsize": 1}, "popsize: nsga2 needs an integer >= 2"),
    ({"sampling": "sobol"}, "sampling: 'sobol' is not one of random, lhs"),
    ({"crossover_prob": 1.5}, "crossover_prob"),
    ({"mutation_eta": 0}, "mutation_eta"),
])
def test_bad_options_are_refused_with_the_field_named(options, message):
    with pytest.raises(ValueError, match=message):
        make_strategy("nsga2", lower=LOWER, upper=UPPER, directions=["minimize"], **options)
