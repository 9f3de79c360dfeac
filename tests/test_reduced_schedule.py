"""How an IRT-reduced run spends its evaluations (``evomerge.execution.reduction.Schedule``):
a warmup generation in full calibrates, candidates are scored on anchors and raced to every item
near the best full score, the model is refit as full rows accumulate; the budget accounting in
summary.json counts every item evaluation once, and a resumed run evaluates no slot twice."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from evomerge.execution.reduction import Reductions
from evomerge.fitness.base import EvalResult, Objective
from evomerge.fitness.irt import Reduction
from evomerge.fitness.reduced import (
    RACE_PRIOR,
    ReducedFitness,
    ReducedSpec,
    extrapolate,
    in_item_order,
    promising,
    race_margin,
    race_thresholds,
    racing_half,
)
from evomerge.store import META, RESULT, encode_scores, scored_in_full

MAX = [Objective("acc", "maximize")]


# ---- the rules, worked by hand ------------------------------------------------------------------


def test_race_margin_is_the_prior_then_twice_the_measured_rms_error():
    assert race_margin([0.3] * 4, "auto") == RACE_PRIOR  # fewer than 5 measured
    # errors 0.01, -0.02, 0.02, -0.01, 0.0: mean square (1 + 4 + 4 + 1 + 0) / 5 = 2e-4
    assert race_margin([0.01, -0.02, 0.02, -0.01, 0.0], "auto") == pytest.approx(
        2 * np.sqrt(2e-4))
    assert race_margin([0.0] * 6, "auto") == 0.005  # never below half a point
    # only the last 20 count: 30 large errors, then 20 of 0.001
    assert race_margin([0.5] * 30 + [0.001] * 20, "auto") == pytest.approx(0.005)
    assert race_margin([0.5] * 10, 0.02) == 0.02  # a fixed margin


def test_thresholds_and_promising_follow_each_objectives_direction():
    objectives = [Objective("acc", "maximize"), Objective("loss", "minimize")]
    thresholds = race_thresholds({"acc": 0.6, "loss": 1.0}, {}, 0.05, objectives)
    assert thresholds == pytest.approx({"acc": 0.55, "loss": 1.05})
    assert promising({"acc": 0.55, "loss": 9.0}, thresholds, objectives)  # reaches acc's
    assert promising({"acc": 0.1, "loss": 1.04}, thresholds, objectives)  # reaches loss's
    assert not promising({"acc": 0.54, "loss": 1.06}, thresholds, objectives)
    # an objective with no full score yet has no threshold
    assert race_thresholds({}, {}, 0.05, objectives) == {}
    # the previous generation's median, where it is below (above) best - (+) margin: the
    # better half of a generation is raced too
    assert race_thresholds({"acc": 0.6, "loss": 1.0}, {}, 0.05, objectives,
                           {"acc": 0.5, "loss": 1.2}) == pytest.approx({"acc": 0.5, "loss": 1.2})
    assert race_thresholds({"acc": 0.6, "loss": 1.0}, {}, 0.05, objectives,
                           {"acc": 0.58, "loss": 1.01}) == pytest.approx({"acc": 0.55, "loss": 1.05})


def test_spec_defaults_depend_on_whether_the_strategy_selects_per_item():
    spec = ReducedSpec()
    assert (spec.resolved().warmup, spec.resolved().design, spec.resolved().race,
            spec.resolved().refit, spec.resolved().rescore) == (1, 0, "auto", 1.5, 0)
    m2n2 = spec.resolved(item_selecting=True)
    assert (m2n2.warmup, m2n2.design, m2n2.race, m2n2.refit, m2n2.rescore) == (
        0, 40, None, None, 8)
    assert spec.resolved().race_stages == 2 and m2n2.race_stages == 1
    assert ReducedSpec(race_stages=1).resolved().race_stages == 1
    off = ReducedSpec(race=False, refit=False).resolved()
    assert (off.race, off.refit, off.rescore) == (None, None, 8)  # estimates: the guard is on
    assert off.race_stages == 1
    with pytest.raises(ValueError, match=r"race_stages: 2.*selects per item"):
        ReducedSpec(race_stages=2).resolved(item_selecting=True)
    with pytest.raises(ValueError, match=r"warmup: 1, refit: 2.*selects per item"):
        ReducedSpec(warmup=1, refit=2.0).resolved(item_selecting=True)
    with pytest.raises(ValueError, match="nothing to fit"):
        ReducedSpec(warmup=0, design=0)
    for bad, match in (({"race": -0.1}, "race"), ({"race": "fast"}, "race"),
                       ({"refit": 1.0}, "refit"), ({"warmup": -1}, "warmup"),
                       ({"race_stages": 0}, "race_stages"), ({"race_stages": 3}, "race_stages"),
                       ({"race_stages": True}, "race_stages")):
        with pytest.raises(ValueError, match=match):
            ReducedSpec.from_dict(bad)


class Table:
    """A fitness whose answers are a fixed table: item i of task t is right iff table[t][i]."""

    objectives = MAX

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table = table
        self.calls: list[dict[str, np.ndarray]] = []

    def num_items(self, split: str = "search") -> dict[str, int]:
        return {t: len(v) for t, v in self.table.items()}

    def objectives_from_task_scores(self, task_scores):
        return {"acc": float(np.mean(list(task_scores.values())))}

    def new_model(self):
        return None

    def evaluate(self, model, split="search", items=None):
        items = items or {t: np.arange(len(v)) for t, v in self.table.items()}
        self.calls.append({t: np.asarray(i) for t, i in items.items()})
        scores = {t: self.table[t][np.sort(items[t])] for t in self.table}
        return EvalResult(self.objectives_from_task_scores(
            {t: s.mean() for t, s in scores.items()}), scores)


def reduction_for(anchors: dict[str, list[int]], sizes: dict[str, int]) -> Reduction:
    """A reduction with the given anchors, fitted on random responses (only anchors matter)."""
    rng = np.random.default_rng(0)
    responses = {t: (rng.random((12, n)) < 0.5).astype(float) for t, n in sizes.items()}
    red = Reduction.build(responses, num_endpoints=2, anchors=2, dim=1)
    for t, a in anchors.items():
        red.tasks[t] = replace(red.tasks[t], anchors=np.asarray(a),
                               weights=np.full(len(a), 1 / len(a)))
    return red


def test_a_raced_candidate_gets_its_exact_score_and_full_rows():
    table = {"a": np.array([1, 0, 1, 1, 0, 1], float), "b": np.array([0, 0, 1, 1], float)}
    red = reduction_for({"a": [1, 4], "b": [2]}, {"a": 6, "b": 4})
    inner = Table(table)
    fitness = ReducedFitness(inner, red, "gp-irt")
    estimate = fitness.evaluate(None).objectives["acc"]

    below = fitness.evaluate(None, race={"acc": estimate + 0.01})
    assert below.info["fidelity"] == "anchors" and below.objectives["acc"] == estimate
    assert {t: list(v) for t, v in below.item_scores.items()} == {"a": [0, 0], "b": [1]}

    inner.calls.clear()
    raced = fitness.evaluate(None, race={"acc": estimate})
    assert raced.info == {"fidelity": "full", "estimate": {"acc": estimate}}
    # exact: (4/6 + 2/4) / 2, and the rows are the table's, in item order
    assert raced.objectives["acc"] == pytest.approx((4 / 6 + 2 / 4) / 2)
    for task in table:
        np.testing.assert_array_equal(raced.item_scores[task], table[task])
    # the anchors were scored once, then only the other items
    assert [sorted(c["a"]) for c in inner.calls] == [[1, 4], [0, 2, 3, 5]]


def test_racing_in_two_stages_scores_a_fixed_random_half_then_the_other_half():
    a = np.array([1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0], float)
    b = np.array([0, 0, 1, 1, 1, 0, 1, 1], float)
    red = reduction_for({"a": [1, 4], "b": [2]}, {"a": 12, "b": 8})
    inner = Table({"a": a, "b": b})
    fitness = ReducedFitness(inner, red, "gp-irt")
    estimate = fitness.evaluate(None).objectives["acc"]
    half = {t: racing_half(t, np.setdiff1d(np.arange(len(v)), anchors))
            for (t, v), anchors in zip({"a": a, "b": b}.items(), ([1, 4], [2]))}
    assert [len(h) for h in half.values()] == [5, 4]  # of 10 and 7 non-anchor items, rounded up
    # the same half on every call and every worker: drawn from the task's name
    np.testing.assert_array_equal(fitness._half["a"], half["a"])

    # the estimate from the anchors and the half: what was answered, plus the half's mean
    # answer for each of the other items
    def by_hand(table, anchors, h):
        other = len(table) - len(anchors) - len(h)
        return (table[anchors].sum() + table[h].sum() + other * table[h].mean()) / len(table)

    from_half = (by_hand(a, [1, 4], half["a"]) + by_hand(b, [2], half["b"])) / 2
    inner.calls.clear()
    stopped = fitness.evaluate(None, race={"acc": estimate}, race_full={"acc": from_half + 0.01})
    assert stopped.info == {"fidelity": "half", "estimate": {"acc": estimate},
                            "estimate_half": {"acc": pytest.approx(from_half)}}
    assert stopped.objectives["acc"] == pytest.approx(from_half)
    seen = {"a": np.union1d([1, 4], half["a"]), "b": np.union1d([2], half["b"])}
    for task, table in (("a", a), ("b", b)):  # the answers given, in item order
        np.testing.assert_array_equal(stopped.item_scores[task], table[seen[task]])
    assert [sorted(c["a"]) for c in inner.calls] == [[1, 4], sorted(half["a"])]

    inner.calls.clear()
    raced = fitness.evaluate(None, race={"acc": estimate}, race_full={"acc": from_half})
    assert raced.info["fidelity"] == "full"
    assert raced.objectives["acc"] == pytest.approx((a.mean() + b.mean()) / 2)
    np.testing.assert_array_equal(raced.item_scores["a"], a)
    np.testing.assert_array_equal(raced.item_scores["b"], b)
    # every item scored once: anchors, the half, the other half
    calls = [sorted(c["a"]) for c in inner.calls]
    assert calls[:2] == [[1, 4], sorted(half["a"])]
    assert sorted(calls[0] + calls[1] + calls[2]) == list(range(12))

    # below the first stage's threshold: the anchors alone, as with one stage
    assert fitness.evaluate(None, race={"acc": estimate + 0.01},
                            race_full={"acc": 0.0}).info["fidelity"] == "anchors"


def test_the_racing_half_is_a_random_half_and_extrapolates_without_bias():
    rest = np.arange(3, 1003)
    h = racing_half("add", rest)
    assert len(h) == 500 and len(np.unique(h)) == 500 and np.all(np.isin(h, rest))
    assert list(h) == sorted(h)
    np.testing.assert_array_equal(h, racing_half("add", rest))
    assert not np.array_equal(h, racing_half("sort", rest))
    # not the first or every other item: a draw whose mean index is near the middle
    assert abs(h.mean() - rest.mean()) < 3 * rest.std() / np.sqrt(500)
    # extrapolate: answers given (anchors 1 + 0, half 1 + 1 + 0 = 2), the half's mean (2/3)
    # for each of 4 unseen items, over 2 + 3 + 4 = 9 items
    parts = [(np.array([0, 5]), np.array([1.0, 0.0])), (np.array([1, 2, 8]),
                                                        np.array([1.0, 1.0, 0.0]))]
    assert extrapolate(parts, 4) == pytest.approx((1 + 2 + 4 * 2 / 3) / 9)
    assert list(in_item_order(parts)) == [1.0, 1.0, 1.0, 0.0, 0.0]  # items 0, 1, 2, 5, 8


# ---- the schedule, on hand-made trials -----------------------------------------------------------


def trial(value: float, rows: dict[str, np.ndarray], fidelity: dict, result: dict
          ) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        state=TrialState.COMPLETE, values=[value],
        user_attrs={META: {"generation": 0, "index": 0, "fidelity": fidelity},
                    RESULT: {"item_scores": {t: encode_scores(r) for t, r in rows.items()},
                             **result}})


def test_the_schedule_warms_up_fits_races_and_refits(tmp_path):
    from evomerge.execution.reduction import Schedule

    rng = np.random.default_rng(1)
    n = 30

    def rows() -> dict[str, np.ndarray]:
        return {"t": (rng.random(n) < rng.random()).astype(float)}

    sources = {"t": np.stack([rows()["t"] for _ in range(2)])}
    spec = ReducedSpec(anchors=3, dim=1, refit=1.5).resolved()
    cache = tmp_path / "irt"  # RUN_DIR/irt
    cache.mkdir()
    schedule = Schedule(spec, MAX, cache, sources, num_endpoints=2)
    assert schedule.fidelity() == {"full": True}  # the warmup generation

    warmup = [trial(0.4 + 0.01 * i, rows(), {"full": True}, {}) for i in range(4)]
    schedule.observe(warmup)
    first = schedule.fidelity()
    assert first["reduction"] == schedule.key and (cache / f"fit-{schedule.key}.json").is_file()
    assert first["race"] == pytest.approx({"acc": 0.43 - RACE_PRIOR})  # best full 0.43
    assert schedule.fits == [{"after_generation": 0, "key": schedule.key, "rows": 6}]

    # a generation: two estimates from anchors (no row), one raced (a row, an error measured)
    gen = [trial(0.2, {"t": np.zeros(3)}, first, {"fidelity": "anchors",
                                                   "estimate": {"acc": 0.2}}),
           trial(0.5, rows(), first, {"fidelity": "full", "estimate": {"acc": 0.52}}),
           trial(0.3, {"t": np.zeros(3)}, first, {"fidelity": "anchors",
                                                   "estimate": {"acc": 0.3}})]
    assert [scored_in_full(t, reduced=True) for t in gen] == [False, True, False]
    schedule.observe(gen)
    assert schedule.errors["acc"] == pytest.approx([0.02])
    assert schedule.best == {"acc": 0.5}
    assert schedule.median == {"acc": 0.3}  # of exact scores and estimates alike
    assert schedule.fidelity()["race"] == pytest.approx({"acc": 0.3})  # below 0.5 - RACE_PRIOR
    assert len(schedule.fits) == 1  # 7 rows < 1.5 x 6
    schedule.observe([trial(0.45, rows(), {"full": True}, {}) for _ in range(2)])
    assert [f["rows"] for f in schedule.fits] == [6, 9]  # 9 >= 1.5 x 6: refit
    assert schedule.fidelity()["race"] == pytest.approx({"acc": 0.5 - RACE_PRIOR})
    latest = json.loads((cache / "reduction.json").read_text())
    assert Reduction.from_dict(latest).to_dict() == schedule.reduction.to_dict()


def test_each_racing_stage_has_its_own_threshold_and_measured_error(tmp_path):
    from evomerge.execution.reduction import Schedule

    rng = np.random.default_rng(2)
    n = 30

    def rows() -> dict[str, np.ndarray]:
        return {"t": (rng.random(n) < 0.5).astype(float)}

    sources = {"t": np.stack([rows()["t"] for _ in range(2)])}
    cache = tmp_path / "irt"
    cache.mkdir()
    for stages in (1, 2):
        spec = ReducedSpec(anchors=3, dim=1, refit=False, race_stages=stages).resolved()
        schedule = Schedule(spec, MAX, cache, sources, num_endpoints=2)
        schedule.observe([trial(0.4, rows(), {"full": True}, {}) for _ in range(3)])
        first = schedule.fidelity()
        assert ("race_full" in first) == (stages == 2)
    # the second stage's threshold: best - its margin, never the median
    assert first["race_full"] == pytest.approx({"acc": 0.4 - RACE_PRIOR})
    half = {"t": np.zeros(16)}  # anchors + the racing half: no row
    gen = [trial(0.46, half, first, {"fidelity": "half", "estimate": {"acc": 0.5},
                                     "estimate_half": {"acc": 0.46}}),
           trial(0.45, rows(), first, {"fidelity": "full", "estimate": {"acc": 0.41},
                                       "estimate_half": {"acc": 0.47}}),
           trial(0.1, {"t": np.zeros(3)}, first, {"fidelity": "anchors",
                                                   "estimate": {"acc": 0.1}})]
    schedule.observe(gen)
    # the anchors' error against the better score known: the half's estimate, the full score
    assert schedule.errors["acc"] == pytest.approx([0.5 - 0.46, 0.41 - 0.45])
    assert schedule.errors_half["acc"] == pytest.approx([0.47 - 0.45])
    assert schedule.best == {"acc": 0.45}  # the half's 0.46 is an estimate
    assert len(schedule._rows["t"]) == 2 + 3 + 1  # sources, warmup, the one scored in full
    assert schedule.median == {"acc": 0.45}
    nxt = schedule.fidelity()
    assert nxt["race"] == pytest.approx({"acc": 0.45 - RACE_PRIOR})
    assert nxt["race_full"] == pytest.approx({"acc": 0.45 - RACE_PRIOR})


def test_the_progress_line_keeps_full_scores_and_estimates_apart():
    from evomerge.execution.driver import _Best

    best = _Best(MAX)
    for value, fidelity in ((0.4, None), (0.5, "full"), (0.7, "half"), (0.6, "anchors")):
        best.add(trial(value, {}, {}, {} if fidelity is None else {"fidelity": fidelity}))
    assert best.text() == "acc 0.5000 full, 0.7000 est"


# ---- end to end: budget accounting and resume ----------------------------------------------------


def experiment(zoo, run_dir, budget: int, **fields) -> dict:
    return {**fields,
        "name": "tinylm_schedule",
        "models": {"base": str(zoo / "base"),
                   "sources": {t: str(zoo / f"expert_{t}") for t in ("reverse", "sort")}},
        "space": "task_arithmetic_per_source",
        "fitness": {"name": "lm", "suite": "tinylm", "tasks": ["reverse", "sort"],
                    "max_items": 16, "objectives": [{"name": "mean_acc", "tasks": "all"}],
                    "reduced": {"anchors": 3, "dim": 1, "rescore": 2}},
        "strategy": {"name": "cmaes", "popsize": 4},
        "budget": budget,
        "seed": 0,
        "run_dir": str(run_dir),
        "export": False,
    }


def count_items(monkeypatch) -> dict[str, int]:
    """Item evaluations on the search split, by who asked: a trial (Evaluator.evaluate), the
    calibration (score_items) or the report."""
    from evomerge.execution.evaluator import Evaluator
    from evomerge.fitness.lm import LMFitness

    counts = {"trial": 0, "calibration": 0, "other": 0}
    phase = ["other"]
    original = LMFitness.evaluate

    def evaluate(self, model, split="search", items=None):
        result = original(self, model, split, items)
        if split == "search":
            counts[phase[0]] += sum(len(v) for v in result.item_scores.values())
        return result

    def during(name, method):
        def wrapped(*args, **kwargs):
            phase[0] = name
            try:
                return method(*args, **kwargs)
            finally:
                phase[0] = "other"
        return wrapped

    monkeypatch.setattr(LMFitness, "evaluate", evaluate)
    monkeypatch.setattr(Evaluator, "evaluate", during("trial", Evaluator.evaluate))
    monkeypatch.setattr(Evaluator, "score_items", during("calibration", Evaluator.score_items))
    return counts


def trials_of(run_dir) -> list:
    from evomerge.execution.plan import Plan
    from evomerge.experiment import Experiment
    from evomerge.store import Store

    store = Store(**Plan(Experiment.from_run_dir(run_dir)).store_args)
    return sorted(store.trials(), key=lambda t: (t.user_attrs[META]["generation"],
                                                 t.user_attrs[META]["index"]))


@pytest.mark.slow
def test_budget_accounting_counts_every_item_evaluation_once(learning_zoo, tmp_path, monkeypatch):
    import evomerge

    counts = count_items(monkeypatch)
    typed = evomerge.run(experiment(learning_zoo, tmp_path / "run", budget=16))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert typed.item_evaluations == summary["item_evaluations"]
    spent = summary["item_evaluations"]
    trials = trials_of(tmp_path / "run")
    full = 2 * 16

    assert spent["calibration"] == counts["calibration"] == 2 * full  # the two sources
    assert spent["search"] == counts["trial"]  # what the trials' evaluations scored
    assert spent["total"] == spent["calibration"] + spent["search"] + spent["rescore"]
    facts = summary["fitness_reduction"]
    assert spent["rescore"] == len(facts["rescored"]) * full
    # the warmup generation in full; then each trial is anchors only, the anchors and the
    # racing half (per task: half the other 16 - anchors items, rounded up), or every item
    anchors = facts["items_per_candidate"]
    reductions = Reductions(tmp_path / "run", "gp-irt")
    for t in trials:
        result = t.user_attrs[RESULT]
        n = sum(v["n"] for v in result["item_scores"].values())
        if t.user_attrs[META]["generation"] == 0:
            assert t.user_attrs[META]["fidelity"] == {"full": True} and n == full
        elif scored_in_full(t, reduced=True):
            assert n == full and "estimate" in result and "estimate_half" in result
        elif result["fidelity"] == "half":
            fit, _ = reductions.load(t.user_attrs[META]["fidelity"]["reduction"])
            assert {task: v["n"] for task, v in result["item_scores"].items()} == {
                task: len(a) + (16 - len(a) + 1) // 2 for task, a in fit.anchor_items().items()}
            assert t.values[0] == result["estimate_half"]["mean_acc"]
        else:
            assert result["fidelity"] == "anchors" and n == anchors
    assert facts["scored_in_full"] == sum(scored_in_full(t, reduced=True) for t in trials)
    halves = sum(t.user_attrs[RESULT]["fidelity"] == "half" for t in trials[4:])
    assert facts["scored_on_half"] == halves
    # some raced to every item, some stopped after the half, some at the anchors
    assert facts["scored_in_full"] > 4 and halves > 0 and facts["scored_in_full"] + halves < 16
    assert facts["fits"][0]["after_generation"] == 0
    # the best is among the trials scored in full or the re-scored estimates, by full score
    best = next(t for t in trials if t.number == summary["best"]["trial"])
    exact = {t.number: t.values[0] for t in trials if scored_in_full(t, reduced=True)}
    exact |= {r["trial"]: r["full"]["mean_acc"] for r in facts["rescored"]}
    assert exact[best.number] == max(exact.values())
    assert facts["best_search_full"]["mean_acc"] == pytest.approx(exact[best.number])


@pytest.fixture(scope="module")
def whole(learning_zoo, tmp_path_factory):
    """An uninterrupted four-generation run (16 candidates): what resumed runs must equal."""
    import evomerge

    run_dir = tmp_path_factory.mktemp("whole") / "run"
    evomerge.run(experiment(learning_zoo, run_dir, budget=16))
    return run_dir


@pytest.mark.slow
def test_a_resumed_run_evaluates_no_slot_twice_and_replays_the_schedule(learning_zoo, whole,
                                                                        tmp_path, monkeypatch):
    """Two generations, then resumed to four: only the new generations' slots are evaluated,
    calibration is not repeated, and every trial (value, fidelity, racing thresholds) equals
    an uninterrupted four-generation run's."""
    import evomerge
    from evomerge.execution.driver import run_experiment
    from evomerge.experiment import Experiment

    evomerge.run(experiment(learning_zoo, tmp_path / "part", budget=8))
    counts = count_items(monkeypatch)
    run_experiment(Experiment.from_run_dir(tmp_path / "part", budget=16), resume=True,
                   progress=False)

    reference, part = trials_of(whole), trials_of(tmp_path / "part")
    assert len(part) == 16  # each slot once
    assert counts["calibration"] == 0
    resumed = [t for t in part if t.user_attrs[META]["generation"] >= 2]
    assert counts["trial"] == sum(sum(v["n"] for v in t.user_attrs[RESULT]["item_scores"]
                                      .values()) for t in resumed)
    for a, b in zip(reference, part):
        assert a.values == b.values
        assert a.user_attrs[META]["fidelity"] == b.user_attrs[META]["fidelity"]
        assert a.user_attrs[RESULT].get("fidelity") == b.user_attrs[RESULT].get("fidelity")


