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

from evomerge.execution.evaluator import fitness_for
from evomerge.experiment import Executor as ExecutorConfig
from evomerge.experiment import Experiment, ExperimentError
from evomerge.fitness.base import Objective
from evomerge.fitness.function import FitnessFactory
from evomerge.search import Strategy
from evomerge.spaces.base import Bound
from evomerge.store import storage_url

__all__ = ["Plan"]


class Plan:
    """Everything derived from an experiment before any compute: space, strategy, store args."""

    experiment: Experiment  #: resolved: absolute model paths and run directory
    paths: list[str]  #: the checkpoints, base first
    space: Bound  #: x <-> recipe, bound to the run's models
    objectives: list[Objective]
    strategy_kwargs: dict[str, Any]  #: what :attr:`strategy_factory` is called with
    store_args: dict[str, Any]  #: :class:`~evomerge.store.Store`'s arguments

    def __init__(self, experiment: Experiment) -> None:
        from evomerge.merge.checkpoints import CheckpointError, check_compatible, check_finite
        from evomerge.spaces import BindTarget, pairing_problems, parse_space, strategy_options

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
        try:
            space = parse_space(experiment.space)  # any kind (evomerge.spaces), bound one way
            if infos is not None:  # binding needs the models' layers
                self.space = space.bind_to(BindTarget(
                    models.base, models.sources, infos[0].tensors,
                    infos[0].config.get("model_type"), experiment.budget))
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
        try:  # the experiment's options and what the space implies (a start, M2N2's crossover)
            options = strategy_options(self.space, experiment.strategy.options,
                                       self.strategy_factory)
        except ValueError as exc:
            raise ExperimentError(str(exc)) from None
        self.strategy_kwargs = dict(lower=self.space.lower, upper=self.space.upper,
                                    directions=directions, seed=experiment.seed, **options)
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
    if experiment.budget_items is not None and not callable(getattr(fitness, "num_items", None)):
        raise ExperimentError(f"budget_items: the {experiment.fitness.name!r} fitness scores no "
                              "items to count (it has no num_items()); give the budget in "
                              "candidates only")
    return list(fitness.objectives)
