"""IRT-reduced fitness: score a candidate on a few anchor items per task, estimate the rest.

``ReducedFitness(inner, reduction, estimator)`` wraps a fitness that can evaluate a subset of its
items (``evaluate(model, split, items={task: indices})``, ``num_items(split) -> {task: N}``)
and that combines task accuracies into objectives through ``objectives_from_task_scores``. On
``search`` it evaluates only the reduction's anchors and turns the per-task estimates into
objectives exactly as the inner fitness does; on ``heldout`` it is the full inner evaluation.

:func:`calibrate` builds the reduction once per run: it scores the source models and a design
of merges on the FULL search items (through any callable that scores a list of recipes, so it
knows nothing of drivers or executors), fits the IRT model per task and picks the anchors. Both
the response matrix and the reduction are cached as JSON in the run directory, keyed by a hash of
their inputs: a resumed run reuses them, and a new anchor count or estimator re-fits without
re-evaluating anything. The experiment block it serves::

    fitness:
      ...
      reduced: {estimator: gp-irt, anchors: 20, design: 40, dim: 2, features: irt, seed: 0}
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from evomerge.fitness.base import EvalResult, Fitness, Objective
from evomerge.fitness.irt import ESTIMATORS, Reduction, estimate
from evomerge.recipe import MergeRecipe

__all__ = ["RACE_PRIOR", "RACE_WINDOW", "ReducedFitness", "ReducedSpec", "SubsetFitness",
           "cached_responses", "calibrate", "calibration_design", "check_reducible",
           "extrapolate", "fit_reduction", "fit_settings", "in_item_order", "local_design",
           "promising", "race_margin", "race_thresholds", "racing_half", "random_merges",
           "response_matrix", "source_recipe", "uniform_design", "validate"]

#: Scores recipes on the full search items: one ``{task: per-item scores}`` per recipe, in order.
ScoreRecipes = Callable[[Sequence[MergeRecipe]], Sequence[Mapping[str, np.ndarray]]]


class SubsetFitness(Protocol):
    """What :class:`ReducedFitness` needs of the fitness it wraps."""

    objectives: list[Objective]

    def new_model(self) -> torch.nn.Module: ...

    def evaluate(self, model: torch.nn.Module, split: str = "search",
                 items: Mapping[str, np.ndarray] | None = None) -> EvalResult: ...

    def num_items(self, split: str = "search") -> dict[str, int]: ...

    def objectives_from_task_scores(self, task_scores: Mapping[str, float]) -> dict[str, float]: ...


#: Racing's margin before enough estimates were checked against full scores to measure it.
RACE_PRIOR = 0.05
#: How many (estimate, full score) pairs measure racing's margin: the most recent ones, since
#: each refit changes the estimator's error.
RACE_WINDOW = 20


@dataclass(frozen=True)
class ReducedSpec:
    """The experiment's ``fitness.reduced`` block.

    estimator: one of ``irt.ESTIMATORS``; anchors: per task; dim: IRT dimension; features:
    what anchors cluster on (``irt`` embeddings or ``correctness`` vectors); seed: the design
    and k-means.

    How the run spends its evaluations (see :mod:`evomerge.execution.reduction`):

    - warmup: the first ``warmup`` generations of the search are scored on every search item;
      they are real candidates (the strategy is told their exact scores) and, with the sources,
      the rows the IRT model is first fit on. 0: fit before the search, on the sources and the
      design.
    - design: candidates drawn from the run's space (:func:`calibration_design`: uniform, or
      around a DFS space's start path) scored in full before the search, only to calibrate.
    - race: after the warmup a candidate is scored on the anchors; when its estimate comes
      within ``race`` of the best full score of the earlier generations, or reaches the previous
      generation's median, it is scored on the remaining items too, and the search and the
      final pick see its exact score. ``auto``:
      twice the estimator's measured error (root mean square of estimate minus full score over
      the last :data:`RACE_WINDOW` raced candidates; :data:`RACE_PRIOR` until 5 were). None:
      never (every candidate keeps its estimate).
    - race_stages: 2 races in two steps: a raced candidate is first scored on a fixed random
      half of the remaining items (:meth:`ReducedFitness.evaluate`), which estimates its score
      with a fraction of the anchors' error; only when that estimate too comes within the
      margin of the best full score (measured for this stage alone; the median does not count
      here) is it scored on the other half. The strategy ranks the better half of a
      generation by these close estimates, and full scores go to the final pick's contenders.
      1: straight from the anchors to every item.
    - refit: refit the IRT model, on every row scored in full so far, whenever the rows grew by
      this factor since the last fit. None: fit once.
    - rescore: at the end, score this many best estimates that were not scored in full on
      every search item; the best full score wins (see ``evomerge.report._rescore``).

    None means "chosen for the strategy" (:meth:`resolved`): a strategy that selects per item
    (M2N2) needs the same anchors for the whole run, so it keeps one calibration before the
    search (warmup 0, 40 design merges, no racing, no refit, rescore 8); every other strategy
    gets warmup 1, no design, racing ``auto`` in 2 stages, refit 1.5 and no rescore.
    """

    estimator: str = "gp-irt"
    anchors: int = 20
    design: int | None = None
    dim: int = 2
    features: str = "irt"
    seed: int = 0
    rescore: int | None = None
    warmup: int | None = None
    race: float | str | None = None
    race_stages: int | None = None
    refit: float | None = None

    def __post_init__(self) -> None:
        where = "fitness.reduced"
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"{where}.estimator: unknown {self.estimator!r}; "
                             f"known: {', '.join(ESTIMATORS)}")
        for name, low in (("anchors", 1), ("design", 0), ("dim", 1), ("rescore", 0),
                          ("warmup", 0), ("race_stages", 1)):
            value = getattr(self, name)
            if value is None and name in ("design", "rescore", "warmup", "race_stages"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{where}.{name}: expected an integer >= {low}, got {value!r}")
        if self.features not in ("irt", "correctness"):
            raise ValueError(f"{where}.features: expected 'irt' or 'correctness', "
                             f"got {self.features!r}")
        if self.race_stages is not None and self.race_stages > 2:
            raise ValueError(f"{where}.race_stages: expected 1 (anchors, then every item) or 2 "
                             f"(anchors, half the other items, the rest), got {self.race_stages}")
        race = self.race
        if not (race is None or race is False or race == "auto" or (
                isinstance(race, (int, float)) and not isinstance(race, bool) and race >= 0)):
            raise ValueError(f"{where}.race: expected auto, a margin >= 0 or off, got {race!r}")
        refit = self.refit
        if not (refit is None or refit is False or (
                isinstance(refit, (int, float)) and not isinstance(refit, bool) and refit > 1)):
            raise ValueError(f"{where}.refit: expected a growth factor > 1 (1.5: refit when the "
                             f"rows scored in full grew by half) or off, got {refit!r}")
        if self.warmup == 0 and self.design == 0:
            raise ValueError(f"{where}: warmup 0 and design 0 leave nothing to fit the IRT model "
                             "on but the sources; set warmup >= 1 (the search's first "
                             "generation, scored in full) or design > 0")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ReducedSpec:
        """Validate a YAML mapping; unknown keys are named in the error."""
        data = dict(data or {})
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"fitness.reduced: unknown key(s) {', '.join(unknown)}; allowed: "
                             f"{', '.join(cls.__dataclass_fields__)}")
        return cls(**data)

    def resolved(self, item_selecting: bool = False) -> ReducedSpec:
        """Every None (and ``off``) made explicit for a strategy that selects per item
        (``item_selecting``: M2N2) or not; refuses what an item-selecting strategy cannot use."""
        off = (None, False)
        if item_selecting:
            bad = [f"{k}: {v}" for k, v in (("warmup", self.warmup), ("race", self.race),
                                             ("refit", self.refit)) if v not in (*off, 0)]
            if self.race_stages not in (None, 1):
                bad.append(f"race_stages: {self.race_stages}")
            if bad:
                raise ValueError(
                    f"fitness.reduced: {', '.join(bad)}: a strategy that selects per item "
                    "compares candidates' answers on the same anchors for the whole run; use "
                    "warmup: 0, race: off, refit: off (the defaults for it)")
            warmup, race, refit = 0, None, None
        else:
            warmup = 1 if self.warmup is None else self.warmup
            race = "auto" if self.race is None else (None if self.race is False else self.race)
            refit = 1.5 if self.refit is None else (None if self.refit is False else self.refit)
        design = (40 if warmup == 0 else 0) if self.design is None else self.design
        rescore = (0 if race is not None else 8) if self.rescore is None else self.rescore
        stages = (2 if race is not None else 1) if self.race_stages is None else \
            self.race_stages
        # replace validates the new spec: warmup 0 with design 0 is refused here too
        return replace(self, warmup=warmup, race=race, refit=refit, design=design,
                       rescore=rescore, race_stages=stages)


def check_reducible(fitness: Any, name: str | None = None) -> None:
    """ValueError (``fitness.reduced: ...``) unless ``fitness`` (a fitness class or object,
    registered as ``name``) can be IRT-reduced: it has the :class:`SubsetFitness` methods and
    does not say why not in a ``not_reducible`` attribute. Drivers call it before any compute."""
    cls = fitness if isinstance(fitness, type) else type(fitness)
    what = f"the {name!r} fitness" if name else cls.__name__
    reason = getattr(fitness, "not_reducible", None)
    if reason:
        raise ValueError(f"fitness.reduced: {what} cannot be IRT-reduced: {reason}")
    for attr in ("num_items", "objectives_from_task_scores"):
        if not callable(getattr(fitness, attr, None)):
            raise ValueError(  # noqa: TRY004 - a configuration error, as drivers report them
                f"fitness.reduced: {what} cannot be IRT-reduced: it has no "
                f"{attr}() (see evomerge.fitness.reduced.SubsetFitness)")


class ReducedFitness(Fitness):
    """``inner`` scored on the reduction's anchors during search, in full on ``heldout``.

    The returned ``item_scores`` on ``search`` are the answers to the items evaluated (per
    task, in ascending item order: the anchors, the anchors and the racing half, or every item),
    so everything downstream that reads per-item scores sees what was evaluated.
    """

    def __init__(self, inner: SubsetFitness, reduction: Reduction, estimator: str) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator: unknown {estimator!r}; known: {', '.join(ESTIMATORS)}")
        check_reducible(inner)
        sizes = inner.num_items("search")
        mismatch = {t: (sizes.get(t), r.num_items) for t, r in reduction.tasks.items()
                    if sizes.get(t) != r.num_items}
        if set(sizes) != set(reduction.tasks) or mismatch:
            raise ValueError(f"reduction does not match the fitness's search items: fitness has "
                             f"{sizes}, reduction has "
                             f"{ {t: r.num_items for t, r in reduction.tasks.items()} }; "
                             "re-calibrate")
        self.inner = inner
        self.reduction = reduction
        self.estimator = estimator
        self.objectives = list(inner.objectives)
        self._anchors = reduction.anchor_items()
        self._rest = {t: np.setdiff1d(np.arange(sizes[t]), a) for t, a in self._anchors.items()}
        self._half = {t: racing_half(t, rest) for t, rest in self._rest.items()}
        self._other = {t: np.setdiff1d(rest, self._half[t]) for t, rest in self._rest.items()}

    def new_model(self) -> torch.nn.Module:
        return self.inner.new_model()

    def num_items(self, split: str = "search") -> dict[str, int]:
        """Items evaluated per task: the anchors on ``search``, all of them on ``heldout``."""
        if split == "search":
            return {t: len(a) for t, a in self._anchors.items()}
        return self.inner.num_items(split)

    def estimate(self, anchor_scores: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Estimated full-set accuracy per task from the anchor answers."""
        return self.reduction.estimate(self.estimator, anchor_scores)

    def evaluate(self, model: torch.nn.Module, split: str = "search", *,
                 race: Mapping[str, float] | None = None,
                 race_full: Mapping[str, float] | None = None) -> EvalResult:
        """On ``search``: the anchors' answers and the estimate. With ``race`` (objective ->
        threshold, from :func:`race_thresholds`), a candidate whose estimate reaches a
        threshold is scored on the remaining items too and gets its exact score and full item
        rows; with ``race_full`` as well, it is first scored on the racing half of them
        (:func:`racing_half`) and goes on to the other half only when the estimate from the
        anchors and that half (:func:`extrapolate`) reaches a ``race_full`` threshold.
        ``info`` says which (``fidelity``: ``anchors``, ``half`` or ``full``) and holds the
        estimates (``estimate``, ``estimate_half``), so a driver can measure each stage's
        error on the candidates that went further."""
        if split != "search":
            return self.inner.evaluate(model, split)
        anchors = self.inner.evaluate(model, split, items=self._anchors).item_scores
        estimate = self.inner.objectives_from_task_scores(self.estimate(anchors))
        info: dict[str, Any] = {"fidelity": "anchors", "estimate": estimate}
        if race is None or not promising(estimate, race, self.objectives):
            return EvalResult(estimate, anchors, info)
        parts = {t: [(self._anchors[t], a)] for t, a in anchors.items()}
        if race_full is not None:
            self._score_more(model, self._half, parts)
            half = self.inner.objectives_from_task_scores(
                {t: extrapolate(p, len(self._other[t])) for t, p in parts.items()})
            info["estimate_half"] = half
            if not promising(half, race_full, self.objectives):
                return EvalResult(half, {t: in_item_order(p) for t, p in parts.items()},
                                  {**info, "fidelity": "half"})
        self._score_more(model, self._rest if race_full is None else self._other, parts)
        rows = {t: in_item_order(p) for t, p in parts.items()}
        exact = self.inner.objectives_from_task_scores({t: float(r.mean()) for t, r in rows.items()})
        return EvalResult(exact, rows, {**info, "fidelity": "full"})

    def _score_more(self, model: torch.nn.Module, items: Mapping[str, np.ndarray],
                    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]]) -> None:
        """Score ``items`` (per task) on the search split; add (items, answers) to ``parts``."""
        answers = self.inner.evaluate(model, "search", items=items).item_scores
        for t, scored in parts.items():
            scored.append((items[t], answers[t]))


