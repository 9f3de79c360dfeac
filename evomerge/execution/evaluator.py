"""The evaluator: an experiment's sources resident once, one model to build into, one fitness.

Every place that scores candidates builds one: the in-process executor and the driver (source and
held-out scores), local worker processes, Ray actors, SLURM tasks, and the driver's IRT
calibration. :func:`evaluator_for` derives it from an experiment alone (device, dtype, engine
options, fitness, the run's fitted reduction), so a worker needs nothing but the experiment.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from evomerge.execution.devices import describe, resolve_device
from evomerge.execution.reduction import Reductions
from evomerge.experiment import Experiment
from evomerge.fitness.base import DTYPES, EvalResult, Fitness, Objective, fitness_class
from evomerge.fitness.function import FitnessFactory, fitness_factory
from evomerge.merge.engine import Merger
from evomerge.merge.export import export_dtype
from evomerge.merge.layerstack import LayerStack, ResidentSources
from evomerge.merge.segments import build_into
from evomerge.recipe import LayerRecipe, MergeRecipe, SegmentRecipe

__all__ = ["Evaluator", "evaluator_for", "fitness_for"]


class Evaluator:
    """Sources resident once, one model to build into, one fitness: scores recipes.

    ``device``: where sources, build target and fitness model live (a ``torch.device`` or its
    name; :func:`evaluator_for` picks it from ``executor.device``). ``dtype``: the fitness
    model's dtype, ``auto`` meaning the checkpoints' own (bf16 stays bf16). ``engine``: the
    Merger's options (cache, chunk, device_budget). ``fitness``: a registered name or a factory
    (:func:`fitness_for`); it gets ``device`` and ``dtype`` when it takes them and the
    experiment did not set them itself.
    """

    def __init__(self, model_paths: list[str], fitness: str | FitnessFactory,
                 fitness_options: Mapping[str, Any], base_model: str | None,
                 device: str | torch.device = "cpu",
                 dtype: str = "auto", engine: Mapping[str, Any] | None = None,
                 reductions: Reductions | None = None) -> None:
        self.device = torch.device(device)
        weights = export_dtype(sources=model_paths)  # None: the checkpoints' dtypes differ
        self.dtype = (weights or torch.float32) if dtype == "auto" else DTYPES[dtype]
        # mixed-dtype checkpoints merge once cast to an explicit dtype; agreeing ones never cast
        self.merger = Merger(model_paths, device=self.device, **(engine or {}),
                             dtype=None if weights or dtype == "auto" else self.dtype)
        placement = describe(self.device, self.dtype)  # its device and dtype, as spelled there
        factory = fitness_class(fitness) if isinstance(fitness, str) else fitness
        takes = inspect.signature(factory).parameters
        #: the fitness as configured; searches see it through :meth:`search_fitness`
        self.inner: Fitness = factory(
            base_model=base_model or model_paths[0],
            **{k: placement[k] for k in ("device", "dtype")
               if k in takes and k not in fitness_options},
            **fitness_options)
        #: the run's fitted reductions (an IRT-reduced run's), by key (see ``search_fitness``)
        self.reductions = reductions
        self._reduced: dict[str, Fitness] = {}
        self.model = self.inner.new_model().to(self.device)
        #: what this worker records with each trial it evaluates (see devices.describe)
        self.placement = describe(self.device, next(self.model.parameters()).dtype)
        self._stack: LayerStack | None = None

    def search_fitness(self, fidelity: Mapping[str, Any] | None) -> Fitness:
        """What scores on the search items at ``fidelity`` (a trial's, see
        :mod:`evomerge.execution.reduction`): the configured fitness for a run without
        reduction and for ``{"full": true}``; ``{"reduction": key, ...}`` that fit's anchors;
        None the run's latest fit (the sources' estimates, and trials recorded before trials
        named their fit)."""
        from evomerge.fitness.reduced import ReducedFitness

        if self.reductions is None or (fidelity is not None and "reduction" not in fidelity):
            return self.inner
        key = self.reductions.latest_key() if fidelity is None else fidelity["reduction"]
        if key not in self._reduced:
            self._reduced[key] = ReducedFitness(self.inner, *self.reductions.load(key))
        return self._reduced[key]

    def build(self, recipe: MergeRecipe | LayerRecipe) -> torch.nn.Module:
        """The candidate: a merge written in place into the evaluator's model, or a layer stack
        (DFS) assembled by reference over the resident models."""
        if isinstance(recipe, LayerRecipe):
            return self._stack_for(recipe).build(recipe)
        self._merge_into_model(recipe)
        return self.model

    def materialise(self, recipe: MergeRecipe | LayerRecipe
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The candidate's tensors for export, and the config fields that differ from the
        base's (a layer stack's depth)."""
        if isinstance(recipe, LayerRecipe):
            return self._stack_for(recipe).materialise(recipe)
        built = self._merge_into_model(recipe)
        # by the checkpoints' names (GPT-NeoX: embed_out, not the class's lm_head); a tied half
        # the checkpoints store anyway as the model holds it (the merged embeddings); tensors
        # the model does not keep (old buffers such as Pythia's attention masks) as the base
        # holds them: the export has the sources' layout
        own = self.model.state_dict()
        base = self.merger.state(getattr(recipe, "base_model", None) or self.merger.paths[0])
        return {n: (built[n] if n in built else own[n] if n in own else base[n]).detach()
                for n in self.merger.names}, {}

    def _merge_into_model(self, recipe: MergeRecipe | SegmentRecipe) -> dict[str, torch.Tensor]:
        """A weight-space merge written into the evaluator's model; the tensors it built."""
        if isinstance(recipe, SegmentRecipe):  # an M2N2 weight-space member
            return build_into(recipe, self.merger, self.model)
        return self.merger.build(recipe, into=self.model)

    def _stack_for(self, recipe: LayerRecipe) -> LayerStack:
        """The layer stacker, with the recipe's ``merged`` models (PS+DFS) built once each."""
        if self._stack is None:
            self._stack = LayerStack(ResidentSources(self.merger), self.model.config, self.model)
        self._stack.tensors.prepare(recipe.merged)
        return self._stack

    def score_items(self, recipes: Sequence[MergeRecipe | LayerRecipe]
                    ) -> list[dict[str, np.ndarray]]:
        """Per-item scores of the configured fitness on the full search split (IRT calibration)."""
        return [self.inner.evaluate(self.build(recipe), "search").item_scores
                for recipe in recipes]

    @property
    def objectives(self) -> list[Objective]:
        return self.inner.objectives

    def evaluate(self, recipe: MergeRecipe | LayerRecipe, split: str = "search",
                 fidelity: Mapping[str, Any] | None = None
                 ) -> tuple[EvalResult, dict[str, float]]:
        """Build and score ``recipe``; on ``search``, at the trial's ``fidelity``
        (:meth:`search_fitness`; a reduction's ``race`` and ``race_full`` thresholds go to its
        evaluate)."""
        started = time.perf_counter()
        model = self.build(recipe)
        built = time.perf_counter()
        if split != "search":  # held out: always every item
            result = self.inner.evaluate(model, split)
        else:
            fitness = self.search_fitness(fidelity)
            racing = {k: v for k, v in (fidelity or {}).items() if k in ("race", "race_full")}
            result = fitness.evaluate(model, split, **racing)
        return result, {"build_s": built - started, "eval_s": time.perf_counter() - built}

    def evaluate_source(self, path: str, split: str = "search") -> EvalResult:
        """Score an input model as it is (no merge); on ``search`` as the run's latest fit
        estimates it, in an IRT-reduced run."""
        self.merger.copy(path, into=self.model)
        fitness = self.search_fitness(None) if split == "search" else self.inner
        return fitness.evaluate(self.model, split)


