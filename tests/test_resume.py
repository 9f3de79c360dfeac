"""Resume after a real ``kill -9`` (DESIGN decision 3, issue 4 item 5).

A real ``evomerge run`` subprocess is SIGKILLed at chosen moments, then ``evomerge resume``
finishes it; chains of kills also kill the resumes themselves. The kill points: the first trial,
mid-generation (a trial RUNNING), a generation boundary, the last generation, after the last trial
(while the summary is being written), and right after the first generation was enqueued (only
WAITING trials). Each resumed run must end with exactly ``budget`` counted trials (finished and not
marked interrupted), every slot (generation, index) evaluated once, and -- the digits fitness
being deterministic -- the very trajectory (every slot's ``x`` and values), best value and best
recipe of an uninterrupted run with the same seed, for CMA-ES and NSGA-II.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from evomerge.cli import app
from run_helpers import (
    assert_exactly_budget,
    build_zoo,
    by_slot,
    cli,
    duplicated_slots,
    experiment_data,
    is_interrupted,
    kill_group,
    load_trials,
    run_cli,
    run_in_process,
    start,
    state_counts,
    wait_until,
    write_experiment,
)

pytestmark = pytest.mark.slow

POPSIZE = {"cmaes": 8, "nsga2": 16}  # as in experiments/digits_*.yaml
BUDGET = {"cmaes": 36, "nsga2": 48}  # 4.5 and 3 generations
NAME = {"cmaes": "digits_cmaes", "nsga2": "digits_nsga2"}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.getbasetemp() / "digits-zoo")


@pytest.fixture(scope="module")
def reference(zoo, tmp_path_factory):
    """Uninterrupted in-process runs, one per strategy, computed on first use:
    ``kind -> (run_dir, summary, {slot: (x, values)})``."""
    cache: dict[str, tuple[Path, dict, dict]] = {}

    def get(kind: str) -> tuple[Path, dict, dict]:
        if kind not in cache:
            run_dir = tmp_path_factory.mktemp(f"reference_{kind}") / "run"
            summary = run_in_process(experiment_data(kind, zoo, run_dir, budget=BUDGET[kind]))
            cache[kind] = run_dir, summary, by_slot(load_trials(run_dir, NAME[kind]))
        return cache[kind]

    return get


@dataclass(frozen=True)
class Kills:
    """A chain of kills: ``evomerge run`` is SIGKILLed when ``points[0](state counts)`` first
    holds, then each ``evomerge resume`` at the next point, and a last resume runs to the end.
    With ``group`` the driver's workers are killed with it (the machine went down)."""

    kind: str
    points: tuple[Callable[[Counter], bool], ...]
    workers: int = 0
    group: bool = False


def _complete(n: int, running: bool = False) -> Callable[[Counter], bool]:
    """At least ``n`` trials complete (and, with ``running``, one being evaluated: the kill
    lands mid-trial and leaves it RUNNING)."""
    return lambda c: c["COMPLETE"] >= n and (not running or c["RUNNING"] >= 1)


KILLS = {
    # cmaes, popsize 8, budget 36: generations end at 8, 16, 24, 32 and 36 trials.
    # The run is killed at the first sight of an enqueued trial (in the middle of enqueuing the
    # first generation), its resume on a generation boundary (the generation told, the next not
    # yet enqueued).
    "cmaes-enqueuing,generation-boundary": Kills("cmaes", (
        lambda c: c["WAITING"] >= 1, _complete(16))),
    # Killed during the second trial (the first complete), in the partial last generation, and
    # after the last trial, while the summary is being written.
    "cmaes-first-trial,last-generation,after-last-trial": Kills(
        "cmaes", (_complete(1, running=True), _complete(34, running=True), _complete(36))),
    # nsga2, popsize 16, budget 48.
    "nsga2-mid-generation": Kills("nsga2", (_complete(20, running=True),)),
    # One worker process: it needs seconds to start, so the first generation sits enqueued
    # (WAITING, nothing popped) long enough to kill the driver and its worker right there.
    "cmaes-only-waiting": Kills("cmaes", (lambda c: c == Counter(WAITING=8),), workers=1,
                                group=True),
}


