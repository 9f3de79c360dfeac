"""``experiments/tinylm_m2n2.yaml`` at test scale: M2N2 over the tiny zoo's four experts with the
file's own space, IRT-reduced lm fitness and strategy, through the real driver.

What is checked against independent truths: the archive starts from each expert alone (the first
trials score what the summary's own evaluation of each expert scores); M2N2 competes on the anchor
answers (every trial's per-item scores are 0/1 over tasks x anchors); and every child the run asked
is a split-point slerp of two earlier candidates (the crossover re-derived here from the formula,
not from ``evomerge.search.m2n2``). The archive's best need not stay at least as accurate as the
best expert: shared fitness can evict the most accurate member (see test_search_m2n2.py); only
the reported best, taken over every stored trial, is bounded by the experts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from evomerge.execution.driver import run_experiment
from evomerge.experiment import Experiment

REPO = Path(__file__).resolve().parents[1]
MAX_ITEMS, ANCHORS, DESIGN, CHILDREN, ARCHIVE = 10, 3, 6, 12, 5


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from evomerge.zoo.tinylm import build_tinylm_zoo

    out = tmp_path_factory.mktemp("m2n2") / "zoo"
    build_tinylm_zoo(out, seed=0, size="tiny", progress=False)
    return out


def experts_alone(n_experts: int, dim: int) -> np.ndarray:
    """Row k: weight 1 on expert k's layer groups, 0 elsewhere (coordinates run expert-major)."""
    return np.kron(np.eye(n_experts), np.ones(dim // n_experts))


def slerp_residual(a: np.ndarray, b: np.ndarray, x: np.ndarray, lower: float,
                   upper: float) -> float:
    """How far ``x`` is from every split-point slerp of ``a`` and ``b`` clipped to the box.

    A child with split ``s`` and mix ``w`` is ``P a_k + Q b_k`` for ``k < s`` and ``Q a_k + P b_k``
    after (``t = w`` then ``1 - w``), with ``P = sin((1-w) O)/sin O``, ``Q = sin(w O)/sin O``
    (``1 - w``, ``w`` when ``sin O`` is ~0): fit (P, Q) by least squares on the unclipped
    coordinates for every ``s``, read ``w`` off Q, and return the smallest misfit of the
    resulting clipped child."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    omega = float(np.arccos(np.clip(a @ b / (na * nb), -1, 1))) if na and nb else 0.0
    free = (x > lower) & (x < upper)
    best = np.inf
    for s in range(len(x)):
        first = np.arange(len(x)) < s
        design = np.stack([np.where(first, a, b), np.where(first, b, a)], axis=1)
        if not free.any():
            continue
        _, q = np.linalg.lstsq(design[free], x[free], rcond=None)[0]
        if np.sin(omega) > 1e-6:
            w = float(np.clip(np.arcsin(np.clip(q * np.sin(omega), -1, 1)) / omega, 0, 1))
            p, q = np.sin((1 - w) * omega) / np.sin(omega), np.sin(w * omega) / np.sin(omega)
        else:
            w = float(np.clip(q, 0, 1))
            p, q = 1 - w, w
        child = np.clip(design @ np.array([p, q]), lower, upper)
        best = min(best, float(np.abs(child - x).max()))
    return best


@pytest.mark.slow
def test_tinylm_m2n2_runs_end_to_end_and_every_child_is_a_crossover_of_earlier_ones(zoo,
                                                                                    tmp_path):
    from run_helpers import load_trials

    from evomerge.store import META, RESULT, decode_scores

    data = yaml.safe_load((REPO / "experiments" / "tinylm_m2n2.yaml").read_text())
    sources = data["models"]["sources"]
    # the shipped file starts from each expert alone, in the order of its sources
    assert data["strategy"]["init"] == "sources"

    data["models"] = {"base": str(zoo / "base"),
                      "sources": {k: str(zoo / Path(v).name) for k, v in sources.items()}}
    data["fitness"]["max_items"] = MAX_ITEMS
    # the tiny zoo answers no generation item right; its multiple-choice task gives the niches
    # items that some candidates solve and others do not
    data["fitness"]["tasks"] = [*data["fitness"]["tasks"], "sort_mc"]
    data["fitness"]["reduced"].update(anchors=ANCHORS, design=DESIGN)
    layers = json.loads((zoo / "base" / "config.json").read_text())["num_hidden_layers"]
    dim = len(sources) * (layers + 1)
    # a small archive, so that children compete for slots within the tiny budget
    data["strategy"].update(archive=ARCHIVE)
    budget = len(sources) + CHILDREN
    data.update(budget=budget, run_dir=str(tmp_path / "run"), export=False)

    summary = run_experiment(Experiment.from_dict(data), progress=False)

    assert summary["n_trials"] == budget and summary["n_failed"] == 0
    assert set(summary["final"]) == {"best", *sources}
    assert all(0.0 <= v["mean_acc"] <= 1.0 for v in summary["final"].values())

    trials = sorted(load_trials(tmp_path / "run", data["name"]), key=lambda t: t.number)
    names = optuna.load_study(study_name=data["name"], storage=f"sqlite:///{tmp_path / 'run'}"
                              "/study.db").user_attrs["evomerge:params"]
    assert len(names) == dim
    xs = np.array([[t.params[n] for n in names] for t in trials])
    values = np.array([t.values[0] for t in trials])
    # steady state: generation 0 holds the experts, then one child per generation
    generations = [int(t.user_attrs[META]["generation"]) for t in trials]
    assert generations == [0] * len(sources) + list(range(1, CHILDREN + 1))

    # generation 0 is each expert alone, scored as the summary scores the expert itself
    np.testing.assert_array_equal(xs[:len(sources)], experts_alone(len(sources), dim))
    np.testing.assert_allclose(values[:len(sources)],
                               [summary["sources"][k]["mean_acc"] for k in sources], atol=1e-9)
    # M2N2's items are the anchor answers: 0/1 over every task's anchors, some solved
    anchors = summary["fitness_reduction"]["items_per_candidate"]
    assert len(data["fitness"]["tasks"]) <= anchors <= len(data["fitness"]["tasks"]) * ANCHORS
    rows = []
    for t in trials:
        scores = t.user_attrs[RESULT]["item_scores"]
        assert sorted(scores) == sorted(data["fitness"]["tasks"])
        rows.append(np.concatenate([decode_scores(scores[k]) for k in sorted(scores)]))
    rows = np.array(rows)
    assert rows.shape == (budget, anchors) and set(np.unique(rows)) == {0.0, 1.0}
    # every child is a split-point slerp of two earlier candidates, clipped to the box
    lower, upper = data["space"]["params"][0]["bounds"]
    for k in range(len(sources), budget):
        misfit = min(slerp_residual(xs[i], xs[j], xs[k], lower, upper)
                     for i in range(k) for j in range(k))
        assert misfit < 1e-9, f"trial {k} is no crossover of earlier candidates ({misfit})"
    # the reported best is taken over every trial, so it is at least every expert's score
    assert summary["best"]["objectives"]["mean_acc"] >= values[:len(sources)].max()
