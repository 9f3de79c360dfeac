"""IRT reduction of a run's fitness (``fitness: {..., reduced: {...}}`` in an experiment).

How a reduced run spends its evaluations (:class:`Schedule`, the block's fields in
:class:`evomerge.fitness.reduced.ReducedSpec`):

1. Before the search the driver scores the sources (and ``design`` merges of the space, when
   asked) on the FULL search items with a throw-away evaluator, released before the executor
   starts its own (responses cached as JSON in ``RUN_DIR/irt/``: a resumed run re-scores
   nothing).
2. The first ``warmup`` generations of the search are scored on every search item. They are
   real candidates, counted in the budget and told to the strategy, and with the sources they
   are the rows the IRT model is fit on: calibration spends no evaluation the search does not
   use.
3. Every later candidate is scored on the fitted anchors; when its estimate comes within the
   racing margin of the best full score of the earlier generations, or reaches the previous
   generation's median score, on a fixed random half of the remaining items too (racing), and
   when the estimate from those (``race_stages: 2``; with 1, straight to every item) comes
   within the second stage's own margin of the best full score, on the other half: the
   strategy ranks the better half of a generation (a population strategy's parents) by close
   estimates or exact scores and the final pick the contenders by exact scores. Each stage's
   error is measured on the candidates that went further (the anchors' against the half's
   estimate or the full score, the half's against the full score: the ``auto`` margins), and
   each candidate scored in full adds a row.
4. The IRT model is refit on all rows scored in full whenever they grew by ``refit``.

Every decision is made between generations from finished trials only, and written into each
trial when it is enqueued (``meta["fidelity"]``: ``{"full": true}``, or ``{"reduction": KEY,
"race": {objective: threshold}, "race_full": {objective: threshold}}``), so any executor's
workers follow it (they read fit KEY from
``RUN_DIR/irt/fit-KEY.json``: :class:`Reductions`), and a resumed run replays the same
decisions from the store. The latest fit is also written to ``RUN_DIR/irt/reduction.json``.
Held-out scores at the end of a run are always full evaluations.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from optuna.trial import FrozenTrial, TrialState

from evomerge.experiment import ExperimentError
from evomerge.fitness.base import FITNESSES, Objective
from evomerge.fitness.irt import Reduction
from evomerge.fitness.reduced import (
    ReducedSpec,
    cached_responses,
    calibration_design,
    check_reducible,
    fit_reduction,
    race_thresholds,
    source_recipe,
)
from evomerge.store import RESULT, decode_scores, scored_in_full

if TYPE_CHECKING:  # the driver's: it hands calibration its plan and a way to build an evaluator
    from evomerge.execution.evaluator import Evaluator
    from evomerge.execution.plan import Plan

#: Where the fitted reduction lives, relative to the run directory (workers read it there).
REDUCTION_FILE = Path("irt") / "reduction.json"


class Reductions:
    """A worker's view of the run's fits: ``load(key) -> (Reduction, estimator)``, for a fit's
    key (``fit-KEY.json``) or :meth:`latest_key` (``reduction.json``, the latest fit)."""

    def __init__(self, run_dir: Path, estimator: str) -> None:
        self.directory = Path(run_dir) / REDUCTION_FILE.parent
        self.estimator = estimator

    def latest_key(self) -> str:
        """The latest fit's key, as of now (the driver rewrites ``reduction.json`` at each
        fit)."""
        path = self.directory / REDUCTION_FILE.name
        return f"latest@{path.stat().st_mtime_ns}" if path.is_file() else "latest@missing"

    def load(self, key: str) -> tuple[Reduction, str]:
        latest = key.startswith("latest@")
        path = self.directory / (REDUCTION_FILE.name if latest else f"fit-{key}.json")
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the driver writes each fit before it "
                                    "enqueues a trial that uses it (is the run directory "
                                    "shared with this worker?)")
        data = json.loads(path.read_text())
        return Reduction.from_dict(data if latest else data["reduction"]), self.estimator


def resolve_spec(plan: Plan, spec: ReducedSpec) -> ReducedSpec:
    """``spec`` with its defaults chosen for the run's strategy (see ``ReducedSpec.resolved``)."""
    try:
        return spec.resolved(getattr(plan.strategy_factory, "needs_item_scores", False))
    except ValueError as exc:
        raise ExperimentError(str(exc)) from None