def _kill_when(args: list[str], run_dir: Path, log: Path, group: bool,
               when: Callable[[Counter], bool]) -> tuple[Counter, bool]:
    """Start ``args`` and SIGKILL it once ``when(state counts)`` holds; returns the counts after
    and whether the kill landed. It may not: a process can finish on its own between the poll
    that sees the point and the kill (a point after the last trial, at any machine speed), and
    only then may it have exited before the kill, cleanly and with the point reached."""
    proc = start(args, log)
    try:
        wait_until(lambda: proc.poll() is not None or when(state_counts(run_dir)), timeout=90,
                   log=log, what="the kill point")
        # The poll above reaps a process that exited on its own (returncode set): killing its
        # pid then raises ProcessLookupError (seen under load). Unreaped, it is alive or a
        # zombie, which the kill reaches safely.
        if proc.returncode is None:
            (os.killpg if group else os.kill)(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        landed = state_counts(run_dir)
        assert when(landed), (f"process exited ({proc.returncode}) before the kill point:\n"
                              + log.read_text(errors="replace")[-3000:])
        assert proc.returncode in (-signal.SIGKILL, 0), log.read_text(errors="replace")[-3000:]
    finally:
        kill_group(proc)
    return landed, proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("chain", list(KILLS))
def test_kill_9_then_resume_matches_an_uninterrupted_run(chain, zoo, reference, tmp_path):
    kills = KILLS[chain]
    kind, budget, popsize = kills.kind, BUDGET[kills.kind], POPSIZE[kills.kind]
    run_dir = tmp_path / "run"
    exp = write_experiment(tmp_path / "exp.yaml", experiment_data(
        kind, zoo, run_dir, budget=budget, workers=kills.workers))

    running_at_kills = 0
    for i, when in enumerate(kills.points):
        args = cli("run", exp) if i == 0 else cli("resume", run_dir)
        landed, killed = _kill_when(args, run_dir, tmp_path / f"{i}.log", kills.group, when)
        print(f"{chain}: kill {i} {'landed' if killed else 'came after the exit'} on "
              f"{dict(landed)}")
        assert when(landed)  # nothing moved after the kill
        assert killed or (run_dir / "summary.json").exists()  # it ended by finishing the run
        if (run_dir / "summary.json").exists():
            # Only a kill aimed after the last trial can land this late: the driver wrote the
            # summary (and maybe exited) within the watcher's reaction time. Resuming a run
            # that already finished is still resumed and checked below; drop the summary so
            # the check proves the resume wrote it again.
            assert i == len(kills.points) - 1, f"kill {i} landed after the run finished"
            assert landed["WAITING"] == landed["RUNNING"] == 0
            (run_dir / "summary.json").unlink()
        running_at_kills += landed["RUNNING"]

    result = run_cli(cli("resume", run_dir))
    assert result.returncode == 0, result.stdout + result.stderr

    trials = load_trials(run_dir, NAME[kind])
    # (a), (b): exactly the budget, each slot once, nothing left queued.
    assert_exactly_budget(trials, budget, popsize)
    # Trials left RUNNING by the kills are marked FAIL(interrupted), never counted.
    interrupted = [t for t in trials if is_interrupted(t)]
    assert len(interrupted) == running_at_kills
    assert all(t.state.name == "FAIL" for t in interrupted)
    # (c): the same trajectory, best value and best recipe as the uninterrupted run.
    _, ref_summary, ref_slots = reference(kind)
    assert by_slot(trials) == ref_slots
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best"]["objectives"] == ref_summary["best"]["objectives"]
    assert summary["best"]["recipe"] == ref_summary["best"]["recipe"]
    if kind == "nsga2":
        front = sorted(tuple(p["objectives"].values()) for p in summary["pareto"])
        assert front == sorted(tuple(p["objectives"].values()) for p in ref_summary["pareto"])
    # (d): the summary counts the budget, interrupted trials excluded.
    assert summary["n_trials"] == budget
    assert summary["n_failed"] == 0
    assert summary["budget"] == budget
    # Provenance keeps every start: the run, then one resume per kill.
    starts = json.loads((run_dir / "provenance.json").read_text())["starts"]
    assert [s["resumed"] for s in starts] == [False] + [True] * len(kills.points)


def test_resume_of_a_complete_run_evaluates_nothing_and_rewrites_the_summary(reference):
    from evomerge.experiment import Experiment

    run_dir, ref_summary, _ = reference("cmaes")
    before = [(t.number, t.state, t.values) for t in load_trials(run_dir, NAME["cmaes"])]
    (run_dir / "summary.json").unlink()

    summary = Experiment.from_yaml(run_dir / "experiment.yaml").run(resume=True, progress=False)

    after = [(t.number, t.state, t.values) for t in load_trials(run_dir, NAME["cmaes"])]
    assert after == before
    written = json.loads((run_dir / "summary.json").read_text())
    assert written["n_trials"] == summary["n_trials"] == BUDGET["cmaes"]
    assert written["best"] == ref_summary["best"]


def test_run_refuses_a_run_dir_that_holds_trials_and_points_to_resume(reference, tmp_path):
    run_dir, _, _ = reference("cmaes")
    before = len(load_trials(run_dir, NAME["cmaes"]))
    summary_before = (run_dir / "summary.json").read_bytes()

    result = CliRunner().invoke(app, ["run", str(run_dir / "experiment.yaml")])

    assert result.exit_code == 2, result.output
    assert "evomerge resume" in result.output
    assert str(run_dir) in result.output.replace("\n", "")
    assert len(load_trials(run_dir, NAME["cmaes"])) == before
    assert (run_dir / "summary.json").read_bytes() == summary_before


def test_resume_refuses_a_run_whose_driver_is_alive(zoo, tmp_path):
    """Regression test (failed at commit c6573f8).

    ``evomerge resume`` on a run whose driver is still running (a second terminal, a batch job
    requeued while the first still runs) must refuse (exit 2) and leave the live run alone.
    Nothing marked a run as driven: the second driver marked the live one's RUNNING trial
    FAIL(interrupted), replayed, and then both drivers enqueued and evaluated the same slots --
    e.g. 416 counted trials for a budget of 240, every slot of the later generations twice --
    or the live driver died on "Trial#N has already finished and can not be updated".
    """
    run_dir = tmp_path / "run"
    exp = write_experiment(tmp_path / "exp.yaml", experiment_data(
        "cmaes", zoo, run_dir, budget=400))  # long enough to still be running: ~20 s
    live = start(cli("run", exp), tmp_path / "run.log")
    second = None
    try:
        wait_until(lambda: state_counts(run_dir)["COMPLETE"] >= 8, timeout=90, proc=live,
                   log=tmp_path / "run.log", what="eight complete trials")
        second = start(cli("resume", run_dir), tmp_path / "resume.log")
        deadline, twice = time.monotonic() + 60, []
        while (second.poll() is None and live.poll() is None and not twice
               and time.monotonic() < deadline):
            twice = duplicated_slots(run_dir)
            time.sleep(0.05)
        twice = twice or duplicated_slots(run_dir)
        resume_log = (tmp_path / "resume.log").read_text(errors="replace")[-2000:]
        assert not twice, (f"a second driver on a live run: slots enqueued twice {twice[:6]}"
                           f"{' ...' if len(twice) > 6 else ''}")
        assert live.poll() is None, ("the live run died when it was resumed beside it:\n"
                                     + (tmp_path / "run.log").read_text(errors="replace")[-2000:])
        assert second.poll() == 2, f"resume of a live run: exit {second.poll()}\n{resume_log}"
    finally:
        for proc in (live, second):
            if proc is not None:
                kill_group(proc)
