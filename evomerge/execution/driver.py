"""The driver: ask a generation, enqueue it, let the executor evaluate it, tell the strategy.

Resume is replay (DESIGN decision 3): the strategy is re-created from the experiment with its
seed and walked through the stored generations: for each, it is asked again (a deterministic
strategy asks the same points; a mismatch is an error, never silently mixed), the slots that
already have a finished trial are told from the store, and only the missing ones are enqueued.
Trials left RUNNING by a killed process are marked FAIL("interrupted") and their slot is
enqueued again, so a run always ends with exactly ``budget`` evaluated slots.

A run has an identity: a random id kept in ``RUN_DIR/run.json`` and in the study (see
:meth:`evomerge.store.Store.claim_run`), so a second run that names the same study in a shared
store is refused with one clear error instead of mixing its trials into the first run's. Trials
are stored with the space's parameter names and a readable recipe as their optuna-dashboard note.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from optuna.trial import FrozenTrial, TrialState

from evomerge.execution import make_executor
from evomerge.execution.devices import torch_threads
from evomerge.execution.evaluator import evaluator_for
from evomerge.execution.plan import Plan
from evomerge.execution.reduction import Schedule, calibrate_run
from evomerge.execution.worker import Executor
from evomerge.experiment import Experiment, ExperimentError
from evomerge.fitness.base import Objective
from evomerge.recipe import LayerRecipe, MergeRecipe, SegmentRecipe
from evomerge.search import Strategy
from evomerge.spaces.base import Bound
from evomerge.store import (EXPERIMENT, INTERRUPTED, RESULT, STORE_ARGS, RunOwnedError, Slot,
                            Store, explain_write_errors, items_scored, scored_in_full, x_of)

RUN_FILE = "run.json"  # RUN_DIR/run.json: {"run_id", "study"}: the run's identity


def run_experiment(experiment: Experiment, *, resume: bool = False, progress: bool = True,
                   on_trial: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run or resume a search end to end; writes the run directory and returns the summary."""

    started = time.perf_counter()
    try:
        plan = Plan(experiment)
    except (TypeError, KeyError) as exc:
        raise ExperimentError(str(exc)) from None
    run_dir = plan.experiment.run_path
    run_dir.mkdir(parents=True, exist_ok=True)
    with _driver_lock(run_dir), torch_threads(plan.experiment.executor.threads):
        return _run_locked(plan, resume, progress, on_trial, started)


@contextmanager
def _driver_lock(run_dir: Path) -> Iterator[None]:
    """One driver per run directory. Resuming marks RUNNING trials as interrupted, which is only
    right when their driver is dead: a live driver holds this lock (the kernel drops it when the
    process dies, kill -9 included)."""
    path = run_dir / "driver.lock"
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise ExperimentError(f"{run_dir} is being run by another driver (pid {holder}); "
                                  "wait for it to finish, or stop it before resuming") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_locked(plan: Plan, resume: bool, progress: bool,
                on_trial: Callable[[int, int], None] | None, started: float) -> dict[str, Any]:
    from evomerge import report

    run_dir = plan.experiment.run_path
    try:  # the store's own writes name a full disk (StoreFullError) themselves
        store = Store(**plan.store_args)
    except ValueError as exc:  # parameters named otherwise: another space
        raise ExperimentError(f"resume: {exc}" if resume else str(exc)) from None
    _claim(store, run_dir, resume)
    report.write_provenance(run_dir, plan.experiment, resumed=resume)
    resumed = _resume_facts(store, plan.experiment) if resume else None
    if resumed is not None:
        _say(progress, resumed["line"])
    store.set_finished(False)
    reduction = schedule = None
    if plan.experiment.fitness.reduced is not None:  # before any evaluator reads it
        reduction, schedule = calibrate_run(
            plan, lambda: evaluator_for(plan.experiment, reduced=False), progress=progress)
    with explain_write_errors(plan.store_args["url"], store.resume_hint):
        # Remote workers (`evomerge worker --storage URL --study NAME`) read the experiment
        # and open the store with these arguments (their own URL and study name aside).
        store.study.set_user_attr(STORE_ARGS, {k: v for k, v in plan.store_args.items()
                                               if k not in ("url", "study_name")})
        store.study.set_user_attr(EXPERIMENT, plan.experiment.model_dump(mode="json"))
    executor = make_executor(plan.experiment, plan.store_args)
    budget = plan.experiment.budget
    before = _previous_summary(run_dir) if resume else None
    with report.progress_bar(budget, enabled=progress) as bar:
        try:
            strategy = _search(plan, store, executor, bar, on_trial, schedule,
                               items_spent=report.calibration_items(reduction),
                               say=lambda line: _say(progress, line))
        except RunOwnedError as exc:
            raise ExperimentError(str(exc)) from None
        finally:
            executor.close(store)
    report.write_strategy_report(strategy, run_dir)
    if schedule is not None:
        reduction.update(schedule.facts())
    wall_s = time.perf_counter() - started
    summary = report.finish_run(plan, store, executor.evaluator,
                                wall_s=before["wall_s"] if before else wall_s,
                                reduction=reduction, progress=progress)
    if resumed is not None:
        _record_resume(run_dir, summary, resumed, wall_s)
    return summary


