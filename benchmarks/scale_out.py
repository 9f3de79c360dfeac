#!/usr/bin/env python
"""Scale-out benchmark: throughput of each execution path, and the ceilings beyond this machine.

Four measurements, all through evomerge's real code paths:

1. ``throughput``: the digits experiment (``experiments/digits_cmaes.yaml``, popsize 8, a fresh
   digits zoo and run directory in a temp dir, the default SQLite store) run end to end by
   ``run_experiment`` in-process, with 1 and 2 local worker processes, and with 1 and 2 Ray
   actors. Two workloads:

   * ``digits``: the real fitness. One evaluation costs ~1 ms, so its throughput measures the
     store and the dispatch path, not parallel evaluation.
   * ``busy``: the same experiment with the ``digits_busy`` fitness registered here: the digits
     fitness that repeats its forward pass ``repeat`` times (calibrated at start-up to
     ``--busy-ms``, ~150 ms, with torch pinned to one thread per process), so 2 vs 1 workers
     measures parallel evaluation on CPU-bound work.

   Throughput excludes start-up: ``(n - 1) / (last finished_at - first finished_at)`` over the
   run's trials (``finished_at`` is stored with every trial). ``speedup_2_vs_1`` is the ratio of
   two such throughputs measured in the same run of this script.
   ``dispatch_overhead_ms``: per trial, steady-state wall time minus the trial's own build +
   evaluation time (``build_s + eval_s`` stored with it), on the digits workload with one
   worker: what the store, the queue and the executor cost per trial on each path.

2. ``store_ceiling``: trials per second through the store with 16 no-op worker processes, on the
   journal file and on PostgreSQL (``--postgres-url``, default ``$EVOMERGE_TEST_POSTGRES_URL``),
   measured by ``benchmarks/_store_load.py``.

3. ``ray_dispatch``: Ray's own dispatch rate, no-op actor calls per second (1 and 2 actors, a
   few calls in flight each) and the round-trip time of one call.

4. ``simulated``: the driver against N simulated workers (N = 16, 64, 256 by default): the real
   driver loop (``evomerge.execution.driver._search``, cmaes with popsize N) enqueues
   generations into a journal (and PostgreSQL) store, while N logical workers (threads spread
   over a few processes, each thread running the real ``worker_loop``) claim trials and finish
   them after a sleep drawn from a log-normal evaluation time. Measured per N: the driver's CPU
   time per trial, the queue wait (claim time - enqueue time), and the per-generation overhead
   (generation wall time minus its slowest evaluation), which is what keeps GPUs idle.

Usage::

    python benchmarks/scale_out.py                      # default sizes, ~5 min, table on stderr
    python benchmarks/scale_out.py --quick --json       # small sizes, one JSON object on stdout
    python benchmarks/scale_out.py --json --write-results   # rewrite benchmarks/RESULTS.md

Progress goes to stderr; with ``--json`` stdout carries exactly one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.util
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# One thread per process for every BLAS/torch pool: each worker process stands for one device.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no ~/.ray/auth_token for a local cluster

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # _results.py sits beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_name, loadavg, stdout_to_stderr

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
START, END = "<!-- scale_out:start -->", "<!-- scale_out:end -->"
BUSY = "digits_busy"
PATHS = ("inprocess", "processes", "ray")
SIM_OBJECTIVE = "value"
SIM_DIM = 16
POLL_S = 0.05  # the driver's poll of remote progress, as LocalExecutor polls its workers


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the busy fitness (registered in every process that imports this file) -----------------


def register_busy_fitness() -> None:
    """Register ``digits_busy``: the digits fitness with ``repeat`` forward passes per
    evaluation, torch pinned to one thread. Spawned local workers import this script as
    ``__mp_main__`` and so register it too; Ray workers run it as their setup hook."""
    import torch

    from evomerge.fitness.base import FITNESSES, register
    from evomerge.fitness.digits import DigitsFitness

    if BUSY in FITNESSES:
        return

    @register(BUSY)
    class BusyDigitsFitness(DigitsFitness):
        """Digits accuracy after ``repeat - 1`` extra forward passes: a fixed CPU workload per
        evaluation (fixed work, not fixed time, so it only parallelises on separate cores)."""

        def __init__(self, base_model: str, repeat: int = 1, **options: Any) -> None:
            if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
                raise ValueError(f"repeat: expected an int >= 1, got {repeat!r}")
            super().__init__(base_model, **options)
            self.repeat = repeat
            torch.set_num_threads(1)

        def evaluate(self, model: Any, split: str = "search") -> Any:
            x, _ = self._split(split)
            with torch.inference_mode():
                for _ in range(self.repeat - 1):
                    model(x)
            return super().evaluate(model, split)


register_busy_fitness()


def calibrate_repeat(base_model: Path, target_ms: float, samples: int = 200) -> tuple[int, float]:
    """``(repeat, ms per forward)``: forward passes of the digits search split (one thread) that
    take about ``target_ms``."""
    import torch

    from evomerge.fitness.digits import DigitsFitness

    torch.set_num_threads(1)
    fitness = DigitsFitness(base_model)
    model = fitness.new_model()
    x, _ = fitness._split("search")
    with torch.inference_mode():
        for _ in range(20):
            model(x)
        started = time.perf_counter()
        for _ in range(samples):
            model(x)
    per_ms = (time.perf_counter() - started) / samples * 1e3
    return max(1, round(target_ms / per_ms)), per_ms


# ---- 1. real runs: throughput per path ------------------------------------------------------


def experiment_data(zoo: dict[str, Path], run_dir: Path, *, budget: int, path: str,
                    workers: int, fitness: dict[str, Any] | None = None,
                    storage: str | None = None) -> dict[str, Any]:
    """``experiments/digits_cmaes.yaml`` with absolute model paths, run in ``run_dir`` on
    ``path`` (inprocess | processes | ray) with ``workers`` workers; ``storage`` None is the
    run directory's SQLite file. The study gets a unique name (a shared PostgreSQL database
    may hold earlier runs)."""
    import yaml

    data = yaml.safe_load((ROOT / "experiments" / "digits_cmaes.yaml").read_text())
    data["models"] = {"base": str(zoo["base"]),
                      "sources": {name: str(zoo[name]) for name in data["models"]["sources"]}}
    data.update(name=f"scale_out_{run_dir.name}_{uuid.uuid4().hex[:8]}", budget=budget,
                run_dir=str(run_dir), export=False, storage=storage)
    if fitness is not None:
        data["fitness"] = {**data["fitness"], **fitness}
    if path == "processes":
        data["executor"] = {"kind": "local", "workers": workers}
    elif path == "ray":
        data["executor"] = {"kind": "ray", "workers": workers}
    return data


def steady_state(finished_at: Sequence[float], eval_s: Sequence[float]) -> dict[str, float]:
    """Throughput between the first and the last finished trial (start-up excluded):
    ``(n - 1) / span``; and the median build + evaluation time, both from the stored trials
    (the median: a worker's first build also computes and caches the task vectors)."""
    n = len(finished_at)
    if n < 2:
        raise ValueError(f"steady state needs at least 2 finished trials, got {n}")
    span = max(finished_at) - min(finished_at)
    if span <= 0:
        raise ValueError(f"first and last trial finished at the same time ({span} s)")
    return {"n": n, "span_s": span, "trials_per_s": (n - 1) / span,
            "ms_per_trial": span / (n - 1) * 1e3, "eval_ms": statistics.median(eval_s) * 1e3}


def dispatch_overhead_ms(ms_per_trial: float, eval_ms: float, workers: int) -> float:
    """Per trial and per worker, the wall time not spent building and evaluating:
    ``workers * ms_per_trial - eval_ms`` (each worker spends ``workers * ms_per_trial`` on one
    trial at that throughput)."""
    return max(workers, 1) * ms_per_trial - eval_ms


def finished_trials(url: str, study: str) -> tuple[list[float], list[float]]:
    """``(finished_at, build_s + eval_s)`` of every COMPLETE trial of a run's study."""
    import optuna
    from optuna.trial import TrialState

    from evomerge.store import RESULT, open_storage

    trials = optuna.load_study(study_name=study, storage=open_storage(url)).get_trials(
        deepcopy=False, states=(TrialState.COMPLETE,))
    results = [t.user_attrs[RESULT] for t in trials]
    return ([r["finished_at"] for r in results],
            [r.get("build_s", 0.0) + r.get("eval_s", 0.0) for r in results])


def measure_run(data: dict[str, Any]) -> dict[str, Any]:
    """Run one experiment end to end; its steady-state numbers and start-up time."""
    from evomerge.execution.driver import run_experiment
    from evomerge.experiment import Experiment
    from evomerge.store import storage_url

    experiment = Experiment.from_dict(data)
    started = time.perf_counter()
    run_experiment(experiment, progress=False)
    wall = time.perf_counter() - started
    finished, evals = finished_trials(storage_url(experiment.storage, experiment.run_path),
                                      experiment.name)
    if len(finished) != experiment.budget:
        raise RuntimeError(f"{experiment.run_path}: {len(finished)} complete trials, budget "
                           f"{experiment.budget}")
    if experiment.storage:
        drop_study(experiment.storage, experiment.name)
    entry = steady_state(finished, evals)
    entry.update(wall_s=wall, startup_s=wall - entry["span_s"])
    return entry


def run_throughput(zoo: dict[str, Path], tmp: Path, workload: str, budget: int,
                   paths: Sequence[str], fitness: dict[str, Any] | None,
                   storage: Callable[[str], str | None]) -> dict[str, Any]:
    """Every path at 1 (and 2) workers on one workload: ``{label: entry}`` plus speedups."""
    out: dict[str, Any] = {"budget": budget, "runs": {}}
    configs = [("inprocess", 0)] + [(p, w) for p in paths if p != "inprocess" for w in (1, 2)]
    for path, workers in configs:
        if path not in paths:
            continue
        label = path if path == "inprocess" else f"{path}_{workers}"
        run_dir = tmp / f"{workload}-{label}"
        entry = measure_run(experiment_data(zoo, run_dir, budget=budget, path=path,
                                            workers=workers, fitness=fitness,
                                            storage=storage(run_dir.name)))
        entry.update(path=path, workers=workers, overhead_ms=dispatch_overhead_ms(
            entry["ms_per_trial"], entry["eval_ms"], workers))
        out["runs"][label] = entry
        log(f"  {workload:>6} {label:<12} {entry['trials_per_s']:8.2f} trials/s, "
            f"{entry['ms_per_trial']:7.2f} ms/trial (eval {entry['eval_ms']:.2f} ms, overhead "
            f"{entry['overhead_ms']:.2f} ms/worker-trial), start-up {entry['startup_s']:.1f} s; "
            f"load {_num(loadavg(), '.1f')}")
    for path in paths:
        runs = out["runs"]
        if f"{path}_1" in runs and f"{path}_2" in runs:
            out[f"{path}_speedup_2_vs_1"] = (runs[f"{path}_2"]["trials_per_s"]
                                             / runs[f"{path}_1"]["trials_per_s"])
    return out


# ---- 2. store ceiling (benchmarks/_store_load.py) ------------------------------------------


def load_store_load() -> Any | None:
    """``benchmarks/_store_load.py`` (beside this script, on ``sys.path``), or None while it
    does not exist. Imported by name so its worker function pickles for spawned processes."""
    if importlib.util.find_spec("_store_load") is None:
        return None
    import _store_load

    return _store_load


# ---- 3. Ray's own dispatch rate ------------------------------------------------------------


def ray_dispatch(actor_counts: Sequence[int], calls: int, in_flight: int = 4) -> dict[str, Any]:
    """No-op actor calls per second with ``n`` actors and ``in_flight`` calls outstanding per
    actor, and the round-trip time of one call (sequential calls to one actor)."""
    import ray

    @ray.remote(num_cpus=0)
    class Noop:
        def call(self, i: int) -> int:
            return i

    out: dict[str, Any] = {"calls": calls, "in_flight_per_actor": in_flight, "actors": {}}
    owned = not ray.is_initialized()
    if owned:
        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    try:
        for n in actor_counts:
            actors = [Noop.remote() for _ in range(n)]
            ray.get([a.call.remote(0) for a in actors])  # actors started
            started = time.perf_counter()
            pending = [a.call.remote(k) for a in actors for k in range(in_flight)]
            sent = len(pending)
            while pending:
                _, pending = ray.wait(pending, num_returns=1)
                if sent < calls:
                    pending.append(actors[sent % n].call.remote(sent))
                    sent += 1
            rate = sent / (time.perf_counter() - started)
            started = time.perf_counter()
            for k in range(min(calls, 200)):
                ray.get(actors[0].call.remote(k))
            rtt_ms = (time.perf_counter() - started) / min(calls, 200) * 1e3
            out["actors"][str(n)] = {"calls_per_s": rate, "round_trip_ms": rtt_ms}
            log(f"  ray dispatch: {n} actor(s) {rate:8.0f} calls/s, round trip {rtt_ms:.2f} ms")
            for a in actors:
                ray.kill(a)
    finally:
        if owned:
            ray.shutdown()
    return out


# ---- 4. the driver against N simulated workers --------------------------------------------


class SleepEvaluator:
    """A worker's evaluator that sleeps for a log-normal evaluation time (mean ``mean_s``,
    log-space sigma ``sigma``) and returns the sphere objective of the recipe's weights."""

    def __init__(self, mean_s: float, sigma: float, seed: int) -> None:
        from evomerge.fitness.base import Objective

        self.objectives = [Objective(SIM_OBJECTIVE, "maximize")]
        self.mu = lognormal_mu(mean_s, sigma)
        self.sigma = sigma
        self.rng = np.random.default_rng(seed)

    def evaluate(self, recipe: Any, split: str = "search",
                 fidelity: Any = None) -> tuple[Any, dict[str, float]]:
        from evomerge.fitness.base import EvalResult

        seconds = float(self.rng.lognormal(self.mu, self.sigma))
        time.sleep(seconds)
        x = np.array([v for e in recipe.models for v in e.parameters["weight"]], dtype=float)
        return (EvalResult({SIM_OBJECTIVE: -float(np.sum((x - 0.5) ** 2))}, {}),
                {"build_s": 0.0, "eval_s": seconds})


def lognormal_mu(mean: float, sigma: float) -> float:
    """The log-space location giving a log-normal of this mean: ``E = exp(mu + sigma^2 / 2)``."""
    if mean <= 0 or sigma < 0:
        raise ValueError(f"log-normal needs mean > 0 and sigma >= 0, got {mean}, {sigma}")
    return math.log(mean) - sigma ** 2 / 2


class SimSpace:
    """Stand-in for a bound SearchSpace: ``x`` decodes into a real two-source MergeRecipe."""

    dim = SIM_DIM
    lower = np.zeros(SIM_DIM)
    upper = np.ones(SIM_DIM)

    def model_names(self) -> dict[str, str]:
        return {}  # the dashboard note keeps the models' paths

    def decode(self, x: np.ndarray, meta: dict | None = None) -> Any:
        from evomerge.recipe import MergeRecipe

        half = SIM_DIM // 2
        return MergeRecipe.from_dict({
            "merge_method": "task_arithmetic", "base_model": "/sim/base", "dtype": "float32",
            "models": [{"model": "/sim/s1", "parameters": {"weight": [float(v) for v in x[:half]]}},
                       {"model": "/sim/s2", "parameters": {"weight": [float(v) for v in x[half:]]}}]})


def _sim_worker_process(store_args: dict, threads: int, mean_s: float, sigma: float, seed: int,
                        poll_s: float, parent: int, ready: Any) -> None:
    """One process of simulated workers: ``threads`` threads share one Store (one connection
    pool) and each runs the real ``worker_loop``."""
    from evomerge.execution.worker import worker_loop
    from evomerge.store import Store

    store = Store(**store_args)
    workers = [threading.Thread(target=worker_loop, daemon=True,
                                args=(store, SleepEvaluator(mean_s, sigma, seed * 10_000 + k)),
                                kwargs={"parent": parent, "poll_s": poll_s})
               for k in range(threads)]
    ready.release()
    for w in workers:
        w.start()
    for w in workers:
        w.join()


class SimExecutor:
    """What a remote executor does while its workers evaluate: poll ``done()`` every
    ``POLL_S``; records the time the driver spends in those polls. Raises instead of waiting
    forever when a worker process died or ``timeout_s`` passed in one generation."""

    def __init__(self, procs: Sequence[Any], timeout_s: float) -> None:
        self.procs = procs
        self.timeout_s = timeout_s
        self.poll_s = 0.0
        self.polls = 0
        self.evaluator = None

    def run(self, store: Any, done: Callable[[], bool], tick: Callable[..., None]) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            dead = [p.exitcode for p in self.procs if not p.is_alive()]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"simulated workers: {len(dead)} process(es) exited (codes "
                                   f"{dead}) or the generation took over {self.timeout_s:.0f} s; "
                                   "see their output above")
            started = time.perf_counter()
            finished = done()
            self.poll_s += time.perf_counter() - started
            self.polls += 1
            if finished:
                return
            time.sleep(POLL_S)
            tick()

    def close(self, store: Any) -> None:
        store.set_finished(True)


