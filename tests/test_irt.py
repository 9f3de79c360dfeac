"""IRT reduction: the 2PL fit, abilities, anchors, estimators, JSON, and the reduced fitness.

Truths are independent of the code under test: responses simulated from a known 2PL, a brute
force grid for the ability MLE, well-separated blobs for k-means, hand-worked estimator formulas,
and a fake inner fitness that records which items it was asked for.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evomerge.fitness.base import EvalResult, Objective
from evomerge.fitness.irt import (
    ESTIMATORS,
    Reduction,
    TaskReduction,
    build_task_reduction,
    estimate,
    estimate_ability,
    fit_irt,
    fit_mixture,
    probabilities,
    select_anchors,
)
from evomerge.fitness.reduced import (
    ReducedFitness,
    ReducedSpec,
    calibrate,
    random_merges,
    response_matrix,
    source_recipe,
    uniform_design,
    validate,
)


def simulate(models: int, items: int, dim: int, seed: int):
    """Responses drawn from a known 2PL: (Y, theta, alpha, beta)."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(models, dim))
    alpha = np.abs(rng.normal(1.2, 0.5, size=(items, dim)))
    beta = rng.normal(0.0, 1.0, size=items)
    y = (rng.random((models, items)) < probabilities(theta, alpha, beta)).astype(float)
    return y, theta, alpha, beta


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


# ---- fit -------------------------------------------------------------------------------------


def test_fit_recovers_known_item_parameters_and_abilities_with_positive_sign():
    y, theta, alpha, beta = simulate(models=300, items=60, dim=1, seed=1)
    fit = fit_irt(y, dim=1)
    # Positive correlations: the sign of the ability axis is identified (more ability = better).
    assert corr(fit.alpha, alpha) > 0.85
    assert corr(fit.beta, beta) > 0.95
    assert corr(fit.theta, theta) > 0.95


def test_fit_orients_ability_so_that_more_ability_means_more_correct_answers():
    y, *_ = simulate(models=200, items=40, dim=1, seed=2)
    # Negating ability and discrimination together leaves the likelihood unchanged (and the
    # SVD start has an arbitrary sign): the fit must report the axis pointing to more correct.
    fit = fit_irt(y, dim=1)
    assert fit.alpha.sum() > 0
    assert corr(fit.theta, y.mean(axis=1)) > 0.9


def test_multidimensional_fit_recovers_the_probability_surface():
    y, theta, alpha, beta = simulate(models=300, items=60, dim=2, seed=3)
    fit = fit_irt(y, dim=2)
    # A rotation of the 2-D ability axes is not identified; the logits are.
    true_logits = theta @ alpha.T - beta
    fitted_logits = fit.theta @ fit.alpha.T - fit.beta
    assert corr(fitted_logits, true_logits) > 0.9


