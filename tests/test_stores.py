"""The store under many writers (issue 7, item 3): SQLite with our claim lock, the journal file
and PostgreSQL, driven directly (no models): worker processes pop trials and finish them with a
trivial deterministic evaluation (``benchmarks/_store_load.py``), each writing what it evaluated
to its own file. The truth the store is checked against is what the workers did and what the
evaluation of each enqueued ``x`` must give: 0 lost, 0 duplicated, 0 corrupted.

Heartbeats: a worker SIGKILLed while it holds a trial (beating, or killed right after its claim
before any beat) has its trial given back by ``Store.fail_stale`` after the grace period, and
the slot enqueued again completes. PostgreSQL cases need ``EVOMERGE_TEST_POSTGRES_URL`` (set by
``.ci/postgres.sh``): skipped on a developer machine without it, a failure in CI.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState
from services import require

from evomerge.store import (
    HEARTBEAT,
    INTERRUPTED,
    OWNER,
    RESULT,
    Slot,
    Store,
    check_heartbeat,
    decode_scores,
    many_writers_warning,
    slot_of,
    x_of,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _store_load as load

BACKENDS = ("sqlite", "journal", "postgresql")
HEARTBEAT_S, GRACE_S = 0.3, 1.5  # short, so the fault tests take seconds


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path):
    """A storage URL of each many-writer backend; PostgreSQL from .ci/postgres.sh."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    if request.param == "journal":
        return f"journal://{tmp_path / 'study.log'}"  # tmp_path is absolute: journal:///...
    pg = os.environ.get("EVOMERGE_TEST_POSTGRES_URL", "")
    require(bool(pg), "PostgreSQL")
    return pg


