"""Shared code for the end-to-end run tests (resume, workers, dashboard).

These tests drive real ``evomerge`` processes on the digits zoo: they write experiment YAMLs with
absolute model paths and a run directory under pytest's tmp dirs, start ``evomerge run`` as a
subprocess, watch its SQLite study *read-only* (plain ``sqlite3`` in ``mode=ro``: a poll costs
well under a millisecond, so a kill lands within a trial of where it was aimed), SIGKILL it, and
read the finished study with Optuna.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from evomerge.execution.driver import run_experiment

REPO = Path(__file__).resolve().parents[1]
META = "evomerge"
RESULT = "result"
INTERRUPTED = "interrupted"


# ---- the zoo and experiments -------------------------------------------------------------------


def build_zoo(out: Path) -> dict[str, Path]:
    """The digits zoo (about 2 s), built in this process, or reused if ``out`` holds it (the
    test modules share one per session); ``{name: absolute directory}``."""
    from evomerge.zoo.digits import build_digits_zoo

    return {k: Path(v).absolute() for k, v in build_digits_zoo(out, seed=0, progress=False).items()}


def experiment_data(kind: str, zoo: dict[str, Path], run_dir: Path, *, budget: int,
                    seed: int = 0, workers: int = 0, export: bool = False) -> dict[str, Any]:
    """``experiments/digits_<kind>.yaml`` with absolute model paths, its run in ``run_dir``."""
    data = yaml.safe_load((REPO / "experiments" / f"digits_{kind}.yaml").read_text())
    data["models"] = {"base": str(zoo["base"]),
                      "sources": {name: str(zoo[name]) for name in data["models"]["sources"]}}
    data.update(budget=budget, seed=seed, run_dir=str(Path(run_dir).absolute()), export=export)
    if workers:
        data["executor"] = {"kind": "local", "workers": workers}
    return data


def write_experiment(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_in_process(data: dict[str, Any]) -> dict[str, Any]:
    """An uninterrupted run of ``data`` in this process; its summary."""
    from evomerge.experiment import Experiment

    return run_experiment(Experiment.from_dict(data), progress=False)


# ---- processes ---------------------------------------------------------------------------------


def cli(*args: Any) -> list[str]:
    return [sys.executable, "-m", "evomerge.cli", *map(str, args)]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(COLUMNS="200", PYTHONUNBUFFERED="1", NO_COLOR="1")
    return env


def _sigint_as_on_a_terminal() -> None:
    """In the child: SIGINT handled by default. Tests run in the background (``pytest &`` in a
    script) ignore SIGINT, as POSIX has shells start background commands, and children inherit
    that; a command tested for how it stops on Ctrl-C would then never see it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(args: list[str], log: Path) -> subprocess.Popen:
    """Start a command in its own session (so its children can be killed as a group), with
    stdout+stderr in ``log`` (a file, never a pipe that could fill up and block it), and Ctrl-C
    (SIGINT) as a terminal delivers it, however the tests were started."""
    handle = open(log, "wb")  # noqa: SIM115 - closed with the process by the caller's wait
    proc = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=subprocess_env(),
                            start_new_session=True, preexec_fn=_sigint_as_on_a_terminal)
    handle.close()
    return proc


def run_cli(args: list[str], *, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=subprocess_env(),
                          timeout=timeout)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started by :func:`start` and everything in its session."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def worker_pids(driver_pid: int) -> list[int]:
    """The driver's worker processes (multiprocessing spawn children, not its resource
    tracker)."""
    import psutil

    workers = []
    for child in psutil.Process(driver_pid).children():
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "spawn_main" in cmdline and "resource_tracker" not in cmdline:
            workers.append(child.pid)
    return workers