def test_fit_rejects_scores_outside_unit_interval():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit_irt(np.array([[0.0, 2.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="models x items"):
        fit_irt(np.array([1.0, 0.0]))


# ---- abilities -------------------------------------------------------------------------------


def test_ability_is_the_minimum_of_the_penalised_likelihood_on_a_grid():
    rng = np.random.default_rng(4)
    alpha = rng.uniform(0.5, 2.0, size=(25, 1))
    beta = rng.normal(size=25)
    y = (rng.random(25) < probabilities(np.array([0.7]), alpha, beta)).astype(float)
    grid = np.linspace(-4, 4, 80001)
    logits = grid[:, None] * alpha[:, 0] - beta
    objective = np.sum(np.logaddexp(0, logits) - y * logits, axis=1) + 0.5 * grid ** 2
    assert estimate_ability(y, alpha, beta)[0] == pytest.approx(grid[np.argmin(objective)],
                                                                abs=1e-3)


def test_ability_stays_finite_when_every_answer_is_right():
    alpha, beta = np.ones((10, 1)), np.zeros(10)
    theta = estimate_ability(np.ones(10), alpha, beta)
    assert np.isfinite(theta).all() and theta[0] > 1.0


def test_mixture_fit_recovers_a_known_combination_of_endpoint_abilities():
    rng = np.random.default_rng(5)
    endpoints = np.array([[1.5, -0.5], [-0.5, 1.5]])
    lam_true = np.array([0.3, 0.7])
    alpha = rng.uniform(0.5, 2.0, size=(4000, 2))
    beta = rng.normal(size=4000)
    y = (rng.random(4000) < probabilities(lam_true @ endpoints, alpha, beta)).astype(float)
    lam = fit_mixture(y, alpha, beta, endpoints)
    assert lam == pytest.approx(lam_true, abs=0.06)


# ---- anchors ---------------------------------------------------------------------------------


def test_anchors_are_one_item_per_cluster_weighted_by_cluster_share():
    rng = np.random.default_rng(6)
    sizes = [5, 10, 15, 20, 50]
    centres = np.arange(len(sizes))[:, None] * 100.0 * np.ones((1, 3))
    x = np.concatenate([c + rng.normal(size=(n, 3)) for c, n in zip(centres, sizes)])
    blob = np.repeat(np.arange(len(sizes)), sizes)
    idx, w = select_anchors(x, k=len(sizes), seed=0)
    assert sorted(blob[idx]) == list(range(len(sizes)))  # one anchor in each blob
    assert w == pytest.approx([n / sum(sizes) for n in sizes])
    assert w.sum() == pytest.approx(1.0)
    assert list(idx) == sorted(idx)
    again = select_anchors(x, k=len(sizes), seed=0)
    assert np.array_equal(again[0], idx)


def test_anchor_count_is_capped_by_distinct_items():
    x = np.array([[0.0], [0.0], [1.0], [1.0], [1.0]])
    idx, w = select_anchors(x, k=4)
    assert len(idx) == 2
    assert sorted(w) == pytest.approx([0.4, 0.6])


# ---- estimators ------------------------------------------------------------------------------


def true_task(alpha, beta, anchors, weights, endpoints=None, gp_lambda=0.5) -> TaskReduction:
    endpoints = np.zeros((0, alpha.shape[1])) if endpoints is None else endpoints
    return TaskReduction(alpha, beta, np.asarray(anchors), np.asarray(weights, dtype=float),
                         endpoints, gp_lambda)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_is_exact_when_every_item_is_an_anchor(name):
    y, *_ = simulate(models=30, items=40, dim=1, seed=7)
    fit = fit_irt(y, dim=1)
    task = true_task(fit.alpha, fit.beta, np.arange(40), np.full(40, 1 / 40), fit.theta[:2])
    assert estimate(name, task, y[-1]) == pytest.approx(y[-1].mean())


def test_estimators_follow_their_formulas():
    rng = np.random.default_rng(8)
    alpha, beta = rng.uniform(0.5, 2, size=(10, 1)), rng.normal(size=10)
    anchors, weights = [1, 4, 7], [0.2, 0.3, 0.5]
    endpoints = np.array([[-1.0], [1.0]])
    task = true_task(alpha, beta, anchors, weights, endpoints, gp_lambda=0.25)
    y = np.array([1.0, 0.0, 1.0])
    unseen = [0, 2, 3, 5, 6, 8, 9]
    anchor = 0.2 + 0.5
    theta = estimate_ability(y, alpha[anchors], beta[anchors])
    pirt = 0.3 * y.mean() + 0.7 * probabilities(theta, alpha[unseen], beta[unseen]).mean()
    lam = fit_mixture(y, alpha[anchors], beta[anchors], endpoints)
    merged = probabilities(lam @ endpoints, alpha[unseen], beta[unseen]).mean()
    mpirt = 0.3 * anchor + 0.7 * merged
    assert estimate("anchor", task, y) == pytest.approx(anchor)
    assert estimate("p-irt", task, y) == pytest.approx(pirt)
    assert estimate("gp-irt", task, y) == pytest.approx(0.25 * anchor + 0.75 * pirt)
    assert estimate("mp-irt", task, y) == pytest.approx(mpirt)
    assert estimate("gmp-irt", task, y) == pytest.approx(0.5 * anchor + 0.5 * mpirt)


def test_p_irt_approaches_the_true_model_and_beats_the_anchor_sum():
    y, _, alpha, beta = simulate(models=160, items=300, dim=1, seed=9)
    fit_rows, test_rows = y[:120], y[120:]
    task = build_task_reduction(fit_rows, num_endpoints=0, anchors=30, dim=1)
    # The same p-IRT with the simulation's true item parameters: the best an IRT fit can do.
    oracle = true_task(alpha, beta, task.anchors, task.weights)
    cases = {"anchor": (task, "anchor"), "p-irt": (task, "p-irt"),
             "gp-irt": (task, "gp-irt"), "oracle": (oracle, "p-irt")}
    mae = {name: float(np.mean([abs(estimate(est, t, row[t.anchors]) - row.mean())
                                for row in test_rows]))
           for name, (t, est) in cases.items()}
    assert mae["p-irt"] < 1.1 * mae["oracle"]  # the fit loses little against the truth
    assert mae["p-irt"] < 0.85 * mae["anchor"]
    assert 0.0 < task.gp_lambda < 1.0
    assert mae["gp-irt"] <= max(mae["anchor"], mae["p-irt"])


def test_mp_irt_estimates_merges_whose_ability_mixes_the_endpoints():
    rng = np.random.default_rng(10)
    n_items, dim = 300, 2
    alpha = np.abs(rng.normal(1.2, 0.5, size=(n_items, dim)))
    beta = rng.normal(size=n_items)
    endpoints = np.array([[1.5, -1.0], [-1.0, 1.5]])
    lams = rng.uniform(0, 1, size=(150, 1))
    thetas = np.vstack([endpoints, lams * endpoints[0] + (1 - lams) * endpoints[1]])
    y = (rng.random((len(thetas), n_items)) < probabilities(thetas, alpha, beta)).astype(float)
    task = build_task_reduction(y[:100], num_endpoints=2, anchors=20, dim=2)
    err = [abs(estimate("mp-irt", task, row[task.anchors]) - row.mean()) for row in y[100:]]
    assert float(np.mean(err)) < 0.05


def test_estimate_names_the_problem():
    task = true_task(np.ones((3, 1)), np.zeros(3), [0, 2], [0.5, 0.5])
    with pytest.raises(ValueError, match="unknown 'nope'"):
        estimate("nope", task, np.ones(2))
    with pytest.raises(ValueError, match="expected 2 scores"):
        estimate("anchor", task, np.ones(3))
    with pytest.raises(ValueError, match="endpoint"):
        estimate("mp-irt", task, np.ones(2))


# ---- the reduction object --------------------------------------------------------------------


def test_reduction_json_round_trip_gives_identical_estimates():
    ya, *_ = simulate(models=40, items=50, dim=2, seed=11)
    yb, *_ = simulate(models=40, items=30, dim=2, seed=12)
    red = Reduction.build({"a": ya, "b": yb}, num_endpoints=3, anchors=8, dim=2)
    back = Reduction.from_dict(json.loads(json.dumps(red.to_dict())))
    answers = {"a": ya[5, red.tasks["a"].anchors], "b": yb[5, red.tasks["b"].anchors]}
    for name in ESTIMATORS:
        assert back.estimate(name, answers) == red.estimate(name, answers)
    assert back.settings == red.settings
    assert back.tasks["a"].endpoints.shape == (3, 2)
    assert red.num_evaluated() == 16 and red.num_items() == 80


def test_reduction_rejects_tasks_scored_on_different_models():
    with pytest.raises(ValueError, match="same models"):
        Reduction.build({"a": np.zeros((3, 4)), "b": np.zeros((4, 4))}, num_endpoints=0,
                        anchors=2)


# ---- the reduced fitness ---------------------------------------------------------------------


class FakeSubsetFitness:
    """Answers item i of task t with a fixed 0/1 table; records the items it was asked for."""

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table = table
        self.objectives = [Objective("mean_acc")]
        self.calls: list[dict[str, np.ndarray] | None] = []

    def new_model(self) -> torch.nn.Module:
        return torch.nn.Linear(1, 1)

    def num_items(self, split: str = "search") -> dict[str, int]:
        return {t: len(v) for t, v in self.table.items()}

    def evaluate(self, model, split="search", items=None) -> EvalResult:
        self.calls.append(items)
        scores = {t: (v if items is None else v[items[t]]) for t, v in self.table.items()}
        return EvalResult(self.objectives_from_task_scores(
            {t: float(s.mean()) for t, s in scores.items()}), scores)

    def objectives_from_task_scores(self, task_scores):
        return {"mean_acc": sum(task_scores.values()) / len(task_scores)}


def test_reduced_fitness_evaluates_only_anchors_on_search_and_everything_on_heldout():
    ya, *_ = simulate(models=30, items=40, dim=1, seed=13)
    yb, *_ = simulate(models=30, items=25, dim=1, seed=14)
    red = Reduction.build({"a": ya, "b": yb}, num_endpoints=2, anchors=5, dim=1)
    inner = FakeSubsetFitness({"a": ya[7], "b": yb[7]})
    fitness = ReducedFitness(inner, red, "anchor")
    result = fitness.evaluate(fitness.new_model(), "search")
    asked = inner.calls[-1]
    assert {t: list(v) for t, v in asked.items()} == {
        t: list(r.anchors) for t, r in red.tasks.items()}
    expected = np.mean([red.tasks[t].weights @ inner.table[t][red.tasks[t].anchors]
                        for t in ("a", "b")])
    assert result.objectives["mean_acc"] == pytest.approx(expected)
    assert {t: len(s) for t, s in result.item_scores.items()} == fitness.num_items("search")
    full = fitness.evaluate(fitness.new_model(), "heldout")
    assert inner.calls[-1] is None
    assert full.objectives["mean_acc"] == pytest.approx((ya[7].mean() + yb[7].mean()) / 2)


def test_reduced_fitness_refuses_a_reduction_of_other_items():
    red = Reduction.build({"a": simulate(20, 10, 1, 15)[0]}, num_endpoints=0, anchors=3, dim=1)
    with pytest.raises(ValueError, match="re-calibrate"):
        ReducedFitness(FakeSubsetFitness({"a": np.ones(11)}), red, "p-irt")
    with pytest.raises(ValueError, match="unknown 'x'"):
        ReducedFitness(FakeSubsetFitness({"a": np.ones(10)}), red, "x")


def test_reduced_spec_names_bad_fields():
    assert ReducedSpec.from_dict({"anchors": 10}).anchors == 10
    with pytest.raises(ValueError, match="unknown key"):
        ReducedSpec.from_dict({"anchor": 10})
    with pytest.raises(ValueError, match="fitness.reduced.estimator"):
        ReducedSpec.from_dict({"estimator": "irt"})
    with pytest.raises(ValueError, match="fitness.reduced.anchors"):
        ReducedSpec.from_dict({"anchors": 0})


def test_calibrate_caches_responses_and_reduction_by_their_inputs(tmp_path):
    y, *_ = simulate(models=20, items=30, dim=1, seed=16)
    recipes = [source_recipe(f"models/m{i}") for i in range(20)]
    calls = []

    def score(batch):
        calls.append(len(batch))
        return [{"t": y[i]} for i in range(len(batch))]

    spec = ReducedSpec(anchors=5, dim=1)
    first = calibrate(score, recipes[:2], recipes[2:], spec, tmp_path, {"fitness": "fake"})
    again = calibrate(score, recipes[:2], recipes[2:], spec, tmp_path, {"fitness": "fake"})
    assert calls == [20]  # the second call read the cache
    assert first.to_dict() == again.to_dict()
    more = calibrate(score, recipes[:2], recipes[2:], ReducedSpec(anchors=8, dim=1), tmp_path,
                     {"fitness": "fake"})
    assert calls == [20] and len(more.tasks["t"].anchors) == 8  # refit, no re-evaluation
    calibrate(score, recipes[:2], recipes[2:], spec, tmp_path, {"fitness": "other"})
    assert calls == [20, 20]
    assert first.tasks["t"].endpoints.shape == (2, 1)


def test_response_matrix_refuses_partial_scores():
    with pytest.raises(ValueError, match="different item counts"):
        response_matrix([{"t": np.ones(3)}, {"t": np.ones(2)}])


# ---- validation and the CLI ------------------------------------------------------------------


def test_validate_reports_exact_anchor_estimates_when_every_item_is_an_anchor():
    y, *_ = simulate(models=40, items=25, dim=1, seed=17)
    y[:, 0], y[:, 1] = 0.0, 1.0  # two distinct constant columns, the rest random
    rows = validate({"t": y}, num_endpoints=2, num_train=20, anchors=[5, 1000], dim=1)
    by = {(r["estimator"], r["anchors"]): r for r in rows}
    assert len(rows) == 2 * len(ESTIMATORS)
    assert len(np.unique(y[:22].T, axis=0)) == 25  # so every item is its own cluster
    full = by[("anchor", 1000)]
    assert full["reduction"] == 1.0 and full["mae_points"] == 0.0
    assert full["spearman"] == pytest.approx(1.0, abs=0.01)  # ties broken by float rounding
    assert by[("anchor", 5)]["reduction"] == 5.0
    with pytest.raises(ValueError, match="held-out merges"):
        validate({"t": y}, num_endpoints=2, num_train=37, anchors=[5])


def test_random_merges_are_seeded_task_arithmetic_recipes():
    a = random_merges("b", ["e1", "e2"], 3, seed=4)
    assert [r.to_dict() for r in a] == [r.to_dict() for r in random_merges("b", ["e1", "e2"],
                                                                          3, seed=4)]
    weights = [e.parameters["weight"] for r in a for e in r.models]
    assert all(0 <= w <= 1 for w in weights) and len(set(weights)) == 6
    assert {r.merge_method for r in a} == {"task_arithmetic"} and a[0].base_model == "b"


def test_uniform_design_fills_the_bounds_reproducibly():
    lo, hi = np.array([0.0, -1.0, 2.0]), np.array([1.0, 1.0, 2.5])
    x = uniform_design(lo, hi, 500, seed=3)
    assert x.shape == (500, 3) and np.all(x >= lo) and np.all(x <= hi)
    assert np.allclose(x.mean(axis=0), (lo + hi) / 2, atol=0.1)
    assert np.array_equal(x, uniform_design(lo, hi, 500, seed=3))


def test_source_recipe_builds_exactly_the_source(tmp_path):
    from helpers import load_weights, make_family

    from evomerge.merge.engine import Merger

    family = make_family(tmp_path, n_sources=2, layers=1)
    merger = Merger([family.base, *family.sources])
    built = merger.build(source_recipe(family.sources[1]))
    want = load_weights(family.sources[1])
    assert set(built) == set(want)
    assert all(torch.equal(built[k], want[k]) for k in want)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    from evomerge.zoo.tinylm import build_tinylm_zoo

    zoo = tmp_path_factory.mktemp("irt") / "zoo"
    build_tinylm_zoo(zoo, seed=0, size="tiny", progress=False)
    return zoo


@pytest.mark.slow
def test_reduced_lm_fitness_scores_anchors_exactly_as_the_full_evaluation_does(tiny_zoo):
    from evomerge.fitness.base import make_fitness
    from evomerge.merge.engine import Merger

    inner = make_fitness("lm", base_model=str(tiny_zoo / "base"), suite="tinylm", max_items=12)
    sizes = inner.num_items("search")
    rng = np.random.default_rng(18)
    red = Reduction.build({t: (rng.random((12, n)) < 0.5).astype(float) for t, n in sizes.items()},
                          num_endpoints=2, anchors=4, dim=1)
    reduced = ReducedFitness(inner, red, "gp-irt")
    model = inner.new_model()
    expert = str(tiny_zoo / "expert_add")
    Merger([str(tiny_zoo / "base"), expert]).build(source_recipe(expert), into=model)
    full = inner.evaluate(model, "search")
    result = reduced.evaluate(model, "search")
    for task, t in red.tasks.items():
        assert np.array_equal(result.item_scores[task], full.item_scores[task][t.anchors])
    expected = red.estimate("gp-irt", {t: full.item_scores[t][r.anchors]
                                       for t, r in red.tasks.items()})
    assert result.objectives == inner.objectives_from_task_scores(expected)
    assert reduced.evaluate(model, "heldout").objectives == inner.evaluate(model,
                                                                           "heldout").objectives


@pytest.mark.slow
def test_cli_irt_validate_on_the_tiny_zoo(tmp_path, tiny_zoo):
    from typer.testing import CliRunner

    from evomerge.cli import app

    zoo = tiny_zoo
    out = tmp_path / "rows.json"
    args = ["irt", "validate", "tinylm", "--models", str(zoo), "--merges", "8",
            "--max-items", "12", "--anchors", "3,50", "--json", str(out),
            "--cache", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert {r["estimator"] for r in rows} == set(ESTIMATORS)
    assert {r["anchors"] for r in rows} == {3, 50}
    # At most 3 (or 12) anchors per task of 12 items: the tiny zoo answers many items alike,
    # and identical items share one cluster, so the reduction can only be larger.
    assert all(r["reduction"] >= 60 / 15 for r in rows if r["anchors"] == 3)
    assert all(r["reduction"] >= 1.0 for r in rows if r["anchors"] == 50)
    assert "MAE (points)" in result.output
    cached = list((tmp_path / "cache").glob("irt-responses-*.json"))
    assert len(cached) == 1
    stored = json.loads(cached[0].read_text())["responses"]
    assert {t: np.shape(v) for t, v in stored.items()} == {
        t: (13, 12) for t in ("add", "reverse", "sort", "translate", "sort_mc")}