def racing_half(task: str, rest: np.ndarray) -> np.ndarray:
    """A task's racing half: half (rounded up) of its non-anchor items ``rest``, drawn at random
    with a seed from the task's name, so every worker draws the same half of the same items.
    Random, so that its mean answer estimates the other half's without bias."""
    seed = int.from_bytes(hashlib.sha256(task.encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(rest, size=(len(rest) + 1) // 2, replace=False))


def extrapolate(parts: Sequence[tuple[np.ndarray, np.ndarray]], unseen: int) -> float:
    """A task's score estimated from ``parts`` (item indices, their answers), the last of them a
    random sample of the items not in the others, when ``unseen`` items were not scored: the
    answers given, plus the sample's mean answer for each unseen item, over all items."""
    given = sum(float(np.sum(a)) for _, a in parts)
    total = sum(len(i) for i, _ in parts) + unseen
    sample = parts[-1][1]
    return (given + unseen * (float(np.mean(sample)) if len(sample) else 0.0)) / total


def in_item_order(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """One task's answers in ascending item order, from ``parts`` (item indices, their answers
    in ascending item order, as the inner fitness returns them)."""
    items = np.concatenate([np.sort(np.asarray(i)) for i, _ in parts])
    answers = np.concatenate([np.asarray(a, dtype=float) for _, a in parts])
    return answers[np.argsort(items, kind="stable")]


def promising(estimate: Mapping[str, float], thresholds: Mapping[str, float],
              objectives: Sequence[Objective]) -> bool:
    """Whether an estimate reaches any objective's racing threshold (>= for an objective to
    maximize, <= to minimize): the candidate could belong on the front."""
    return any(estimate[o.name] >= thresholds[o.name] if o.direction == "maximize"
               else estimate[o.name] <= thresholds[o.name]
               for o in objectives if o.name in thresholds)


def race_margin(errors: Sequence[float], race: float | str) -> float:
    """Racing's margin for one objective: ``race`` itself, or for ``auto`` twice the root mean
    square of the last :data:`RACE_WINDOW` (estimate - full score) differences (at least
    0.005), :data:`RACE_PRIOR` while fewer than 5 were measured."""
    if race != "auto":
        return float(race)
    if len(errors) < 5:
        return RACE_PRIOR
    recent = np.asarray(errors[-RACE_WINDOW:], dtype=float)
    return max(0.005, 2.0 * float(np.sqrt(np.mean(recent ** 2))))


def race_thresholds(best: Mapping[str, float], errors: Mapping[str, Sequence[float]],
                    race: float | str, objectives: Sequence[Objective],
                    median: Mapping[str, float] | None = None) -> dict[str, float]:
    """Per objective with a full score so far: its best full score, less (maximize) or plus
    (minimize) the margin (:func:`race_margin`); or, when lower (higher), the previous
    generation's ``median`` score: a population-based strategy selects parents from the
    better half of each generation, so that half is ranked by exact scores too."""
    out = {}
    median = median or {}
    for o in objectives:
        if o.name in best:
            margin = race_margin(errors.get(o.name, ()), race)
            if o.direction == "maximize":
                out[o.name] = min(best[o.name] - margin, median.get(o.name, np.inf))
            else:
                out[o.name] = max(best[o.name] + margin, median.get(o.name, -np.inf))
    return out


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


def source_recipe(path: str | os.PathLike, dtype: str | None = None) -> MergeRecipe:
    """A recipe whose merge is exactly one model (linear, weight 1): how sources are scored."""
    return MergeRecipe.from_dict({"merge_method": "linear", "dtype": dtype,
                                  "models": [{"model": str(path), "parameters": {"weight": 1.0}}]})


def uniform_design(lower: np.ndarray, upper: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` points drawn uniformly in a search space's bounds (decode each into a recipe)."""
    lower, upper = np.asarray(lower, dtype=float), np.asarray(upper, dtype=float)
    return np.random.default_rng(seed).uniform(lower, upper, size=(n, len(lower)))


#: Local designs: each point flips between LOCAL_FLIPS[0] and LOCAL_FLIPS[1] on/off switches
#: (uniformly) and jitters every other coordinate by N(0, (LOCAL_JITTER * range)^2).
LOCAL_FLIPS = (1, 4)
LOCAL_JITTER = 0.1


def local_design(start: np.ndarray, lower: np.ndarray, upper: np.ndarray, n: int,
                 seed: int = 0, *, switches: int = 0, flips: tuple[int, int] = LOCAL_FLIPS,
                 jitter: float = LOCAL_JITTER) -> np.ndarray:
    """``n`` perturbations of ``start`` (ours): the design for spaces whose uniform draws are
    mostly broken models (a DFS layer path drawn uniformly is), so that IRT calibrates on models
    like the ones a search started at ``start`` will score.

    The first ``switches`` coordinates are on/off switches (on when > 0, as DFS inclusion
    values): each point flips ``k ~ U{flips[0], ..., flips[1]}`` distinct ones of them (``v ->
    -v``; a 0 becomes ``upper / 2``). Every other coordinate moves by ``N(0, (jitter * (upper -
    lower))^2)``. Points are clipped to the bounds.
    """
    start = np.asarray(start, dtype=float)
    lower, upper = np.asarray(lower, dtype=float), np.asarray(upper, dtype=float)
    lo, hi = flips
    if not 0 <= switches <= len(start) or not 0 <= lo <= hi <= switches or jitter < 0:
        raise ValueError(f"local_design: need 0 <= flips[0] <= flips[1] <= switches <= dim "
                         f"({len(start)}) and jitter >= 0, got switches={switches}, "
                         f"flips={flips}, jitter={jitter}")
    rng = np.random.default_rng(seed)
    points = np.repeat(start[None, :], n, axis=0)
    points[:, switches:] += rng.normal(size=(n, len(start) - switches)) * (
        jitter * (upper - lower)[switches:])
    for x in points:
        chosen = rng.choice(switches, size=int(rng.integers(lo, hi + 1)), replace=False)
        x[chosen] = np.where(x[chosen] != 0, -x[chosen], upper[chosen] / 2)
    return np.clip(points, lower, upper)


def calibration_design(space: Any, n: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """The design a run's reduction calibrates on, chosen by the bound space: a
    :func:`local_design` around ``space.start_point`` for spaces that have one (DFS: its
    ``slots`` inclusion values are the switches, the hop scales are jittered), else a
    :func:`uniform_design` in the bounds. Returns ``(points, "local" | "uniform")``."""
    start = getattr(space, "start_point", None)
    if start is None:
        return uniform_design(space.lower, space.upper, n, seed), "uniform"
    switches = len(getattr(space, "slots", ()))
    flips = (min(LOCAL_FLIPS[0], switches), min(LOCAL_FLIPS[1], switches))
    return local_design(start, space.lower, space.upper, n, seed, switches=switches,
                        flips=flips), "local"


def response_matrix(scores: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack per-model ``{task: item scores}`` into ``{task: models x items}``."""
    if not scores:
        raise ValueError("responses: no models were scored")
    tasks = list(scores[0])
    out = {}
    for task in tasks:
        rows = [np.asarray(s[task], dtype=np.float64) for s in scores]
        lengths = {len(r) for r in rows}
        if len(lengths) != 1:
            raise ValueError(f"responses: task {task!r} has different item counts across "
                             f"models ({sorted(lengths)}); score the full search split")
        out[task] = np.stack(rows)
    return out


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def cached_responses(score: ScoreRecipes, recipes: Sequence[MergeRecipe],
                     cache_dir: str | os.PathLike, fingerprint: Mapping[str, Any] | None = None,
                     ) -> tuple[dict[str, np.ndarray], str]:
    """The response matrix of ``recipes`` (scored on first use, then read from the cache)
    and its cache key, a hash of the recipes and ``fingerprint``."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    inputs = {"recipes": [r.to_dict() for r in recipes], "fingerprint": dict(fingerprint or {})}
    key = _digest(inputs)
    path = cache / f"irt-responses-{key}.json"
    if path.is_file():
        stored = json.loads(path.read_text())["responses"]
        return {t: np.asarray(y, dtype=np.float64) for t, y in stored.items()}, key
    responses = response_matrix(list(score(recipes)))
    _write_json(path, {"inputs": inputs, "responses": {t: y.tolist() for t, y in responses.items()}})
    return responses, key


def fit_settings(spec: ReducedSpec) -> dict[str, Any]:
    """What of ``spec`` a fit depends on (the estimator is chosen at scoring time)."""
    return {"anchors": spec.anchors, "dim": spec.dim, "features": spec.features,
            "seed": spec.seed}


def fit_reduction(responses: Mapping[str, np.ndarray], num_endpoints: int, spec: ReducedSpec,
                  cache_dir: str | os.PathLike) -> tuple[Reduction, str]:
    """Fit the reduction of ``responses`` (task -> models x items, the endpoints' rows first)
    and its key, a hash of the responses and the fit settings; the fit is cached as
    ``fit-<key>.json`` in ``cache_dir``, which is also where workers read it by key
    (:class:`evomerge.execution.reduction.Reductions`)."""
    settings = {**fit_settings(spec), "num_endpoints": num_endpoints}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for task in sorted(responses):
        digest.update(task.encode())
        digest.update(np.ascontiguousarray(responses[task], dtype=np.float64).tobytes())
    key = digest.hexdigest()[:16]
    path = Path(cache_dir) / f"fit-{key}.json"
    if path.is_file():
        return Reduction.from_dict(json.loads(path.read_text())["reduction"]), key
    reduction = Reduction.build(responses, num_endpoints=num_endpoints, anchors=spec.anchors,
                                dim=spec.dim, features=spec.features, seed=spec.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, {"settings": settings, "reduction": reduction.to_dict()})
    return reduction, key


def calibrate(score: ScoreRecipes, endpoints: Sequence[MergeRecipe],
              design: Sequence[MergeRecipe], spec: ReducedSpec, cache_dir: str | os.PathLike,
              fingerprint: Mapping[str, Any] | None = None) -> Reduction:
    """Score endpoints + design on the full search items, fit, pick anchors; cached as JSON.

    ``endpoints`` are the source models (as :func:`source_recipe`); they come first in the
    response matrix and their abilities are mp-IRT's endpoints. ``fingerprint`` is whatever else
    determines the scores (fitness name and options): it enters the responses' cache key
    (:func:`cached_responses`); the fit is cached under the responses and the fit settings of
    ``spec`` (:func:`fit_reduction`).
    """
    recipes = list(endpoints) + list(design)
    fingerprint = {**dict(fingerprint or {}), "endpoints": len(endpoints)}
    responses, _ = cached_responses(score, recipes, cache_dir, fingerprint)
    return fit_reduction(responses, len(endpoints), spec, cache_dir)[0]


# ---------------------------------------------------------------------------------------------
# Validation: estimates against full evaluation on merges the fit never saw
# ---------------------------------------------------------------------------------------------


def random_merges(base: str, experts: Sequence[str], n: int, seed: int = 0,
                  dtype: str | None = None) -> list[MergeRecipe]:
    """``n`` task-arithmetic merges with each expert's weight drawn uniformly in [0, 1].

    Sums of up to K task vectors span broken, partial and good merges: the spread of abilities
    the IRT model must cover during a search.
    """
    rng = np.random.default_rng(seed)
    return [MergeRecipe.from_dict({
        "merge_method": "task_arithmetic", "base_model": base, "dtype": dtype,
        "models": [{"model": e, "parameters": {"weight": round(float(w), 4)}}
                   for e, w in zip(experts, rng.uniform(0, 1, len(experts)))]})
        for _ in range(n)]


def validate(responses: Mapping[str, np.ndarray], *, num_endpoints: int, num_train: int,
             anchors: Sequence[int], estimators: Sequence[str] = tuple(ESTIMATORS),
             dim: int = 2, features: str = "irt", seed: int = 0) -> list[dict[str, Any]]:
    """Fit on endpoints + the first ``num_train`` merges, score every other merge.

    Rows ``{estimator, anchors, mae_points, spearman, reduction}``: MAE over (merge, task) of the
    estimated minus the full accuracy, in points (0-100); Spearman rank correlation over the
    held-out merges of the estimated vs full macro-mean accuracy across tasks (how a search
    would rank them; None where either side is constant); reduction = items in the full search
    set / items evaluated.
    """
    from scipy.stats import spearmanr

    rows_total = {np.shape(y)[0] for y in responses.values()}
    total = next(iter(rows_total))
    fit_rows = num_endpoints + num_train
    if len(rows_total) != 1 or total - fit_rows < 3:
        raise ValueError(f"validate: need >= 3 held-out merges after {fit_rows} fitting rows; "
                         f"the response matrix has {sorted(rows_total)} rows")
    train = {t: y[:fit_rows] for t, y in responses.items()}
    test = {t: y[fit_rows:] for t, y in responses.items()}
    truth = np.column_stack([y.mean(axis=1) for y in test.values()])  # merges x tasks
    out = []
    for k in anchors:
        red = Reduction.build(train, num_endpoints=num_endpoints, anchors=k, dim=dim,
                              features=features, seed=seed)
        for name in estimators:
            est = np.array([[estimate_task(red, name, task, y[j]) for task, y in test.items()]
                            for j in range(len(truth))])
            rho = float(spearmanr(est.mean(axis=1), truth.mean(axis=1)).statistic)
            out.append({"estimator": name, "anchors": k,
                        "mae_points": round(100 * float(np.abs(est - truth).mean()), 3),
                        "spearman": None if np.isnan(rho) else round(rho, 4),
                        "reduction": round(red.num_items() / red.num_evaluated(), 2)})
    return out


def estimate_task(reduction: Reduction, estimator: str, task: str, row: np.ndarray) -> float:
    """Estimate of one task from a model's full response row (reads only the anchors)."""
    t = reduction.tasks[task]
    return estimate(estimator, t, row[t.anchors])