def calibrate_run(plan: Plan, new_evaluator: Callable[[], Evaluator], *, progress: bool = True
                  ) -> tuple[dict[str, Any], Schedule]:
    """Score the sources and the design (or reuse their cached scores) and make the run's
    :class:`Schedule`; returns what summary.json reports about it, and the schedule.
    ``new_evaluator``: a full (not reduced) evaluator of the run, built here and released
    before the executor builds its own. A fitness that cannot be reduced
    (:func:`evomerge.fitness.reduced.check_reducible`) is refused before anything is scored."""
    experiment = plan.experiment
    spec = experiment.fitness.reduced
    assert spec is not None, "calibrate_run needs a fitness.reduced block"
    try:
        check_reducible(FITNESSES[experiment.fitness.name], experiment.fitness.name)
    except ValueError as exc:
        raise ExperimentError(str(exc)) from None
    spec = resolve_spec(plan, spec)
    rows, design = _score_calibration(plan, new_evaluator, spec, progress)
    gc.collect()  # the calibration evaluator (sources, model) is gone before workers start
    schedule = Schedule(spec, plan.objectives, experiment.run_path / REDUCTION_FILE.parent,
                        rows, len(experiment.models.sources))
    facts = {"estimator": spec.estimator, "anchors_per_task": spec.anchors,
             "design_merges": spec.design, "design": design, "warmup": spec.warmup,
             "race": spec.race, "race_stages": spec.race_stages, "refit": spec.refit,
             "calibration_models": len(experiment.models.sources) + spec.design,
             "full_items": sum(np.shape(y)[1] for y in rows.values()),
             "rescore": spec.rescore}
    return facts, schedule


def _score_calibration(plan: Plan, new_evaluator: Callable[[], Evaluator], spec: ReducedSpec,
                       progress: bool) -> tuple[dict[str, np.ndarray], str]:
    """The sources' and the design's full search responses (task -> models x items; the design
    from :func:`evomerge.fitness.reduced.calibration_design`: uniform in the bounds, or local
    around a DFS space's start), and the design's kind. Progress: a bar on a terminal, plain
    periodic lines in a log (:func:`evomerge.report.track`)."""
    from evomerge.report import track

    experiment = plan.experiment
    endpoints = [source_recipe(p) for p in experiment.models.sources.values()]
    points, kind = calibration_design(plan.space, spec.design, spec.seed)
    design = [plan.space.decode(x) for x in points]
    evaluator = new_evaluator()

    def score(recipes: list) -> list:
        items = track(list(recipes), "IRT calibration (full search items)", enabled=progress)
        return [evaluator.score_items([r])[0] for r in items]

    responses, _ = cached_responses(
        score, endpoints + design, experiment.run_path / REDUCTION_FILE.parent,
        {"fitness": experiment.fitness.name, "options": experiment.fitness.options,
         "endpoints": len(endpoints)})
    return responses, kind if spec.design else "none"


