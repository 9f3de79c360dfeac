"""The ``random`` strategy: uniform in the box, from its own seeded generator."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.search import make_strategy

BOX = {"lower": [-2.0, 10.0, 0.0], "upper": [2.0, 20.0, 1e-3]}


def test_points_are_the_seeded_generators_uniforms_scaled_into_the_box():
    strategy = make_strategy("random", **BOX, directions=["minimize"], seed=42)
    X = np.stack([c.x for c in strategy.ask(5)])
    U = np.random.default_rng(42).random((5, 3))
    lower, upper = np.array(BOX["lower"]), np.array(BOX["upper"])
    assert np.array_equal(X, lower + U * (upper - lower))


def test_uniform_over_the_box():
    strategy = make_strategy("random", **BOX, directions=["minimize"], seed=0, popsize=4000)
    X = np.stack([c.x for c in strategy.ask()])
    U = (X - BOX["lower"]) / (np.array(BOX["upper"]) - BOX["lower"])
    assert np.all((U >= 0) & (U < 1))
    # mean 1/2 and variance 1/12 per coordinate, within 5 standard errors
    assert np.all(np.abs(U.mean(axis=0) - 0.5) < 5 * np.sqrt(1 / 12 / 4000))
    assert np.all(np.abs(U.var(axis=0) - 1 / 12) < 0.005)


def test_grouping_of_asks_and_told_values_do_not_change_the_points():
    a = make_strategy("random", **BOX, directions=["minimize"], seed=1)
    b = make_strategy("random", **BOX, directions=["minimize"], seed=1)
    xa = np.stack([c.x for c in a.ask(8)])
    first, second = b.ask(3), b.ask(5)
    b.tell(second, [[1.0]] * 5)
    xb = np.stack([c.x for c in first + second])
    assert np.array_equal(xa, xb)
    assert [c.generation for c in first + second] == [0] * 3 + [1] * 5


def test_a_candidate_is_told_once():
    strategy = make_strategy("random", **BOX, directions=["minimize"], popsize=2)
    cands = strategy.ask()
    strategy.tell(cands, [[1.0], [2.0]])
    with pytest.raises(ValueError, match="were not asked or were already told"):
        strategy.tell(cands[:1], [[1.0]])
