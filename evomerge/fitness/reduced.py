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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from evomerge.fitness.base import EvalResult, Fitness, Objective
from evomerge.fitness.irt import ESTIMATORS, Reduction, estimate
from evomerge.recipe import MergeRecipe

__all__ = ["ReducedFitness", "ReducedSpec", "SubsetFitness", "cached_responses", "calibrate",
           "calibration_design", "check_reducible", "local_design", "random_merges",
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


@dataclass(frozen=True)
class ReducedSpec:
    """The experiment's ``fitness.reduced`` block.

    estimator: one of ``irt.ESTIMATORS``; anchors: per task; design: how many candidates of
    the run's space (besides the sources) calibrate the IRT model (drawn by
    :func:`calibration_design`: uniform, or around a DFS space's start path); dim: IRT
    dimension; features: what anchors cluster on (``irt`` embeddings or ``correctness`` vectors); seed: the design and k-means;
    rescore: at the end of the run, score this many best candidates (by estimate) on the
    full search items and keep the best of those (0: keep the best estimate; see
    ``evomerge.report._rescore``).
    """

    estimator: str = "gp-irt"
    anchors: int = 20
    design: int = 40
    dim: int = 2
    features: str = "irt"
    seed: int = 0
    rescore: int = 8

    def __post_init__(self) -> None:
        where = "fitness.reduced"
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"{where}.estimator: unknown {self.estimator!r}; "
                             f"known: {', '.join(ESTIMATORS)}")
        for name, low in (("anchors", 1), ("design", 0), ("dim", 1), ("rescore", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{where}.{name}: expected an integer >= {low}, got {value!r}")
        if self.features not in ("irt", "correctness"):
            raise ValueError(f"{where}.features: expected 'irt' or 'correctness', "
                             f"got {self.features!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ReducedSpec:
        """Validate a YAML mapping; unknown keys are named in the error."""
        data = dict(data or {})
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"fitness.reduced: unknown key(s) {', '.join(unknown)}; allowed: "
                             f"{', '.join(cls.__dataclass_fields__)}")
        return cls(**data)


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

    The returned ``item_scores`` on ``search`` are the anchor answers (per task, in ascending
    item order), so everything downstream that reads per-item scores sees what was evaluated.
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

    def evaluate(self, model: torch.nn.Module, split: str = "search") -> EvalResult:
        if split != "search":
            return self.inner.evaluate(model, split)
        result = self.inner.evaluate(model, split, items=self._anchors)
        estimates = self.estimate(result.item_scores)
        return EvalResult(self.inner.objectives_from_task_scores(estimates), result.item_scores)


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


def calibrate(score: ScoreRecipes, endpoints: Sequence[MergeRecipe],
              design: Sequence[MergeRecipe], spec: ReducedSpec, cache_dir: str | os.PathLike,
              fingerprint: Mapping[str, Any] | None = None) -> Reduction:
    """Score endpoints + design on the full search items, fit, pick anchors; cached as JSON.

    ``endpoints`` are the source models (as :func:`source_recipe`); they come first in the
    response matrix and their abilities are mp-IRT's endpoints. ``fingerprint`` is whatever else
    determines the scores (fitness name and options): it enters the cache key. The responses are
    cached under a key of (endpoints, design, fingerprint), the reduction under that plus the
    fit settings of ``spec`` (the estimator is chosen at scoring time and is not part of it).
    """
    cache = Path(cache_dir)
    settings = {k: v for k, v in asdict(spec).items()
                if k not in ("estimator", "design", "rescore")}
    recipes = list(endpoints) + list(design)
    fingerprint = {**dict(fingerprint or {}), "endpoints": len(endpoints)}
    key = _digest([[r.to_dict() for r in recipes], fingerprint, settings])
    path = cache / f"irt-reduction-{key}.json"
    if path.is_file():
        return Reduction.from_dict(json.loads(path.read_text())["reduction"])
    responses, resp_key = cached_responses(score, recipes, cache, fingerprint)
    reduction = Reduction.build(responses, num_endpoints=len(endpoints), anchors=spec.anchors,
                                dim=spec.dim, features=spec.features, seed=spec.seed)
    _write_json(path, {"responses": f"irt-responses-{resp_key}.json", "settings": settings,
                       "reduction": reduction.to_dict()})
    return reduction


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
