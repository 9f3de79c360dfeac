"""Where evaluations run. One registry of executors, named by ``executor.kind`` in experiments.

An executor is built as ``cls(experiment, store_args)`` and offers:

- ``evaluator``: an :class:`~evomerge.execution.worker.Evaluator` in the driver process (source
  and held-out scores at the end of a run);
- ``run(store, done, tick)``: return once ``done()``; ``tick(1)`` per trial evaluated in this
  process, ``tick()`` after each poll of remote progress;
- ``close(store)``: mark the study finished and release the workers.

Work always flows through the store (the queue), so every executor gets resume, failure
recording and exactly-once accounting from the driver for free.
"""

from __future__ import annotations

from typing import Any

from evomerge.registry import Registry

#: kind -> executor class, imported on use so that `local` runs never import ray; plugins:
#: entry-point group ``evomerge.executors``.
EXECUTORS: Registry[Any] = Registry("executor", "evomerge.executors", {
    "local": "evomerge.execution.local:LocalExecutor",
    "ray": "evomerge.execution.ray:RayExecutor",
    "slurm": "evomerge.execution.slurm:SlurmExecutor",
})


def make_executor(experiment: Any, store_args: dict) -> Any:
    """The executor for ``experiment.executor.kind``."""
    return EXECUTORS[experiment.executor.kind](experiment, store_args)
