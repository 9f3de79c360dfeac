#!/usr/bin/env python
"""Search-overhead benchmark: what evomerge's loop costs per trial beyond bare Optuna.

A synthetic 50-dimensional objective (a shifted sphere, maximise ``-||x - c||^2`` over
``[0, 1]^50``) replaces the merge and the model evaluation, so every millisecond measured is search
and bookkeeping. Per storage kind (in-memory, SQLite file, journal file; each in a fresh temp dir)
three loops evaluate the same number ``n`` of candidates:

* ``bare_cma_ms_per_trial``: a bare ``cma.CMAEvolutionStrategy`` ask/tell loop (the popsize and
  sigma0 of evomerge's ``cmaes`` defaults), no storage at all. Measured once (it has no storage).
* ``bare_optuna_ms_per_trial``: the same cma loop, and every candidate recorded in Optuna on that
  storage the cheapest way that still stores its 50 coordinates as Optuna params:
  ``study.enqueue_trial(params)``, ``trial = study.ask(fixed_distributions)`` (50
  ``FloatDistribution``), ``study.tell(trial, value)``.
* ``evomerge_ms_per_trial``: evomerge's own loop, unmodified: a :class:`evomerge.store.Store`
  on that storage, the driver's generation loop (``evomerge.execution.driver._search``) with the
  ``cmaes`` strategy, and the in-process worker (``evomerge.execution.worker.process_one``: pop,
  ``MergeRecipe.from_dict``, evaluate, ``Store.finish``). Only the plan is a stand-in: the
  "space" decodes ``x`` into a real 50-number task-arithmetic ``MergeRecipe`` (two sources, a
  25-value weight gradient each), and the "evaluator" reads ``x`` back from that recipe and
  returns the objective, its timings and a 64-item 0/1 score vector (as a real fitness does).
  Every trial is enqueued (params written with it), popped and finished through ``Store``.

``ratio_vs_bare_optuna = evomerge_ms_per_trial / bare_optuna_ms_per_trial``; the issue's target is
<= 1.10 on every storage. Timed: the loops only (study/Store creation excluded on both sides).
By default the two Optuna loops run interleaved: each time evomerge's driver hands a generation
to the executor, one generation of the bare loop runs first, timed apart and subtracted, so load
from other processes hits both alike (``--separate``: one after the other, alternating order).
The fastest of ``--repeats`` runs is reported (other processes only ever add time); every sample
is kept in the JSON, wall and CPU time both. After each run every evomerge trial is checked:
COMPLETE, 50 params, its value equal to the objective at its params, its result attribute present.

A separate, untimed pass counts storage calls per trial for both Optuna paths (the storage API
methods called, plus SQL statements and commits for SQLite, log appends/reads for the journal):
``calls_per_trial``. ``--profile STORAGE`` adds cProfile listings of both loops on stderr.

Usage::

    python benchmarks/search_overhead.py                       # table on stderr
    python benchmarks/search_overhead.py --quick --json        # small n, one JSON object on stdout
    python benchmarks/search_overhead.py --json --write-results   # rewrite benchmarks/RESULTS.md
    python benchmarks/search_overhead.py --storages sqlite --profile sqlite

Progress goes to stderr; with ``--json`` stdout carries exactly one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as _dt
import gc
import io
import json
import math
import os
import platform
import pstats
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# One BLAS thread: cma's eigendecomposition is the same on both sides, and on a small shared
# machine a second BLAS thread only adds noise (set before numpy is imported).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

if str(Path(__file__).resolve().parent) not in sys.path:  # _results.py sits beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_name, loadavg, stdout_to_stderr  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
START, END = "<!-- search_overhead:start -->", "<!-- search_overhead:end -->"

DIM = 50
STORAGES = ("memory", "sqlite", "journal")
N_FULL = {"memory": 2000, "sqlite": 300, "journal": 300}
N_QUICK = {"memory": 150, "sqlite": 30, "journal": 30}
N_COUNT = 60  # trials of the untimed call-counting pass (4 generations of 15)
TARGET_RATIO = 1.10
TMP_DIR: str | None = None  # where the study files go (--tmp-dir); None = the system temp dir
SEED = 1  # cma seed (evomerge's cmaes with seed s >= 1 asks what bare cma with seed s asks)
CENTER = np.random.default_rng(12345).uniform(0.2, 0.8, DIM)  # optimum of the shifted sphere
OBJECTIVE = "neg_sq_dist"
N_ITEMS = 64  # per-item 0/1 scores stored with each evomerge trial, as a real fitness returns


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def objective(x: np.ndarray) -> float:
    return -float(np.sum((np.asarray(x, dtype=float) - CENTER) ** 2))


def item_scores(x: np.ndarray) -> np.ndarray:
    """A deterministic 0/1 vector standing in for per-item correctness."""
    return (np.abs(np.resize(np.asarray(x), N_ITEMS) - np.resize(CENTER, N_ITEMS)) < 0.1
            ).astype(np.float32)


# ---- the strategy's defaults --------------------------------------------------------------


def cmaes_defaults() -> tuple[int, float]:
    """(popsize, sigma0) of evomerge's ``cmaes`` strategy at this dimension, from the strategy."""
    from evomerge.search import make_strategy

    s = make_strategy("cmaes", lower=[0.0] * DIM, upper=[1.0] * DIM, directions=["maximize"],
                      seed=SEED)
    return s.popsize, s.sigma0


