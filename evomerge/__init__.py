"""evomerge: evolutionary model-merge optimization.

The public API (see :mod:`evomerge.api`)::

    import evomerge

    summary = evomerge.run("experiments/digits_cmaes.yaml", budget=16, fitness=my_score)
    evomerge.resume(summary.run_dir)
    evomerge.merge_config("runs/digits_cmaes/best_recipe.yaml", "merged/")

Names are imported on first use, so ``import evomerge`` stays cheap (no torch). The merge
function is ``merge_config``: ``evomerge.merge`` is the merge-engine package.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> "module:attribute", imported on first access
_EXPORTS = {
    "run": "evomerge.api:run",
    "resume": "evomerge.api:resume",
    "Summary": "evomerge.api:Summary",
    "merge_config": "evomerge.merge.from_config:merge_config",
    "Experiment": "evomerge.experiment:Experiment",
    "ExperimentError": "evomerge.experiment:ExperimentError",
    "MergeRecipe": "evomerge.recipe:MergeRecipe",
    "Merger": "evomerge.merge.engine:Merger",
    "Fitness": "evomerge.fitness.base:Fitness",
    "EvalResult": "evomerge.fitness.base:EvalResult",
    "Objective": "evomerge.fitness.base:Objective",
    "Strategy": "evomerge.search.base:Strategy",
    "Candidate": "evomerge.search.base:Candidate",
    # the registries: name -> what experiments and recipes refer to by that name
    "FITNESSES": "evomerge.fitness.base:FITNESSES",
    "STRATEGIES": "evomerge.search:STRATEGIES",
    "METHODS": "evomerge.recipe.params:METHODS",
    "EXECUTORS": "evomerge.execution:EXECUTORS",
    "SPACE_KINDS": "evomerge.spaces:SPACE_KINDS",
}

__all__ = ["EXECUTORS", "FITNESSES", "METHODS", "SPACE_KINDS", "STRATEGIES", "Candidate",
           "EvalResult", "Experiment", "ExperimentError", "Fitness", "MergeRecipe", "Merger",
           "Objective", "Strategy", "Summary", "__version__", "merge_config", "resume", "run"]


def __getattr__(name: str) -> Any:
    try:
        module, _, attribute = _EXPORTS[name].partition(":")
    except KeyError:
        raise AttributeError(f"module 'evomerge' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
