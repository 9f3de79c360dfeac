"""SLURM execution (issue 7): `evomerge worker`, `evomerge slurm submit`, the SlurmExecutor.

The array-job tests run against a real single-node Slurm (``.ci/slurm.sh`` starts one in CI;
elsewhere they skip): a 4-task worker array serves a digits search whose driver runs in the
submitting process (``--driver here``) or as a job of its own (the default). The search is
deterministic and the driver tells whole generations in slot order, so the array must reproduce
the in-process run exactly, each slot evaluated once. The rendering, option and error tests need
no Slurm.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from run_helpers import (
    assert_exactly_budget,
    build_zoo,
    by_slot,
    cli,
    experiment_data,
    is_interrupted,
    kill_group,
    load_trials,
    run_cli,
    run_in_process,
    running_trials,
    start,
    wait_for_exit,
    wait_until,
    write_experiment,
)
from services import require

from evomerge.execution.slurm import sbatch_options
from evomerge.store import EXPERIMENT, OWNER

NAME, POPSIZE, BUDGET, WORKERS = "digits_cmaes", 8, 16, 4

# A digits fitness that sleeps in each search evaluation, so a trial is still running when the
# test cancels its worker. Registered in every Python process of the test (driver, array tasks:
# they inherit the environment through sbatch) by a sitecustomize module on PYTHONPATH.
SLOW_FITNESS = '''
import time

from evomerge.fitness.base import register
from evomerge.fitness.digits import DigitsFitness


@register("slow_digits")
class SlowDigits(DigitsFitness):
    def __init__(self, base_model, delay_s=0.0, **options):
        super().__init__(base_model, **options)
        self.delay_s = delay_s

    def evaluate(self, model, split="search"):
        if split == "search":
            time.sleep(self.delay_s)
        return super().evaluate(model, split)
'''


def _slurm_answers() -> bool:
    if not (shutil.which("sbatch") and shutil.which("sinfo")):
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, check=False)
    return out.returncode == 0 and bool(out.stdout.strip())


@pytest.fixture
def slurm():
    require(_slurm_answers(), "a running Slurm (sbatch, sinfo)")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.getbasetemp() / "digits-zoo")


def _experiment(zoo, tmp_path: Path, **changes) -> tuple[Path, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    run_dir = tmp_path / "run"
    data = experiment_data("cmaes", zoo, run_dir, budget=changes.pop("budget", BUDGET))
    data.update(changes)
    return write_experiment(tmp_path / "exp.yaml", data), run_dir


def _array_logs(run_dir: Path) -> dict[str, str]:
    return {p.name: p.read_text(errors="replace") for p in (run_dir / "slurm").glob("worker-*")}


def _squeue(job: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i"], capture_output=True, text=True,
                         check=False)
    return out.stdout.split()


def _reference(zoo, run_dir: Path) -> dict:
    """``{slot: (x, values)}`` of the uninterrupted in-process run a Slurm run must reproduce."""
    run_in_process(experiment_data("cmaes", zoo, run_dir, budget=BUDGET))
    return by_slot(load_trials(run_dir, NAME))


def _submit_here(exp: Path, log: Path) -> subprocess.Popen:
    return start(cli("slurm", "submit", exp, "--workers", WORKERS, "--driver", "here",
                     "--time", "10"), log)


def _cancel_leftovers(run_dir: Path) -> None:
    job_file = run_dir / "slurm" / "workers.jobid"
    if job_file.exists():
        subprocess.run(["scancel", job_file.read_text().strip()], check=False)


# ---- against a real Slurm -----------------------------------------------------------------------


@pytest.mark.slow
def test_worker_array_evaluates_each_slot_once_and_reproduces_the_in_process_run(
        slurm, zoo, tmp_path):
    reference = _reference(zoo, tmp_path / "reference")
    exp, run_dir = _experiment(zoo, tmp_path / "slurm")
    log = tmp_path / "submit.log"
    proc = _submit_here(exp, log)
    try:
        wait_for_exit(proc, run_dir, stall_s=30, timeout=120, what="slurm submit --driver here")
        assert proc.returncode == 0, log.read_text(errors="replace")[-3000:]
    finally:
        kill_group(proc)
        _cancel_leftovers(run_dir)

    trials = load_trials(run_dir, NAME)
    assert_exactly_budget(trials, BUDGET, POPSIZE)
    assert by_slot(trials) == reference
    # The array did the work: every trial names a worker, and several tasks served.
    served = Counter(t.system_attrs.get(OWNER) for t in trials)
    assert None not in served, "a trial was evaluated without a worker (by the driver?)"
    assert len(served) >= 2, f"one worker served everything: {served}"
    # Every task ended on its own once the driver marked the study finished.
    job = (run_dir / "slurm" / "workers.jobid").read_text().strip()
    wait_until(lambda: not _squeue(job), timeout=30, interval=0.5, what="the array to end")
    logs = _array_logs(run_dir)
    assert len(logs) == WORKERS
    total = sum(int(text.split("Served ")[1].split()[0]) for text in logs.values())
    assert total == BUDGET, logs


@pytest.mark.slow
def test_default_submit_runs_the_driver_as_a_job_and_reproduces_the_in_process_run(
        slurm, zoo, tmp_path):
    """``evomerge slurm submit`` as a user types it: the driver is a job too, the command
    returns once both jobs are queued, and the two jobs alone finish the run."""
    reference = _reference(zoo, tmp_path / "reference")
    exp, run_dir = _experiment(zoo, tmp_path / "slurm")
    jobs: dict[str, str] = {}
    try:
        done = run_cli(cli("slurm", "submit", exp, "--workers", WORKERS, "--time", "10"))
        assert done.returncode == 0, done.stdout + done.stderr
        jobs = dict(re.findall(r"Submitted (driver|workers): job (\d+)", done.stdout))
        assert set(jobs) == {"driver", "workers"}, done.stdout
        wait_until(lambda: not _squeue(jobs["driver"]) and not _squeue(jobs["workers"]),
                   timeout=300, interval=0.5, what="the driver and worker jobs to end")
    finally:
        _cancel_leftovers(run_dir)
        if "driver" in jobs:
            subprocess.run(["scancel", jobs["driver"]], check=False)

    driver_log = run_dir / "slurm" / f"driver-{jobs['driver']}.out"
    assert (run_dir / "summary.json").is_file(), driver_log.read_text(errors="replace")[-3000:]
    trials = load_trials(run_dir, NAME)
    assert_exactly_budget(trials, BUDGET, POPSIZE)
    assert by_slot(trials) == reference
    assert None not in Counter(t.system_attrs.get(OWNER) for t in trials)  # the array did it
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["n_trials"] == BUDGET and summary["n_failed"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("how", ["scancel", "kill -9"])
def test_a_cancelled_or_killed_task_loses_no_trial_and_the_run_keeps_the_budget(
        how, slurm, zoo, tmp_path, monkeypatch):
    """``scancel`` (SIGTERM): the worker gives its trial back itself. ``kill -9`` of the worker
    process: nothing is given back; its heartbeat stops and the driver's ``fail_stale`` returns
    the trial after ``grace_s``. Either way the slot is evaluated again, once, elsewhere."""
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "sitecustomize.py").write_text(SLOW_FITNESS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(plugin), *filter(None, [os.environ.get("PYTHONPATH")])]))
    budget = 2 * POPSIZE
    exp, run_dir = _experiment(zoo, tmp_path, budget=budget,
                               fitness={"name": "slow_digits", "delay_s": 1.5},
                               executor={"kind": "slurm", "workers": WORKERS,
                                         "heartbeat_s": 1.0, "grace_s": 5.0})
    log = tmp_path / "submit.log"
    proc = _submit_here(exp, log)
    try:
        # Aim at a trial a worker holds: its owner names the worker process, whose environment
        # names its array task.
        held: list = []

        def a_trial_is_held() -> bool:
            held[:] = [r for r in running_trials(run_dir, OWNER) if r[2]]
            return bool(held)

        wait_until(a_trial_is_held, timeout=60, interval=0.05, proc=proc, log=log,
                   what="a worker holding a trial")
        trial_id, _, owner = held[0]
        environ = Path(f"/proc/{owner.split(':')[1]}/environ").read_bytes().split(b"\0")
        env = dict(v.decode().split("=", 1) for v in environ if b"=" in v)
        task = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        if how == "scancel":
            subprocess.run(["scancel", task], check=True)
        else:
            os.kill(int(owner.split(":")[1]), signal.SIGKILL)

        wait_for_exit(proc, run_dir, stall_s=30, timeout=120, what=f"the run after {how}")
        assert proc.returncode == 0, log.read_text(errors="replace")[-3000:]
    finally:
        kill_group(proc)
        _cancel_leftovers(run_dir)

    trials = load_trials(run_dir, NAME)
    assert_exactly_budget(trials, budget, POPSIZE)
    cancelled = next(t for t in trials if t._trial_id == trial_id)
    assert cancelled.state == TrialState.FAIL and is_interrupted(cancelled), cancelled
    if how == "scancel":
        text = _array_logs(run_dir)[f"worker-{task}.out"]
        assert f"gave back: {cancelled.number}" in text, text[-2000:]
    # The slot it held was evaluated once, by someone else.
    again = [t for t in trials if t.user_attrs["evomerge"] == cancelled.user_attrs["evomerge"]
             and t.state == TrialState.COMPLETE]
    assert len(again) == 1 and again[0].system_attrs[OWNER] != owner


# ---- no Slurm needed ----------------------------------------------------------------------------


def test_dry_run_prints_both_scripts_with_the_merged_sbatch_options(zoo, tmp_path):
    exp, run_dir = _experiment(zoo, tmp_path, executor={
        "kind": "local", "slurm": {"partition": "from-experiment", "mem": "4G",
                                   "cpus_per_task": 2}})
    out = run_cli(cli("slurm", "submit", exp, "--workers", 3, "--partition", "gpu",
                      "--gres", "gpu:1", "--time", "01:00:00", "--dry-run"))
    assert out.returncode == 0, out.stderr
    worker, driver = out.stdout.split("/driver.sbatch\n")
    for line in ("#SBATCH --array=0-2", "#SBATCH --signal=B:TERM@60", "#SBATCH --requeue",
                 "#SBATCH --partition=gpu", "#SBATCH --gres=gpu:1", "#SBATCH --mem=4G",
                 "#SBATCH --cpus-per-task=2", "#SBATCH --time=01:00:00",
                 f"#SBATCH --output={run_dir / 'slurm'}/worker-%A_%a.out"):
        assert line in worker.splitlines(), line
    assert "from-experiment" not in out.stdout  # the flag overrides the experiment
    assert (f"worker --storage sqlite:///{run_dir / 'study.db'} --study {NAME}"
            in worker)
    assert "#SBATCH --partition=gpu" in driver.splitlines()
    assert "#SBATCH --no-requeue" in driver.splitlines()
    assert "--gres" not in driver  # the driver evaluates nothing: no GPU for it
    assert f"run {run_dir / 'slurm' / 'experiment.yaml'}" in driver
    assert "nothing submitted" in out.stdout and "one node only" in out.stderr
    assert not run_dir.exists()  # a dry run writes nothing
    for script in (worker, driver):  # the rendered scripts are valid bash
        body = script[script.index("#!/bin/bash"):]
        assert subprocess.run(["bash", "-n"], input=body, text=True, check=False).returncode == 0


def test_submit_rejects_options_it_sets_itself(zoo, tmp_path):
    exp, _ = _experiment(zoo, tmp_path, executor={"slurm": {"array": "0-99"}})
    out = run_cli(cli("slurm", "submit", exp, "--workers", 2, "--dry-run"))
    assert out.returncode == 2
    assert "executor.slurm: 'array' is set by `evomerge slurm submit`" in out.stderr


def test_sbatch_options_flags_override_the_experiment_and_spaces_are_refused():
    merged = sbatch_options({"partition": "a", "cpus_per_task": 4, "qos": "low"},
                            {"partition": "b", "time": None, "--mem": "8G"})
    assert merged == {"partition": "b", "cpus-per-task": "4", "qos": "low", "mem": "8G"}
    with pytest.raises(ValueError, match="without spaces"):
        sbatch_options({"account": "a b"}, {})
    with pytest.raises(ValueError, match="'output' is set by"):
        sbatch_options({}, {"output": "x.log"})


def _study_without_experiment(path: Path, name: str) -> str:
    url = f"sqlite:///{path}"
    optuna.create_study(storage=url, study_name=name)
    return url


def test_worker_on_a_missing_study_fails_with_a_clear_message(tmp_path):
    url = _study_without_experiment(tmp_path / "study.db", "other")
    out = run_cli(cli("worker", "--storage", url, "--study", NAME, "--wait", 0))
    assert out.returncode == 2
    assert f"no study '{NAME}' in {url}" in " ".join(out.stderr.split())

    missing = tmp_path / "nowhere" / "study.db"
    out = run_cli(cli("worker", "--storage", f"sqlite:///{missing}", "--study", NAME,
                      "--wait", 0.5, "--poll", 0.1))
    assert out.returncode == 2
    assert f"{missing} does not exist (waited 0.5 s" in " ".join(out.stderr.split())
    assert not missing.parent.exists()  # the worker created nothing


def test_worker_on_a_study_without_an_experiment_says_so(tmp_path):
    url = _study_without_experiment(tmp_path / "study.db", NAME)
    out = run_cli(cli("worker", "--storage", url, "--study", NAME, "--wait", 0))
    assert out.returncode == 2
    assert f"holds no experiment (attribute '{EXPERIMENT}')" in " ".join(out.stderr.split())


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (the SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def test_worker_waiting_for_its_driver_exits_0_on_sigterm(tmp_path):
    log = tmp_path / "worker.log"
    proc = start(cli("worker", "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--study",
                     NAME, "--wait", 60, "--poll", 0.1), log)
    try:
        wait_until(lambda: _catches_sigterm(proc.pid), timeout=60, interval=0.05, proc=proc,
                   log=log, what="the worker to install its SIGTERM handler")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.read_text()
    finally:
        kill_group(proc)
    assert "SIGTERM: stopped after 0 trials; gave back: none" in log.read_text()



def test_driver_stops_when_no_worker_job_is_left_and_counts_resubmitted_ones(slurm, zoo,
                                                                           tmp_path):
    from evomerge.execution.slurm import SlurmExecutor, worker_job_name
    from evomerge.experiment import Experiment

    exp, run_dir = _experiment(zoo, tmp_path, executor={"kind": "slurm", "workers": 1})
    experiment = Experiment.from_yaml(exp)
    executor = SlurmExecutor(experiment, {})
    executor._check_workers()
    executor._check_workers()  # nothing submitted by `slurm submit`: nothing to check

    (run_dir / "slurm").mkdir(parents=True)
    (run_dir / "slurm" / "worker.sbatch").write_text("#!/bin/bash\n")
    name = worker_job_name(NAME)
    job = subprocess.run(["sbatch", "--parsable", "-J", name, "-o", str(tmp_path / "w.out"),
                          "--wrap", "sleep 60"], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        for _ in range(3):  # a worker job (submitted by hand, by name) keeps the run alive
            executor._check_workers()
    finally:
        subprocess.run(["scancel", job], check=True)
    wait_until(lambda: not _squeue(job), timeout=30, interval=0.2, what="the job to end")
    executor._check_workers()  # once may be a requeue in passing
    with pytest.raises(RuntimeError, match=f"no worker job \\({name}\\) is left in squeue"):
        executor._check_workers()
