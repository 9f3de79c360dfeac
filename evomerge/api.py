"""The Python API: run, resume and merge from code, with your own fitness or strategy objects.

``run`` takes what ``evomerge run`` takes (an experiment file, a mapping of its fields, or an
:class:`~evomerge.experiment.Experiment`) plus field overrides, validated as the YAML is (one
error naming every problem), and returns a typed :class:`Summary` of ``summary.json``::

    summary = evomerge.run("experiments/digits_cmaes.yaml", budget=16, run_dir="runs/try")
    summary.best.objectives  # {"acc": 0.88...}

Objects instead of registered names (as ``optuna.create_study().optimize(f)`` or pymoo's
``minimize(problem, algorithm)`` take them):

- ``fitness=``: a :class:`~evomerge.fitness.base.Fitness` instance or subclass, or a function
  ``model -> EvalResult`` (its objectives are those the experiment's ``fitness.objectives``
  names; see :mod:`evomerge.fitness.function`);
- ``strategy=``: a :class:`~evomerge.search.base.Strategy` subclass, or any callable
  ``(lower=, upper=, directions=, seed=) -> Strategy``: a class, not an instance, because
  resume re-creates the strategy and replays the stored results into it.

The run directory records an object as its ``module:qualname``; the object itself never leaves
the process. So a fitness object runs in the driver (``executor.workers: 0``) or in local
workers, which import it by that name (it must be defined at module level). Remote executors
(Ray, SLURM) are refused with an error saying so: their workers start elsewhere from the
experiment stored in the study, and each builds its fitness from the names it records.
Resuming a run made with objects takes them again (``resume(run_dir,
fitness=...)``) unless their names import.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.experiment import Experiment, ExperimentError, is_run_dir
from evomerge.registry import import_object, is_object_name

Source = Experiment | str | Path | Mapping[str, Any]


# ---- the summary -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trial:
    """A trial of the study and its objective values (search split)."""

    trial: int
    objectives: dict[str, float]


@dataclass(frozen=True)
class Best(Trial):
    """The best trial, the rule that picked it, and its recipe (plain data)."""

    rule: str
    recipe: dict[str, Any]


@dataclass(frozen=True)
class Summary:
    """``summary.json`` as typed fields (see the README's run-directory table). Scores are
    ``{objective: value}``; ``sources`` on the search items, ``final`` on held-out items (the
    best under ``"best"``, then each source)."""

    experiment: str
    strategy: str
    n_trials: int
    n_failed: int
    wall_s: float
    budget: int
    objectives: dict[str, str]  # name -> "maximize" | "minimize", in the study's order
    best: Best
    pareto: list[Trial]
    sources: dict[str, dict[str, float]]
    final: dict[str, dict[str, float]]
    run_dir: Path
    best_recipe: Path
    best_model: Path | None
    storage: str
    timing: dict[str, float]
    devices: dict[str, Any]
    base: dict[str, Any] | None = None  # the base's scores, when it is not a source
    fitness_reduction: dict[str, Any] | None = None  # IRT-reduced runs
    item_evaluations: dict[str, int] | None = None  # calibration, search, rescore, total
    resume: dict[str, Any] | None = None  # what the latest resume did
    budget_items: int | None = None  # the item-evaluation cap, when the experiment set one

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Summary:
        outputs = data["outputs"]
        return cls(
            experiment=data["experiment"], strategy=data["strategy"],
            n_trials=data["n_trials"], n_failed=data["n_failed"], wall_s=data["wall_s"],
            budget=data["budget"],
            objectives={o["name"]: o["direction"] for o in data["objectives"]},
            best=Best(**data["best"]), pareto=[Trial(**t) for t in data["pareto"]],
            sources=data["sources"], final=data["final"],
            run_dir=Path(outputs["run_dir"]), best_recipe=Path(outputs["best_recipe"]),
            best_model=Path(outputs["best_model"]) if outputs.get("best_model") else None,
            storage=data["storage"], timing=data["timing"], devices=data["devices"],
            base=data.get("base"), fitness_reduction=data.get("fitness_reduction"),
            item_evaluations=data.get("item_evaluations"),
            resume=data.get("resume"), budget_items=data.get("budget_items"))

    @classmethod
    def read(cls, run_dir: str | Path) -> Summary:
        """The summary a finished run wrote in ``run_dir``."""
        from evomerge.report import SUMMARY

        return cls.from_dict(json.loads((Path(run_dir) / SUMMARY).read_text()))


# ---- running -----------------------------------------------------------------------------------


def run(experiment: Source, /, *, fitness: Any = None, strategy: Any = None,
        progress: bool = False, **overrides: Any) -> Summary:
    """Run a search to its budget; its run directory as ``evomerge run`` writes it.

    ``experiment``: a YAML path, a mapping of experiment fields, or an Experiment. ``overrides``:
    experiment fields (``budget=10, seed=1, run_dir=...``), validated with the rest. ``fitness``
    / ``strategy``: a mapping overrides the field; an object stands for it (see the module
    docstring). ``progress``: the live bar and phase lines, as the CLI shows them.
    """
    from evomerge.execution.driver import run_experiment

    base, objects = _source(experiment)
    data = {**base, **{k: v for k, v in overrides.items() if v is not None}}
    for field, given in (("fitness", fitness), ("strategy", strategy)):
        if isinstance(given, Mapping):  # a field override: no longer the object it carried
            data[field] = dict(given)
            objects.pop(field, None)
        elif given is not None:
            data[field] = _object_block(field, given, data.get(field))
            objects[field] = given
    where = str(experiment) if isinstance(experiment, (str, Path)) else "experiment"
    resolved = Experiment.from_dict(data, where=where).with_objects(**objects)
    _check_objects(resolved)
    return Summary.from_dict(run_experiment(resolved, progress=progress))


def resume(run_dir: str | Path, /, *, fitness: Any = None, strategy: Any = None,
           progress: bool = False) -> Summary:
    """Continue a killed (or finished) run where its store stopped, as ``evomerge resume``
    does. A run made with objects needs them again, unless their names import here."""
    from evomerge.execution.driver import run_experiment

    if not is_run_dir(run_dir):
        raise ExperimentError(f"{run_dir}: not a run directory (no experiment.yaml with "
                              "run.json or provenance.json)")
    experiment = Experiment.from_run_dir(run_dir)
    objects = {}
    for field, given in (("fitness", fitness), ("strategy", strategy)):
        if given is None:
            continue
        recorded, name = getattr(experiment, field).name, object_name(given)
        if recorded != name:
            raise ExperimentError(f"{field}: {run_dir} was run with {recorded!r}, not {name!r}; "
                                  "resume it with the object it ran with")
        objects[field] = given
    experiment = experiment.with_objects(**objects)
    _check_objects(experiment)
    return Summary.from_dict(run_experiment(experiment, resume=True, progress=progress))


def _source(experiment: Source) -> tuple[dict[str, Any], dict[str, Any]]:
    """An experiment's fields as a mapping, and the objects it already carries."""
    if isinstance(experiment, Experiment):
        return (experiment.model_dump(mode="json", exclude_none=True),
                dict(experiment._objects))
    if isinstance(experiment, Mapping):
        return dict(experiment), {}
    if isinstance(experiment, (str, Path)):
        from evomerge.config_io import read_yaml

        path = Path(experiment)
        if is_run_dir(path) or is_run_dir(path.parent) and path.name == "experiment.yaml":
            raise ExperimentError(f"{path}: a run directory's experiment; continue the run with "
                                  "evomerge.resume(run_dir)")
        data = read_yaml(path, ExperimentError, "experiment")
        if not isinstance(data, dict):
            raise ExperimentError(f"{path}: expected a mapping of experiment fields")
        return data, {}
    raise TypeError(f"experiment: expected an Experiment, a YAML path or a mapping, got "
                    f"{type(experiment).__name__}")


def object_name(obj: Any) -> str:
    """What a run records for an object: ``module:qualname`` of a function or class, with
    ``()`` for an instance (which no worker can import)."""
    if isinstance(getattr(obj, "__qualname__", None), str):
        return f"{obj.__module__}:{obj.__qualname__}"
    return f"{type(obj).__module__}:{type(obj).__qualname__}()"


def _object_block(field: str, obj: Any, block: Any) -> dict[str, Any]:
    """The experiment's ``field`` for an object: its name; a fitness function keeps the
    objectives the replaced block named (their names and directions), which are all it has."""
    from evomerge.fitness.base import Fitness

    out: dict[str, Any] = {"name": object_name(obj)}
    function = field == "fitness" and not isinstance(obj, Fitness) and not (
        isinstance(obj, type) and issubclass(obj, Fitness))
    if function and isinstance(block, Mapping) and "objectives" in block:
        specs = block["objectives"]
        out["objectives"] = [
            {k: s[k] for k in ("name", "direction") if k in s} if isinstance(s, Mapping) else s
            for s in specs] if isinstance(specs, list) else specs
    return out


def _check_objects(experiment: Experiment) -> None:
    """Objects go where they can (see the module docstring); ExperimentError naming the field
    and what to do, before any compute."""
    executor = experiment.executor
    for field in ("fitness", "strategy"):
        name = getattr(experiment, field).name
        if executor.kind != "local" and (field in experiment._objects or is_object_name(name)):
            raise ExperimentError(
                f"{field}: {name!r} is a Python object, and executor kind {executor.kind!r} "
                "starts workers elsewhere that read the experiment from the store; remote "
                f"executors need importable names: register the {field} "
                f"(@evomerge.{'fitness.base' if field == 'fitness' else 'search'}.register"
                "('name') in a module the workers import) and name it in the experiment, or "
                "run it with executor kind 'local'")
    given, name = experiment._objects.get("fitness"), experiment.fitness.name
    if executor.workers == 0 or given is None:
        return
    main = sys.modules.get("__main__")
    interactive = name.startswith("__main__:") and not getattr(main, "__file__", None)
    try:
        importable = not interactive and import_object(name) is given
    except ImportError:
        importable = False
    if not importable:
        raise ExperimentError(
            f"fitness: local workers are separate processes that import the fitness by name, "
            f"and {name!r} does not import as the object given (a lambda, a closure, an "
            "instance, or a function of an interactive session); define it at module level in "
            "a file, or use executor.workers: 0")
