"""The worker loop: pop an enqueued trial, build its merge in place, score it, record it.

The same loop serves the in-process executor, local worker processes, and (later) Ray actors
and SLURM array tasks: everything it needs arrives as data (model paths, fitness options, and
the recipe stored with each trial), so a worker can start anywhere the storage URL reaches.
"""

from __future__ import annotations

import math
import os
import socket
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import torch

from evomerge.fitness.base import EvalResult, Fitness, Objective, make_fitness
from evomerge.merge.engine import Merger
from evomerge.recipe import MergeRecipe
from evomerge.store import Store


class Evaluator:
    """Sources resident once, one model to build into, one fitness: scores recipes."""

    def __init__(self, model_paths: list[str], fitness_name: str,
                 fitness_options: Mapping[str, Any], base_model: str | None,
                 device: str = "cpu") -> None:
        self.merger = Merger(model_paths, device=device)
        self.fitness: Fitness = make_fitness(fitness_name, base_model=base_model or model_paths[0],
                                             **fitness_options)
        self.model = self.fitness.new_model().to(device)

    @property
    def objectives(self) -> list[Objective]:
        return self.fitness.objectives

    def evaluate(self, recipe: MergeRecipe, split: str = "search"
                 ) -> tuple[EvalResult, dict[str, float]]:
        started = time.perf_counter()
        self.merger.build(recipe, into=self.model)
        built = time.perf_counter()
        result = self.fitness.evaluate(self.model, split)
        return result, {"build_s": built - started, "eval_s": time.perf_counter() - built}

    def evaluate_source(self, path: str, split: str = "search") -> EvalResult:
        """Score an input model as it is (no merge)."""
        with torch.inference_mode():
            state = self.merger.state(path)
            for name, tensor in self.model.state_dict().items():
                if name in state:
                    tensor.copy_(state[name])
        return self.fitness.evaluate(self.model, split)


def worker_id(pid: int | None = None) -> str:
    """How a worker process is named in the store: ``host:pid``."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


def process_one(store: Store, evaluator: Evaluator, owner: str | None = None) -> bool:
    """Pop and evaluate one trial; False when the queue is empty.

    A build or evaluation that raises (including out-of-memory) or yields a non-finite value is
    recorded as a FAIL trial with its reason; the caller's strategy then sees a penalty.
    """
    claim = store.pop(owner)
    if claim is None:
        return False
    try:
        recipe = MergeRecipe.from_dict(claim.meta["recipe"])
        result, timings = evaluator.evaluate(recipe)
        values = result.values(evaluator.objectives)
    except Exception as exc:  # noqa: BLE001 - any failure of a candidate is data, not a crash
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
        store.finish(claim, None, error=reason)
        return True
    error = None if all(math.isfinite(v) for v in values) else f"non-finite objectives {values}"
    store.finish(claim, values, timings=timings, item_scores=result.item_scores, error=error)
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
                parent: int | None = None) -> int:
    """Serve the queue until the driver marks the study finished and the queue is empty.

    With ``parent`` (the driver's pid) the worker also stops when its driver is gone, so a
    killed driver leaves no orphan evaluating trials that its resume will re-queue.
    """
    count, owner = 0, worker_id()
    while parent is None or os.getppid() == parent:
        if process_one(store, evaluator, owner):
            count += 1
            continue
        if store.is_finished():
            break
        time.sleep(poll_s)
    return count
