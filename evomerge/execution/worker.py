"""The worker loop: pop an enqueued trial, build its merge in place, score it, record it.

The same loop serves the in-process executor, local worker processes, and (later) Ray actors
and SLURM array tasks: everything it needs arrives as data (model paths, fitness options, and
the recipe stored with each trial), so a worker can start anywhere the storage URL reaches.
"""

from __future__ import annotations

import inspect
import math
import os
import signal
import socket
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge.execution.devices import describe, resolve_device
from evomerge.fitness.base import (
    DTYPES,
    EvalResult,
    Fitness,
    Objective,
    fitness_class,
)
from evomerge.fitness.function import FitnessFactory, fitness_factory
from evomerge.merge.engine import Merger
from evomerge.merge.export import export_dtype
from evomerge.merge.layerstack import LayerStack, ResidentSources
from evomerge.merge.segments import build_into
from evomerge.recipe import LayerRecipe, MergeRecipe, SegmentRecipe, parse_recipe
from evomerge.store import EXPERIMENT, OWNER, Store, open_storage


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
                 device: str | torch.device = "cpu", reduction: Any = None,
                 dtype: str = "auto", engine: Mapping[str, Any] | None = None,
                 reductions: Any = None) -> None:
        self.device = torch.device(device)
        weights = export_dtype(sources=model_paths)  # None: the checkpoints' dtypes differ
        self.dtype = (weights or torch.float32) if dtype == "auto" else DTYPES[dtype]
        # mixed-dtype checkpoints merge once cast to an explicit dtype; agreeing ones never cast
        self.merger = Merger(model_paths, device=self.device, **(engine or {}),
                             dtype=None if weights or dtype == "auto" else self.dtype)
        placement = describe(self.device, self.dtype)  # its device and dtype, as spelled there
        factory = fitness_class(fitness) if isinstance(fitness, str) else fitness
        takes = inspect.signature(factory).parameters
        #: the fitness as configured; ``fitness`` is what the search sees (maybe IRT-reduced)
        self.inner: Fitness = factory(
            base_model=base_model or model_paths[0],
            **{k: placement[k] for k in ("device", "dtype")
               if k in takes and k not in fitness_options},
            **fitness_options)
        self.fitness: Fitness = self.inner
        if reduction is not None:
            self.reduce(*reduction)
        #: the run's fitted reductions by key, for trials that name theirs (see ``evaluate``)
        self.reductions = reductions
        self._reduced: dict[str, Fitness] = {}
        self.model = self.fitness.new_model().to(self.device)
        #: what this worker records with each trial it evaluates (see devices.describe)
        self.placement = describe(self.device, next(self.model.parameters()).dtype)
        self._stack: LayerStack | None = None

    def reduce(self, reduction: Any, estimator: str) -> None:
        """Score searches on the reduction's anchor items only (see evomerge.fitness.reduced)."""
        from evomerge.fitness.reduced import ReducedFitness

        self.fitness = ReducedFitness(self.inner, reduction, estimator)

    def search_fitness(self, fidelity: Mapping[str, Any] | None) -> Fitness:
        """What scores a trial enqueued with ``fidelity`` (see
        :mod:`evomerge.execution.reduction`): ``{"full": true}`` every search item,
        ``{"reduction": key, ...}`` that fitted reduction's anchors, None the configured
        fitness (runs recorded before trials named their fidelity)."""
        from evomerge.fitness.reduced import ReducedFitness

        if fidelity is None:
            return self.fitness
        key = fidelity.get("reduction")
        if key is None:
            return self.inner
        if key not in self._reduced:
            if self.reductions is None:
                raise ValueError(f"trial names reduction {key!r}, but this evaluator was "
                                 "built without the run's reductions")
            self._reduced[key] = ReducedFitness(self.inner, *self.reductions.load(key))
        return self._reduced[key]

    def build(self, recipe: MergeRecipe | LayerRecipe) -> torch.nn.Module:
        """The candidate: a merge written in place into the evaluator's model, or a layer stack
        (DFS) assembled by reference over the resident models."""
        if isinstance(recipe, LayerRecipe):
            return self._stack_for(recipe).build(recipe)
        if isinstance(recipe, SegmentRecipe):  # an M2N2 weight-space member
            build_into(recipe, self.merger, self.model)
            return self.model
        self.merger.build(recipe, into=self.model)
        return self.model

    def materialise(self, recipe: MergeRecipe | LayerRecipe
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The candidate's tensors for export, and the config fields that differ from the
        base's (a layer stack's depth)."""
        if isinstance(recipe, LayerRecipe):
            return self._stack_for(recipe).materialise(recipe)
        built = (build_into(recipe, self.merger, self.model) if isinstance(recipe, SegmentRecipe)
                 else self.merger.build(recipe, into=self.model))
        # by the checkpoints' names (GPT-NeoX: embed_out, not the class's lm_head); a tied half
        # the checkpoints store anyway as the model holds it (the merged embeddings); tensors
        # the model does not keep (old buffers such as Pythia's attention masks) as the base
        # holds them: the export has the sources' layout
        own = self.model.state_dict()
        base = self.merger.state(getattr(recipe, "base_model", None) or self.merger.paths[0])
        return {n: (built[n] if n in built else own[n] if n in own else base[n]).detach()
                for n in self.merger.names}, {}

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
        return self.fitness.objectives

    def evaluate(self, recipe: MergeRecipe | LayerRecipe, split: str = "search",
                 fidelity: Mapping[str, Any] | None = None
                 ) -> tuple[EvalResult, dict[str, float]]:
        """Build and score ``recipe``; on ``search``, at the trial's ``fidelity``
        (:meth:`search_fitness`; a reduction's ``race`` thresholds go to its evaluate)."""
        started = time.perf_counter()
        model = self.build(recipe)
        built = time.perf_counter()
        if split == "search" and fidelity is not None:
            fitness = self.search_fitness(fidelity)
            race = fidelity.get("race")
            result = (fitness.evaluate(model, split, race=race) if race is not None
                      else fitness.evaluate(model, split))
        else:
            result = self.fitness.evaluate(model, split)
        return result, {"build_s": built - started, "eval_s": time.perf_counter() - built}

    def evaluate_source(self, path: str, split: str = "search") -> EvalResult:
        """Score an input model as it is (no merge)."""
        self.merger.copy(path, into=self.model)
        return self.fitness.evaluate(self.model, split)


def evaluator_for(experiment: Any, slot: int = 0, device: str | None = None,
                  reduced: bool = True) -> Evaluator:
    """The evaluator of an experiment's models and fitness on the device of worker ``slot``
    (``executor.device``, see :mod:`evomerge.execution.devices`; ``device`` overrides it), in
    ``models.dtype`` with the ``engine`` options; IRT-reduced when the experiment says so and
    ``reduced`` (the driver has written the run's reduction before any trial exists; its
    calibration itself scores full items)."""
    from evomerge.execution import reduction

    models = experiment.models
    paths = ([models.base] if models.base else []) + list(models.sources.values())
    options, spec = reduction.split_options(experiment.fitness.options)
    reduced = reduced and spec is not None
    fitted = reduction.load(experiment.run_path, spec) if reduced and reduction.is_fixed(
        experiment.run_path) else None
    where = resolve_device(device or experiment.executor.device, slot)
    return Evaluator(paths, fitness_for(experiment), options, models.base, device=where,
                     reduction=fitted, dtype=models.dtype, engine=experiment.engine.options(),
                     reductions=reduction.Reductions(experiment.run_path, spec.estimator)
                     if reduced else None)


def fitness_for(experiment: Any) -> FitnessFactory:
    """How the experiment's fitness is built: its registered class, or the Python object
    :func:`evomerge.run` was given for it (see :mod:`evomerge.fitness.function`)."""
    given = experiment.component("fitness")
    return (fitness_class(experiment.fitness.name) if given is None
            else fitness_factory(given))


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` (None: unchanged) for the block. On a shared
    machine, torch's default (one thread per core, spinning) made LM evaluation 16x slower."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Executor:
    """What every executor shares (see :mod:`evomerge.execution` for the protocol): the
    experiment, the store arguments, and the driver's own evaluator, built on first use (source
    and held-out scores at the end of a run; in-process trials for the local executor)."""

    def __init__(self, experiment: Any, store_args: dict) -> None:
        self.experiment = experiment
        self.store_args = store_args
        self._evaluator: Evaluator | None = None

    @property
    def evaluator(self) -> Evaluator:
        if self._evaluator is None:
            # a remote executor's driver (a SLURM driver job gets no --gres) uses a GPU only
            # where it has one; the local executor's driver is worker slot 0 as asked
            remote = self.experiment.executor.kind != "local"
            self._evaluator = evaluator_for(self.experiment, device="auto" if remote else None)
        return self._evaluator


def worker_id(pid: int | None = None) -> str:
    """How a worker process is named in the store: ``host:pid``."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


def process_one(store: Store, evaluator: Evaluator, owner: str | None = None) -> bool:
    """Pop and evaluate one trial; False when the queue is empty.

    A build or evaluation that raises (including out-of-memory) or yields a non-finite value is
    recorded as a FAIL trial with its reason; the caller's strategy then sees a penalty.

    A worker with an ``owner`` beats while it holds the trial (:meth:`Store.beating`, when the
    store has ``heartbeat_s``), so a checker's :meth:`Store.fail_stale` can give the trial back
    if this process dies or goes silent; the in-process executor (no owner) does not beat.
    """
    claim = store.pop(owner)
    if claim is None:
        return False
    with store.beating(claim) if owner is not None else nullcontext():
        try:
            # the driver validated it when it decoded x: checked once per trial, not twice
            recipe = parse_recipe(claim.meta["recipe"], validated=True)
            result, timings = evaluator.evaluate(recipe, fidelity=claim.meta.get("fidelity"))
            values = result.values(evaluator.objectives)
        except Exception as exc:  # noqa: BLE001 - any failure of a candidate is data, not a crash
            if isinstance(exc, torch.OutOfMemoryError):
                torch.cuda.empty_cache()  # a no-op without CUDA
            reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
            store.finish(claim, None, error=reason)
            return True
        finite = all(math.isfinite(v) for v in values)
        store.finish(claim, values, timings=timings, item_scores=result.item_scores,
                     error=None if finite else f"non-finite objectives {values}",
                     worker=getattr(evaluator, "placement", None), info=result.info)
    return True


def drain(store: Store, evaluator: Evaluator, on_done: Callable[[], None] | None = None) -> int:
    """Evaluate enqueued trials until the queue is empty; returns how many were processed."""
    count = 0
    while process_one(store, evaluator):
        count += 1
        if on_done:
            on_done()
    return count


def worker_loop(store: Store, evaluator: Evaluator, poll_s: float = 0.05,
                parent: int | None = None, max_trials: int | None = None) -> int:
    """Serve the queue until the driver marks the study finished and the queue is empty (or
    ``max_trials`` are done).

    With ``parent`` (the driver's pid) the worker also stops when its driver is gone, so a
    killed driver leaves no orphan evaluating trials that its resume will re-queue.
    """
    count, owner = 0, worker_id()
    while (parent is None or os.getppid() == parent) and count != max_trials:
        if process_one(store, evaluator, owner):
            count += 1
            continue
        if store.is_finished():
            break
        time.sleep(poll_s)
    return count


# ---- a standalone worker (`evomerge worker`: SLURM array tasks, any shell) ----------------------


class Terminated(BaseException):
    """SIGTERM arrived (scancel, preemption, the time limit's ``--signal``). A BaseException so
    that :func:`process_one`'s ``except Exception`` does not record the trial as a failed
    candidate: the trial was interrupted, not bad."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` in the main thread, once (a repeated signal during
    the give-back is ignored)."""

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def storage_file(url: str) -> Path | None:
    """The file behind a file-based storage URL (it must exist before a worker opens it: opening
    would create an empty database that the driver did not make)."""
    if url.startswith("sqlite:///"):  # sqlite:///relative.db, sqlite:////absolute.db
        return Path(url.removeprefix("sqlite:///"))
    if url.startswith("journal:///"):  # journal:///absolute.log (as open_storage reads it)
        return Path(url.removeprefix("journal://"))
    return None


def wait_for_experiment(url: str, study: str, *, wait_s: float, poll_s: float = 1.0
                        ) -> dict[str, Any]:
    """The experiment that ``evomerge run`` stored in ``study`` (the study's user attribute
    ``experiment``), waiting up to ``wait_s`` for the driver to create it: array tasks may start
    before their driver. LookupError naming what is missing after the wait."""
    import sqlalchemy.exc

    deadline = time.monotonic() + wait_s
    storage, problem = None, ""
    while True:
        try:
            path = storage_file(url)
            if storage is None and path is not None and not path.exists():
                problem = f"{path} does not exist"
            else:
                storage = storage or open_storage(url)
                study_id = storage.get_study_id_from_name(study)
                data = storage.get_study_user_attrs(study_id).get(EXPERIMENT)
                if isinstance(data, dict):
                    return data
                problem = (f"study {study!r} holds no experiment (attribute {EXPERIMENT!r}); "
                           "was it created by `evomerge run`?")
        except KeyError:
            problem = f"no study {study!r} in {url}"
        except sqlalchemy.exc.SQLAlchemyError as exc:  # the driver may be creating the schema
            problem = f"cannot read {url}: {exc}"
        if time.monotonic() >= deadline:
            raise LookupError(f"{problem} (waited {wait_s:g} s for the driver to create it; "
                              "start `evomerge run` on an experiment with this name and storage, "
                              "or check --storage and --study)")
        time.sleep(poll_s)


def serve(url: str, study: str, *, poll_s: float = 1.0, max_trials: int | None = None,
          wait_s: float = 600.0) -> dict[str, Any]:
    """Serve a run's queue from anywhere its storage URL reaches: a SLURM array task, a shell.

    Everything comes from the study (the driver stored the resolved experiment there), so a
    worker needs only the URL and the study name. Returns ``{"trials": n, "given_back": [...],
    "terminated": bool}``. On SIGTERM the running trial is given back at once (FAIL
    "interrupted", which the driver enqueues again) and the worker returns normally, so a
    cancelled, preempted or timed-out task exits 0 and no slot is evaluated twice.
    """
    from evomerge.execution.driver import Plan
    from evomerge.experiment import Experiment

    owner, count, given_back = worker_id(), 0, []
    with _sigterm_raises():
        store_args: dict[str, Any] | None = None
        try:
            experiment = Experiment.model_validate(
                wait_for_experiment(url, study, wait_s=wait_s, poll_s=poll_s))
            with warnings.catch_warnings():  # advice on the storage: the driver gave it once
                warnings.simplefilter("ignore", UserWarning)
                plan = Plan(experiment)
            # Plan's store args carry executor.heartbeat_s: this worker beats while it holds a
            # trial, so the driver gives the trial back if the task dies (kill -9, node loss).
            store_args = {**plan.store_args, "url": url, "study_name": study}
            store = Store(**store_args)
            # Slurm gives the task its GPUs through CUDA_VISIBLE_DEVICES: slot 0 is the first
            # of them; several tasks of one step sharing a node's GPUs take them by local id
            slot = int(os.environ.get("SLURM_LOCALID", "0"))
            count = worker_loop(store, evaluator_for(experiment, slot=slot), poll_s=poll_s,
                                max_trials=max_trials)
        except Terminated:
            if store_args is not None:  # a fresh store: the old one may have been mid-call
                fresh = Store(**store_args)
                given_back = [t.number for t in fresh.fail_interrupted(owner)]
                count = sum(t.state.is_finished() and t.system_attrs.get(OWNER) == owner
                            and t.number not in given_back for t in fresh.trials())
            return {"trials": count, "given_back": given_back, "terminated": True}
    return {"trials": count, "given_back": given_back, "terminated": False}
