"""IRT reduction of a run's fitness (``fitness: {..., reduced: {...}}`` in an experiment).

The driver calibrates once per run, before the search: it scores the source models and a
design of candidates drawn from the run's own search space (uniform in its bounds; for a space
with a start point, DFS, perturbations of that start: see
:func:`evomerge.fitness.reduced.calibration_design`) on the FULL search items, fits
the IRT model and picks anchors (:func:`evomerge.fitness.reduced.calibrate`, cached as JSON in
``RUN_DIR/irt/``, so a resumed run re-uses it without re-scoring), and writes the fitted
reduction to ``RUN_DIR/irt/reduction.json``. Every evaluator (in-process, worker processes,
Ray actors, SLURM tasks) then reads that file and scores candidates on the anchors only; held-out
scores at the end of a run are always full evaluations.

Calibration uses a throw-away evaluator in the driver, released before the executor starts its
own, so the sources are never resident twice at once (they are loaded twice: seconds, from the
page cache).
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.experiment import ExperimentError
from evomerge.fitness.reduced import ReducedSpec

if TYPE_CHECKING:  # the driver's: it hands calibration its plan and a way to build an evaluator
    from evomerge.execution.evaluator import Evaluator
    from evomerge.execution.plan import Plan
    from evomerge.fitness.irt import Reduction

#: Where the fitted reduction lives, relative to the run directory (workers read it there).
REDUCTION_FILE = Path("irt") / "reduction.json"


def load_reduction(run_dir: Path, spec: ReducedSpec) -> tuple[Reduction, str]:
    """The run's fitted reduction and estimator, for ``Evaluator(reduction=...)``."""
    from evomerge.fitness.irt import Reduction

    path = Path(run_dir) / REDUCTION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the driver writes it before any trial is "
                                "enqueued (is the run directory shared with this worker?)")
    return Reduction.from_dict(json.loads(path.read_text())), spec.estimator


def calibrate_run(plan: Plan, new_evaluator: Callable[[], Evaluator], *,
                  progress: bool = True) -> dict[str, Any]:
    """Calibrate the run's reduction (or reuse the cached one) and write it where evaluators
    read it; returns what summary.json reports about it. ``new_evaluator``: a full (not
    reduced) evaluator of the run, built here and released before the executor builds its own.
    A fitness that cannot be reduced (:func:`evomerge.fitness.reduced.check_reducible`) is
    refused before anything is scored."""
    from evomerge.fitness.base import FITNESSES
    from evomerge.fitness.reduced import check_reducible

    experiment = plan.experiment
    spec = experiment.fitness.reduced
    assert spec is not None, "calibrate_run needs a fitness.reduced block"
    try:
        check_reducible(FITNESSES[experiment.fitness.name], experiment.fitness.name)
    except ValueError as exc:
        raise ExperimentError(str(exc)) from None
    reduction, design = _calibrate(plan, new_evaluator, spec, progress)
    gc.collect()  # the calibration evaluator (sources, model) is gone before workers start
    path = experiment.run_path / REDUCTION_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(reduction.to_dict()))
    os.replace(tmp, path)
    full, evaluated = reduction.num_items(), reduction.num_evaluated()
    return {"estimator": spec.estimator, "anchors_per_task": spec.anchors,
            "design_merges": spec.design, "design": design,
            "calibration_models": len(experiment.models.sources) + spec.design,
            "items_per_candidate": evaluated, "full_items": full, "rescore": spec.rescore,
            "reduction_factor": round(full / evaluated, 2)}


def _calibrate(plan: Plan, new_evaluator: Callable[[], Evaluator], spec: ReducedSpec,
               progress: bool) -> tuple[Reduction, str]:
    """Score sources + the space's design (:func:`evomerge.fitness.reduced.calibration_design`:
    uniform in the bounds, or local around a DFS space's start) on the full search items; fit.
    Returns the reduction and the design's kind. Progress: a bar on a terminal, plain periodic
    lines in a log (:func:`evomerge.report.track`).
    """
    from evomerge.fitness.reduced import calibrate, calibration_design, source_recipe
    from evomerge.report import track

    experiment = plan.experiment
    endpoints = [source_recipe(p) for p in experiment.models.sources.values()]
    points, kind = calibration_design(plan.space, spec.design, spec.seed)
    design = [plan.space.decode(x) for x in points]
    evaluator = new_evaluator()

    def score(recipes: list) -> list:
        items = track(list(recipes), "IRT calibration (full search items)", enabled=progress)
        return [evaluator.score_items([r])[0] for r in items]

    return calibrate(score, endpoints, design, spec,
                     experiment.run_path / REDUCTION_FILE.parent,
                     fingerprint={"fitness": experiment.fitness.name,
                                  "options": experiment.fitness.options}), kind
