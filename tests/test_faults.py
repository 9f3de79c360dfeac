"""Candidate faults (issue 7, item 4) that tests/test_run.py does not already cover.

test_run.py covers a fitness that raises a RuntimeError with an out-of-memory message, NaN
objectives, and max_fail_share stopping the run. Here: the real ``torch.OutOfMemoryError`` type
(what CUDA, MPS and XPU raise) and infinite objectives, in a whole run and in a beating worker.
"""

from __future__ import annotations

import time

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState
from run_helpers import build_zoo, experiment_data

from evomerge.execution.driver import run_experiment
from evomerge.execution.worker import process_one
from evomerge.experiment import Experiment
from evomerge.fitness.base import EvalResult, Objective, register
from evomerge.fitness.digits import DigitsFitness
from evomerge.store import HEARTBEAT, RESULT, Slot, Store


@register("oom_digits_for_tests")
class OomDigits(DigitsFitness):
    """Digits accuracy; search calls 2 and 7 run out of memory, call 4 scores +inf."""

    calls = 0

    def evaluate(self, model, split="search"):
        if split != "search":
            return super().evaluate(model, split)
        OomDigits.calls += 1
        if OomDigits.calls in (2, 7):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        result = super().evaluate(model, split)
        if OomDigits.calls == 4:
            result.objectives["acc"] = float("inf")
        return result


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.getbasetemp() / "digits-zoo")


@pytest.mark.slow
def test_out_of_memory_and_infinite_candidates_fail_with_their_reason_and_the_run_goes_on(
        zoo, tmp_path):
    OomDigits.calls = 0
    data = experiment_data("cmaes", zoo, tmp_path / "run", budget=16)
    data["fitness"] = {"name": "oom_digits_for_tests"}
    summary = run_experiment(Experiment.from_dict(data), progress=False)
    study = optuna.load_study(study_name=data["name"],
                              storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    trials = study.get_trials()
    failed = {t.number: t.user_attrs[RESULT]["error"] for t in trials
              if t.state == TrialState.FAIL}
    # In-process trials run in creation order: search calls 2, 4, 7 are trials 1, 3, 6.
    assert sorted(failed) == [1, 3, 6]
    assert failed[1].startswith("OutOfMemoryError: CUDA out of memory")
    assert failed[6].startswith("OutOfMemoryError: CUDA out of memory")
    assert failed[3] == "non-finite objectives [inf]"
    assert len(trials) == 16 and summary["n_trials"] == 16 and summary["n_failed"] == 3
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 13


class _OomEvaluator:
    """Just enough of an Evaluator for process_one: out of memory once, slow enough to beat."""

    def __init__(self) -> None:
        self.objectives = [Objective("acc", "maximize")]
        self.calls = 0

    def evaluate(self, recipe, fidelity=None):
        self.calls += 1
        time.sleep(0.5)  # a few heartbeats
        if self.calls == 1:
            raise torch.OutOfMemoryError("out of memory (simulated)")
        return EvalResult({"acc": 0.75}, {"t": np.array([1.0, 0.0, 1.0, 1.0])}), {"eval_s": 0.5}


def test_a_beating_worker_records_out_of_memory_as_a_failed_candidate_and_goes_on(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 's.db'}", "s", ["maximize"], [0.0], [1.0],
                  heartbeat_s=0.1, grace_s=1.0)
    recipe = {"merge_method": "linear", "models": [{"model": "/a", "parameters": {"weight": 0.5}},
                                                  {"model": "/b", "parameters": {"weight": 0.5}}]}
    first, second = (store.enqueue(np.array([0.5]), Slot(0, i), recipe) for i in range(2))
    evaluator = _OomEvaluator()
    assert process_one(store, evaluator, owner="host:1") and process_one(store, evaluator,
                                                                         owner="host:1")
    assert process_one(store, evaluator, owner="host:1") is False  # queue empty
    oom, ok = store.get(first), store.get(second)
    assert oom.state == TrialState.FAIL
    assert oom.user_attrs[RESULT]["error"].startswith("OutOfMemoryError: out of memory")
    assert ok.state == TrialState.COMPLETE and ok.values == [0.75]
    assert HEARTBEAT in oom.system_attrs and HEARTBEAT in ok.system_attrs  # they did beat
