"""Ray actors as workers (``executor: {kind: ray, workers: N}``, issue 7 items 1 and 4).

The digits evaluations are deterministic and the driver tells whole generations in slot order,
so a run on Ray actors must reproduce the in-process run of the same seed exactly, slot by slot.
An actor killed with SIGKILL must give its trial back and the run still end with every slot
evaluated once. The first test lets the executor start (and stop) its own local Ray; the others
share one Ray started by a module fixture, which the executor joins (Ray start-up costs seconds).
A local Ray listens on loopback only: every LISTEN socket of every Ray process during a run.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray
from optuna.trial import TrialState
from run_helpers import (
    assert_exactly_budget,
    build_zoo,
    by_slot,
    experiment_data,
    is_interrupted,
    load_trials,
    run_in_process,
    running_trials,
    state_counts,
)

from evomerge.execution.driver import run_experiment
from evomerge.execution.plan import Plan
from evomerge.execution.ray import (
    RayExecutor,
    check_address,
    cpus_needed,
    missing_resources,
    start_local_ray,
)
from evomerge.experiment import Experiment, ExperimentError
from evomerge.store import OWNER, RESULT, Slot, Store

NAME, POPSIZE, BUDGET = "digits_cmaes", 8, 24


def _ray_data(zoo, run_dir: Path, workers: int = 2, **executor) -> dict:
    data = experiment_data("cmaes", zoo, run_dir, budget=BUDGET)
    data["executor"] = {"kind": "ray", "workers": workers, **executor}
    return data


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.getbasetemp() / "digits-zoo")


@pytest.fixture(scope="module")
def reference(zoo, tmp_path_factory):
    """The uninterrupted in-process run: ``{slot: (x, values)}``."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_in_process(experiment_data("cmaes", zoo, run_dir, budget=BUDGET))
    return by_slot(load_trials(run_dir, NAME))


@pytest.fixture(scope="module")
def shared_ray(tmp_path_factory):
    """One local Ray for the tests after the first; executors join it (``ray.is_initialized``)
    and leave it running."""
    temp = tmp_path_factory.mktemp("r")  # Ray's socket paths must stay short
    start_local_ray(2, str(temp))
    yield
    ray.shutdown()


def listeners() -> dict[str, list[str]]:
    """``{process: [ip:port, ...]}``: the LISTEN sockets of this process and its descendants
    (GCS, raylet, agents, monitor, dashboard, actors: a local Ray's processes all descend from
    the driver that started it)."""
    out: dict[str, list[str]] = {}
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            name = " ".join(proc.cmdline()[:2]) or proc.name()
            socks = proc.net_connections(kind="inet")
        except psutil.Error:  # exited meanwhile
            continue
        found = [f"{c.laddr.ip}:{c.laddr.port}" for c in socks if c.status == psutil.CONN_LISTEN]
        if found:
            out[f"{proc.pid} {name}"] = found
    return out


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.rsplit(":", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or ip).is_loopback


# ---- pure helpers (no Ray) ---------------------------------------------------------------------


def test_loopback_addresses():
    assert [is_loopback(a) for a in ("127.0.0.1:80", "::1:80", "::ffff:127.0.0.1:80")] == [
        True] * 3
    assert not [a for a in ("0.0.0.0:80", ":::80", "192.0.2.2:80", "::ffff:10.0.0.1:80")
                if is_loopback(a)]


def test_address_must_be_local_auto_or_a_ray_url():
    assert [check_address(a) for a in ("local", "auto", "ray://head:10001")] == [
        "local", "auto", "ray://head:10001"]
    for bad in ("", "ray://", "http://head:8265", "Local"):
        with pytest.raises(ExperimentError, match="executor.address"):
            check_address(bad)


def test_local_ray_offers_enough_cpus_for_every_actor():
    assert cpus_needed(2, 1.0) == 2
    assert cpus_needed(3, 0.5) == 2  # ceil(1.5)
    assert cpus_needed(4, 0.25) == 1
    assert cpus_needed(3, 1 / 3) == 1  # float round-off must not ask for a second CPU


def test_missing_resources_name_what_the_cluster_lacks():
    cluster = {"CPU": 4.0, "GPU": 1.0}
    assert missing_resources(cluster, 4, 1.0, 0.25) == []
    assert missing_resources(cluster, 2, 1.0, 1.0) == [
        "GPU: 2 workers need 2, the cluster has 1"]
    assert missing_resources({"CPU": 2.0}, 3, 1.0, 0.0) == [
        "CPU: 3 workers need 3, the cluster has 2"]


