"""Runs with an IRT-reduced fitness (``fitness: {..., reduced: {...}}``), end to end on the
tiny-LM zoo, calibrated once before the search (``warmup: 0, race: off, refit: off``: the
schedule M2N2 keeps; the default schedule is tested in test_reduced_schedule.py): trials are
scored on the anchors only, held-out scores are full evaluations, and a resumed run re-uses the
calibration without re-scoring."""

from __future__ import annotations

import json

import numpy as np
import pytest
from optuna.trial import TrialState

from evomerge.execution.reduction import REDUCTION_FILE
from evomerge.experiment import Experiment, ExperimentError

MAX_ITEMS, ANCHORS, DESIGN = 12, 4, 6


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from evomerge.zoo.tinylm import build_tinylm_zoo

    out = tmp_path_factory.mktemp("reduced") / "zoo"
    build_tinylm_zoo(out, seed=0, size="tiny", progress=False)
    return out


def experiment(zoo, run_dir, **reduced) -> dict:
    return {
        "name": "tinylm_reduced",
        "models": {"base": str(zoo / "base"),
                   "sources": {t: str(zoo / f"expert_{t}") for t in ("add", "sort")}},
        "space": "task_arithmetic_per_source",
        "fitness": {"name": "lm", "suite": "tinylm", "max_items": MAX_ITEMS,
                    "reduced": {"estimator": "gp-irt", "anchors": ANCHORS, "design": DESIGN,
                                "dim": 1, "warmup": 0, "race": False, "refit": False,
                                **reduced}},
        "strategy": {"name": "random", "popsize": 4},
        "budget": 8,
        "run_dir": str(run_dir),
        "export": False,
    }


@pytest.mark.slow
def test_reduced_run_scores_anchors_and_reports_full_heldout(zoo, tmp_path, monkeypatch):
    from evomerge.execution.worker import Evaluator
    from evomerge.fitness.base import make_fitness
    from evomerge.fitness.irt import Reduction
    from evomerge.merge.engine import Merger
    from evomerge.recipe import MergeRecipe
    from evomerge.store import META, RESULT, Store, decode_scores

    scored = []
    original = Evaluator.score_items
    monkeypatch.setattr(Evaluator, "score_items",
                        lambda self, recipes: scored.extend(recipes) or original(self, recipes))
    data = experiment(zoo, tmp_path / "run")
    summary = Experiment.from_dict(data).run(progress=False)

    # calibration: the 2 sources + the design, each scored once on the full search items
    assert len(scored) == 2 + DESIGN
    reduction = Reduction.from_dict(json.loads((tmp_path / "run" / REDUCTION_FILE).read_text()))
    anchors = reduction.anchor_items()
    facts = summary["fitness_reduction"]
    assert facts["items_per_candidate"] == sum(len(a) for a in anchors.values())
    assert facts["full_items"] == 5 * MAX_ITEMS
    best = MergeRecipe.from_dict(summary["best"]["recipe"])
    assert facts["reduction_factor"] == pytest.approx(5 * MAX_ITEMS / facts["items_per_candidate"],
                                                      abs=0.01)

    # every trial: its stored answers are the full evaluation's answers on the anchor items,
    # and its values are the reduction's estimate from them
    inner = make_fitness("lm", base_model=str(zoo / "base"), suite="tinylm", max_items=MAX_ITEMS)
    model = inner.new_model()
    paths = [data["models"]["base"], *data["models"]["sources"].values()]
    merger = Merger(paths)
    store = Store(f"sqlite:///{tmp_path / 'run' / 'study.db'}", "tinylm_reduced",
                  ["maximize"] * len(inner.objectives), [0.0, 0.0], [1.5, 1.5])
    trials = store.trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 8
    for trial in trials[:3]:
        merger.build(MergeRecipe.from_dict(trial.user_attrs[META]["recipe"]), into=model)
        full = inner.evaluate(model, "search")
        answers = {t: decode_scores(s) for t, s in trial.user_attrs[RESULT]["item_scores"].items()}
        for task, idx in anchors.items():
            np.testing.assert_array_equal(answers[task], full.item_scores[task][idx])
        estimate = inner.objectives_from_task_scores(reduction.estimate("gp-irt", answers))
        assert trial.values == pytest.approx([estimate[o.name] for o in inner.objectives])

    merger.build(best, into=model)
    assert facts["best_search_full"] == pytest.approx(inner.evaluate(model, "search").objectives)

    # held-out scores of the sources are full evaluations
    merger.build(MergeRecipe.from_dict({"merge_method": "linear", "models": [
        {"model": data["models"]["sources"]["add"], "parameters": {"weight": 1.0}}]}), into=model)
    heldout = inner.evaluate(model, "heldout").objectives
    assert summary["final"]["add"] == pytest.approx(heldout)

    # resuming the finished run replays the store and reads the calibration from the cache
    scored.clear()
    Experiment.from_dict(data).run(resume=True, progress=False)
    assert scored == []