def wait_until(predicate: Callable[[], bool], *, timeout: float, interval: float = 0.002,
               proc: subprocess.Popen | None = None, log: Path | None = None,
               what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail if ``proc`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n"
                                 + (log.read_text(errors="replace")[-3000:] if log else ""))
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                                 + (":\n" + log.read_text(errors="replace")[-3000:] if log else ""))
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- the study ---------------------------------------------------------------------------------


def db_path(run_dir: Path) -> Path:
    return Path(run_dir) / "study.db"


def state_counts(run_dir: Path) -> Counter:
    """Trial states in the run's SQLite study, read-only; empty while it does not exist yet."""
    path = db_path(run_dir)
    if not path.exists():
        return Counter()
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            return Counter(dict(con.execute("SELECT state, COUNT(*) FROM trials GROUP BY state")))
        finally:
            con.close()
    except sqlite3.OperationalError:  # no tables yet, or locked for a moment by a writer
        return Counter()


def running_trials(run_dir: Path, owner_key: str) -> list[tuple[int, int, str | None]]:
    """``(trial_id, number of params written, owner system attribute or None)`` of each RUNNING
    trial, read-only."""
    path = db_path(run_dir)
    if not path.exists():
        return []
    query = ("SELECT t.trial_id, (SELECT COUNT(*) FROM trial_params p WHERE p.trial_id = "
             "t.trial_id), (SELECT a.value_json FROM trial_system_attributes a WHERE "
             "a.trial_id = t.trial_id AND a.key = ?) FROM trials t WHERE t.state = 'RUNNING'")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            rows = con.execute(query, (owner_key,)).fetchall()
        finally:
            con.close()
    except sqlite3.OperationalError:
        return []
    return [(tid, n, None if owner is None else json.loads(owner)) for tid, n, owner in rows]


def owners(run_dir: Path, owner_key: str) -> set[str]:
    """Every value of the system attribute ``owner_key`` in the study (the workers that claimed
    a trial), read-only."""
    path = db_path(run_dir)
    if not path.exists():
        return set()
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            rows = con.execute("SELECT DISTINCT value_json FROM trial_system_attributes "
                               "WHERE key = ?", (owner_key,)).fetchall()
        finally:
            con.close()
    except sqlite3.OperationalError:
        return set()
    return {json.loads(v) for (v,) in rows}


def wait_for_exit(proc: subprocess.Popen, run_dir: Path, *, stall_s: float, timeout: float,
                  what: str) -> None:
    """Wait for ``proc`` to exit; fail if the study's trial states stop changing for
    ``stall_s`` seconds (a hang) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last, since = state_counts(run_dir), time.monotonic()
    while proc.poll() is None:
        now = time.monotonic()
        counts = state_counts(run_dir)
        if counts != last:
            last, since = counts, now
        elif now - since > stall_s:
            raise AssertionError(f"{what}: the run hangs, its trials stuck at {dict(counts)} for "
                                 f"{stall_s} s")
        if now > deadline:
            raise AssertionError(f"{what}: the run did not end within {timeout} s "
                                 f"(trials {dict(counts)})")
        time.sleep(0.1)


def duplicated_slots(run_dir: Path) -> list[tuple[int, int]]:
    """Slots that hold more than one trial not marked interrupted (in any state: a slot enqueued
    twice is already a double evaluation in the making), read-only."""
    path = db_path(run_dir)
    if not path.exists():
        return []
    query = ("SELECT m.value_json, r.value_json FROM trial_user_attributes m "
             "LEFT JOIN trial_user_attributes r ON r.trial_id = m.trial_id AND r.key = ? "
             "WHERE m.key = ?")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            rows = con.execute(query, (RESULT, META)).fetchall()
        finally:
            con.close()
    except sqlite3.OperationalError:
        return []
    seen: Counter = Counter()
    for meta, result in rows:
        if result is not None and json.loads(result).get("error") == INTERRUPTED:
            continue
        meta = json.loads(meta)
        seen[int(meta["generation"]), int(meta["index"])] += 1
    return sorted(s for s, n in seen.items() if n > 1)


def load_trials(run_dir: Path, study_name: str) -> list[FrozenTrial]:
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{db_path(run_dir)}")
    return study.get_trials(deepcopy=False)


def slot(trial: FrozenTrial) -> tuple[int, int]:
    meta = trial.user_attrs[META]
    return int(meta["generation"]), int(meta["index"])


def is_interrupted(trial: FrozenTrial) -> bool:
    return trial.user_attrs.get(RESULT, {}).get("error") == INTERRUPTED


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Finished, non-interrupted trials: the evaluations a run counts against its budget."""
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)
            and not is_interrupted(t)]


def assert_exactly_budget(trials: list[FrozenTrial], budget: int, popsize: int) -> None:
    """(a) exactly ``budget`` counted trials; (b) each slot counted once, the slots of each
    generation contiguous from 0 (full generations of ``popsize`` but the last); nothing left
    queued or failed."""
    done = counted(trials)
    slots = Counter(slot(t) for t in done)
    twice = {s: n for s, n in slots.items() if n > 1}
    assert not twice, f"slots evaluated more than once (slot: count): {twice}"
    assert len(done) == budget, (f"{len(done)} counted trials, budget {budget}; states "
                                 f"{Counter(t.state.name for t in trials)}")
    sizes = Counter(g for g, _ in slots)
    assert sorted(sizes) == list(range(len(sizes))), f"generations {sorted(sizes)}"
    for g, n in sizes.items():
        assert {i for gg, i in slots if gg == g} == set(range(n)), f"generation {g}"
        assert n == popsize or g == len(sizes) - 1, f"generation {g} has {n} slots"
    left = [t.number for t in trials if not t.state.is_finished()]
    assert not left, f"trials left WAITING/RUNNING after the run: {left}"
    for t in trials:
        if t.state == TrialState.FAIL and not is_interrupted(t):
            raise AssertionError(f"trial {t.number} failed: {t.user_attrs.get(RESULT)}")


def by_slot(trials: list[FrozenTrial]) -> dict[tuple[int, int], tuple[list[float], list[float]]]:
    """``{slot: (x, values)}`` of the counted trials: a run's whole trajectory."""
    out = {}
    for t in counted(trials):
        params = t.params or t.system_attrs.get("fixed_params", {})
        x = [params[k] for k in sorted(params)]  # any fixed order: runs are compared
        out[slot(t)] = (x, list(t.values or []))
    return out