def new_es(popsize: int, sigma0: float):
    import cma

    return cma.CMAEvolutionStrategy(np.full(DIM, 0.5), sigma0, {
        "bounds": [0.0, 1.0], "popsize": popsize, "seed": SEED, "verbose": -9, "verb_log": 0,
        "verb_disp": 0, "signals_filename": ""})


def generations(n: int, popsize: int) -> Iterator[int]:
    """Candidates evaluated per generation for ``n`` evaluations (the last may be partial, as
    the driver's exact budget does; a partial generation is never told)."""
    done = 0
    while done < n:
        yield min(popsize, n - done)
        done += popsize


# ---- (a) bare cma -------------------------------------------------------------------------


def run_bare_cma(n: int, popsize: int, sigma0: float) -> float:
    es = new_es(popsize, sigma0)
    started = time.perf_counter()
    for k in generations(n, popsize):
        xs = es.ask()
        values = [objective(x) for x in xs[:k]]
        if k == popsize:
            es.tell(xs, [-v for v in values])
    return time.perf_counter() - started


# ---- storages -----------------------------------------------------------------------------


def storage_url(kind: str, tmp: Path) -> str:
    if kind == "memory":
        return "memory"
    if kind == "sqlite":
        return f"sqlite:///{tmp / 'study.db'}"
    if kind == "journal":
        return f"journal://{(tmp / 'journal.log').absolute()}"
    raise ValueError(kind)


# ---- (b) bare Optuna ----------------------------------------------------------------------


def bare_optuna_setup(url: str):
    import optuna
    from optuna.distributions import FloatDistribution

    from evomerge.store import open_storage

    storage = open_storage(url)  # the same storage object evomerge opens (Optuna's own caching)
    study = optuna.create_study(storage=storage, study_name="bare", direction="maximize")
    dists = {f"x{i}": FloatDistribution(0.0, 1.0) for i in range(DIM)}
    return storage, study, dists


def bare_optuna_generations(study, dists, n: int, popsize: int, sigma0: float
                            ) -> Iterator[int]:
    """The bare loop, one generation per step (yields how many candidates it evaluated)."""
    es = new_es(popsize, sigma0)
    names = list(dists)
    for k in generations(n, popsize):
        xs = es.ask()
        values = []
        for x in xs[:k]:
            study.enqueue_trial({name: float(v) for name, v in zip(names, x)})
            trial = study.ask(dists)
            params = trial.params  # one copy (each ``trial.params`` deep-copies them all)
            value = objective(np.array([params[name] for name in names]))
            study.tell(trial, value)
            values.append(value)
        if k == popsize:
            es.tell(xs, [-v for v in values])
        yield k


def bare_optuna_loop(study, dists, n: int, popsize: int, sigma0: float) -> None:
    for _ in bare_optuna_generations(study, dists, n, popsize, sigma0):
        pass


# ---- (c) evomerge -------------------------------------------------------------------------


class _Space:
    """Stand-in for a bound SearchSpace: decode ``x`` into a real 50-number MergeRecipe."""

    dim = DIM
    lower = np.zeros(DIM)
    upper = np.ones(DIM)

    def model_names(self) -> dict[str, str]:
        return {}  # the dashboard note keeps the models' paths

    def decode(self, x: np.ndarray, meta: dict | None = None):
        from evomerge.recipe import MergeRecipe

        half = DIM // 2
        return MergeRecipe.from_dict({
            "merge_method": "task_arithmetic", "base_model": "/bench/base", "dtype": "float32",
            "models": [{"model": "/bench/s1", "parameters": {"weight": [float(v) for v in x[:half]]}},
                       {"model": "/bench/s2", "parameters": {"weight": [float(v) for v in x[half:]]}}]})


class _Evaluator:
    """Stand-in for the worker's Evaluator: the objective of the ``x`` carried by the recipe."""

    def __init__(self) -> None:
        from evomerge.fitness.base import Objective

        self.objectives = [Objective(OBJECTIVE, "maximize")]

    def evaluate(self, recipe, split: str = "search", fidelity=None):
        from evomerge.fitness.base import EvalResult

        started = time.perf_counter()
        x = np.array([v for e in recipe.models for v in e.parameters["weight"]], dtype=float)
        value = objective(x)
        return (EvalResult({OBJECTIVE: value}, {"sphere": item_scores(x)}),
                {"build_s": 0.0, "eval_s": time.perf_counter() - started})