def test_bad_reduced_block_is_refused_before_any_compute(zoo, tmp_path):
    data = experiment(zoo, tmp_path / "run", estimator="magic")
    with pytest.raises(ExperimentError, match=r"fitness.reduced.estimator: unknown 'magic'"):
        Experiment.from_dict(data).run(progress=False)
    assert not (tmp_path / "run" / "study.db").exists()


@pytest.mark.slow
def test_rescore_keeps_the_best_full_search_score_among_the_top_estimates(zoo, tmp_path):
    """The winner's-curse guard: the k best trials by estimate are scored on every search item
    (here independently, with a fresh fitness) and the best of those full scores is the run's
    best; rescore: 0 keeps the best estimate."""
    from evomerge.fitness.base import make_fitness
    from evomerge.merge.engine import Merger
    from evomerge.recipe import MergeRecipe
    from evomerge.store import META, Store

    k = 3
    data = {**experiment(zoo, tmp_path / "run", rescore=k), "budget": 12}
    summary = Experiment.from_dict(data).run(progress=False)

    inner = make_fitness("lm", base_model=str(zoo / "base"), suite="tinylm", max_items=MAX_ITEMS)
    store = Store(f"sqlite:///{tmp_path / 'run' / 'study.db'}", "tinylm_reduced",
                  ["maximize"] * len(inner.objectives), [0.0, 0.0], [1.5, 1.5])
    trials = store.trials(states=(TrialState.COMPLETE,))
    order = lambda t: (np.mean(t.values), -t.user_attrs[META]["generation"],  # noqa: E731
                       -t.user_attrs[META]["index"])
    top = sorted(trials, key=order, reverse=True)[:k]
    model = inner.new_model()
    merger = Merger([data["models"]["base"], *data["models"]["sources"].values()])
    full = {}
    for trial in top:
        merger.build(MergeRecipe.from_dict(trial.user_attrs[META]["recipe"]), into=model)
        full[trial.number] = np.mean(list(inner.evaluate(model, "search").objectives.values()))
    expected = max(top, key=lambda t: (full[t.number], order(t)[1:]))

    rows = summary["fitness_reduction"]["rescored"]
    assert [r["trial"] for r in rows] == [t.number for t in top]
    assert [np.mean(list(r["full"].values())) for r in rows] == pytest.approx(
        [full[t.number] for t in top])
    assert summary["best"]["trial"] == expected.number
    assert np.mean(list(summary["fitness_reduction"]["best_search_full"].values())) == \
        pytest.approx(full[expected.number])

    plain = {**data, "run_dir": str(tmp_path / "plain")}
    plain["fitness"] = {**data["fitness"], "reduced": {**data["fitness"]["reduced"], "rescore": 0}}
    unguarded = Experiment.from_dict(plain).run(progress=False)
    assert unguarded["fitness_reduction"]["rescored"] == []
    assert unguarded["best"]["trial"] == top[0].number  # same seed, same trials: best estimate


@pytest.mark.slow
def test_a_reduced_dfs_run_calibrates_on_perturbations_of_its_start_path(zoo, tmp_path,
                                                                       monkeypatch):
    """A DFS space has a start path: calibration scores the sources and the local design
    around it (evomerge.fitness.reduced.calibration_design), not uniform layer paths."""
    from evomerge.execution.driver import Plan
    from evomerge.execution.worker import Evaluator
    from evomerge.fitness.reduced import calibration_design, source_recipe

    scored = []
    original = Evaluator.score_items
    monkeypatch.setattr(Evaluator, "score_items",
                        lambda self, recipes: scored.extend(recipes) or original(self, recipes))
    data = {**experiment(zoo, tmp_path / "run"),
            "name": "tinylm_dfs_reduced",
            "models": {"base": str(zoo / "base"),
                       "sources": {t: str(zoo / f"expert_{t}") for t in ("add", "sort")}},
            "space": {"kind": "dfs", "repeats": 2, "start": "sort"}}
    summary = Experiment.from_dict(data).run(progress=False)

    space = Plan(Experiment.from_dict(data)).space
    points, kind = calibration_design(space, DESIGN, seed=0)
    assert kind == "local" and summary["fitness_reduction"]["design"] == "local"
    expected = [source_recipe(p) for p in data["models"]["sources"].values()] + [
        space.decode(x) for x in points]
    assert [r.to_dict() for r in scored[:2 + DESIGN]] == [r.to_dict() for r in expected]
    # every design path is its start path with 1 to 4 inclusion switches flipped
    t = len(space.slots)
    flips = ((points[:, :t] > 0) != (space.start_point[:t] > 0)).sum(axis=1)
    assert flips.min() >= 1 and flips.max() <= 4
    assert summary["fitness_reduction"]["items_per_candidate"] < 5 * MAX_ITEMS