@pytest.mark.slow
def test_budget_items_ends_the_run_at_the_first_generation_that_reaches_it(learning_zoo, whole,
                                                                         tmp_path, monkeypatch):
    """The cap is the item evaluations of calibration plus the first two generations of an
    uncapped run (the same trials: the cap only decides where to stop): the capped run stops
    after exactly those two generations, reports the cap, resumes to the same stop without
    evaluating anything, and, resumed with a larger cap, goes on to the uncapped run's trials."""
    import evomerge
    from evomerge.execution.driver import run_experiment
    from evomerge.experiment import Experiment
    from evomerge.store import items_scored

    calibration = json.loads((whole / "summary.json").read_text())[
        "item_evaluations"]["calibration"]
    uncapped = trials_of(whole)
    assert calibration == 2 * 2 * 16  # two sources on 2 x 16 items
    cap = calibration + sum(items_scored(t) for t in uncapped[:8])

    capped = evomerge.run(experiment(learning_zoo, tmp_path / "capped", budget=16,
                                     budget_items=cap))
    assert capped.n_trials == 8 and capped.budget_items == cap
    spent = capped.item_evaluations
    assert spent["calibration"] + spent["search"] == cap
    for a, b in zip(uncapped, trials_of(tmp_path / "capped")):
        assert a.values == b.values

    counts = count_items(monkeypatch)  # a resume replays the stop: nothing is evaluated
    run_experiment(Experiment.from_run_dir(tmp_path / "capped"), resume=True, progress=False)
    assert counts["trial"] == counts["calibration"] == 0
    assert len(trials_of(tmp_path / "capped")) == 8

    # one item more than two generations spent: a third generation starts, then the run stops
    run_experiment(Experiment.from_run_dir(tmp_path / "capped", budget_items=cap + 1),
                   resume=True, progress=False)
    resumed = trials_of(tmp_path / "capped")
    assert len(resumed) == 12
    for a, b in zip(uncapped, resumed):
        assert a.values == b.values
