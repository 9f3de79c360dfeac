"""The ask/tell contract, checked for every built-in strategy.

Determinism is the contract resume relies on: a fresh strategy built with the same arguments and
told the same values in the same order asks the same candidates, bit for bit, also when other
code draws from the global RNGs in between and in another process with another hash seed.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import evomerge.search as search
from evomerge.search import STRATEGIES, Candidate, Strategy, make_strategy

LOWER = [-1.0, 0.0, 0.0, -2.0]
UPPER = [2.0, 1.0, 0.5, 2.0]
TARGET = np.array([0.3, 0.7, 0.1, -1.5])

# (id, strategy name, options, supports several objectives)
CONFIGS = [
    ("cmaes", "cmaes", {}, False),
    ("cmaes-diagonal", "cmaes", {"diagonal": True, "popsize": 6}, False),
    ("nsga2", "nsga2", {"popsize": 8}, True),
    ("optuna-tpe", "optuna", {"sampler": "tpe", "popsize": 6,
                              "sampler_options": {"n_startup_trials": 6}}, True),
    ("optuna-cmaes", "optuna", {"sampler": "cmaes", "popsize": 6}, False),
    ("optuna-nsgaii", "optuna", {"sampler": "nsgaii", "popsize": 6}, True),
    # GPSampler costs ~0.2 s per candidate here (~0.4 s with two objectives): keep it short
    # and single-objective (its two-objective replay is in test_search_optuna.py).
    ("optuna-gp", "optuna", {"sampler": "gp", "popsize": 3,
                             "sampler_options": {"n_startup_trials": 2}}, False),
    ("optuna-random", "optuna", {"sampler": "random"}, True),
    ("optuna-qmc", "optuna", {"sampler": "qmc"}, True),
    ("random", "random", {}, True),
]
IDS = [c[0] for c in CONFIGS]
MULTI = [c for c in CONFIGS if c[3]]


def build(name: str, options: dict, n_obj: int = 1, seed: int = 3) -> Strategy:
    return make_strategy(name, lower=LOWER, upper=UPPER, directions=["minimize"] * n_obj,
                         seed=seed, **options)


def objectives(x: np.ndarray, n_obj: int) -> list[float]:
    f = [float(np.sum((x - TARGET) ** 2)), float(np.sum((x + TARGET) ** 2))]
    return f[:n_obj]


def drive(strategy: Strategy, generations: int, n_obj: int = 1, disturb: bool = False):
    """Ask/evaluate/tell whole generations; one failure (None) and one NaN on the way.

    Returns the asked points and the told values per generation."""
    record = []
    for g in range(generations):
        cands = strategy.ask()
        X = np.stack([c.x for c in cands])
        values = [objectives(c.x, n_obj) for c in cands]
        if g == 1:
            values[0] = None
            values[-1] = [float("nan")] * n_obj
        if disturb:  # other code using the global RNGs must not change what is asked
            np.random.seed(12345)
            np.random.rand(7)
            random.seed(99)
            random.random()
            import torch  # Optuna's GPSampler computes with torch

            torch.manual_seed(7)
            torch.rand(3)
        strategy.tell(cands, values)
        record.append((X, values))
    return record


def test_importing_the_package_registers_the_builtin_strategies():
    assert {"cmaes", "nsga2", "optuna", "random"} <= set(STRATEGIES)
    assert all(issubclass(cls, Strategy) for cls in STRATEGIES.values())
    assert search.STRATEGIES is STRATEGIES


def test_unknown_strategy_name_lists_the_known_ones():
    known = "cmaes, (.*, )?nsga2, optuna"  # sorted; other strategies may sit in between
    with pytest.raises(KeyError, match=f"unknown strategy 'nope'; known: {known}"):
        make_strategy("nope", lower=[0], upper=[1], directions=["minimize"])


@pytest.mark.parametrize("name", ["cmaes", "nsga2", "optuna", "random"])
def test_unknown_option_is_refused_by_name(name):
    with pytest.raises(ValueError, match=f"{name} options: unknown sigma_zero"):
        make_strategy(name, lower=[0, 0], upper=[1, 1], directions=["minimize"], sigma_zero=0.1)


@pytest.mark.parametrize("seed", [-1, None, 1.5, 2**32])
def test_seed_must_be_a_fixed_integer(seed):
    with pytest.raises(ValueError, match="seed"):
        make_strategy("random", lower=[0], upper=[1], directions=["minimize"], seed=seed)


def test_reversed_bounds_and_bad_directions_are_refused():
    with pytest.raises(ValueError, match=r"bounds\[1\]: lower 1.0 is not below upper 0.0"):
        make_strategy("random", lower=[0, 1], upper=[1, 0], directions=["minimize"])
    with pytest.raises(ValueError, match="directions"):
        make_strategy("random", lower=[0], upper=[1], directions=["max"])


@pytest.mark.parametrize("cid,name,options,multi", CONFIGS, ids=IDS)
def test_candidates_lie_in_bounds_and_number_popsize(cid, name, options, multi):
    strategy = build(name, options)
    for g, (X, _) in enumerate(drive(strategy, 2)):
        assert X.shape == (strategy.popsize, len(LOWER))
        assert np.all(X >= LOWER) and np.all(X <= UPPER), cid


@pytest.mark.parametrize("cid,name,options,multi", CONFIGS, ids=IDS)
def test_replaying_stored_values_into_a_fresh_strategy_asks_the_same_candidates(
        cid, name, options, multi):
    n_obj = 2 if multi else 1
    uninterrupted = build(name, options, n_obj)
    original = drive(uninterrupted, 2, n_obj, disturb=True)  # the second one has failures
    replayed = build(name, options, n_obj)
    for X, values in original:
        cands = replayed.ask()
        assert np.array_equal(np.stack([c.x for c in cands]), X), cid  # bit for bit
        replayed.tell(cands, values)
    # ...and it goes on exactly as the uninterrupted run does.
    assert np.array_equal(np.stack([c.x for c in replayed.ask()]),
                          np.stack([c.x for c in uninterrupted.ask()]))
    # The seed matters.
    other = drive(build(name, options, n_obj, seed=4), 1, n_obj)
    assert not np.array_equal(other[0][0], original[0][0])


@pytest.mark.parametrize("cid,name,options,multi", CONFIGS, ids=IDS)
def test_failed_evaluations_get_the_penalty_and_the_search_goes_on(cid, name, options, multi):
    strategy = build(name, options)
    assert strategy.penalty() == [0.0]  # nothing seen yet
    cands = strategy.ask()
    strategy.tell(cands, [None] * len(cands))  # a whole generation fails
    cands = strategy.ask()
    values = [[float(i)] for i in range(len(cands))]
    values[0], values[1] = None, [float("inf")]
    strategy.tell(cands, values)
    assert strategy.penalty() == [float(len(cands) - 1)]  # the worst finite value seen
    cands = strategy.ask()
    assert len(cands) == strategy.popsize
    assert all(np.all(np.isfinite(c.x)) for c in cands)


def test_penalty_is_the_worst_value_per_objective_in_each_direction():
    strategy = make_strategy("random", lower=[0], upper=[1],
                             directions=["maximize", "minimize"], popsize=3)
    cands = strategy.ask()
    strategy.tell(cands, [[0.9, 5.0], None, [0.2, 1.0]])
    assert strategy.penalty() == [0.2, 5.0]


def test_a_value_with_the_wrong_number_of_objectives_is_refused():
    strategy = make_strategy("random", lower=[0], upper=[1], directions=["minimize"] * 2,
                             popsize=2)
    cands = strategy.ask()
    with pytest.raises(ValueError, match=r"values\[1\]: 1 objective value\(s\) for 2"):
        strategy.tell(cands, [[1.0, 2.0], [3.0]])
    with pytest.raises(ValueError, match="2 candidates but 1 values"):
        strategy.tell(cands, [[1.0, 2.0]])


@pytest.mark.parametrize("name,options", [("cmaes", {}), ("nsga2", {"popsize": 6})])
def test_generational_strategies_want_whole_generations_in_order(name, options):
    strategy = build(name, options)
    with pytest.raises(RuntimeError, match="ask first"):
        strategy.tell([], [])
    cands = strategy.ask()
    with pytest.raises(RuntimeError, match="asked but not told"):
        strategy.ask()
    with pytest.raises(ValueError, match="whole generation 0"):
        strategy.tell(cands[:-1], [[1.0]] * (len(cands) - 1))
    with pytest.raises(ValueError, match="n must be None or popsize"):
        build(name, options).ask(strategy.popsize + 1)
    strategy.tell(cands, [[1.0]] * len(cands))
    assert strategy.ask()[0].generation == 1


@pytest.mark.parametrize("cid,name,options,multi", CONFIGS, ids=IDS)
def test_the_global_numpy_rng_is_left_alone(cid, name, options, multi):
    np.random.seed(2024)
    before = np.random.get_state()[1].copy()
    drive(build(name, options), 2)
    assert np.array_equal(np.random.get_state()[1], before), cid


SUBPROCESS = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from test_search_contract import CONFIGS, build, drive
    out = {}
    for cid, name, options, multi in CONFIGS:
        n_obj = 2 if multi else 1
        out[cid] = [X.tolist() for X, _ in drive(build(name, options, n_obj), 2, n_obj)]
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_another_process_with_another_hash_seed_asks_the_same_candidates():
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    proc = subprocess.run([sys.executable, "-c", SUBPROCESS, os.path.dirname(__file__)],
                          env=env, capture_output=True, text=True, timeout=300, check=True)
    there = json.loads(proc.stdout.strip().splitlines()[-1])
    for cid, name, options, multi in CONFIGS:
        n_obj = 2 if multi else 1
        here = [X.tolist() for X, _ in drive(build(name, options, n_obj), 2, n_obj)]
        assert here == there[cid], cid  # floats survive JSON exactly (repr round-trips)


def test_candidate_is_plain_data():
    c = build("random", {}).ask(1)[0]
    assert isinstance(c, Candidate) and c.generation == 0 and c.index == 0
    json.dumps(c.meta)  # meta crosses process boundaries with the candidate


class Stepper(Strategy):
    """A user's generational strategy, unregistered: it implements only the algorithm."""

    default_popsize = 3

    def _ask(self, n: int) -> list:
        start = self.lower + 0.1 * self.generation
        return [(start + 0.01 * i, {"i": i}) for i in range(n)]

    def _tell(self, candidates, results) -> None:
        self.seen = [(c.meta["i"], r.values, r.failed, r.item_scores) for c, r in
                     zip(candidates, results)]


