"""The ``map`` strategy (MAP, Bayesian MAP, Nested MAP) against known quadratics.

Truths used: hand-set surrogate coefficients (exact quadratics, identity and sigmoid links), the
closed-form leave-one-out residual of linear least squares (e_k / (1 - h_kk)), hand-worked
angles and bin scores, the analytic Pareto set of two spheres (the segment between their
centres), the reference code's bins, design sampler, pair order and preference pick re-derived
by hand, and separable tasks whose best nested merge is known per coordinate.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import expit

from evomerge.search import make_strategy
from evomerge.search._surrogate import (
    QuadraticFit,
    cell_of,
    cell_probabilities,
    cell_scores,
    closest_pair,
    errors,
    fit_quadratic,
    fittable,
    from_angles,
    loo_predictions,
    preference_pick,
    quadratic_features,
    reference_bins,
    reference_design,
    surrogate_front,
    to_angles,
)

FAST = {"front_pop": 40, "front_generations": 40}  # small surrogate NSGA-II for tests


def true_quadratic(C: np.ndarray, A: np.ndarray, b: np.ndarray, e: float) -> np.ndarray:
    """sum_{i<=j} A_ij c_i c_j + b.c + e with A upper-triangular (MAP's parameterisation)."""
    return np.einsum("ni,ij,nj->n", C, A, C) + C @ b + e


def drive(strategy, f, generations: int, failures: bool = False):
    """Ask/evaluate/tell; with ``failures`` a None and a NaN in generation 0. Returns the asked
    points, told values and metas per generation."""
    record = []
    for g in range(generations):
        cands = strategy.ask()
        X = np.stack([c.x for c in cands])
        values = f(X).tolist()
        if failures and g == 0:
            values[0] = None
            values[-1] = [float("nan")] * len(values[-1])
        strategy.tell(cands, values)
        record.append((X, values, [c.meta for c in cands]))
    return record


def assert_replays(first, replayed, original) -> None:
    """``replayed`` (a fresh strategy built like ``first``), told ``original``'s values, asks
    the same points and metas generation by generation, then the same next points as ``first``,
    and reports the same surrogates."""
    for X, values, metas in original:
        np.random.rand(3)  # other code drawing from the global RNG changes nothing
        cands = replayed.ask()
        assert np.array_equal(np.stack([c.x for c in cands]), X)
        assert [c.meta for c in cands] == metas
        json.dumps(metas)  # meta is plain data
        replayed.tell(cands, values)
    assert np.array_equal(np.stack([c.x for c in replayed.ask()]),
                          np.stack([c.x for c in first.ask()]))
    assert replayed.surrogate_report() == first.surrogate_report()


# ---- the surrogate -----------------------------------------------------------------------------

def test_features_are_squares_cross_terms_linear_terms_and_one():
    assert quadratic_features(np.array([[2.0, 3.0]])).tolist() == [[4, 9, 6, 2, 3, 1]]
    assert quadratic_features(np.array([[1.0, 2.0, 3.0]])).tolist() == [
        [1, 4, 9, 2, 3, 6, 1, 2, 3, 1]]


def test_identity_link_recovers_an_exact_quadratic_and_predicts_new_points():
    rng = np.random.default_rng(0)
    A = np.triu(rng.normal(size=(3, 3)))
    b, e = rng.normal(size=3), 0.7
    C = rng.uniform(0, 1.5, size=(25, 3))
    fit = fit_quadratic(C, true_quadratic(C, A, b, e), "identity")
    coef = fit.coefficients()
    np.testing.assert_allclose(coef["A"], A, atol=1e-9)
    np.testing.assert_allclose(coef["b"], b, atol=1e-9)
    assert coef["e"] == pytest.approx(e, abs=1e-9)
    new = rng.uniform(0, 1.5, size=(10, 3))
    np.testing.assert_allclose(fit.predict(new), true_quadratic(new, A, b, e), atol=1e-9)


def test_sigmoid_link_recovers_the_quadratic_also_where_accuracies_saturate():
    # z reaches -9 and +9.5: sigmoid(z) is below 1e-3 or above 1 - 1e-3 on 13 of the points,
    # where the linear start (logit of clipped targets) is wrong and the nonlinear least
    # squares has to correct it.
    A = np.array([[-6.0, 2.0], [0.0, -5.0]])
    b, e = np.array([14.0, 12.0]), -9.0
    C = np.vstack([np.random.default_rng(1).uniform(0, 1.5, size=(30, 2)), [[0, 0], [0.05, 0.1]]])
    z = true_quadratic(C, A, b, e)
    assert z.min() < -6.9 < 6.9 < z.max()
    fit = fit_quadratic(C, expit(z), "sigmoid")
    coef = fit.coefficients()
    np.testing.assert_allclose(coef["A"], A, atol=1e-4)
    np.testing.assert_allclose(coef["b"], b, atol=1e-4)
    assert coef["e"] == pytest.approx(e, abs=1e-4)
    grid = np.stack(np.meshgrid(np.linspace(0, 1.5, 7), np.linspace(0, 1.5, 7)), -1).reshape(-1, 2)
    np.testing.assert_allclose(fit.predict(grid), expit(true_quadratic(grid, A, b, e)),
                               atol=1e-6)


def test_softplus_link_recovers_a_loss_shaped_quadratic():
    A, b, e = np.array([[1.5, -1.0], [0.0, 2.0]]), np.array([-2.0, -1.0]), 1.0
    C = np.random.default_rng(2).uniform(0, 1.5, size=(20, 2))
    fit = fit_quadratic(C, np.logaddexp(0, true_quadratic(C, A, b, e)), "softplus")
    np.testing.assert_allclose(fit.coefficients()["A"], A, atol=1e-5)


def test_leave_one_out_equals_the_closed_form_for_linear_least_squares():
    rng = np.random.default_rng(3)
    C = rng.uniform(0, 1.5, size=(18, 2))
    y = true_quadratic(C, np.triu(rng.normal(size=(2, 2))), rng.normal(size=2), 0.1)
    y = y + rng.normal(scale=0.05, size=len(y))
    fit = fit_quadratic(C, y, "identity")
    Phi = quadratic_features(C)
    H = Phi @ np.linalg.pinv(Phi)
    resid = y - H @ y
    closed = y - resid / (1 - np.diag(H))  # the LOO prediction of point k
    np.testing.assert_allclose(loo_predictions(C, y, fit), closed, atol=1e-9)


def test_errors_are_mae_and_r2_and_r2_is_none_for_constant_targets():
    y, p = np.array([0.0, 1.0, 2.0, 3.0]), np.array([0.5, 1.0, 2.0, 2.5])
    out = errors(y, p)
    assert out["mae"] == pytest.approx(0.25)
    assert out["r2"] == pytest.approx(1 - 0.5 / 5.0)
    assert errors(np.ones(3), np.ones(3))["r2"] is None
    assert errors(y, np.array([np.nan, 1.0, 2.0, np.nan]))["n"] == 2


def test_points_on_a_line_cannot_fit_a_quadratic():
    t = np.linspace(0, 1, 20)
    assert not fittable(np.stack([t, 2 * t], 1))
    assert not fittable(np.random.default_rng(0).uniform(size=(6, 2)))  # 6 points, 6 terms
    assert fittable(np.random.default_rng(0).uniform(size=(7, 2)))


# ---- hyperspherical bins -----------------------------------------------------------------------

def test_hyperspherical_angles_hand_worked_and_round_trip():
    np.testing.assert_allclose(to_angles(np.array([[1.0, 1.0]])), [[np.pi / 4]])
    np.testing.assert_allclose(to_angles(np.array([[1.0, 1.0, np.sqrt(2)]])),
                               [[np.pi / 3, np.arctan(np.sqrt(2))]])
    C = np.random.default_rng(4).uniform(0.01, 1.5, size=(10, 4))
    U = from_angles(to_angles(C))
    np.testing.assert_allclose(U, C / np.linalg.norm(C, axis=1, keepdims=True), atol=1e-12)


def test_cell_scores_are_mean_plus_half_std_and_empty_cells_score_as_the_best():
    cells = np.array([0, 0, 2, 2, 2])
    sq = np.array([1.0, 3.0, 0.0, 0.0, 6.0])
    scores = cell_scores(cells, sq, 4)
    assert scores[0] == pytest.approx(2.0 + 1.0 / 2)  # mean 2, std 1
    assert scores[2] == pytest.approx(2.0 + np.sqrt(8.0) / 2)  # mean 2, std sqrt(8)
    assert scores[1] == scores[3] == scores.max()
    assert cell_of(np.array([[0.0], [np.pi / 4 - 1e-9], [np.pi / 2]]), 2).tolist() == [0, 0, 1]
    p = cell_probabilities(np.array([1.0, 0.5]), 0.07)
    assert p[1] / p[0] == pytest.approx(np.exp(-0.5 / 0.07))


def test_bayesian_map_samples_most_from_the_cell_with_the_largest_residuals():
    # A quadratic plus a narrow bump the quadratic cannot follow at the angle 5pi/16: with four
    # bins of pi/8 the bump lies in bin 2 ([pi/4, 3pi/8)).
    def f(X):
        phi = to_angles(X)[:, 0]
        bump = 0.3 * np.exp(-((phi - 5 * np.pi / 16) / 0.05) ** 2)
        return np.stack([0.5 - 0.1 * X[:, 0] ** 2 + 0.05 * X[:, 1] + bump], 1)

    strategy = make_strategy("map", lower=[0, 0], upper=[1.5, 1.5], directions=["maximize"],
                             seed=5, popsize=40, design=40, link="identity",
                             bayesian={"rounds": 1, "per_round": 40, "bins": 4}, **FAST)
    drive(strategy, f, 1)
    cands = strategy.ask()
    report = strategy.surrogate_report()["bayesian"][0]
    assert all(c.meta["phase"] == "bayesian" for c in cands)
    assert int(np.argmax(report["scores"])) == 2
    counts = np.bincount([c.meta["cell"] for c in cands], minlength=4)
    assert counts.tolist() == report["counts"]
    assert counts[2] > len(cands) / 2, counts
    # Each point lies in its cell and in the box.
    X = np.stack([c.x for c in cands])
    assert cell_of(to_angles(X), 4).tolist() == [c.meta["cell"] for c in cands]
    assert np.all((X >= 0) & (X <= 1.5))


# ---- the strategy ------------------------------------------------------------------------------

A_CENTRE, B_CENTRE = np.array([0.2, 1.2]), np.array([1.3, 0.4])


def two_spheres(X: np.ndarray) -> np.ndarray:
    """Minimise |x - a|^2 and |x - b|^2: exact quadratics, Pareto set = segment [a, b]."""
    return np.stack([np.sum((X - A_CENTRE) ** 2, 1), np.sum((X - B_CENTRE) ** 2, 1)], 1)


def distance_to_segment(X: np.ndarray) -> np.ndarray:
    """Distance to the Pareto set. By Pythagoras both objectives at ``x`` exceed those at its
    projection onto the segment by exactly distance^2: the objective-space gap to the front."""
    d = B_CENTRE - A_CENTRE
    t = np.clip((X - A_CENTRE) @ d / (d @ d), 0, 1)
    return np.linalg.norm(X - (A_CENTRE + t[:, None] * d), axis=1)


def test_front_points_lie_on_the_true_pareto_set_and_spread_along_it():
    strategy = make_strategy("map", lower=[0, 0], upper=[1.5, 1.5], seed=0, link="identity",
                             directions=["minimize", "minimize"], front_points=8, **FAST)
    record = drive(strategy, two_spheres, 2)
    design, front = record
    assert all(m["phase"] == "design" for m in design[2]) and len(design[0]) == 16
    assert all(m["phase"] == "front" for m in front[2]) and len(front[0]) == 8
    X = front[0]
    # On the front up to what a finite NSGA-II population resolves: a point off the set by
    # 0.1 loses 0.01 on both objectives (0.5% of their range |a - b|^2 = 1.85), still
    # non-dominated by its neighbours in a population of 40.
    assert np.max(distance_to_segment(X) ** 2) < 0.025
    assert np.median(distance_to_segment(X)) < 0.05
    # Spread: the points cover most of the segment, from near a to near b.
    t = (X - A_CENTRE) @ (B_CENTRE - A_CENTRE) / np.sum((B_CENTRE - A_CENTRE) ** 2)
    assert t.min() < 0.1 and t.max() > 0.9
    # An exact quadratic is predicted exactly, so the error at the front points is ~0.
    report = strategy.surrogate_report()
    assert [r["mae"] < 1e-8 for r in report["front"]] == [True, True]
    assert [s["loo"]["mae"] < 1e-8 for s in report["surrogates"]] == [True, True]
    predicted = np.array([m["predicted"] for m in front[2]])
    np.testing.assert_allclose(predicted, two_spheres(X), atol=1e-8)


def test_a_refine_round_fills_gaps_between_the_points_already_asked():
    strategy = make_strategy("map", lower=[0, 0], upper=[1.5, 1.5], seed=1, link="identity",
                             directions=["minimize", "minimize"], front_points=4, **FAST)
    record = drive(strategy, two_spheres, 3)
    first, second = record[1][0], record[2][0]
    assert np.max(distance_to_segment(second) ** 2) < 0.025
    # New points are not repeats: each is away from every point of the first round.
    gaps = np.min(np.linalg.norm(second[:, None] - first[None], axis=2), axis=1)
    assert gaps.min() > 0.05, gaps


def test_sigmoid_accuracies_front_matches_the_true_front():
    """Two accuracy-like objectives acc_k = sigmoid(quadratic_k): every asked front point is
    non-dominated by a dense grid of the truth up to a small tolerance."""
    def accs(X):
        return np.stack([expit(1 + 3 * X[:, 0] - 2 * X[:, 0] ** 2 - 1.5 * X[:, 1] ** 2),
                         expit(0.5 + 3 * X[:, 1] - 2 * X[:, 1] ** 2 - X[:, 0] * X[:, 1])], 1)

    strategy = make_strategy("map", lower=[0, 0], upper=[1.5, 1.5], seed=2,
                             directions=["maximize", "maximize"], front_points=8, **FAST)
    front = drive(strategy, accs, 2)[1]
    g = np.linspace(0, 1.5, 151)
    truth = accs(np.stack(np.meshgrid(g, g), -1).reshape(-1, 2))
    for y in np.asarray(front[1]):
        dominated_by = np.all(truth >= y + 2e-3, axis=1)
        assert not dominated_by.any(), y
    assert strategy.surrogate_report()["surrogates"][0]["link"] == "sigmoid"


def test_replay_asks_the_same_points_through_every_phase_and_failures():
    def f(X):
        return np.stack([expit(1 - X[:, 0] ** 2 + X[:, 1]), expit(X[:, 0] - X[:, 1] ** 2)], 1)

    def build(seed=7):
        return make_strategy("map", lower=[0, 0], upper=[1.5, 1.5], seed=seed, popsize=10,
                             design=14, front_points=6, directions=["maximize", "maximize"],
                             bayesian={"rounds": 1, "per_round": 5}, **FAST)

    first = build()
    original = drive(first, f, 5, failures=True)  # design 10+4, bayes 5, front 6, front 6
    assert [len(X) for X, _, _ in original] == [10, 4, 5, 6, 6]
    assert [m[0]["phase"] for _, _, m in original] == [
        "design", "design", "bayesian", "front", "front"]
    assert_replays(first, build(), original)
    assert not np.array_equal(drive(build(seed=8), f, 1)[0][0], original[0][0])
    # Failures stay out of the fit: the last ask refitted on all 31 told points, 2 failed.
    assert first.surrogate_report()["n_fit"] == 14 + 5 + 6 + 6 - 2


def test_the_global_numpy_rng_is_left_alone():
    np.random.seed(2024)
    state = np.random.get_state()[1].copy()
    drive(make_strategy("map", lower=[0, 0], upper=[1, 1], directions=["minimize"] * 2,
                        bayesian=True, **FAST), two_spheres, 3)
    assert np.array_equal(np.random.get_state()[1], state)


def test_a_design_lost_to_failures_is_drawn_again():
    strategy = make_strategy("map", lower=[0, 0], upper=[1, 1], directions=["minimize"],
                             popsize=8, design=8, **FAST)
    cands = strategy.ask()
    strategy.tell(cands, [None] * 8)
    again = strategy.ask()
    assert [c.meta["phase"] for c in again] == ["design"] * 8
    assert not np.array_equal(np.stack([c.x for c in again]), np.stack([c.x for c in cands]))


def test_generations_must_be_told_whole_and_in_order():
    strategy = make_strategy("map", lower=[0, 0], upper=[1, 1], directions=["minimize"], **FAST)
    with pytest.raises(RuntimeError, match="ask first"):
        strategy.tell([], [])
    cands = strategy.ask()
    with pytest.raises(RuntimeError, match="asked but not told"):
        strategy.ask()
    with pytest.raises(ValueError, match="whole generation 0"):
        strategy.tell(cands[:-1], [[1.0]] * (len(cands) - 1))
    with pytest.raises(ValueError, match="n must be None"):
        make_strategy("map", lower=[0], upper=[1], directions=["minimize"]).ask(4)


@pytest.mark.parametrize("options,match", [
    ({"design": 6}, "design: 6 points cannot fit a quadratic in 2 variables"),
    ({"link": "logit"}, "link: one of auto"),
    ({"link": ["sigmoid"]}, "link: one of auto"),
    ({"sampling": "sobol"}, "sampling: 'sobol'"),
    ({"front_points": 0}, "front_points: an integer >= 1"),
    ({"bayesian": {"round": 2}}, "bayesian: unknown round"),
    ({"bayesian": {"temperature": 0}}, "bayesian.temperature"),
    ({"nested": {"preference": [1, -1]}}, "nested.preference"),
    ({"nested": {"design": 6}}, "a pair's quadratic has 6 parameters; design 6 gives 6 points"),
    ({"nested": {"preference": [1], "generations": 0, "isotropic": 1.0}},
     ("nested.preference: 2 non-negative.*nested.generations: an integer >= 1, got 0; "
      "nested.isotropic")),
    ({"nested": {"variant": "index_pairs"}}, "nested: unknown variant"),
    ({"sigma0": 0.1}, "map options: unknown sigma0"),
])
def test_bad_options_are_refused_by_name(options, match):
    with pytest.raises(ValueError, match=match):
        make_strategy("map", lower=[0, 0], upper=[1, 1], directions=["maximize"] * 2, **options)


def test_bayesian_and_nested_refuse_spaces_they_cannot_handle():
    with pytest.raises(ValueError, match="bayesian: needs lower bounds >= 0"):
        make_strategy("map", lower=[-1, 0], upper=[1, 1], directions=["maximize"],
                      bayesian=True)
    with pytest.raises(ValueError, match="nested: needs one objective per coefficient"):
        make_strategy("map", lower=[0, 0, 0], upper=[1, 1, 1], directions=["maximize"] * 2,
                      nested=True)
    with pytest.raises(ValueError, match="nested: needs lower <= 0 < upper"):
        make_strategy("map", lower=[0.1, 0], upper=[1, 1], directions=["maximize"] * 2,
                      nested=True)
    with pytest.raises(ValueError, match="share one direction"):
        make_strategy("map", lower=[0, 0], upper=[1, 1], directions=["maximize", "minimize"],
                      nested=True)


# ---- Nested MAP --------------------------------------------------------------------------------

def test_reference_bins_follow_get_sample_n_bins():
    # The reference's get_sample_n_bins(dim): 4 bins per angle below 4 coefficients, else 2.
    for d, bins in [(2, 4), (3, 4), (4, 2), (5, 2), (6, 2), (8, 2)]:
        assert reference_bins(d) == bins
    # Bayesian MAP's default uses it: bins^(d - 1) cells (4 at d = 2, 16 at d = 3, 8 at d = 4).
    for d, cells in [(2, 4), (3, 16), (4, 8)]:
        strategy = make_strategy("map", lower=[0] * d, upper=[1] * d, seed=1, popsize=64,
                                 directions=["minimize"], bayesian={"rounds": 1}, **FAST)
        drive(strategy, lambda X: np.sum(X**2, axis=1, keepdims=True), 1)
        strategy.ask()
        assert len(strategy.surrogate_report()["bayesian"][0]["scores"]) == cells


def test_reference_design_is_one_hot_isotropic_and_grid_points_in_its_order():
    D = reference_design(np.random.default_rng(0), 2, 20, 0.2)
    # m = 18, k = floor(3.6) = 3: 1 isotropic + 1 disturbed isotropic, 2 one-hot, 15 grid.
    assert D.shape == (19, 2)
    assert D[0, 0] == D[0, 1] and 0 <= D[0, 0] <= 1
    assert np.all((D[1] >= 0) & (D[1] <= 1))
    np.testing.assert_array_equal(D[2:4], np.eye(2))
    grid = D[4:]  # g = ceil(sqrt(30)) = 6: multiples of 1/5 without the excluded points
    np.testing.assert_allclose(grid * 5, np.round(grid * 5), atol=1e-12)
    assert len({tuple(r) for r in grid}) == 15
    assert np.all(grid[:, 0] != grid[:, 1]) and np.all(grid.sum(axis=1) != 1)
    # total 10: m = 8, k = floor(1.6) = 1 makes no isotropic pair; 7 of the 1/3 grid's 8 points.
    D = reference_design(np.random.default_rng(1), 2, 10, 0.2)
    assert D.shape == (9, 2)
    np.testing.assert_array_equal(D[:2], np.eye(2))
    np.testing.assert_allclose(D[2:] * 3, np.round(D[2:] * 3), atol=1e-12)
    with pytest.raises(ValueError, match="include the 2 one-hot points"):
        reference_design(np.random.default_rng(0), 2, 2, 0.2)


def test_closest_pair_is_the_smallest_score_gap_first_in_index_order():
    assert closest_pair([0.90, 0.70, 0.85, 0.60, 0.72]) == (1, 4)  # |0.70 - 0.72| = 0.02
    assert closest_pair([0.5, 0.75, 1.0]) == (0, 1)  # ties (0.25 twice): the first pair
    with pytest.raises(ValueError, match="at least 2"):
        closest_pair([0.5])


def test_preference_pick_takes_the_best_weighted_non_dominated_row():
    # Minimisation form (negated accuracies). Row 3 is dominated by row 1.
    F = -np.array([[0.9, 0.5], [0.8, 0.7], [0.6, 0.8], [0.5, 0.5]])
    assert preference_pick(F, np.array([1.0, 1.0])) == 1  # 1.4, 1.5, 1.4
    assert preference_pick(F, np.array([1.0, 3.0])) == 2  # 2.4, 2.9, 3.0
    assert preference_pick(F, np.array([1.0, 0.0])) == 0
    # A dominated row is never taken, even where its weighted sum ties the best.
    assert preference_pick(-np.array([[0.5, 0.5], [0.5, 0.6]]), np.array([1.0, 0.0])) == 1


def test_the_pick_from_a_hand_made_surrogate_front_is_the_weighted_optimum():
    # f_A = 1 - (a - 1)^2 - b^2 and f_B = 1 - a^2 - (b - 1)^2 (features a^2, b^2, ab, a, b, 1):
    # the Pareto set is the segment (1, 0)-(0, 1) and w_A f_A + w_B f_B peaks at
    # (a, b) = (w_A, w_B) / (w_A + w_B).
    fits = [QuadraticFit(np.array([-1.0, -1, 0, 2, 0, 0]), "identity", 2),
            QuadraticFit(np.array([-1.0, -1, 0, 0, 2, 0]), "identity", 2)]

    def objective(P):
        return -np.stack([f.predict(P) for f in fits], axis=1)

    X, F = surrogate_front(objective, np.zeros(2), np.ones(2), 2, pop=100, generations=25,
                           seed=0)
    for w, ab in [((1.0, 3.0), (0.25, 0.75)), ((1.0, 1.0), (0.5, 0.5)), ((4.0, 1.0), (0.8, 0.2))]:
        np.testing.assert_allclose(X[preference_pick(F, np.array(w))], ab, atol=0.03)


def constant_tasks(scores):
    """Every merge scores ``scores`` on the tasks: the pool's scores are then known by hand."""
    return lambda X: np.tile(scores, (len(X), 1))


def test_nested_map_pairs_closest_scores_and_puts_each_merge_back_in_the_pool():
    scores = np.array([0.90, 0.70, 0.85, 0.60, 0.72])
    strategy = make_strategy("map", lower=[0] * 5, upper=[1.5] * 5, seed=3, popsize=32,
                             directions=["maximize"] * 5, **FAST,
                             nested={"preference": [1, 1, 1, 1, 2]})
    record = drive(strategy, constant_tasks(scores), 9)
    assert [(m[0]["phase"], len(X)) for X, _, m in record] == (
        [("nested-expert", 5)] + [("nested-design", 19), ("nested-pick", 1)] * 4)
    np.testing.assert_array_equal(record[0][0], np.eye(5))  # each expert alone
    assert strategy.ask()[0].meta["phase"] == "design"  # then flat MAP
    report = strategy.surrogate_report()["nested"]
    assert report["experts"] == scores.tolist()
    # By hand, preference p = (1, 1, 1, 1, 2); a group scores sum p_t s_t / sum p_t:
    # pool .90 .70 .85 .60 .72 -> closest 1, 4 (gap .02) -> (.70 + 2 .72) / 3 = .71333
    # pool .90 .85 .60 {1,4} .71333 -> 0, 2 (gap .05) -> .875
    # pool .60 {1,4} .71333 {0,2} .875 -> 3, {1,4} (gap .11333) -> (.60 + .70 + 1.44) / 4
    # pool {0,2} .875 {3,1,4} .685 -> the last pair -> (.9 + .85 + .6 + .7 + 1.44) / 6
    pairs = report["pairs"]
    assert [p["tasks"] for p in pairs] == [[[1], [4]], [[0], [2]], [[3], [1, 4]],
                                           [[0, 2], [3, 1, 4]]]
    np.testing.assert_allclose([p["score"] for p in pairs],
                               [2.14 / 3, 0.875, 2.74 / 4, 4.49 / 6])
    np.testing.assert_allclose(pairs[3]["scores"], [0.875, 2.74 / 4])
    assert report["result"]["score"] == pytest.approx(4.49 / 6)
    # A pair's design switches every task outside it off, and its cost is counted per task.
    design = record[1][0]
    assert np.all(design[:, [0, 2, 3]] == 0)
    assert [p["evaluations"] for p in pairs] == [20] * 4
    assert report["evaluations"] == 5 + 4 * 20
    assert report["task_evaluations"] == 5 + 20 * (2 + 2 + 3 + 5)


TARGETS = np.array([0.4, 1.1, 0.8, 0.6])


def separable(X: np.ndarray) -> np.ndarray:
    """Task n scores 1 - (c_n - TARGETS[n])^2: a group's preference-weighted mean is exactly
    quadratic in its scale s (peak at s = sum v t / sum v^2), so each pair's surrogates are
    exact and the pick of a pair of single tasks is (TARGETS[i], TARGETS[j])."""
    return 1.0 - (X - TARGETS) ** 2


def test_nested_map_picks_each_pair_from_the_predicted_front_and_recovers_the_targets():
    strategy = make_strategy("map", lower=[0] * 4, upper=[1.5] * 4, seed=5, popsize=32,
                             directions=["maximize"] * 4, link="identity", nested=True, **FAST)
    record = drive(strategy, separable, 7)
    strategy.ask()
    report = strategy.surrogate_report()["nested"]
    # Experts alone (c_n = 1) score 1 - (1 - t)^2 = .64 .99 .96 .84: tasks 1, 2 (gap .03)
    # merge first and score ~1; then 3 (.84) with {1, 2} (gap ~.16 < .2 to task 0); then 0.
    np.testing.assert_allclose(report["experts"], [0.64, 0.99, 0.96, 0.84])
    assert [p["tasks"] for p in report["pairs"]] == [[[1], [2]], [[3], [1, 2]],
                                                     [[0], [3, 1, 2]]]
    first = report["pairs"][0]
    np.testing.assert_allclose(first["chosen_ab"], TARGETS[[1, 2]], atol=0.02)
    # The pick is a surrogate prediction, not one of the evaluated design points (a = 1.1
    # lies outside the design's [0, 1]); its predicted group scores are ~1.
    pick = record[2]
    assert pick[2][0]["phase"] == "nested-pick"
    np.testing.assert_allclose(pick[2][0]["predicted_groups"], [1.0, 1.0], atol=1e-3)
    assert not any(np.allclose(pick[0][0], x) for x in record[1][0])
    np.testing.assert_allclose(report["result"]["coefficients"], TARGETS, atol=0.03)
    assert report["result"]["score"] == pytest.approx(1.0, abs=1e-3)


def test_nested_pair_left_with_too_few_valid_points_takes_its_best_real_design_point():
    strategy = make_strategy("map", lower=[0, 0], upper=[1.5, 1.5], seed=2, popsize=32,
                             directions=["maximize"] * 2, link="identity", nested=True, **FAST)
    experts = strategy.ask()
    strategy.tell(experts, separable(np.hstack([np.stack([c.x for c in experts]),
                                                np.zeros((2, 2))]))[:, :2].tolist())
    design = strategy.ask()
    X = np.stack([c.x for c in design])
    values = (1.0 - (X - TARGETS[:2]) ** 2).tolist()
    values = [v if i < 5 else None for i, v in enumerate(values)]  # 5 valid < 6 parameters
    strategy.tell(design, values)
    pick = strategy.ask()[0]
    best = int(np.argmax([sum(v) for v in values[:5]]))
    np.testing.assert_array_equal(pick.x, X[best])
    assert pick.meta["predicted_groups"] is None


def test_after_a_two_task_tree_flat_map_fits_the_tree_points_without_a_new_design():
    strategy = make_strategy("map", lower=[0, 0], upper=[1.5, 1.5], seed=2, popsize=32,
                             directions=["maximize"] * 2, link="identity", nested=True, **FAST)
    record = drive(strategy, lambda X: separable(np.hstack([X, np.zeros((len(X), 2))]))[:, :2],
                   3)
    assert [m[0]["phase"] for _, _, m in record] == ["nested-expert", "nested-design",
                                                      "nested-pick"]
    assert {c.meta["phase"] for c in strategy.ask()} == {"front"}
    assert strategy.surrogate_report()["n_fit"] == 2 + 19 + 1


def test_nested_map_replay_asks_the_same_points_through_failures():
    def build(seed=7):
        return make_strategy("map", lower=[0] * 4, upper=[1.5] * 4, seed=seed, popsize=12,
                             directions=["maximize"] * 4, nested=True, **FAST)

    first = build()
    original = drive(first, separable, 8, failures=True)
    assert_replays(first, build(), original)
    json.dumps(first.surrogate_report())  # the run writes it as surrogate.json
    other = drive(build(seed=8), separable, 2)
    assert not np.array_equal(other[1][0], original[1][0])  # another seed, another design


# ---- in the run driver: the digits experiment, and resume after kill -9 ------------------------

@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from run_helpers import build_zoo

    return build_zoo(tmp_path_factory.getbasetemp() / "digits-zoo")


@pytest.mark.slow
def test_digits_map_experiment_front_holds_real_front_evaluations(zoo, tmp_path):
    from run_helpers import assert_exactly_budget, experiment_data, load_trials, run_in_process
    from run_helpers import slot as slot_of

    summary = run_in_process(experiment_data("map", zoo, tmp_path / "run", budget=40))
    trials = load_trials(tmp_path / "run", "digits_map")
    assert_exactly_budget(trials, 40, 16)  # design 16, front 16, 8 of the next front round
    by_number = {t.number: t for t in trials}
    assert summary["pareto"]
    for point in summary["pareto"]:  # the reported front is real evaluations, as stored
        assert list(point["objectives"].values()) == list(by_number[point["trial"]].values)
    # Most of the front comes from the surrogate's proposals (generation >= 1), not the design.
    proposed = [slot_of(by_number[p["trial"]])[0] >= 1 for p in summary["pareto"]]
    assert sum(proposed) > len(proposed) / 2, summary["pareto"]
    # The run keeps the surrogates' error next to its summary.
    report = json.loads((tmp_path / "run" / "surrogate.json").read_text())
    assert [s["link"] for s in report["surrogates"]] == ["sigmoid", "sigmoid"]
    assert report["n_fit"] == 32 and all(s["loo"]["n"] == 32 for s in report["surrogates"])
    assert [e["n"] for e in report["front"]] == [16, 16]


@pytest.mark.slow
def test_kill_9_mid_front_round_then_resume_matches_an_uninterrupted_run(zoo, tmp_path):
    from run_helpers import (
        assert_exactly_budget,
        by_slot,
        cli,
        experiment_data,
        kill_group,
        load_trials,
        run_cli,
        run_in_process,
        start,
        state_counts,
        wait_until,
        write_experiment,
    )

    budget = 40
    run_in_process(experiment_data("map", zoo, tmp_path / "ref", budget=budget))
    reference = by_slot(load_trials(tmp_path / "ref", "digits_map"))
    run_dir = tmp_path / "run"
    exp = write_experiment(tmp_path / "exp.yaml",
                           experiment_data("map", zoo, run_dir, budget=budget))
    proc = start(cli("run", exp), tmp_path / "run.log")
    try:  # killed inside the first front round: the design is told, the front half done
        wait_until(lambda: state_counts(run_dir)["COMPLETE"] >= 20, timeout=120, proc=proc,
                   log=tmp_path / "run.log", what="20 complete trials")
        proc.kill()
        proc.wait(timeout=30)
    finally:
        kill_group(proc)
    assert not (run_dir / "summary.json").exists()
    result = run_cli(cli("resume", run_dir), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    trials = load_trials(run_dir, "digits_map")
    assert_exactly_budget(trials, budget, 16)
    assert by_slot(trials) == reference  # the very trajectory: every slot's x and values


# ---- benchmarks/map_front.py -------------------------------------------------------------------

def _benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "map_front.py"
    spec = importlib.util.spec_from_file_location("map_front", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_hypervolume_is_the_area_dominated_above_the_origin():
    hv = _benchmark().hypervolume
    # Two rectangles [0, .5] x [0, 1] and [0, 1] x [0, .5] overlap in [0, .5]^2: .5 + .5 - .25.
    assert hv(np.array([[0.5, 1.0], [1.0, 0.5]])) == pytest.approx(0.75)
    assert hv(np.array([[0.5, 1.0], [1.0, 0.5], [0.4, 0.4]])) == pytest.approx(0.75)  # dominated


def _run_benchmark(zoo, ks: str, configs: str) -> dict:
    """``benchmarks/map_front.py --json`` on one seed over the test zoo: its JSON object."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "map_front.py"
    proc = subprocess.run([sys.executable, str(script), "--json", "--seeds", "1", "--ks", ks,
                           "--configs", configs, "--zoo", str(zoo["base"].parent)],
                          check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_benchmark_runs_and_prints_one_json_object(zoo, tmp_path):
    data = _run_benchmark(zoo, "16,32", "map,nsga2-source")
    assert [(r["config"], r["k"]) for r in data["rows"]] == [
        ("map", 16), ("map", 32), ("nsga2-source", 16), ("nsga2-source", 32)]
    for run in data["runs"]:  # a front only grows: HV never drops with more evaluations
        assert 0 < run["hv"]["16"] <= run["hv"]["32"] <= 1
    map_32 = data["rows"][1]
    assert map_32["loo_mae"] is not None and map_32["front_mae"] is not None


@pytest.mark.slow
def test_benchmark_five_tasks_counts_the_nested_tree_and_writes_its_own_section(zoo, tmp_path):
    data = _run_benchmark(zoo, "48,96", "nested,map5")
    rows = {(r["config"], r["k"]): r for r in data["rows"]}
    assert set(rows) == {("nested", 48), ("nested", 96), ("map5", 48), ("map5", 96)}
    # The tree of five tasks: 5 experts alone + 4 pairs x (19 design + 1 pick) = 85 evaluations;
    # task evaluations 5 + 20 x (sizes of the 4 merged groups), which sum to 12, 13 or 14.
    assert rows[("nested", 48)]["chosen_score"] is None  # the tree is not done at 48
    nested = rows[("nested", 96)]
    assert nested["chosen_evaluations"] == 85
    assert nested["chosen_task_evaluations"] in (5 + 20 * 12, 5 + 20 * 13, 5 + 20 * 14)
    assert 0 < nested["chosen_score"] <= nested["best_mean"] <= 1
    assert rows[("map5", 96)]["chosen_score"] is None
    assert len(data["base_five_tasks"]) == 5
    section = _benchmark().nested_section(data)
    assert section.startswith("<!-- map-nested:start -->")
    assert section.endswith("<!-- map-nested:end -->")
    assert sum(line.startswith("| nested |") for line in section.splitlines()) == 2