@pytest.fixture
def study(url):
    """A fresh study name per test (PostgreSQL is one shared database); dropped afterwards."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    if url.startswith("postgresql"):
        from evomerge.store import open_storage

        optuna.delete_study(study_name=name, storage=open_storage(url))


def _enqueued_x(n: int, dim: int) -> list[np.ndarray]:
    """What ``load.enqueue`` enqueues in slot order (same generator, same seed)."""
    rng = np.random.default_rng(0)
    return [rng.random(dim) for _ in range(n)]


# ---- 0 lost, 0 duplicated, 0 corrupted ----------------------------------------------------------


@pytest.mark.slow
def test_eight_workers_fifty_trials_each_lose_duplicate_and_corrupt_nothing(url, study, tmp_path):
    workers, trials, dim = 8, 400, 2
    load.run_load(url, study, tmp_path / "records", workers=workers, trials=trials, dim=dim,
                  timeout_s=900)
    records = load.read_records(tmp_path / "records")
    done = [r for rs in records.values() for r in rs]
    store = Store(**load.store_args(url, study, dim))
    stored = store.trials()

    # 0 lost: every enqueued trial is COMPLETE, and every slot has one.
    assert len(stored) == trials
    assert Counter(t.state for t in stored) == {TrialState.COMPLETE: trials}
    assert sorted(s.index for s in store.slots()) == list(range(trials))
    # 0 duplicated: each trial was evaluated by exactly one worker, once.
    evaluated = Counter(r["trial_id"] for r in done)
    assert max(evaluated.values()) == 1, [t for t, n in evaluated.items() if n > 1]
    assert set(evaluated) == {t._trial_id for t in stored}
    assert sum(len(rs) > 0 for rs in records.values()) >= 2  # the work really was shared
    # 0 corrupted: params, values, item scores and owner are what the worker wrote for this x.
    expected_x = _enqueued_x(trials, dim)
    by_id = {r["trial_id"]: r for r in done}
    for t in stored:
        record, x = by_id[t._trial_id], x_of(t, dim)
        np.testing.assert_array_equal(x, expected_x[slot_of(t).index])
        np.testing.assert_array_equal(x, record["x"])
        values, bits, floats = load.fake_result(x)
        assert t.values == values
        scores = t.user_attrs[RESULT]["item_scores"]
        np.testing.assert_array_equal(decode_scores(scores["bits"]), bits)
        np.testing.assert_array_equal(decode_scores(scores["floats"]), floats)
        assert t.system_attrs[OWNER] == f"load:{record['pid']}"
        assert t.user_attrs[RESULT]["eval_s"] == 0.0 and "error" not in t.user_attrs[RESULT]


# ---- heartbeats: a killed worker's trial comes back ---------------------------------------------


def _wait(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hang", "hang_silent"])
def test_killed_worker_trial_is_given_back_after_grace_and_its_slot_completes(url, study, mode,
                                                                               tmp_path):
    """``hang``: the worker beats while it holds its trial; ``hang_silent``: it never beats,
    as a worker killed between its claim and its first beat (or, on PostgreSQL and the
    journal, between the claim and writing its owner)."""
    dim = 3
    args = load.store_args(url, study, dim, heartbeat_s=HEARTBEAT_S, grace_s=GRACE_S)
    checker = Store(**args)
    ids = load.enqueue(checker, 3, dim)
    records = tmp_path / "records"
    records.mkdir()
    (proc,), go = load.start_workers(args, records, 1, mode=mode)
    try:
        go.set()
        held = _wait(lambda: load.read_records(records).get("worker0.jsonl"), 60,
                     "the worker's claim")[0]
        if mode == "hang":  # alive and beating: never stale, however long it takes
            _wait(lambda: checker.get(held["trial_id"]).system_attrs.get(HEARTBEAT), 30,
                  "a first heartbeat")
            watch_until = time.monotonic() + 3 * GRACE_S
            while time.monotonic() < watch_until:
                assert checker.fail_stale() == []
                time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        proc.join(10)
        stale = _wait(checker.fail_stale, 60, "fail_stale to give the trial back")
    finally:
        if proc.is_alive():
            proc.kill()
    waited = time.monotonic() - killed
    assert [t._trial_id for t in stale] == [held["trial_id"]]
    # The checker last saw a beat at most one interval before the kill, and waits grace_s on it.
    assert waited >= GRACE_S - HEARTBEAT_S
    given_back = checker.get(held["trial_id"])
    assert given_back.state == TrialState.FAIL
    assert given_back.user_attrs[RESULT] == {"error": INTERRUPTED}
    assert checker.fail_stale() == []  # given back once

    # The driver enqueues the slot again; a worker completes everything.
    lost = slot_of(given_back)
    checker.enqueue(x_of(given_back, dim), lost)
    go = threading.Event()
    go.set()
    load.worker_main(args, str(records / "rerun.jsonl"), threading.Event(), go)
    slots = checker.slots()
    assert sorted(s.index for s in slots) == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in slots.values())
    redone = slots[lost]
    assert redone._trial_id not in ids
    assert redone.values == load.fake_result(x_of(given_back, dim))[0]


# ---- heartbeats in one process: who is stale, and late finishes ----------------------------------


def test_fail_stale_gives_back_the_silent_trial_and_spares_the_beating_one(url, study):
    dim = 2
    store = Store(**load.store_args(url, study, dim, heartbeat_s=0.2, grace_s=1.0))
    load.enqueue(store, 2, dim)
    beating, silent = store.pop("me:1"), store.pop("me:2")
    returned = []
    with store.beating(beating):
        started = time.monotonic()
        while time.monotonic() - started < 3.0:  # three grace periods
            returned += store.fail_stale()
            time.sleep(0.05)
        assert store.finish(beating, [1.0, 0.0])
    assert [t._trial_id for t in returned] == [silent.trial._trial_id]
    assert store.get(beating.trial._trial_id).state == TrialState.COMPLETE
    late = store.finish(silent, [2.0, 0.0])  # the silent worker wakes up: too late
    assert late is False
    trial = store.get(silent.trial._trial_id)
    assert trial.state == TrialState.FAIL and trial.user_attrs[RESULT] == {"error": INTERRUPTED}
    assert trial.values is None


def test_a_worker_whose_heartbeats_fail_gives_its_trial_back_instead_of_finishing(url, study):
    """Its lease (the last successful beat) is older than (heartbeat_s + grace_s) / 2 = 0.6 s,
    so a checker may be about to give the trial back: finishing could race it."""
    dim = 2
    store = Store(**load.store_args(url, study, dim, heartbeat_s=0.2, grace_s=1.0))
    load.enqueue(store, 2, dim)

    kept = store.pop()
    with store.beating(kept):
        time.sleep(1.5)  # longer than grace_s, but the beats renew the lease
        assert store.finish(kept, [1.0, 0.0]) is True

    broken = store.pop()
    real = store.storage.set_trial_system_attr

    def partitioned(trial_id, key, value):
        if key == HEARTBEAT:
            raise ConnectionError("network partition (simulated)")
        return real(trial_id, key, value)

    store.storage.set_trial_system_attr = partitioned
    try:
        with store.beating(broken):
            time.sleep(0.8)
            assert store.finish(broken, [2.0, 0.0]) is False
    finally:
        store.storage.set_trial_system_attr = real
    trial = store.get(broken.trial._trial_id)
    assert trial.state == TrialState.FAIL and trial.user_attrs[RESULT] == {"error": INTERRUPTED}
    assert store.get(kept.trial._trial_id).values == [1.0, 0.0]


# ---- settings and advice ------------------------------------------------------------------------


def test_fail_stale_without_heartbeat_settings_is_an_error(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 's.db'}", "s", ["maximize"], [0.0], [1.0])
    with pytest.raises(ValueError, match="heartbeat_s"):
        store.fail_stale()


@pytest.mark.parametrize("heartbeat_s, grace_s, problem", [
    (1.0, None, "set both or neither"), (None, 5.0, "set both or neither"),
    (5.0, 5.0, "0 < heartbeat_s < grace_s"), (0.0, 5.0, "0 < heartbeat_s < grace_s"),
])
def test_heartbeat_settings_are_checked_before_the_store_opens(heartbeat_s, grace_s, problem,
                                                               tmp_path):
    with pytest.raises(ValueError, match=problem):
        check_heartbeat(heartbeat_s, grace_s)
    with pytest.raises(ValueError, match=problem):
        Store(f"sqlite:///{tmp_path / 's.db'}", "s", ["maximize"], [0.0], [1.0],
              heartbeat_s=heartbeat_s, grace_s=grace_s)
    assert not (tmp_path / "s.db").exists()


@pytest.mark.parametrize("url, workers, remote, warned", [
    ("sqlite:////r/study.db", 4, False, True),
    ("sqlite:////r/study.db", 3, False, False),
    ("sqlite:////r/study.db", 1, True, True),
    ("journal:////r/study.log", 16, True, False),
    ("postgresql://u:p@127.0.0.1/db", 16, True, False),
])
def test_sqlite_with_many_writers_gets_advice_naming_journal_and_postgresql(url, workers, remote,
                                                                            warned):
    advice = many_writers_warning(url, workers, remote)
    assert (advice is not None) == warned
    if warned:
        assert "journal:///" in advice and "postgresql://" in advice and url in advice


@pytest.mark.parametrize("executor, warned", [
    ({"kind": "local", "workers": 4}, True), ({"kind": "local", "workers": 2}, False),
    ({"kind": "slurm", "workers": 1}, True),
])
def test_the_driver_warns_once_about_an_sqlite_store_with_many_writers(executor, warned):
    import warnings

    from evomerge.execution.plan import _warn_many_writers
    from evomerge.experiment import Executor

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _warn_many_writers("sqlite:////r/study.db", Executor(**executor))
    assert len(caught) == int(warned)
    if warned:
        assert "journal:///" in str(caught[0].message)


def _open_fresh(path: str) -> str:
    from evomerge.store import open_storage

    open_storage(f"sqlite:///{path}")
    return "ok"


def test_processes_opening_one_fresh_sqlite_database_at_once_all_succeed(tmp_path):
    """Each RDBStorage creates the schema and inserts its version; on a fresh file two processes
    at once used to collide (IntegrityError on alembic_version, seen as a SLURM driver crash)."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(6) as pool:
        for k in range(3):
            path = str(tmp_path / f"fresh{k}.db")
            assert pool.map(_open_fresh, [path] * 6) == ["ok"] * 6