class _Bar:
    def update(self, *args: Any, **kwargs: Any) -> None:
        pass


def split_threads(n_workers: int, processes: int) -> list[int]:
    """``n_workers`` logical workers over at most ``processes`` processes, as evenly as
    possible: thread counts per process, summing to ``n_workers``."""
    if n_workers < 1 or processes < 1:
        raise ValueError(f"need n_workers >= 1 and processes >= 1, got {n_workers}, {processes}")
    p = min(processes, n_workers)
    return [n_workers // p + (1 if k < n_workers % p else 0) for k in range(p)]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (linear interpolation, numpy's default)."""
    return float(np.percentile(np.asarray(values, dtype=float), q))


def generation_overheads(enqueued: dict[int, list[float]], finished: dict[int, list[float]],
                         evals: dict[int, list[float]]) -> tuple[list[float], list[float]]:
    """Per generation: ``(dispatch, turnaround)`` in seconds. dispatch = (last finish - first
    enqueue) - slowest evaluation: what enqueueing, claiming and finishing added to the
    generation; turnaround = next generation's first enqueue - this one's last finish: the
    driver noticing the end, telling, asking and enqueueing (GPUs idle meanwhile)."""
    gens = sorted(enqueued)
    dispatch = [max(finished[g]) - min(enqueued[g]) - max(evals[g]) for g in gens]
    turnaround = [min(enqueued[b]) - max(finished[a]) for a, b in itertools.pairwise(gens)]
    return dispatch, turnaround


def run_simulation(url: str, n_workers: int, generations: int, mean_s: float, sigma: float,
                   processes: int, poll_s: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """The real driver loop against ``n_workers`` simulated workers; see the module doc."""
    from optuna.trial import TrialState

    from evomerge.execution.driver import _search
    from evomerge.fitness.base import Objective
    from evomerge.search import make_strategy
    from evomerge.store import META, RESULT, Store

    name = f"scale_out_sim_{n_workers}_{uuid.uuid4().hex[:8]}"
    store_args = {"url": url, "study_name": name, "directions": ["maximize"],
                  "lower": [0.0] * SIM_DIM, "upper": [1.0] * SIM_DIM,
                  "objective_names": [SIM_OBJECTIVE]}
    store = Store(**store_args)
    store.set_finished(False)
    enqueue_at: dict[int, float] = {}
    enqueue_s = [0.0]
    plain_enqueue = store.enqueue

    def timed_enqueue(x: np.ndarray, slot: Any, recipe: Any = None, **options: Any) -> int:
        started = time.perf_counter()
        trial_id = plain_enqueue(x, slot, recipe, **options)
        enqueue_at[trial_id] = time.time()
        enqueue_s[0] += time.perf_counter() - started
        return trial_id

    store.enqueue = timed_enqueue  # type: ignore[method-assign]
    ctx = mp.get_context("spawn")
    ready = ctx.Semaphore(0)
    procs = [ctx.Process(target=_sim_worker_process, daemon=True,
                         args=(store_args, threads, mean_s, sigma, seed + k, poll_s, os.getpid(),
                               ready))
             for k, threads in enumerate(split_threads(n_workers, processes))]
    for p in procs:
        p.start()
    for _ in procs:
        if not ready.acquire(timeout=120):
            raise RuntimeError("simulated worker processes did not start within 120 s")
    plan = SimpleNamespace(
        experiment=SimpleNamespace(budget=n_workers * generations, budget_items=None,
                                   max_fail_share=0.5,
                                   run_path=Path(tempfile.gettempdir())),  # cmaes writes none
        space=SimSpace(), objectives=[Objective(SIM_OBJECTIVE, "maximize")],
        new_strategy=lambda: make_strategy("cmaes", lower=[0.0] * SIM_DIM,
                                           upper=[1.0] * SIM_DIM, directions=["maximize"],
                                           seed=seed + 1, popsize=n_workers))
    executor = SimExecutor(procs, timeout_s=60 + 20 * mean_s * math.exp(4 * sigma))
    plan.new_strategy()  # imports and first-use costs outside the timed driver loop
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        _search(plan, store, executor, _Bar(), None)
    finally:
        executor.close(store)
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
    driver_cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0

    trials = store.trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if len(complete) != n_workers * generations:
        raise RuntimeError(f"simulation N={n_workers}: {len(complete)} complete trials of "
                           f"{n_workers * generations}")
    waits, enq, fin, evs = [], {}, {}, {}
    for t in complete:
        g = int(t.user_attrs[META]["generation"])
        result = t.user_attrs[RESULT]
        waits.append(t.datetime_start.timestamp() - enqueue_at[t._trial_id])
        enq.setdefault(g, []).append(enqueue_at[t._trial_id])
        fin.setdefault(g, []).append(result["finished_at"])
        evs.setdefault(g, []).append(result["eval_s"])
    dispatch, turnaround = generation_overheads(enq, fin, evs)
    ideal = sum(max(v) for v in evs.values())
    n = len(complete)
    drop_study(url, name)
    return {
        "workers": n_workers, "generations": generations, "trials": n,
        "processes": len(procs), "mean_eval_s": mean_s, "sigma": sigma, "worker_poll_s": poll_s,
        "wall_s": wall,
        "driver_cpu_ms_per_trial": driver_cpu / n * 1e3,
        "driver_enqueue_ms_per_trial": enqueue_s[0] / n * 1e3,
        "driver_poll_ms_per_trial": executor.poll_s / n * 1e3,
        "polls": executor.polls,
        "queue_wait_ms": {"median": percentile(waits, 50) * 1e3,
                          "p95": percentile(waits, 95) * 1e3, "max": max(waits) * 1e3},
        "generation_dispatch_ms": {"median": percentile(dispatch, 50) * 1e3,
                                   "max": max(dispatch) * 1e3},
        "generation_turnaround_ms": ({"median": percentile(turnaround, 50) * 1e3,
                                      "max": max(turnaround) * 1e3} if turnaround else None),
        "efficiency": ideal / (max(max(v) for v in fin.values()) - min(enqueue_at.values())),
    }


# ---- capacity: how many GPUs each configuration keeps busy ---------------------------------


def gpus_kept_busy(trials_per_s: float, eval_s: float) -> float:
    """Little's law: a path that completes ``trials_per_s`` keeps at most
    ``trials_per_s * eval_s`` workers busy when each evaluation takes ``eval_s``."""
    return trials_per_s * eval_s


def generation_efficiency(eval_s: float, overhead_s: float) -> float:
    """Share of a generation's wall time the slowest worker spends evaluating:
    ``eval_s / (eval_s + overhead_s)``."""
    return eval_s / (eval_s + overhead_s)


# ---- the whole run --------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import subprocess

    info: dict[str, Any] = {"cpu": cpu_name(), "cores": os.cpu_count(),
                            "python": platform.python_version(),
                            "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}
    from importlib.metadata import version

    for pkg in ("optuna", "ray", "torch", "sqlalchemy", "psycopg2-binary"):
        with contextlib.suppress(Exception):
            info[pkg] = version(pkg)
    with contextlib.suppress(Exception):
        info["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                        check=True, capture_output=True,
                                        text=True).stdout.strip()
    return info


@contextlib.contextmanager
def ray_session(enabled: bool) -> Iterator[None]:
    """A local Ray for the Ray rows whose workers register ``digits_busy`` at start-up (the
    executor joins an initialised Ray instead of starting its own; Ray's own start-up is then
    outside every row's start-up time)."""
    if not enabled:
        yield
        return
    import ray

    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
             configure_logging=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": register_busy_fitness})
    try:
        yield
    finally:
        ray.shutdown()


def ray_available() -> str | None:
    """None if the Ray executor can run here, else why not."""
    if importlib.util.find_spec("ray") is None:
        return "ray is not installed (pip install 'evomerge[ray]')"
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    import optuna

    from evomerge.zoo.digits import build_digits_zoo

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    sizes = SIZES["quick" if args.quick else "full"]
    sim_workers = args.sim_workers or sizes["sim_workers"]
    load_start = loadavg()
    result: dict[str, Any] = {"quick": args.quick, "machine": machine_info(), "notes": []}
    log(f"scale_out: sizes {sizes}; 1-min load average {load_start}")
    tmp_root = tempfile.mkdtemp(prefix="scale_out-", dir=args.tmp_dir)
    tmp = Path(tmp_root)
    ray_missing = ray_available() if "ray" in args.paths else "not requested (--paths)"
    paths = [p for p in args.paths if p != "ray" or ray_missing is None]
    if ray_missing:
        log(f"ray path skipped: {ray_missing}")
        result["notes"].append(f"Ray rows not measured: {ray_missing}.")

    if "throughput" in args.parts:
        zoo = {k: Path(v).absolute() for k, v in
               build_digits_zoo(tmp / "zoo", seed=0, progress=False).items()}
        repeat, fwd_ms = calibrate_repeat(zoo["base"], args.busy_ms)
        log(f"busy fitness: {repeat} forward passes of {fwd_ms:.3f} ms ~ {repeat * fwd_ms:.0f} ms")
        result["busy"] = {"target_ms": args.busy_ms, "repeat": repeat, "forward_ms": fwd_ms}
        result["storage"] = args.storage

        def store_for(label: str) -> str | None:
            return throughput_storage(args.storage, tmp, label, args.postgres_url)

        with ray_session("ray" in paths):
            result["throughput"] = {
                "digits": run_throughput(zoo, tmp, "digits", sizes["digits_budget"], paths,
                                         None, store_for),
                "busy": run_throughput(zoo, tmp, "busy", sizes["busy_budget"], paths,
                                       {"name": BUSY, "repeat": repeat}, store_for),
            }
        busy, digits = result["throughput"]["busy"], result["throughput"]["digits"]["runs"]
        for path in ("processes", "ray"):
            result[f"{path}_speedup_2_vs_1"] = busy.get(f"{path}_speedup_2_vs_1")
        result["dispatch_overhead_ms"] = {
            "inprocess": digits["inprocess"]["overhead_ms"] if "inprocess" in digits else None,
            "processes": digits["processes_1"]["overhead_ms"] if "processes_1" in digits else None,
            "ray": digits["ray_1"]["overhead_ms"] if "ray_1" in digits else None,
        }

    if "ceiling" in args.parts:
        result["store_ceiling"] = run_ceiling(args, tmp, sizes)

    if "ray" in args.parts:
        if importlib.util.find_spec("ray") is None:
            result["ray_dispatch"] = {"not_measured": "ray is not installed"}
        else:
            result["ray_dispatch"] = ray_dispatch((1, 2), sizes["ray_calls"])

    if "sim" in args.parts:
        result["simulated"] = {}
        for kind, url in storages(args, tmp).items():
            if url is None:
                result["simulated"][kind] = {"not_measured": "no PostgreSQL "
                                             "(set EVOMERGE_TEST_POSTGRES_URL or --postgres-url)"}
                continue
            rows = []
            for n in sim_workers:
                if kind == "journal":
                    url = f"journal://{(tmp / f'sim-{n}.log').absolute()}"
                row = run_simulation(url, n, sizes["sim_generations"], args.sim_eval_s,
                                     args.sim_sigma, args.sim_processes, args.sim_poll_s)
                rows.append(row)
                log(f"  sim {kind:>8} N={n:<4} driver {row['driver_cpu_ms_per_trial']:.2f} ms "
                    f"CPU/trial, queue wait median {row['queue_wait_ms']['median']:.0f} ms "
                    f"(p95 {row['queue_wait_ms']['p95']:.0f}), generation dispatch "
                    f"{row['generation_dispatch_ms']['median']:.0f} ms, efficiency "
                    f"{row['efficiency']:.2f}; load {_num(loadavg(), '.1f')}")
            result["simulated"][kind] = {"rows": rows}
    result["capacity"] = capacity(result)
    result["loadavg_1min"] = {"start": load_start, "end": loadavg()}
    if not args.keep_tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return result


def throughput_storage(kind: str, tmp: Path, label: str, postgres_url: str | None
                       ) -> str | None:
    """The storage URL of one throughput run: a fresh journal file, the run directory's SQLite
    file (None), or the PostgreSQL database."""
    if kind == "journal":
        return f"journal://{(tmp / f'{label}.log').absolute()}"
    if kind == "sqlite":
        return None
    if not postgres_url:
        raise SystemExit("--storage postgresql needs --postgres-url or "
                         "$EVOMERGE_TEST_POSTGRES_URL")
    return postgres_url


def storages(args: argparse.Namespace, tmp: Path) -> dict[str, str | None]:
    """The multi-node storages: journal (a file here) and PostgreSQL when a URL is known."""
    return {"journal": f"journal://{(tmp / 'journal.log').absolute()}",
            "postgresql": args.postgres_url or None}


def run_ceiling(args: argparse.Namespace, tmp: Path, sizes: dict[str, Any]) -> dict[str, Any]:
    """Trials/s through the store with 16 no-op worker processes, via ``_store_load``."""
    module = load_store_load()
    if module is None:
        return {"not_measured": "benchmarks/_store_load.py does not exist yet"}
    out: dict[str, Any] = {}
    for kind, url in storages(args, tmp).items():
        if url is None:
            out[kind] = {"not_measured": "no PostgreSQL"}
            continue
        study = f"scale_out_ceiling_{uuid.uuid4().hex[:8]}"
        out[kind] = module.run_load(url, study, tmp / f"ceiling-{kind}",
                                    workers=sizes["ceiling_workers"],
                                    trials=sizes["ceiling_trials"])
        drop_study(url, study)
        log(f"  store ceiling {kind}: {out[kind]['trials_per_s']:.1f} trials/s with "
            f"{out[kind]['workers']} worker processes; load {_num(loadavg(), '.1f')}")
    return out


def drop_study(url: str, study: str) -> None:
    """Delete a benchmark study from a shared PostgreSQL database (files go with the temp dir)."""
    if url.startswith("postgresql"):
        import optuna

        from evomerge.store import open_storage

        optuna.delete_study(study_name=study, storage=open_storage(url))


def capacity(result: dict[str, Any]) -> dict[str, Any]:
    """GPUs each storage keeps busy at 30 s and 5 min per evaluation (Little's law on the
    measured store ceiling), and the generation efficiency at the largest simulated N."""
    out: dict[str, Any] = {}
    for kind, entry in (result.get("store_ceiling") or {}).items():
        rate = entry.get("trials_per_s") if isinstance(entry, dict) else None
        if rate:
            out[kind] = {"store_trials_per_s": rate,
                         "gpus_at_30s": gpus_kept_busy(rate, 30.0),
                         "gpus_at_300s": gpus_kept_busy(rate, 300.0)}
    for kind, entry in (result.get("simulated") or {}).items():
        rows = entry.get("rows") or []
        if rows:
            top = rows[-1]
            overhead = (top["generation_dispatch_ms"]["median"]
                        + (top["generation_turnaround_ms"] or {"median": 0.0})["median"]) / 1e3
            out.setdefault(kind, {}).update(
                sim_workers=top["workers"], generation_overhead_s=overhead,
                efficiency_at_30s=generation_efficiency(30.0, overhead),
                efficiency_at_300s=generation_efficiency(300.0, overhead))
    return out


SIZES: dict[str, dict[str, Any]] = {
    "full": {"digits_budget": 96, "busy_budget": 32, "ray_calls": 2000,
             "sim_workers": [16, 64, 256], "sim_generations": 3,
             "ceiling_workers": 16, "ceiling_trials": 400},
    "quick": {"digits_budget": 16, "busy_budget": 16, "ray_calls": 200,
              "sim_workers": [4, 16], "sim_generations": 2,
              "ceiling_workers": 4, "ceiling_trials": 40},
}


# ---- reporting ------------------------------------------------------------------------------


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def text_table(result: dict[str, Any]) -> str:
    lines = []
    for workload, entry in (result.get("throughput") or {}).items():
        for label, r in entry["runs"].items():
            lines.append(f"{workload:>6} {label:<12} {r['trials_per_s']:8.2f} trials/s "
                         f"eval {r['eval_ms']:7.2f} ms overhead {r['overhead_ms']:7.2f} ms")
    for key in ("processes_speedup_2_vs_1", "ray_speedup_2_vs_1"):
        if key in result:
            lines.append(f"{key}: {_num(result[key], '.2f')}")
    if "dispatch_overhead_ms" in result:
        lines.append("dispatch_overhead_ms: " + ", ".join(
            f"{k} {_num(v, '.2f')}" for k, v in result["dispatch_overhead_ms"].items()))
    for kind, entry in (result.get("simulated") or {}).items():
        for row in entry.get("rows", []):
            lines.append(f"sim {kind:>10} N={row['workers']:<4} driver "
                         f"{row['driver_cpu_ms_per_trial']:.2f} ms CPU/trial, wait median "
                         f"{row['queue_wait_ms']['median']:.0f} ms, efficiency "
                         f"{row['efficiency']:.2f}")
    return "\n".join(lines)


def markdown_section(result: dict[str, Any]) -> str:
    mach, load = result["machine"], result["loadavg_1min"]
    lines = [
        START,
        "## Scale-out (benchmarks/scale_out.py)",
        "",
        (f"- Machine: {mach['cpu']}, {mach['cores']} cores, Python {mach['python']}, optuna "
         f"{mach.get('optuna', '?')}, ray {mach.get('ray', '?')}, torch "
         f"{mach.get('torch', '?')}; evomerge at {mach.get('commit', '?')}; {mach['date']}; "
         f"1-min load average {_num(load['start'], '.2f')} at start, "
         f"{_num(load['end'], '.2f')} at end"),
        f"- Command: `{result.get('command', '?')}`",
    ]
    tp = result.get("throughput")
    if tp:
        busy = result["busy"]
        lines += [
            "",
            ("### Throughput per execution path (digits experiment, popsize 8, "
             f"{result.get('storage', 'journal')} store)"),
            "",
            ("`digits`: the real fitness (~1 ms per evaluation: measures the store and the "
            "dispatch path). `busy`: the same experiment with `digits_busy`, the digits fitness "
            f"repeating its forward pass {busy['repeat']} times ({busy['forward_ms']:.3f} ms "
            f"each, ~{busy['repeat'] * busy['forward_ms']:.0f} ms of CPU work per evaluation, "
            "one torch thread per process): measures parallel evaluation. Trials/s = "
            "(n - 1) / (last - first finished trial), start-up excluded (shown apart). "
            "Overhead = workers x ms/trial - median build+eval ms: wall time per trial a worker "
             "does not spend evaluating (store round trips, polling, generation barriers)."),
            "",
            ("| workload | path | workers | n | trials/s | ms/trial | median build+eval ms "
             "| overhead ms | start-up s |"),
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for workload, entry in tp.items():
            for r in entry["runs"].values():
                lines.append(f"| {workload} | {r['path']} | {r['workers']} | {r['n']} | "
                             f"{r['trials_per_s']:.2f} | {r['ms_per_trial']:.2f} | "
                             f"{r['eval_ms']:.2f} | {r['overhead_ms']:.2f} | "
                             f"{r['startup_s']:.1f} |")
        lines += ["", "| speedup 2 vs 1 workers | digits | busy (target >= 1.8) |",
                  "|---|---:|---:|"]
        for path in ("processes", "ray"):
            key = f"{path}_speedup_2_vs_1"
            lines.append(f"| {path} | {_num(tp['digits'].get(key), '.2f')} | "
                         f"{_num(tp['busy'].get(key), '.2f')} |")
        lines += ["", "Dispatch overhead per trial (digits, 1 worker): " + ", ".join(
            f"{k} {_num(v, '.2f')} ms" for k, v in result["dispatch_overhead_ms"].items()) + "."]
    ceiling = result.get("store_ceiling")
    if ceiling:
        lines += ["", "### Store ceiling (no-op evaluations, benchmarks/_store_load.py)", ""]
        for kind, entry in ceiling.items():
            lines.append(f"- {kind}: {json.dumps(_json_safe(entry))}")
    ray_d = result.get("ray_dispatch")
    if ray_d:
        lines += ["", "### Ray dispatch rate (no-op actor calls)", ""]
        if "not_measured" in ray_d:
            lines.append(f"Not measured: {ray_d['not_measured']}.")
        else:
            lines += ["| actors | calls/s | round trip ms |", "|---:|---:|---:|"]
            for n, e in ray_d["actors"].items():
                lines.append(f"| {n} | {e['calls_per_s']:.0f} | {e['round_trip_ms']:.2f} |")
    sim = result.get("simulated")
    if sim:
        lines += [
            "", "### The driver against N simulated workers", "",
            ("Real driver loop (`_search`, cmaes, popsize N, polling every 50 ms) and real "
             "`worker_loop`s (an idle worker polls the queue every "
             f"{sim_poll(sim)} s, as `evomerge worker` does); each "
            "evaluation sleeps a log-normal time. Queue wait = claim - enqueue. Generation "
            "dispatch = (last finish - first enqueue) - slowest evaluation; turnaround = next "
            "generation's first enqueue - this one's last finish. Efficiency = sum of slowest "
             "evaluations / wall time (1.0: the generation barrier is the only idle time)."),
            "",
            ("| storage | N | trials | mean eval s | driver CPU ms/trial | enqueue ms/trial "
             "| poll ms/trial | queue wait ms median / p95 / max | generation dispatch ms "
             "median / max | turnaround ms median | efficiency |"),
            "|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|",
        ]
        for kind, entry in sim.items():
            if "not_measured" in entry:
                lines.append(f"| {kind} | — | | | | | | not measured: "
                             f"{entry['not_measured']} | | | |")
                continue
            for r in entry["rows"]:
                w, d = r["queue_wait_ms"], r["generation_dispatch_ms"]
                t = r["generation_turnaround_ms"]
                lines.append(
                    f"| {kind} | {r['workers']} | {r['trials']} | {r['mean_eval_s']:.1f} | "
                    f"{r['driver_cpu_ms_per_trial']:.2f} | "
                    f"{r['driver_enqueue_ms_per_trial']:.2f} | "
                    f"{r['driver_poll_ms_per_trial']:.2f} | {w['median']:.0f} / "
                    f"{w['p95']:.0f} / {w['max']:.0f} | {d['median']:.0f} / {d['max']:.0f} | "
                    f"{_num(t and t['median'], '.0f')} | {r['efficiency']:.2f} |")
    cap = result.get("capacity")
    if cap:
        lines += ["", "### Capacity (derived)", "", "```json",
                  json.dumps(_json_safe(cap), indent=1), "```"]
    if result.get("notes"):
        lines += [""] + [f"- {n}" for n in result["notes"]]
    lines.append(END)
    return "\n".join(lines)


def sim_poll(sim: dict[str, Any]) -> str:
    """The workers' poll interval of the simulation rows, for the table's caption."""
    polls = {r.get("worker_poll_s") for e in sim.values() for r in e.get("rows", [])}
    return ", ".join(f"{p:g}" for p in sorted(p for p in polls if p is not None)) or "?"


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(allowed)}")
        return values
    return parse


PARTS = ("throughput", "ceiling", "ray", "sim")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"small sizes: {SIZES['quick']}")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--parts", type=_choices(PARTS), default=list(PARTS),
                   help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--paths", type=_choices(PATHS), default=list(PATHS),
                   help=f"execution paths for the throughput part: subset of {','.join(PATHS)}")
    p.add_argument("--storage", choices=("journal", "sqlite", "postgresql"), default="journal",
                   help="store of the throughput runs (default journal: the multi-process "
                        "store for one machine or a shared filesystem)")
    p.add_argument("--busy-ms", type=float, default=150.0,
                   help="CPU work per evaluation of the busy workload (default 150)")
    p.add_argument("--sim-workers", type=_int_list, default=None,
                   help="simulated worker counts (default 16,64,256; quick 4,16)")
    p.add_argument("--sim-eval-s", type=float, default=None,
                   help="mean simulated evaluation time in s (default 2; quick 0.3)")
    p.add_argument("--sim-sigma", type=float, default=0.25,
                   help="log-space sigma of the simulated evaluation time (default 0.25)")
    p.add_argument("--sim-poll-s", type=float, default=1.0,
                   help="how often an idle simulated worker polls the queue (default 1.0 s, "
                        "what `evomerge worker` does)")
    p.add_argument("--sim-processes", type=int, default=4,
                   help="processes the simulated workers are spread over (default 4)")
    p.add_argument("--postgres-url", default=os.environ.get("EVOMERGE_TEST_POSTGRES_URL"),
                   help="PostgreSQL URL (default $EVOMERGE_TEST_POSTGRES_URL); none: skipped")
    p.add_argument("--tmp-dir", type=Path, default=None, help="where temp files go")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (debugging)")
    p.add_argument("--out-md", type=Path, default=None,
                   help="(re)write this benchmark's section of this markdown file")
    p.add_argument("--write-results", action="store_true",
                   help=f"same as --out-md {RESULTS_MD.relative_to(ROOT)}")
    p.add_argument("--note", action="append", default=[], help="a line added under the tables")
    p.add_argument("--from-json", type=Path, default=None,
                   help="skip the run: re-render from a saved --json output")
    args = p.parse_args(argv)
    if args.busy_ms <= 0:
        p.error("--busy-ms must be > 0")
    if args.sim_eval_s is None:
        args.sim_eval_s = 0.3 if args.quick else 2.0
    if args.sim_eval_s <= 0 or args.sim_sigma < 0:
        p.error("--sim-eval-s must be > 0 and --sim-sigma >= 0")
    if args.sim_processes < 1 or args.sim_poll_s <= 0:
        p.error("--sim-processes must be >= 1 and --sim-poll-s > 0")
    if args.write_results and args.out_md is None:
        args.out_md = RESULTS_MD
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/scale_out.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    with stdout_to_stderr(args.json):
        if args.from_json is not None:
            result = json.loads(args.from_json.read_text())
        else:
            result = run(args)
            result["command"] = command.strip()
        if args.note:
            result["notes"] = list(result.get("notes", [])) + args.note
        log("\n" + text_table(result))
        if args.out_md is not None:
            from _results import write_section

            write_section(args.out_md, markdown_section(result), START, END)
            log(f"wrote {args.out_md}")
    if args.json:
        print(json.dumps(_json_safe(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
