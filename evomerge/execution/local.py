"""Local execution: evaluate in the driver process, or in N worker processes on this machine.

Both paths use the store as the queue. In-process, the driver drains the queue itself after
enqueuing a generation. With ``workers: N``, N spawned processes each load the sources once and
run :func:`evomerge.execution.worker.worker_loop`; the driver only waits for the generation's
trials to finish, as it will for Ray actors and SLURM array tasks.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable
from typing import Any

from evomerge.execution.evaluator import evaluator_for
from evomerge.execution.worker import Executor, drain, worker_id, worker_loop
from evomerge.experiment import Experiment
from evomerge.store import Store


def _worker_main(experiment_data: dict[str, Any], store_args: dict[str, Any], parent: int,
                 slot: int) -> None:
    import torch

    experiment = Experiment.model_validate(experiment_data)
    # N workers share this machine's cores: torch's default (all cores each) oversubscribes
    # them, which cost 15x on LM evaluation here with 2 workers on 2 cores.
    torch.set_num_threads(experiment.executor.threads
                          or max(1, (os.cpu_count() or 1) // experiment.executor.workers))
    store = Store(**store_args)
    # worker k of N takes visible GPU k mod G (executor.device auto/cuda): one CUDA context
    # per process, and a replaced worker keeps its predecessor's slot
    worker_loop(store, evaluator_for(experiment, slot=slot), parent=parent)


class LocalExecutor(Executor):
    """Runs the enqueued trials of a generation to completion."""

    def __init__(self, experiment: Experiment, store_args: dict[str, Any]) -> None:
        super().__init__(experiment, store_args)
        self.workers = experiment.executor.workers
        self._procs: list[mp.Process] = []
        self._deaths = 0

    def run(self, store: Store, done: Callable[[], bool], tick: Callable[..., None]) -> None:
        """Return once ``done()``; ``tick(1)`` after each trial evaluated here, ``tick()`` after
        each poll of the workers' progress."""
        if self.workers == 0:
            drain(store, self.evaluator, on_done=lambda: tick(1))
            return
        self._start()
        last_stale = time.monotonic()
        while not done():
            self._replace_dead(store)
            if time.monotonic() - last_stale >= 1.0:  # a worker killed between claim and owner
                store.fail_stale()                    # write (PostgreSQL, journal) never beat
                last_stale = time.monotonic()
            time.sleep(0.05)
            tick()

    def _replace_dead(self, store: Store) -> None:
        """A worker that died gives its running trial back (FAIL "interrupted", which the driver
        enqueues again) and is replaced; repeated deaths end the run instead of looping."""
        for k, proc in enumerate(self._procs):
            if proc.is_alive():
                continue
            store.fail_interrupted(owner=worker_id(proc.pid))
            self._deaths += 1
            if self._deaths > 3 * self.workers:
                raise RuntimeError(f"{self._deaths} worker processes died (last exit code "
                                   f"{proc.exitcode}); see their output above")
            self._procs[k] = self._spawn(k)

    def _start(self) -> None:
        if self._procs:
            return
        self._procs = [self._spawn(k) for k in range(self.workers)]

    def _spawn(self, slot: int) -> mp.Process:
        ctx = mp.get_context("spawn")  # fresh interpreters: no forked torch/SQLite state
        proc = ctx.Process(target=_worker_main,
                           args=(self.experiment.model_dump(mode="json"), self.store_args,
                                 os.getpid(), slot),
                           daemon=True)
        proc.start()
        return proc

    def close(self, store: Store) -> None:
        """Mark the study finished (workers stop; the dashboard shows it) and wait for them."""
        store.set_finished(True)
        if not self._procs:
            return
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
        self._procs = []
