"""The worker loop: pop an enqueued trial, build its merge in place, score it, record it.

The same loop serves the in-process executor, local worker processes, Ray actors and SLURM
array tasks: everything it needs arrives as data (the experiment and the store's arguments,
stored in the study by the driver, and the recipe stored with each trial), so a worker can
start anywhere the storage URL reaches. Scoring itself is :mod:`evomerge.execution.evaluator`'s.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from evomerge.execution.evaluator import Evaluator, evaluator_for
from evomerge.experiment import Experiment
from evomerge.recipe import parse_recipe
from evomerge.store import EXPERIMENT, OWNER, STORE_ARGS, Store, open_storage


class Executor:
    """What every executor shares (see :mod:`evomerge.execution` for the protocol): the
    experiment, the store arguments, and the driver's own evaluator, built on first use (source
    and held-out scores at the end of a run; in-process trials for the local executor)."""

    def __init__(self, experiment: Experiment, store_args: dict[str, Any]) -> None:
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


def wait_for_run(url: str, study: str, *, wait_s: float, poll_s: float = 1.0
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The experiment and the store arguments that ``evomerge run`` stored in ``study`` (its
    user attributes ``experiment`` and ``evomerge:store_args``), waiting up to ``wait_s`` for
    the driver to create them: array tasks may start before their driver. LookupError naming
    what is missing after the wait."""
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
                attrs = storage.get_study_user_attrs(storage.get_study_id_from_name(study))
                data, store_args = attrs.get(EXPERIMENT), attrs.get(STORE_ARGS)
                if isinstance(data, dict) and isinstance(store_args, dict):
                    return data, store_args
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

    Everything comes from the study (the driver stored the resolved experiment and the store's
    arguments there), so a worker needs only the URL and the study name. Returns ``{"trials":
    n, "given_back": [...], "terminated": bool}``. On SIGTERM the running trial is given back
    at once (FAIL "interrupted", which the driver enqueues again) and the worker returns
    normally, so a cancelled, preempted or timed-out task exits 0 and no slot is evaluated twice.
    """
    owner, count, given_back = worker_id(), 0, []
    with _sigterm_raises():
        store_args: dict[str, Any] | None = None
        try:
            data, stored = wait_for_run(url, study, wait_s=wait_s, poll_s=poll_s)
            experiment = Experiment.model_validate(data)
            # the store args carry executor.heartbeat_s: this worker beats while it holds a
            # trial, so the driver gives the trial back if the task dies (kill -9, node loss)
            store_args = {**stored, "url": url, "study_name": study}
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