def test_a_subclass_implements_only_the_algorithm_and_gets_every_check():
    strategy = Stepper([0.0, 0.0], [1.0, 1.0], ["maximize"], seed=1)
    assert strategy.popsize == 3
    with pytest.raises(ValueError, match="popsize: Stepper needs an integer >= 1, got 0"):
        Stepper([0.0], [1.0], ["maximize"], popsize=0)
    with pytest.raises(ValueError, match="Stepper options: unknown sigma; known: popsize"):
        Stepper([0.0], [1.0], ["maximize"], sigma=0.1)
    cands = strategy.ask()
    assert [(c.generation, c.index, c.meta) for c in cands] == [(0, i, {"i": i}) for i in range(3)]
    with pytest.raises(RuntimeError, match="generation 0 was asked but not told"):
        strategy.ask()
    with pytest.raises(ValueError, match="whole generation 0"):
        strategy.tell(cands[::-1], [[1.0]] * 3)
    scores = [np.ones(2), None, np.zeros(2)]
    strategy.tell(cands, [[0.5], None, [float("nan")]], item_scores=scores)
    assert [s[:3] for s in strategy.seen] == [(0, [0.5], False), (1, [0.5], True),
                                              (2, [0.5], True)]  # the penalty: worst seen
    assert [s[3] is None for s in strategy.seen] == [False, True, False]
    assert strategy.ask()[0].generation == 1