# ---- parameters go in with the trial ------------------------------------------------------------


def test_a_waiting_trial_has_its_parameters_and_the_claim_writes_none(url, study, monkeypatch):
    """enqueue writes the candidate's parameters with the trial in one transaction: a WAITING
    trial already shows them (read back through a fresh Optuna study), and pop's claim writes
    no parameter (per-parameter writes were 0.06 s of every 40-parameter trial on SQLite)."""
    store = Store(url, study, ["maximize"], [0.0] * 3, [1.0] * 3, param_names=["a", "b", "c"])
    x = np.array([0.25, 0.5, 1.0])
    store.enqueue(x, Slot(0, 0), {"merge_method": "linear"})
    waiting = optuna.load_study(study_name=study, storage=store.storage).trials[0]
    assert waiting.state == TrialState.WAITING and waiting.params == {"a": 0.25, "b": 0.5,
                                                                      "c": 1.0}
    writes = []
    monkeypatch.setattr(type(store.storage), "set_trial_param",
                        lambda self, *args: writes.append(args))
    claim = store.pop()
    assert writes == [] and claim.trial.params == waiting.params
    assert store.finish(claim, [0.75])
    done = optuna.load_study(study_name=study, storage=store.storage).trials[0]
    assert done.state == TrialState.COMPLETE and done.params == waiting.params
    assert x_of(done, store.names).tolist() == x.tolist()


def test_a_point_past_the_bounds_is_stored_as_proposed_not_refused(tmp_path):
    """A strategy's float overshoot past a bound is no param of the distribution: it is
    enqueued as fixed params, claimed, and its value kept (Optuna warns), as before."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    store = Store(url, "past", ["maximize"], [0.0] * 2, [1.0] * 2, param_names=["a", "b"])
    x = np.array([0.5, 1.0 + 1e-12])
    store.enqueue(x, Slot(0, 0), {"merge_method": "linear"})
    with pytest.warns(UserWarning, match="out of range"):
        claim = store.pop()
    assert claim.trial.params == {"a": 0.5, "b": 1.0 + 1e-12}
    assert store.finish(claim, [0.5])
    done = optuna.load_study(study_name="past", storage=url).trials[0]
    assert x_of(done, store.names).tolist() == x.tolist()


def test_a_trial_enqueued_without_parameters_gets_them_at_its_claim(tmp_path):
    """A run enqueued by an older evomerge (parameters as Optuna's ``fixed_params``, set at the
    claim) resumes: its waiting trial's parameters are written when a worker claims it."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    store = Store(url, "old", ["maximize"], [0.0] * 2, [1.0] * 2, param_names=["a", "b"])
    store.study.enqueue_trial({"a": 0.1, "b": 0.9},
                              user_attrs={"evomerge": {"generation": 0, "index": 0}})
    assert store.study.trials[0].params == {}
    claim = store.pop()
    assert claim.trial.params == {"a": 0.1, "b": 0.9}
    assert optuna.load_study(study_name="old", storage=url).trials[0].params == {"a": 0.1,
                                                                                 "b": 0.9}
