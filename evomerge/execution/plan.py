"""The plan of a run: everything derived from an experiment before any compute.

:class:`Plan` checks the models (present, compatible, finite), binds the search space to their
layers, reads the fitness's objectives, sets up the strategy's arguments and the store's, and
raises one :class:`~evomerge.experiment.ExperimentError` naming every problem it found, so a bad
experiment is refused before a run directory or a study exists. The driver runs a plan;
workers never build one (they read the experiment and the store's arguments from the study).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from evomerge.dfs import BoundDfsSpace
from evomerge.execution.evaluator import fitness_for
from evomerge.experiment import Executor as ExecutorConfig
from evomerge.experiment import Experiment, ExperimentError
from evomerge.fitness.base import Objective
from evomerge.fitness.function import FitnessFactory
from evomerge.search import Strategy
from evomerge.spaces import BoundSpace
from evomerge.store import storage_url
from evomerge.weight_space import BoundWeightSpace

__all__ = ["BoundSpaceLike", "Plan"]

#: A search space bound to the run's models: x <-> recipe (coefficients, a DFS layer path, or
#: M2N2's weight-space members).
BoundSpaceLike = BoundSpace | BoundDfsSpace | BoundWeightSpace


class Plan:
    """Everything derived from an experiment before any compute: space, strategy, store args."""

    experiment: Experiment  #: resolved: absolute model paths and run directory
    paths: list[str]  #: the checkpoints, base first
    space: BoundSpaceLike
    objectives: list[Objective]
    strategy_kwargs: dict[str, Any]  #: what :attr:`strategy_factory` is called with
    store_args: dict[str, Any]  #: :class:`~evomerge.store.Store`'s arguments

    def __init__(self, experiment: Experiment) -> None:
        from evomerge.merge.checkpoints import CheckpointError, check_compatible, check_finite
        from evomerge.merge.engine import layer_group
        from evomerge.spaces import SearchSpace, load_space
        from evomerge.weight_space import WeightSpace, is_weight_space, pairing_problems

        problems: list[str] = []  # every problem the file has, raised together below
        missing = experiment.models.missing()
        if missing:
            problems.append("models not found (local directories, e.g. built by `evomerge zoo "
                            "build digits`, or Hub ids in the Hugging Face cache):\n  "
                            + "\n  ".join(missing))
        else:
            experiment = experiment.resolved()
        self.experiment = experiment
        models = experiment.models
        self.paths = ([models.base] if models.base else []) + list(models.sources.values())
        infos = None
        if not missing:
            try:
                infos = check_compatible(self.paths)
            except CheckpointError as exc:
                problems.append(str(exc))
            # NaN/inf weights, before the run directory exists (one pass; workers check again)
            problems += check_finite(self.paths)
        weights = is_weight_space(experiment.space)  # M2N2's members (evomerge.weight_space)
        try:
            dfs = isinstance(experiment.space, dict) and experiment.space.get("kind") == "dfs"
            if dfs:
                from evomerge.dfs import DfsSpace

                space = DfsSpace.from_dict(experiment.space)
            elif weights:
                space = WeightSpace.from_dict(experiment.space)
            else:
                space = (SearchSpace.from_dict(experiment.space, where="space")
                         if isinstance(experiment.space, dict) else load_space(experiment.space))
            if infos is not None:  # binding needs the models' layers
                names = list(infos[0].tensors)
                groups = [layer_group(n) for n in names]
                num_layers = 1 + max((g.layer for g in groups if g.layer is not None),
                                     default=-1)
                non_layer = [n for n, g in zip(names, groups) if g.layer is None]
                self.space = (space.bind(models.sources, experiment.budget, infos[0].tensors)
                              if weights else space.bind(models.sources, num_layers,
                                         infos[0].config.get("model_type"), loaded=self.paths)
                              if dfs else space.bind(models.base, list(models.sources.values()),
                                                     num_layers, non_layer))
        except (ValueError, KeyError, FileNotFoundError) as exc:
            message = str(exc)
            problems.append(message if message.startswith("space:") else f"space: {message}")
        problems += pairing_problems(experiment.space, experiment.strategy.name,
                                     experiment.strategy.options,
                                     experiment.fitness.model_dump(exclude_none=True))
        try:
            self.objectives = _objectives(fitness_for(experiment), experiment)
        except ExperimentError as exc:
            problems.append(str(exc))
        if problems:
            raise ExperimentError("\n".join(problems))
        directions = [o.direction for o in self.objectives]
        self.strategy_kwargs = dict(lower=self.space.lower, upper=self.space.upper,
                                    directions=directions, seed=experiment.seed,
                                    **experiment.strategy.options)
        if weights:  # M2N2 crosses members with the space's Gram oracle (loaded on first use)
            self.strategy_kwargs.setdefault("crossover", "weights")
            self.strategy_kwargs["geometry"] = self.space.geometry
        if self.strategy_kwargs.get("init") == "sources":  # M2N2: each source alone
            try:
                self.strategy_kwargs["init"] = [p.tolist() for p in self.space.source_points()]
            except ValueError as exc:
                raise ExperimentError(f"strategy.init: sources: {exc}") from None
        start = getattr(self.space, "start_point", None)  # DFS: start from a real model
        if start is not None and "x0" not in self.strategy_kwargs and _takes_x0(
                self.strategy_factory):
            self.strategy_kwargs["x0"] = start.tolist()
        strategy = self.new_strategy()
        if experiment.budget < strategy.popsize:
            raise ExperimentError(f"budget: {experiment.budget} is smaller than one generation "
                                  f"(strategy.popsize = {strategy.popsize})")
        self.store_args = dict(url=storage_url(experiment.storage, experiment.run_path),
                               study_name=experiment.name, directions=directions,
                               lower=list(map(float, self.space.lower)),
                               upper=list(map(float, self.space.upper)),
                               param_names=list(self.space.names),
                               objective_names=[o.name for o in self.objectives],
                               # Always on: only workers with an owner beat (one write per
                               # heartbeat_s each), the in-process executor never does.
                               heartbeat_s=experiment.executor.heartbeat_s,
                               grace_s=experiment.executor.grace_s)
        _warn_many_writers(self.store_args["url"], experiment.executor)

    @property
    def strategy_factory(self) -> Callable[..., Strategy]:
        """The registered strategy class, or the Strategy class (or factory) given to
        :func:`evomerge.run`: called with the bounds, directions, seed and the experiment's
        strategy options, afresh for every run and resume (resume is replay)."""
        from evomerge.search import STRATEGIES

        return self.experiment.component("strategy") or STRATEGIES[self.experiment.strategy.name]

    def new_strategy(self) -> Strategy:
        try:
            return self.strategy_factory(**self.strategy_kwargs)
        except TypeError as exc:
            raise ExperimentError(f"strategy: {exc}") from None
        except ValueError as exc:
            raise ExperimentError(f"strategy: {exc}") from None


def _takes_x0(factory: Callable[..., Strategy]) -> bool:
    import inspect

    return "x0" in inspect.signature(factory).parameters


def _warn_many_writers(url: str, executor: ExecutorConfig) -> None:
    """One warning when the experiment's workers would all write one SQLite file."""
    import warnings

    from evomerge.store import many_writers_warning

    remote = executor.kind == "slurm" or (executor.kind == "ray" and executor.address != "local")
    advice = many_writers_warning(url, executor.workers, remote=remote)
    if advice:
        warnings.warn(advice, UserWarning, stacklevel=3)


def _objectives(fitness_cls: FitnessFactory, experiment: Experiment) -> list[Objective]:
    """The fitness's objectives, validating its options (and that a ``reduced`` block's fitness
    can be reduced) before any compute. The fitness is built once here, in the driver, because
    building it is what checks every option and data file (a suite's items, whether each fits
    the model's context) before the run directory exists; workers never build a plan."""
    from evomerge.fitness.reduced import check_reducible

    try:
        if experiment.fitness.reduced is not None:  # refused before the run directory exists
            check_reducible(fitness_cls, experiment.fitness.name)
        fitness = fitness_cls(base_model=experiment.models.base or next(
            iter(experiment.models.sources.values())), **experiment.fitness.options)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        raise ExperimentError(message if message.startswith("fitness") else
                              f"fitness: {message}") from None
    return list(fitness.objectives)
