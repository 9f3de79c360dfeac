"""The ``cmaes`` strategy against pycma itself and against known optima."""

from __future__ import annotations

import math

import cma
import numpy as np
import pytest

from evomerge.search import make_strategy


def bare_cma_generations(d, seed, popsize, sigma0, generations, f, diagonal=False):
    """A plain pycma ask/tell loop in [0, 1]^d with cma's own (global np.random) seeding."""
    state = np.random.get_state()
    try:
        es = cma.CMAEvolutionStrategy(np.full(d, 0.5), sigma0, {
            "bounds": [0, 1], "seed": seed, "popsize": popsize, "CMA_diagonal": diagonal,
            "verbose": -9, "verb_log": 0, "verb_disp": 0})
        out = []
        for _ in range(generations):
            Z = es.ask()
            out.append(np.array(Z))
            es.tell(Z, [f(np.asarray(z)) for z in Z])
        return out
    finally:
        np.random.set_state(state)


def sphere_at(opt):
    return lambda x: float(np.sum((x - opt) ** 2))


@pytest.mark.parametrize("diagonal", [False, True])
def test_asks_exactly_what_bare_cma_asks_with_the_same_seed_and_options(diagonal):
    d, seed, popsize, sigma0 = 4, 5, 7, 0.3
    f = sphere_at(np.array([0.2, 0.9, 0.5, 0.35]))
    expected = bare_cma_generations(d, seed, popsize, sigma0, 6, f, diagonal)
    strategy = make_strategy("cmaes", lower=[0] * d, upper=[1] * d, directions=["minimize"],
                             seed=seed, popsize=popsize, sigma0=sigma0, diagonal=diagonal)
    for Z in expected:
        cands = strategy.ask()
        X = np.stack([c.x for c in cands])
        assert np.array_equal(X, Z)  # in the unit box x is z, bit for bit
        strategy.tell(cands, [[f(x)] for x in X])


def test_works_in_normalised_coordinates_of_any_box():
    lower, upper = np.array([-10.0, 0.0, 100.0]), np.array([10.0, 0.001, 300.0])
    unit = make_strategy("cmaes", lower=[0] * 3, upper=[1] * 3, directions=["minimize"], seed=2)
    boxed = make_strategy("cmaes", lower=lower, upper=upper, directions=["minimize"], seed=2)
    f = sphere_at(np.array([0.6, 0.1, 0.8]))
    for _ in range(5):
        cu, cb = unit.ask(), boxed.ask()
        Z = np.stack([c.x for c in cu])
        assert np.array_equal(np.stack([c.x for c in cb]),
                              np.clip(lower + Z * (upper - lower), lower, upper))
        unit.tell(cu, [[f(z)] for z in Z])
        boxed.tell(cb, [[f(z)] for z in Z])  # same fitness of the normalised point


def test_default_popsize_and_step_size_are_cmas_and_a_quarter_of_the_box():
    strategy = make_strategy("cmaes", lower=[0] * 10, upper=[4] * 10, directions=["minimize"])
    assert strategy.popsize == 4 + math.floor(3 * math.log(10)) == 10
    assert strategy.sigma0 == 0.25
    X = np.stack([c.x for c in strategy.ask()])
    # Samples are centred on the box centre with a spread of about 0.25 * width = 1.
    assert abs(X.mean() - 2.0) < 0.5 and 0.5 < X.std() < 1.5


def run_to(strategy, f, opt, width, budget):
    """Evaluations until a candidate is within 1e-3 (per coordinate, relative to the box)."""
    n = 0
    while n < budget:
        cands = strategy.ask()
        n += len(cands)
        if min(np.max(np.abs(c.x - opt) / width) for c in cands) < 1e-3:
            return n
        strategy.tell(cands, [[f(c.x)] for c in cands])
    return None