class _Executor:
    """The in-process executor's ``run`` (LocalExecutor with workers=0): drain the queue with
    the real worker step, ``process_one``. ``before``, if given, runs first in every ``run``
    (the paired timing mode steps the bare loop there; its time is subtracted)."""

    def __init__(self, before: Callable[[], None] | None = None) -> None:
        self.evaluator = _Evaluator()
        self.before = before

    def run(self, store, done: Callable[[], bool], tick: Callable[[], None]) -> None:
        from evomerge.execution.worker import drain

        if self.before is not None:
            self.before()
        drain(store, self.evaluator, on_done=tick)

    def close(self, store) -> None:
        pass


class _Bar:
    def update(self, *args: Any, **kwargs: Any) -> None:
        pass


def _plan(n: int):
    """What ``_search`` reads from a Plan: experiment.budget / max_fail_share, space.dim /
    decode, objectives, new_strategy()."""
    from evomerge.fitness.base import Objective
    from evomerge.search import make_strategy

    return SimpleNamespace(
        experiment=SimpleNamespace(budget=n, budget_items=None, max_fail_share=0.5),
        space=_Space(),
        objectives=[Objective(OBJECTIVE, "maximize")],
        new_strategy=lambda: make_strategy("cmaes", lower=[0.0] * DIM, upper=[1.0] * DIM,
                                           directions=["maximize"], seed=SEED),
    )


def evomerge_setup(url: str):
    from evomerge.store import Store

    store = Store(url, "evomerge", ["maximize"], [0.0] * DIM, [1.0] * DIM,
                  objective_names=[OBJECTIVE])
    return store


def evomerge_loop(store, n: int, before_run: Callable[[], None] | None = None) -> None:
    """``run_experiment`` minus provenance/report: the same store calls around ``_search``."""
    from evomerge.execution.driver import _search

    store.trials()  # run_experiment's "existing trials" check
    store.set_finished(False)
    executor = _Executor(before_run)
    try:
        _search(_plan(n), store, executor, _Bar(), None)
    finally:
        executor.close(store)


def check_evomerge(store, n: int) -> dict[str, Any]:
    """Untimed: every trial went through the store for real."""
    from optuna.trial import TrialState

    from evomerge.store import RESULT, x_of

    trials = store.trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    bad_value = sum(1 for t in complete if not math.isclose(
        t.values[0], objective(x_of(t, DIM)), rel_tol=1e-9, abs_tol=1e-12))
    ok = (len(trials) == n and len(complete) == n and bad_value == 0
          and all(len(t.params) == DIM for t in complete)
          and all(RESULT in t.user_attrs and "item_scores" in t.user_attrs[RESULT]
                  for t in complete))
    best = max((t.values[0] for t in complete), default=float("nan"))
    return {"trials": len(trials), "complete": len(complete), "value_mismatches": bad_value,
            "ok": ok, "best": best}


# ---- call counting (untimed) --------------------------------------------------------------


_STORAGE_API = ("create_new_trial", "set_trial_param", "set_trial_state_values",
                "set_trial_user_attr", "set_trial_system_attr", "get_trial", "get_all_trials",
                "get_trial_id_from_study_id_trial_number", "get_study_user_attrs",
                "get_study_system_attrs", "set_study_user_attr", "get_study_directions",
                "get_n_trials", "get_best_trial", "get_trial_params", "get_trial_user_attrs",
                "get_trial_system_attrs", "get_trial_number_from_id")