def evaluator_for(experiment: Experiment, slot: int = 0, device: str | None = None,
                  reduced: bool = True) -> Evaluator:
    """The evaluator of an experiment's models and fitness on the device of worker ``slot``
    (``executor.device``, see :mod:`evomerge.execution.devices`; ``device`` overrides it), in
    ``models.dtype`` with the ``engine`` options; IRT-reduced when the experiment says so and
    ``reduced`` (the driver has written the run's reduction before any trial exists; its
    calibration itself scores full items)."""
    models = experiment.models
    paths = ([models.base] if models.base else []) + list(models.sources.values())
    spec = experiment.fitness.reduced
    reduced = reduced and spec is not None
    where = resolve_device(device or experiment.executor.device, slot)
    return Evaluator(paths, fitness_for(experiment), experiment.fitness.options, models.base,
                     device=where, dtype=models.dtype,
                     engine=experiment.engine.options(),
                     reductions=Reductions(experiment.run_path, spec.estimator)
                     if reduced else None)


def fitness_for(experiment: Experiment) -> FitnessFactory:
    """How the experiment's fitness is built: its registered class, or the Python object
    :func:`evomerge.run` was given for it (see :mod:`evomerge.fitness.function`)."""
    given = experiment.component("fitness")
    return (fitness_class(experiment.fitness.name) if given is None
            else fitness_factory(given))