def test_ray_with_no_workers_is_refused_before_any_compute(zoo, tmp_path):
    data = _ray_data(zoo, tmp_path / "run", workers=0)
    with pytest.raises(ExperimentError, match=r"workers: executor kind 'ray' needs workers >= 1"):
        Experiment.from_dict(data)
    assert not (tmp_path / "run").exists()


# ---- runs on Ray ------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_actors_reproduce_the_in_process_run(zoo, reference, tmp_path):
    """Both actors serve and the trajectory is the in-process one. Run first (in file order),
    the executor starts its own local Ray and ``close`` shuts it down again; after the module's
    shared Ray is up, it joins that one and leaves it running. Either Ray listens on loopback
    only: every LISTEN socket of its processes, read while the actors serve."""
    ray_was_running = ray.is_initialized()
    run_dir = tmp_path / "run"
    seen: dict[str, list[str]] = {}

    def sockets(count: int, budget: int) -> None:
        if count >= POPSIZE and not seen:  # the actors have served a generation
            seen.update(listeners())

    summary = run_experiment(Experiment.from_dict(_ray_data(zoo, run_dir)), progress=False,
                             on_trial=sockets)
    names = " ".join(seen)
    for part in ("gcs_server", "raylet", "DashboardAgent", "RuntimeEnvAgent", "_Actor"):
        assert part in names, f"no listener of {part} among {seen}"
    open_ = {proc: [a for a in found if not is_loopback(a)] for proc, found in seen.items()}
    assert not {proc: found for proc, found in open_.items() if found}, seen
    trials = load_trials(run_dir, NAME)
    assert_exactly_budget(trials, BUDGET, POPSIZE)
    assert not [t for t in trials if is_interrupted(t)]
    assert by_slot(trials) == reference
    assert summary["n_trials"] == BUDGET
    assert len({t.system_attrs[OWNER] for t in trials}) == 2, "both actors claim trials"
    assert ray.is_initialized() == ray_was_running, "close stops only a Ray it started"


@pytest.mark.slow
def test_the_dashboard_when_asked_for_is_on_loopback_too(tmp_path_factory):
    """``EVOMERGE_RAY_DASHBOARD=1``: Ray's dashboard serves, on 127.0.0.1 like the rest."""
    if ray.is_initialized():
        pytest.skip("needs a Ray of its own (run before the shared one)")
    start_local_ray(1, str(tmp_path_factory.mktemp("d")), dashboard=True)  # short socket paths
    try:
        url = ray.worker.get_dashboard_url()
        seen = listeners()
    finally:
        ray.shutdown()
    assert url.startswith("127.0.0.1:"), url
    assert any(url in found for found in seen.values()), (url, seen)
    assert all(is_loopback(a) for found in seen.values() for a in found), seen


@pytest.mark.slow
def test_run_completes_after_an_actor_is_killed(zoo, reference, tmp_path, shared_ray):
    """SIGKILL of an actor process that holds a claimed trial (its owner "host:pid" recorded):
    the driver must see the actor die, mark that trial FAIL(interrupted), evaluate its slot
    again and finish with exactly ``budget`` counted trials and the in-process trajectory."""
    run_dir = tmp_path / "run"
    victim: list[str] = []

    def kill_a_busy_actor(count: int, budget: int) -> None:
        if victim or state_counts(run_dir)["COMPLETE"] < 4:
            return
        held = [owner for _, _, owner in running_trials(run_dir, OWNER) if owner]
        if held:
            victim.append(held[0])
            os.kill(int(held[0].rsplit(":", 1)[1]), signal.SIGKILL)

    run_experiment(Experiment.from_dict(_ray_data(zoo, run_dir)), progress=False,
                   on_trial=kill_a_busy_actor)
    assert victim, "no actor was ever seen holding a trial"
    trials = load_trials(run_dir, NAME)
    assert_exactly_budget(trials, BUDGET, POPSIZE)
    assert by_slot(trials) == reference
    interrupted = [t for t in trials if is_interrupted(t)]
    assert len(interrupted) <= 1
    assert all(t.system_attrs[OWNER] == victim[0] for t in interrupted)