class Schedule:
    """Which items each generation's candidates are scored on (the module docstring's steps
    2-4), decided between generations from what finished. The driver asks :meth:`fidelity`
    before it enqueues a generation and :meth:`observe` once the generation finished
    (replayed or evaluated: the same trials, the same decisions)."""

    def __init__(self, spec: ReducedSpec, objectives: Sequence[Objective], cache_dir: Path,
                 rows: Mapping[str, np.ndarray], num_endpoints: int) -> None:
        self.spec, self.objectives, self.cache_dir = spec, list(objectives), Path(cache_dir)
        self.num_endpoints = num_endpoints
        self._rows = {t: list(y) for t, y in rows.items()}  # sources, design, then full trials
        self.key: str | None = None
        self.reduction: Reduction | None = None
        self.fits: list[dict[str, Any]] = []  # after which generation, on how many rows
        self.best: dict[str, float] = {}  # best full score per objective
        # estimate - better score, per racing stage: the anchors' (against the half's estimate
        # or the full score) and the racing half's (against the full score)
        self.errors: dict[str, list[float]] = {o.name: [] for o in self.objectives}
        self.errors_half: dict[str, list[float]] = {o.name: [] for o in self.objectives}
        self.median: dict[str, float] = {}  # the last generation's, exact or estimated
        self.generations = 0
        if spec.warmup == 0:
            self._fit()

    def fidelity(self) -> dict[str, Any]:
        """The next generation's: every item during the warmup, else the latest fit's anchors
        with racing thresholds (once some candidate was scored in full)."""
        if self.key is None:
            return {"full": True}
        out: dict[str, Any] = {"reduction": self.key}
        if self.spec.race is not None and self.best:
            out["race"] = race_thresholds(self.best, self.errors, self.spec.race,
                                          self.objectives, self.median)
            if self.spec.race_stages == 2:
                out["race_full"] = race_thresholds(self.best, self.errors_half, self.spec.race,
                                                   self.objectives)
        return out

    def observe(self, trials: Sequence[FrozenTrial]) -> None:
        """A finished generation (slot order): its full scores (best, each racing stage's
        error, rows) and its median score (exact and estimated alike: the next racing
        threshold), then a fit when the warmup ends or the rows grew by ``refit``."""
        for t in trials:
            if t.state != TrialState.COMPLETE:
                continue
            result = t.user_attrs.get(RESULT, {})
            half = result.get("estimate_half")
            if not scored_in_full(t, reduced=True):
                if half is not None and "estimate" in result:  # raced, stopped after half
                    for o in self.objectives:
                        self.errors[o.name].append(result["estimate"][o.name] - half[o.name])
                continue
            scores = {task: decode_scores(v) for task, v in result.get("item_scores", {}).items()}
            if set(scores) == set(self._rows):
                for task, row in scores.items():
                    self._rows[task].append(row)
            for o, value in zip(self.objectives, t.values):
                better = max if o.direction == "maximize" else min
                self.best[o.name] = better(self.best.get(o.name, value), value)
                if "estimate" in result:
                    self.errors[o.name].append(result["estimate"][o.name] - value)
                if half is not None:
                    self.errors_half[o.name].append(half[o.name] - value)
        values = [t.values for t in trials if t.state == TrialState.COMPLETE]
        if values:
            self.median = {o.name: float(np.median([v[k] for v in values]))
                           for k, o in enumerate(self.objectives)}
        self.generations += 1
        rows = len(next(iter(self._rows.values())))
        if self.key is None:
            if self.generations >= self.spec.warmup:
                self._fit()
        elif self.spec.refit is not None and rows >= self.spec.refit * self.fits[-1]["rows"]:
            self._fit()

    def facts(self) -> dict[str, Any]:
        """What summary.json reports of the fits: anchor items per candidate (the latest
        fit's; k-means may merge anchors), the reduction factor, and every fit."""
        if self.reduction is None:
            return {"fits": []}
        evaluated = self.reduction.num_evaluated()
        return {"items_per_candidate": evaluated,
                "reduction_factor": round(self.reduction.num_items() / evaluated, 2),
                "fits": list(self.fits)}

    def _fit(self) -> None:
        from evomerge.report import write_atomic  # the driver's: workers never fit

        responses = {t: np.stack(rows) for t, rows in self._rows.items()}
        reduction, self.key = fit_reduction(responses, self.num_endpoints, self.spec,
                                            self.cache_dir)
        self.reduction = reduction
        write_atomic(self.cache_dir / REDUCTION_FILE.name, json.dumps(reduction.to_dict()))
        self.fits.append({"after_generation": self.generations - 1, "key": self.key,
                          "rows": len(next(iter(responses.values())))})