@contextlib.contextmanager
def counting(storage) -> Iterator[Counter]:
    """Count storage API calls (by method) and the backend's own round trips: SQL statements and
    commits (SQLite), log appends and reads (journal)."""
    counts: Counter = Counter()
    patched: list[tuple[Any, str]] = []

    def wrap(obj: Any, name: str, key: str) -> None:
        fn = getattr(obj, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[key] += 1
            return fn(*args, **kwargs)

        setattr(obj, name, counted)
        patched.append((obj, name))

    for name in _STORAGE_API:
        if hasattr(storage, name):
            wrap(storage, name, f"api.{name}")
    backend = getattr(storage, "_backend", None)
    engine = getattr(backend, "engine", None)
    listeners = []
    if engine is not None:
        from sqlalchemy import event

        def on_sql(*_: Any, **__: Any) -> None:
            counts["sql.statements"] += 1

        def on_commit(*_: Any, **__: Any) -> None:
            counts["sql.commits"] += 1

        listeners = [(engine, "before_cursor_execute", on_sql), (engine, "commit", on_commit)]
        for target, ev, fn in listeners:
            event.listen(target, ev, fn)
    elif backend is not None and hasattr(backend, "append_logs"):
        wrap(backend, "append_logs", "journal.appends")
        wrap(backend, "read_logs", "journal.reads")
    try:
        yield counts
    finally:
        for obj, name in patched:
            with contextlib.suppress(AttributeError):
                delattr(obj, name)
        if listeners:
            from sqlalchemy import event

            for target, ev, fn in listeners:
                event.remove(target, ev, fn)


def count_calls(kind: str, n: int, popsize: int, sigma0: float) -> dict[str, dict[str, float]]:
    out = {}
    with tempfile.TemporaryDirectory(prefix="evomerge-search-bench-", dir=TMP_DIR) as tmp:
        storage, study, dists = bare_optuna_setup(storage_url(kind, Path(tmp)))
        with counting(storage) as c:
            bare_optuna_loop(study, dists, n, popsize, sigma0)
        out["bare_optuna"] = {k: v / n for k, v in sorted(c.items())}
    with tempfile.TemporaryDirectory(prefix="evomerge-search-bench-", dir=TMP_DIR) as tmp:
        store = evomerge_setup(storage_url(kind, Path(tmp)))
        with counting(store.storage) as c:
            evomerge_loop(store, n)
        out["evomerge"] = {k: v / n for k, v in sorted(c.items())}
    return out


# ---- timing -------------------------------------------------------------------------------


def time_bare_optuna(kind: str, n: int, popsize: int, sigma0: float) -> tuple[float, float]:
    """(wall s, CPU s) of the bare Optuna loop."""
    tmp = Path(tempfile.mkdtemp(prefix="evomerge-search-bench-", dir=TMP_DIR))
    try:
        _, study, dists = bare_optuna_setup(storage_url(kind, tmp))
        gc.collect()
        cpu, started = time.process_time(), time.perf_counter()
        bare_optuna_loop(study, dists, n, popsize, sigma0)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        assert len(study.get_trials(deepcopy=False)) == n
        return elapsed, cpu
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def time_evomerge(kind: str, n: int) -> tuple[float, float, dict[str, Any]]:
    """(wall s, CPU s, checks) of the evomerge loop."""
    tmp = Path(tempfile.mkdtemp(prefix="evomerge-search-bench-", dir=TMP_DIR))
    try:
        store = evomerge_setup(storage_url(kind, tmp))
        gc.collect()
        cpu, started = time.process_time(), time.perf_counter()
        evomerge_loop(store, n)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        return elapsed, cpu, check_evomerge(store, n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def time_paired(kind: str, n: int, popsize: int, sigma0: float
                ) -> tuple[float, float, float, float, dict[str, Any]]:
    """Both loops interleaved generation by generation, so load from other processes hits both
    alike: each time evomerge's driver hands a generation to the executor, one generation of the
    bare loop runs first (timed separately, subtracted from evomerge's total). Returns (evomerge
    wall s, evomerge CPU s, bare wall s, bare CPU s, checks)."""
    tmp = Path(tempfile.mkdtemp(prefix="evomerge-search-bench-", dir=TMP_DIR))
    try:
        (tmp / "bare").mkdir()
        (tmp / "evomerge").mkdir()
        _, study, dists = bare_optuna_setup(storage_url(kind, tmp / "bare"))
        store = evomerge_setup(storage_url(kind, tmp / "evomerge"))
        steps = bare_optuna_generations(study, dists, n, popsize, sigma0)
        bare = [0.0, 0.0]

        def bare_step() -> None:
            cpu, started = time.process_time(), time.perf_counter()
            next(steps, None)
            bare[0] += time.perf_counter() - started
            bare[1] += time.process_time() - cpu

        gc.collect()
        cpu, started = time.process_time(), time.perf_counter()
        evomerge_loop(store, n, before_run=bare_step)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        if next(steps, None) is not None:
            raise RuntimeError("the bare loop has generations left: the pairing is off")
        assert len(study.get_trials(deepcopy=False)) == n
        return wall - bare[0], cpu - bare[1], bare[0], bare[1], check_evomerge(store, n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# (label, file suffix, function name): where a trial's time goes, for the profile summary.
_ATTRIBUTION = (
    ("evomerge Store.enqueue", "evomerge/store.py", "enqueue"),
    ("evomerge Store.pop", "evomerge/store.py", "pop"),
    ("evomerge Store.finish", "evomerge/store.py", "finish"),
    ("evomerge Store.get", "evomerge/store.py", "get"),
    ("evomerge Store.trials/slots", "evomerge/store.py", "trials"),
    ("space.decode (stand-in, builds a MergeRecipe)", "search_overhead.py", "decode"),
    ("MergeRecipe.from_dict (worker)", "evomerge/recipe/mergekit_config.py", "from_dict"),
    ("MergeRecipe.to_dict (driver)", "evomerge/recipe/mergekit_config.py", "to_dict"),
    ("encode_scores", "evomerge/store.py", "encode_scores"),
    ("cmaes strategy ask", "evomerge/search/cmaes.py", "ask"),
    ("cmaes strategy tell", "evomerge/search/cmaes.py", "tell"),
    ("optuna Study.enqueue_trial", "optuna/study/study.py", "enqueue_trial"),
    ("optuna Study.ask", "optuna/study/study.py", "ask"),
    ("optuna Study.tell", "optuna/study/study.py", "tell"),
    ("optuna Trial.__init__", "optuna/trial/_trial.py", "__init__"),
    ("optuna Trial.suggest_float / _suggest", "optuna/trial/_trial.py", "_suggest"),
    ("optuna Trial.params", "optuna/trial/_trial.py", "params"),
    ("cma ask", "cma/evolution_strategy.py", "ask"),
    ("cma tell", "cma/evolution_strategy.py", "tell"),
    ("storage.create_new_trial", "optuna/storages/", "create_new_trial"),
    ("storage.set_trial_param", "optuna/storages/", "set_trial_param"),
    ("storage.set_trial_state_values", "optuna/storages/", "set_trial_state_values"),
    ("storage.set_trial_user_attr", "optuna/storages/", "set_trial_user_attr"),
    ("storage.get_trial", "optuna/storages/", "get_trial"),
    ("storage.get_all_trials", "optuna/storages/", "get_all_trials"),
    ("sqlite3 commit", "~", "<method 'commit' of 'sqlite3.Connection' objects>"),
    ("sqlite3 execute", "~", "<method 'execute' of 'sqlite3.Cursor' objects>"),
)


def attribution(stats: pstats.Stats, n: int) -> dict[str, float]:
    """Cumulative ms per trial of the functions in ``_ATTRIBUTION`` (outermost calls only: a
    function's time is counted once even when it calls itself or its storage wrapper)."""
    out: dict[str, float] = {}
    raw = stats.stats  # type: ignore[attr-defined]
    for label, suffix, func in _ATTRIBUTION:
        keys = {k for k in raw if k[2] == func and (k[0].endswith(suffix) or suffix in k[0])}
        # drop entries called only from another matching entry (wrapper -> backend)
        total = 0.0
        for k in keys:
            callers = raw[k][4]
            outer = {c: v for c, v in callers.items() if c not in keys}
            if not callers:
                total += raw[k][3]
            elif outer:
                # cumulative time attributed to the calls from outside the matched set
                total += sum(v[3] for v in outer.values())
        if total:
            out[label] = total / n * 1e3
    return out


def profile_both(kind: str, n: int, popsize: int, sigma0: float, top: int = 30
                 ) -> dict[str, dict[str, float]]:
    summary = {}
    for name in ("bare_optuna", "evomerge"):
        with tempfile.TemporaryDirectory(prefix="evomerge-search-bench-", dir=TMP_DIR) as tmp:
            url = storage_url(kind, Path(tmp))
            if name == "bare_optuna":
                _, study, dists = bare_optuna_setup(url)
                run = lambda: bare_optuna_loop(study, dists, n, popsize, sigma0)  # noqa: E731
            else:
                store = evomerge_setup(url)
                run = lambda: evomerge_loop(store, n)  # noqa: E731
            pr = cProfile.Profile()
            started = time.perf_counter()
            pr.enable()
            run()
            pr.disable()
            wall = time.perf_counter() - started
            for sort in ("cumulative", "tottime"):
                buf = io.StringIO()
                pstats.Stats(pr, stream=buf).sort_stats(sort).print_stats(top)
                log(f"\n=== cProfile: {name} on {kind}, n={n}, sorted by {sort} ===\n"
                    f"{buf.getvalue()}")
            summary[name] = {"total (profiled)": wall / n * 1e3,
                             **attribution(pstats.Stats(pr), n)}
    labels = list(dict.fromkeys([*summary["bare_optuna"], *summary["evomerge"]]))
    log(f"\n=== where a trial's time goes on {kind} (ms/trial, cumulative, under cProfile) ===")
    log(f"{'':48} {'bare':>9} {'evomerge':>9}")
    for label in labels:
        b, e = summary["bare_optuna"].get(label), summary["evomerge"].get(label)
        log(f"{label:48} {_num(b, '9.3f'):>9} {_num(e, '9.3f'):>9}")
    return summary


# ---- the benchmark ------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = cpu_name()
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(),
                            "python": platform.python_version(),
                            "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}
    from importlib.metadata import version

    for pkg in ("optuna", "cma", "sqlalchemy", "numpy"):
        with contextlib.suppress(Exception):
            info[pkg] = version(pkg)
    import subprocess

    with contextlib.suppress(Exception):  # which evomerge code was measured
        git = ["git", "-C", str(ROOT)]
        info["commit"] = subprocess.run([*git, "rev-parse", "--short", "HEAD"], check=True,
                                        capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "evomerge"], check=True,
                               capture_output=True, text=True).stdout.split("\n")
        info["evomerge_modified"] = [line[3:] for line in dirty if line.strip()]
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    import optuna

    global TMP_DIR
    TMP_DIR = str(args.tmp_dir) if args.tmp_dir else None

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    kinds = [k.strip() for k in args.storages.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in STORAGES]
    if unknown:
        raise SystemExit(f"unknown storage(s): {', '.join(unknown)}; known: {', '.join(STORAGES)}")
    ns = dict(N_QUICK if args.quick else N_FULL)
    for spec in args.n or []:
        kind, _, value = spec.partition("=")
        if kind not in STORAGES or not value.isdigit() or int(value) < 1:
            raise SystemExit(f"--n: expected STORAGE=N with STORAGE in {STORAGES}, got {spec!r}")
        ns[kind] = int(value)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 2)
    machine = machine_info()  # at the start: the evomerge code imported below is what runs
    popsize, sigma0 = cmaes_defaults()
    load_start = loadavg()
    log(f"dim {DIM}, cmaes popsize {popsize}, sigma0 {sigma0}; storages {kinds}; n {ns}; "
        f"repeats {repeats}; 1-min load average {load_start}")
    if load_start is not None and load_start > 0.5 * (os.cpu_count() or 1):
        log(f"warning: 1-min load average {load_start:.1f} on {os.cpu_count()} cores: other "
            "processes share the CPU, timings will be noisy")

    # Import everything up front so no loop pays a first import.
    import cma  # noqa: F401

    import evomerge.execution.driver  # noqa: F401
    import evomerge.execution.worker  # noqa: F401

    n_cma = max(ns[k] for k in kinds)
    cma_s = [run_bare_cma(n_cma, popsize, sigma0) for _ in range(max(repeats, 3))]
    bare_cma_ms = min(cma_s) / n_cma * 1e3
    log(f"bare cma: {bare_cma_ms:.4f} ms/trial (n={n_cma}, best of {len(cma_s)})")

    storages: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        n = ns[kind]
        bare, evo, bare_cpu, evo_cpu, checks = [], [], [], [], []
        for r in range(repeats):
            if args.separate:
                order = ("bare", "evo") if r % 2 == 0 else ("evo", "bare")
            else:
                order = ("paired",)
            for which in order:
                if which == "paired":
                    e_s, e_cpu, b_s, b_cpu, check = time_paired(kind, n, popsize, sigma0)
                elif which == "bare":
                    b_s, b_cpu = time_bare_optuna(kind, n, popsize, sigma0)
                else:
                    e_s, e_cpu, check = time_evomerge(kind, n)
                if which in ("paired", "bare"):
                    bare.append(b_s / n * 1e3)
                    bare_cpu.append(b_cpu / n * 1e3)
                    log(f"{kind:>8} [{r + 1}/{repeats}] bare optuna: {bare[-1]:.3f} ms/trial "
                        f"(CPU {bare_cpu[-1]:.3f}; load {_num(loadavg(), '.1f')})")
                if which in ("paired", "evo"):
                    evo.append(e_s / n * 1e3)
                    evo_cpu.append(e_cpu / n * 1e3)
                    checks.append(check)
                    log(f"{kind:>8} [{r + 1}/{repeats}] evomerge:    {evo[-1]:.3f} ms/trial "
                        f"(CPU {evo_cpu[-1]:.3f}; load {_num(loadavg(), '.1f')}; checks "
                        f"{'ok' if check['ok'] else 'FAILED: ' + str(check)})")
                    if not check["ok"]:
                        raise SystemExit(f"evomerge run on {kind} failed its checks: {check}")
        entry: dict[str, Any] = {
            "n": n,
            "evomerge_ms_per_trial": min(evo),
            "bare_optuna_ms_per_trial": min(bare),
            "ratio_vs_bare_optuna": min(evo) / min(bare),
            "extra_ms_per_trial": min(evo) - min(bare),
            "evomerge_cpu_ms_per_trial": min(evo_cpu),
            "bare_optuna_cpu_ms_per_trial": min(bare_cpu),
            "cpu_ratio_vs_bare_optuna": min(evo_cpu) / min(bare_cpu),
            "evomerge_ms_samples": evo,
            "bare_optuna_ms_samples": bare,
            "ratio_samples": [e / b for e, b in zip(evo, bare)],
            "target_met": min(evo) / min(bare) <= TARGET_RATIO,
            "checks": checks[-1],
        }
        if not args.no_count:
            cn = min(N_COUNT, n)
            entry["calls_per_trial"] = count_calls(kind, cn, popsize, sigma0)
            entry["calls_counted_over_n"] = cn
        log(f"{kind:>8}: evomerge {entry['evomerge_ms_per_trial']:.3f} ms/trial vs bare optuna "
            f"{entry['bare_optuna_ms_per_trial']:.3f} -> ratio {entry['ratio_vs_bare_optuna']:.3f} "
            f"({'met' if entry['target_met'] else 'MISSED'} <= {TARGET_RATIO})")
        storages[kind] = entry
        if args.profile == kind:
            entry["profile_ms_per_trial"] = profile_both(kind, n, popsize, sigma0)
    if args.profile and args.profile not in kinds:
        profile_both(args.profile, ns[args.profile], popsize, sigma0)

    return {
        "dim": DIM,
        "objective": "maximise -||x - c||^2 over [0, 1]^50 (c fixed, in [0.2, 0.8]^50)",
        "popsize": popsize,
        "sigma0": sigma0,
        "repeats": repeats,
        "timing": "separate" if args.separate else "paired",
        "tmp_dir": TMP_DIR or tempfile.gettempdir(),
        "quick": args.quick,
        "target_ratio": TARGET_RATIO,
        "bare_cma_ms_per_trial": bare_cma_ms,
        "bare_cma_n": n_cma,
        "storages": storages,
        "loadavg_1min": {"start": load_start, "end": loadavg()},
        "machine": machine,
    }


# ---- reporting ----------------------------------------------------------------------------


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _calls(entry: dict[str, Any], path: str) -> dict[str, float]:
    return entry.get("calls_per_trial", {}).get(path, {})


def _roundtrips(kind: str, calls: dict[str, float]) -> str:
    if not calls:
        return "—"
    if kind == "sqlite":
        return f"{calls.get('sql.statements', 0):.1f} SQL / {calls.get('sql.commits', 0):.1f} commits"
    if kind == "journal":
        return (f"{calls.get('journal.appends', 0):.1f} appends / "
                f"{calls.get('journal.reads', 0):.1f} reads")
    return f"{sum(v for k, v in calls.items() if k.startswith('api.')):.1f} storage calls"


def text_table(result: dict[str, Any]) -> str:
    rows = [f"bare cma: {result['bare_cma_ms_per_trial']:.4f} ms/trial",
            f"{'storage':>8} {'n':>5} {'bare_optuna':>11} {'evomerge':>9} {'ratio':>6} "
            f"{'cpu_ratio':>9} target"]
    for kind, e in result["storages"].items():
        rows.append(f"{kind:>8} {e['n']:>5} {e['bare_optuna_ms_per_trial']:11.3f} "
                    f"{e['evomerge_ms_per_trial']:9.3f} {e['ratio_vs_bare_optuna']:6.3f} "
                    f"{e['cpu_ratio_vs_bare_optuna']:9.3f} "
                    f"{'met' if e['target_met'] else 'MISSED'}")
    return "\n".join(rows)


def markdown_section(result: dict[str, Any], command: str) -> str:
    mach, load = result["machine"], result["loadavg_1min"]
    lines = [
        START,
        "## Search overhead (benchmarks/search_overhead.py)",
        "",
        f"- Machine: {mach['cpu']}, {mach['cores']} cores, Python {mach['python']}, optuna "
        f"{mach.get('optuna', '?')}, cma {mach.get('cma', '?')}, SQLAlchemy "
        f"{mach.get('sqlalchemy', '?')}; evomerge at {mach.get('commit', '?')}"
        + (f" (modified: {', '.join(mach['evomerge_modified'])})"
           if mach.get("evomerge_modified") else "")
        + f"; {mach['date']}; 1-min load average "
        f"{_num(load['start'], '.2f')} at start, {_num(load['end'], '.2f')} at end"
        + (" (the machine was shared with other work)"
           if (load["start"] or 0) > 0.5 * (mach["cores"] or 1) else ""),
        f"- Command: `{command}`",
        f"- Objective: {result['objective']}, {result['dim']} params; cmaes defaults popsize "
        f"{result['popsize']}, sigma0 {result['sigma0']}. Per storage, best of "
        f"{result['repeats']} runs of each loop, "
        + ("interleaved generation by generation (each time the driver hands a generation to "
           "the executor, one generation of the bare loop runs first, timed apart and "
           "subtracted), so load from other processes hits both alike"
           if result.get("timing", "paired") == "paired" else
           "as separate runs in alternating order")
        + f"; fresh studies in a temp dir under `{result.get('tmp_dir', '?')}` each run; the "
        "loops are timed, study creation is not; "
        "one BLAS thread. CPU = process time of the same runs.",
        "- bare Optuna: per candidate `study.enqueue_trial(params)`, `study.ask(50 "
        "FloatDistributions)`, `study.tell(trial, value)` (candidates from the same bare cma "
        "loop). evomerge: `Store` + the driver's `_search` + the worker's `process_one` with "
        "the cmaes strategy; only the merge and the model evaluation are replaced by the "
        "objective (a stand-in space decodes x into a real 50-number `MergeRecipe`).",
        f"- bare `cma` ask/tell, no storage: **{result['bare_cma_ms_per_trial']:.4f} ms/trial** "
        f"(n = {result['bare_cma_n']}).",
        "",
        "| storage | n | bare Optuna ms/trial | evomerge ms/trial | ratio | extra ms/trial "
        "| CPU ms/trial bare / evomerge (ratio) | <= 1.10x bare Optuna "
        "| round trips/trial: bare Optuna | evomerge |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for kind, e in result["storages"].items():
        lines.append(
            f"| {kind} | {e['n']} | {e['bare_optuna_ms_per_trial']:.2f} | "
            f"{e['evomerge_ms_per_trial']:.2f} | {e['ratio_vs_bare_optuna']:.3f} | "
            f"{e['extra_ms_per_trial']:+.2f} | {e['bare_optuna_cpu_ms_per_trial']:.2f} / "
            f"{e['evomerge_cpu_ms_per_trial']:.2f} ({e['cpu_ratio_vs_bare_optuna']:.3f}) | "
            f"{'met' if e['target_met'] else '**missed**'} | "
            f"{_roundtrips(kind, _calls(e, 'bare_optuna'))} | "
            f"{_roundtrips(kind, _calls(e, 'evomerge'))} |")
    counted = {k: e for k, e in result["storages"].items() if e.get("calls_per_trial")}
    if counted:
        api = {k: {p: {c: v for c, v in _calls(e, p).items() if c.startswith("api.")}
                   for p in ("bare_optuna", "evomerge")} for k, e in counted.items()}
        keys = sorted({c for a in api.values() for calls in a.values() for c in calls})
        lines += ["", "Storage API calls per trial, bare Optuna / evomerge (untimed counting pass "
                  "over " + ", ".join(f"{k} {e['calls_counted_over_n']}"
                                      for k, e in counted.items()) + " trials):", "",
                  "| call | " + " | ".join(counted) + " |",
                  "|---|" + "---:|" * len(counted)]
        for key in keys:
            lines.append(f"| `{key[4:]}` | " + " | ".join(
                f"{a['bare_optuna'].get(key, 0):.2f} / {a['evomerge'].get(key, 0):.2f}"
                for a in api.values()) + " |")
    if result.get("notes"):
        lines += ["", *result["notes"]]
    lines.append(END)
    return "\n".join(lines)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"small n ({N_QUICK}) instead of {N_FULL}, one repeat")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--storages", default=",".join(STORAGES),
                   help=f"comma-separated subset of {','.join(STORAGES)}")
    p.add_argument("--n", action="append", metavar="STORAGE=N",
                   help="override the number of evaluations for one storage (repeatable)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs of each loop per storage, best taken (default 2; 1 quick)")
    p.add_argument("--separate", action="store_true",
                   help="time the two loops in separate runs (alternating order) instead of "
                        "interleaved generation by generation")
    p.add_argument("--no-count", action="store_true", help="skip the call-counting pass")
    p.add_argument("--tmp-dir", type=Path, default=None,
                   help="where the SQLite/journal files go (default: the system temp dir; "
                        "e.g. /dev/shm to take disk sync latency out of the comparison)")
    p.add_argument("--profile", choices=STORAGES, default=None,
                   help="also cProfile both loops on this storage (stderr)")
    p.add_argument("--out-md", type=Path, default=None,
                   help="(re)write this benchmark's section of this markdown file")
    p.add_argument("--write-results", action="store_true",
                   help=f"same as --out-md {RESULTS_MD.relative_to(ROOT)}")
    p.add_argument("--note", action="append", default=[],
                   help="a line of text added under the table (repeatable)")
    p.add_argument("--from-json", type=Path, default=None,
                   help="skip the run: re-render the markdown (and --json) from a saved --json "
                        "output")
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.write_results and args.out_md is None:
        args.out_md = RESULTS_MD
    return args


def write_markdown(path: Path, section: str) -> None:
    from _results import write_section

    write_section(path, section, START, END)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/search_overhead.py " + shlex.join(
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
            write_markdown(args.out_md, markdown_section(result, result.get("command", "?")))
            log(f"wrote {args.out_md}")
    if args.json:
        print(json.dumps(_json_safe(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