# ---- the run's identity, resume facts ---------------------------------------------------------


def _claim(store: Store, run_dir: Path, resume: bool) -> str:
    """This run's id, the study claimed for it (see Store.claim_run); a new run gets a new id,
    a resume the one in RUN_DIR/run.json (a run made before ids gets one now). run.json is
    written only once the claim holds, so a refused run never overwrites another's."""
    path = run_dir / RUN_FILE
    recorded = None
    if resume and path.is_file():
        try:
            recorded = json.loads(path.read_text()).get("run_id")
        except (ValueError, AttributeError):
            raise ExperimentError(f"{path}: not a run identity file (expected JSON with "
                                  "run_id); restore it, or remove it to resume as a run "
                                  "that had none") from None
    run_id = recorded or uuid.uuid4().hex
    try:
        store.claim_run(run_id, run_dir, resume=resume)
    except RunOwnedError as exc:
        raise ExperimentError(str(exc)) from None
    if recorded is None:
        from evomerge.report import write_atomic

        write_atomic(path, json.dumps({"run_id": run_id, "study": store.study.study_name},
                                      indent=2) + "\n")
    return run_id


def _resume_facts(store: Store, experiment: Experiment) -> dict[str, Any]:
    """Mark the trials a dead run left RUNNING as interrupted; what the resume starts from:
    ``replayed`` (finished slots, told from the store), ``interrupted`` (marked now), ``left``
    (slots still to evaluate, at most: ``budget_items`` may end the run first) and the line
    that says so."""
    budget = experiment.budget
    interrupted = len(store.fail_interrupted())
    replayed = sum(t.state.is_finished() for t in store.slots().values())
    left = max(budget - replayed, 0)
    line = (f"resume: replayed {replayed} trial{'s' * (replayed != 1)} from the store, "
            f"{interrupted} marked failed as interrupted (evaluated again), "
            f"{'at most ' if experiment.budget_items else ''}{left} of "
            f"{budget} slot{'s' * (budget != 1)} left")
    return {"replayed": replayed, "interrupted": interrupted, "left": left, "line": line}


def _say(progress: bool, line: str) -> None:
    """One line for the person at the terminal (stderr, so it never mixes into output
    that is parsed), and the log."""
    import logging

    logging.getLogger("evomerge").info(line)
    if progress:
        print(line, file=sys.stderr, flush=True)