@pytest.mark.parametrize("direction,sign", [("minimize", 1.0), ("maximize", -1.0)])
def test_converges_on_a_sphere_or_a_negative_sphere(direction, sign):
    lower, upper = np.full(5, -1.0), np.full(5, 3.0)
    opt = np.array([-0.5, 0.25, 1.0, 2.0, 3.0])  # the last coordinate sits on the bound
    f = lambda x: sign * float(np.sum((x - opt) ** 2))  # noqa: E731
    strategy = make_strategy("cmaes", lower=lower, upper=upper, directions=[direction], seed=1)
    n = run_to(strategy, f, opt, upper - lower, budget=1500)
    assert n is not None and n <= 1500


def test_maximising_f_asks_exactly_what_minimising_minus_f_asks():
    f = sphere_at(np.array([0.1, 0.8, 0.4]))
    mins = make_strategy("cmaes", lower=[0] * 3, upper=[1] * 3, directions=["minimize"], seed=8)
    maxs = make_strategy("cmaes", lower=[0] * 3, upper=[1] * 3, directions=["maximize"], seed=8)
    for _ in range(5):
        a, b = mins.ask(), maxs.ask()
        assert all(np.array_equal(p.x, q.x) for p, q in zip(a, b))
        mins.tell(a, [[f(c.x)] for c in a])
        maxs.tell(b, [[-f(c.x)] for c in b])


def test_one_dimension_works_although_pycma_fails_on_it():
    f = sphere_at(np.array([0.7]))
    strategy = make_strategy("cmaes", lower=[0.0], upper=[2.0], directions=["minimize"], seed=0)
    assert strategy.popsize == 6  # cma's default for the padded 2-D problem
    n = run_to(strategy, f, np.array([0.7]), np.array([2.0]), budget=600)
    assert n is not None


def test_x0_starts_the_search_there():
    strategy = make_strategy("cmaes", lower=[0, 0], upper=[10, 10], directions=["minimize"],
                             x0=[1.0, 9.0], sigma0=0.01, seed=0)
    X = np.stack([c.x for c in strategy.ask()])
    assert np.allclose(X.mean(axis=0), [1.0, 9.0], atol=0.3)


@pytest.mark.parametrize("options,message", [
    ({"directions": ["minimize", "maximize"]}, "directions: cmaes optimises one objective"),
    ({"popsize": 1}, "popsize: cmaes needs an integer >= 2"),
    ({"sigma0": 2.0}, "sigma0"),
    ({"x0": [0.5, 5.0]}, r"x0\[1\]: 5.0 is outside the bounds"),
    ({"cma_options": {"seed": 3}}, "cma_options: seed are set by the cmaes strategy"),
    ({"cma_options": {"CMA_activ": False}}, "unknown cma option"),
])
def test_bad_options_are_refused_with_the_field_named(options, message):
    kwargs = {"lower": [0, 0], "upper": [1, 1], "directions": ["minimize"], **options}
    with pytest.raises(ValueError, match=message):
        make_strategy("cmaes", **kwargs)


def test_cma_options_pass_through():
    strategy = make_strategy("cmaes", lower=[0] * 3, upper=[1] * 3, directions=["minimize"],
                             cma_options={"CMA_stds": [1.0, 1.0, 1e-3]})  # per-coordinate sigma
    X = np.stack([c.x for c in strategy.ask()])
    assert X[:, 0].std() > 0.05 and np.all(np.abs(X[:, 2] - 0.5) < 0.01)


def test_nothing_is_printed_or_written(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cma_signals.in").write_text("{'popsize': 99}")  # must not be read
    strategy = make_strategy("cmaes", lower=[0] * 3, upper=[1] * 3, directions=["minimize"])
    for _ in range(30):
        cands = strategy.ask()
        assert len(cands) == strategy.popsize == 7
        strategy.tell(cands, [[1.0]] * len(cands))  # flat fitness: cma would warn
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cma_signals.in"]
    out, err = capfd.readouterr()
    assert out == "" and err == ""
