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
from pathlib import Path
from typing import Any

#: Where the fitted reduction lives, relative to the run directory (workers read it there).
REDUCTION_FILE = Path("irt") / "reduction.json"


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """``(fitness options without the reduced block, its ReducedSpec or None)``; raises
    ValueError naming a bad ``fitness.reduced`` key before any compute."""
    from evomerge.fitness.reduced import ReducedSpec

    options = dict(options)
    block = options.pop("reduced", None)
    if block is None:
        return options, None
    if not isinstance(block, dict):
        raise ValueError(  # noqa: TRY004 - a configuration error, as drivers report them
            "fitness.reduced: expected a mapping (estimator, anchors, design, "
            f"...), got {block!r}")
    return options, ReducedSpec.from_dict(block)


def load(run_dir: Path, spec: Any) -> tuple[Any, str]:
    """The run's fitted reduction and estimator, for ``Evaluator(reduction=...)``."""
    from evomerge.fitness.irt import Reduction

    path = Path(run_dir) / REDUCTION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the driver writes it before any trial is "
                                "enqueued (is the run directory shared with this worker?)")
    return Reduction.from_dict(json.loads(path.read_text())), spec.estimator


def calibrate_run(plan: Any, *, progress: bool = True) -> dict[str, Any]:
    """Calibrate the run's reduction (or reuse the cached one) and write it where evaluators
    read it; returns what summary.json reports about it. A fitness that cannot be reduced
    (:func:`evomerge.fitness.reduced.check_reducible`) is refused before anything is scored."""
    from evomerge.experiment import ExperimentError
    from evomerge.fitness.base import FITNESSES
    from evomerge.fitness.reduced import check_reducible

    experiment = plan.experiment
    try:
        check_reducible(FITNESSES[experiment.fitness.name], experiment.fitness.name)
    except ValueError as exc:
        raise ExperimentError(str(exc)) from None
    options, spec = split_options(experiment.fitness.options)
    reduction, design = _calibrate(plan, options, spec, progress)
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


def _calibrate(plan: Any, options: dict[str, Any], spec: Any, progress: bool
               ) -> tuple[Any, str]:
    """Score sources + the space's design (:func:`evomerge.fitness.reduced.calibration_design`:
    uniform in the bounds, or local around a DFS space's start) on the full search items; fit.
    Returns the reduction and the design's kind. Progress: a bar on a terminal, plain periodic
    lines in a log (:func:`evomerge.report.track`).
    """
    from evomerge.execution.worker import evaluator_for
    from evomerge.fitness.reduced import calibrate, calibration_design, source_recipe
    from evomerge.report import track

    experiment = plan.experiment
    endpoints = [source_recipe(p) for p in experiment.models.sources.values()]
    points, kind = calibration_design(plan.space, spec.design, spec.seed)
    design = [plan.space.decode(x) for x in points]
    evaluator = evaluator_for(experiment, reduced=False)

    def score(recipes: list) -> list:
        items = track(list(recipes), "IRT calibration (full search items)", enabled=progress)
        return [evaluator.score_items([r])[0] for r in items]

    return calibrate(score, endpoints, design, spec,
                     experiment.run_path / REDUCTION_FILE.parent,
                     fingerprint={"fitness": experiment.fitness.name, "options": options}), kind