def _previous_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary a finished run wrote before this resume (None when it never finished)."""
    from evomerge.report import SUMMARY

    try:
        data = json.loads((run_dir / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("wall_s"), (int, float)) \
        else None


def _record_resume(run_dir: Path, summary: dict[str, Any], resumed: dict[str, Any],
                   wall_s: float) -> None:
    """summary.json keeps the run's own ``wall_s`` (the first run's, when that one finished: a
    resume of a finished run must not replace it with its own few seconds) and says what the
    latest resume did under ``resume``: its seconds, trials replayed, interrupted, left."""
    from evomerge.report import SUMMARY, write_atomic

    summary["resume"] = {"wall_s": round(wall_s, 3),
                         **{k: resumed[k] for k in ("replayed", "interrupted", "left")}}
    write_atomic(run_dir / SUMMARY, json.dumps(summary, indent=2))


def _note(space: Bound, recipe: MergeRecipe | LayerRecipe | SegmentRecipe,
          slot: Slot) -> str:
    """A trial's recipe as optuna-dashboard shows it on the trial's page (Markdown): the
    mergekit YAML with models by their short names and numbers to 4 decimals, then which
    model each short name is."""
    names = space.model_names()
    text = recipe.to_yaml()
    for ref in sorted(names, key=len, reverse=True):
        text = text.replace(ref, names[ref])
    text = re.sub(r"(?<![\w.])-?\d+\.\d{5,}(?:e[-+]?\d+)?",
                  lambda m: repr(round(float(m.group()), 4)), text)
    legend = "\n".join(f"- `{short}`: `{ref}`" for ref, short in names.items())
    return (f"### Recipe: generation {slot.generation}, candidate {slot.index}\n\n"
            f"```yaml\n{text.rstrip()}\n```\n\n**Models**\n\n{legend}\n")


def _search(plan: Plan, store: Store, executor: Executor, bar: Any,
            on_trial: Callable[[int, int], None] | None, schedule: Schedule | None = None,
            items_spent: int = 0, say: Callable[[str], None] = lambda line: None) -> Strategy:
    """Ask, enqueue, evaluate and tell until the budget is spent; the told strategy. With an
    IRT-reduced fitness, ``schedule`` says which items each generation is scored on. With
    ``budget_items``, no generation starts once the item evaluations (``items_spent`` before
    the search, then every finished trial's) reached it: decided from whole generations, so a
    resume replays the same stop."""
    experiment = plan.experiment
    budget, budget_items = experiment.budget, experiment.budget_items
    strategy = plan.new_strategy()
    stored = store.slots()  # read once: what a previous (killed) run left
    done = sum(t.state.is_finished() for t in stored.values())
    best = _Best(plan.objectives)
    for t in stored.values():
        best.add(t)
    generation = asked = 0
    while asked < budget:
        if budget_items is not None and generation > 0 and items_spent >= budget_items:
            say(f"item budget reached: {items_spent:,} item evaluations (budget_items "
                f"{budget_items:,}) after {asked} of {budget} candidates")
            break
        candidates = strategy.ask()  # may be fewer than popsize (pymoo drops duplicates)
        size = min(len(candidates), budget - asked)
        asked += size
        fidelity = None if schedule is None else {"fidelity": schedule.fidelity()}
        ids, finished = [], {}  # trial ids per slot; finished trials by id
        for i, cand in enumerate(candidates[:size]):
            trial = stored.get(Slot(generation, i))
            if trial is not None:
                if not np.allclose(x_of(trial, store.names), cand.x, rtol=0, atol=1e-12):
                    raise ExperimentError(
                        f"resume: trial {trial.number} (generation {generation}, candidate {i}) "
                        "does not match what the strategy asks now; the experiment (seed, space, "
                        "strategy options) must be the one the run started with")
                ids.append(trial._trial_id)
                if trial.state.is_finished():
                    finished[trial._trial_id] = trial
            else:
                ids.append(_enqueue(store, plan.space, cand.x, Slot(generation, i), cand.meta,
                                    fidelity))
        already = len(finished)

        def generation_done() -> bool:
            for tid in ids:
                if tid not in finished:
                    trial = store.get(tid)
                    if not trial.state.is_finished():
                        return False
                    finished[tid] = trial
            return True

        evaluated = [0]  # in-process: trials this driver drained; workers: seen via polling

        def tick(step: int = 0) -> None:
            evaluated[0] += step
            count = done + max(len(finished) - already, evaluated[0])
            bar.update(count, best.text())
            if on_trial:
                on_trial(count, budget)

        bar.update(done, best.text())
        while True:
            executor.run(store, generation_done, tick)
            generation_done()
            lost = [k for k, tid in enumerate(ids) if _interrupted(finished[tid])]
            if not lost:  # a dead worker's trial comes back: evaluate its slot again
                break
            for k in lost:
                finished.pop(ids[k])
                ids[k] = _enqueue(store, plan.space, candidates[k].x, Slot(generation, k),
                                  candidates[k].meta, fidelity)
        trials = [finished[tid] for tid in ids]
        done += len(trials) - already
        items_spent += sum(items_scored(t) for t in trials)
        for t in trials:
            best.add(t)
        bar.update(done, best.text())
        _check_failures(trials, store, experiment.max_fail_share, strategy.popsize)
        if size == len(candidates):
            values = [list(t.values) if t.state == TrialState.COMPLETE else None for t in trials]
            strategy.tell(candidates, values, item_scores=[_item_scores(t) for t in trials])
        if schedule is not None:
            schedule.observe(trials)
        generation += 1
    return strategy


def _enqueue(store: Store, space: Bound, x: np.ndarray, slot: Slot,
             meta: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> int:
    """One candidate into the store: its parameters by name, its recipe (data, and readable as
    the trial's dashboard note; not for an in-memory study, which no dashboard can open), which
    the space decodes from the candidate's ``x`` and ``meta``, and ``extra`` metadata for its
    worker (an IRT-reduced run's ``fidelity``)."""
    recipe = space.decode(x, meta)
    note = None if store.url == "memory" else _note(space, recipe, slot)
    return store.enqueue(x, slot, recipe.to_dict(), note=note, extra=extra)


class _Best:
    """Best-so-far for the progress bar, tracked locally (no store scan per trial). In an
    IRT-reduced run a full score and an estimate (from the anchors, or the anchors and the
    racing half) are not the same measure: the best of each is shown apart (``mean_acc 0.6012
    full, 0.6240 est``)."""

    def __init__(self, objectives: list[Objective]) -> None:
        self.objectives = objectives
        self.value: float | None = None
        self.estimate: float | None = None

    def add(self, trial: FrozenTrial) -> None:
        if trial.state != TrialState.COMPLETE or len(self.objectives) > 1:
            return
        v = trial.values[0]
        better = max if self.objectives[0].direction == "maximize" else min
        if not scored_in_full(trial, reduced=False):  # an estimate the trial says it is
            self.estimate = v if self.estimate is None else better(self.estimate, v)
        else:
            self.value = v if self.value is None else better(self.value, v)

    def text(self) -> str:
        if len(self.objectives) > 1:
            return f"{len(self.objectives)} objectives"
        name = self.objectives[0].name
        if self.estimate is None:
            return "-" if self.value is None else f"{name} {self.value:.4f}"
        full = "-" if self.value is None else f"{self.value:.4f}"
        return f"{name} {full} full, {self.estimate:.4f} est"


def _item_scores(trial: FrozenTrial) -> np.ndarray | None:
    """A finished trial's per-item scores as one vector (tasks in sorted name order), read
    from the store, so a replayed trial tells exactly what the live one did; None if it
    failed. Told to every strategy; M2N2 selects by them (see ``evomerge.search.m2n2``)."""
    from evomerge.store import decode_scores

    scores = trial.user_attrs.get(RESULT, {}).get("item_scores")
    if trial.state != TrialState.COMPLETE or not scores:
        return None
    return np.concatenate([decode_scores(scores[task]) for task in sorted(scores)])


def _interrupted(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and trial.user_attrs.get(RESULT, {}).get(
        "error") == INTERRUPTED


def _check_failures(generation: list[FrozenTrial], store: Store, share: float,
                    popsize: int) -> None:
    """Stop the run when more than ``share`` of the finished candidates failed."""
    finished = [t for t in store.slots().values() if t.state.is_finished()] if any(
        t.state == TrialState.FAIL for t in generation) else None
    if not finished:
        return
    failed = [t for t in finished if t.state == TrialState.FAIL]
    if len(finished) >= popsize and len(failed) > share * len(finished):
        reason = failed[-1].user_attrs.get(RESULT, {}).get("error", "?").splitlines()[0]
        raise RuntimeError(f"{len(failed)} of {len(finished)} candidates failed (more than "
                           f"max_fail_share = {share}); last error: {reason}")