@pytest.mark.slow
def test_a_failing_evaluation_is_a_failed_trial_and_the_actor_serves_on(zoo, tmp_path,
                                                                         shared_ray):
    """A candidate whose build raises is recorded FAIL with its reason by the actor, which then
    evaluates the next trial; that one's value equals the driver's own evaluation of it."""
    plan = Plan(Experiment.from_dict(_ray_data(zoo, tmp_path / "run", workers=1)))
    plan.experiment.run_path.mkdir(parents=True)
    store = Store(**plan.store_args)
    x = (plan.space.lower + plan.space.upper) / 2
    good = plan.space.decode(x).to_dict()
    bad = {**good, "models": [{**good["models"][0], "model": str(tmp_path / "not-loaded")},
                              *good["models"][1:]]}
    ids = [store.enqueue(x, Slot(0, 0), bad), store.enqueue(x, Slot(0, 1), good)]
    executor = RayExecutor(plan.experiment, plan.store_args)
    ticks: list[int] = []
    try:
        executor.run(store, lambda: all(store.get(i).state.is_finished() for i in ids),
                     lambda step=0: ticks.append(step))
    finally:
        executor.close(store)
    failed, done = (store.get(i) for i in ids)
    assert failed.state == TrialState.FAIL
    assert "not-loaded" in failed.user_attrs[RESULT]["error"]
    assert done.state == TrialState.COMPLETE
    assert failed.system_attrs[OWNER] == done.system_attrs[OWNER], "one actor did both"
    from evomerge.recipe import MergeRecipe

    result, _ = executor.evaluator.evaluate(MergeRecipe.from_dict(good))
    np.testing.assert_allclose(done.values, result.values(executor.evaluator.objectives))
    assert sum(ticks) == 2, "one tick(1) per trial an actor evaluated"


@pytest.mark.slow
def test_more_gpus_than_the_cluster_has_is_refused_before_any_trial(zoo, tmp_path, shared_ray):
    run_dir = tmp_path / "run"
    data = _ray_data(zoo, run_dir, gpus_per_worker=1)
    with pytest.raises(ExperimentError, match="GPU: 2 workers need 2, the cluster has 0"):
        run_experiment(Experiment.from_dict(data), progress=False)
    assert state_counts(run_dir)["COMPLETE"] == 0


@pytest.mark.slow
def test_an_actor_that_keeps_dying_ends_the_run_with_an_error(zoo, tmp_path, shared_ray):
    """Every actor that claims a trial is killed: after 3 replacements per worker the executor
    stops with an error counting the deaths instead of restarting actors forever; every trial
    the killed actors held was given back (none left RUNNING)."""
    plan = Plan(Experiment.from_dict(_ray_data(zoo, tmp_path / "run", workers=1)))
    plan.experiment.run_path.mkdir(parents=True)
    store = Store(**plan.store_args)
    rng = np.random.default_rng(0)
    ids = [store.enqueue(x, Slot(0, i), plan.space.decode(x).to_dict())
           for i, x in enumerate(rng.uniform(plan.space.lower, plan.space.upper,
                                             size=(POPSIZE, plan.space.dim)))]
    killed: set[str] = set()
    stop = threading.Event()

    def kill_whoever_holds_a_trial() -> None:
        # A digits trial is RUNNING for only ~10 ms (on an idle machine the executor's own
        # polls missed it): watch the study from a thread, read-only, every millisecond.
        while not stop.is_set():
            for _, _, owner in running_trials(plan.experiment.run_path, OWNER):
                if owner and owner not in killed:
                    killed.add(owner)
                    os.kill(int(owner.rsplit(":", 1)[1]), signal.SIGKILL)
            time.sleep(0.001)

    killer = threading.Thread(target=kill_whoever_holds_a_trial, daemon=True)
    executor = RayExecutor(plan.experiment, plan.store_args)
    killer.start()
    try:
        with pytest.raises(RuntimeError, match="4 Ray actors died"):
            executor.run(store, lambda: all(store.get(i).state.is_finished() for i in ids),
                         lambda step=0: None)
    finally:
        stop.set()
        killer.join()
        executor.close(store)
    assert len(killed) == 4
    states = [store.get(i) for i in ids]
    assert not [t.number for t in states if t.state == TrialState.RUNNING]
    assert sum(is_interrupted(t) for t in states) == 4
