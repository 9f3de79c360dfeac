"""SLURM execution: an array job of ``evomerge worker`` tasks serves the run's store (the queue).

The driver side (:class:`SlurmExecutor`, ``executor: {kind: slurm}``) evaluates nothing: while
array tasks pop and score the generation's trials, it polls the store, and it returns the trials
of workers that stopped heart-beating (kill -9, a lost node) to the queue with
``Store.fail_stale``. A task that is cancelled, preempted or reaches its time limit gets SIGTERM
first and gives its trial back itself (:func:`evomerge.execution.worker.serve`).

The submit side renders ``slurm/worker.sbatch`` (the array) and ``slurm/driver.sbatch`` (``evomerge
run`` on the experiment with ``executor.kind`` set to slurm) and submits them with ``sbatch
--parsable``; ``evomerge slurm submit`` is the command line over :func:`prepare` and :func:`submit`.
The rendered scripts, the driver's experiment and the array's job id go to ``RUN_DIR/slurm/``.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.execution.worker import Executor, storage_file
from evomerge.experiment import Executor as ExecutorConfig
from evomerge.experiment import Experiment
from evomerge.store import Store, open_storage, storage_url

#: Where the sbatch templates live (a repository folder, next to experiments/).
TEMPLATES = Path(__file__).resolve().parents[2] / "slurm"
#: The worker array's job id, written by :func:`submit` into ``RUN_DIR/slurm/``.
WORKER_JOB_FILE = "workers.jobid"
#: sbatch options the templates set themselves; an experiment or flag may not override them.
RESERVED = frozenset({"array", "job-name", "output", "error", "open-mode", "signal", "requeue",
                      "no-requeue", "dependency", "parsable", "wrap", "chdir"})
#: Options that size the workers' devices: the driver job does not get them.
WORKER_ONLY = frozenset({"gres", "gpus", "gpus-per-node", "gpus-per-task", "gpus-per-socket",
                         "cpus-per-gpu", "mem-per-gpu", "gpu-bind"})


class SlurmExecutor(Executor):
    """Waits for each generation while the worker array evaluates it (see the module doc)."""

    poll_s = 0.25  # how often the driver reads the generation's trials
    check_s = 10.0  # how often it asks squeue whether the worker array still exists

    def __init__(self, experiment: Experiment, store_args: dict[str, Any]) -> None:
        super().__init__(experiment, store_args)
        self._folder = Path(experiment.run_path) / "slurm"
        self._missing = 0  # consecutive squeue checks that found no worker task

    def run(self, store: Store, done: Callable[[], bool], tick: Callable[..., None]) -> None:
        """Return once ``done()``; ``tick()`` after each poll. Trials of silent workers go back
        to the queue (the driver's store carries ``executor.heartbeat_s`` and ``grace_s``); a
        worker array that has left squeue while trials wait ends the run."""
        stale_s = min(1.0, self.experiment.executor.heartbeat_s)
        last_stale = last_check = time.monotonic()
        while not done():
            now = time.monotonic()
            if now - last_stale >= stale_s:
                store.fail_stale()
                last_stale = now
            if now - last_check >= self.check_s:
                self._check_workers()
                last_check = now
            time.sleep(self.poll_s)
            tick()

    def _check_workers(self) -> None:
        """Jobs are found by name, so workers resubmitted by hand (``sbatch worker.sbatch``)
        count too. Runs whose workers were not submitted by ``evomerge slurm submit`` (no
        rendered script) or where squeue is missing are not checked."""
        if not (self._folder / "worker.sbatch").exists() or shutil.which("squeue") is None:
            return
        name = worker_job_name(self.experiment.name)
        if worker_tasks(name):
            self._missing = 0
            return
        self._missing += 1
        if self._missing >= 2:  # twice in a row: not a requeue in passing
            raise RuntimeError(
                f"no worker job ({name}) is left in squeue while trials wait; see the logs in "
                f"{self._folder}. Continue with `evomerge resume {self._folder.parent}` and start "
                f"workers again: `sbatch {self._folder}/worker.sbatch`")

    def close(self, store: Store) -> None:
        """Mark the study finished: workers exit once the queue is empty."""
        store.set_finished(True)


def worker_job_name(study: str) -> str:
    """The job name of a run's worker array (how the driver finds its workers in squeue)."""
    return f"evomerge-worker-{study}"


def worker_tasks(name: str) -> list[str]:
    """This user's tasks of jobs named ``name`` that squeue lists (pending or running)."""
    out = subprocess.run(["squeue", "-h", "--me", "-n", name, "-o", "%i"], capture_output=True,
                         text=True, check=False)
    return out.stdout.split() if out.returncode == 0 else []


# ---- submission --------------------------------------------------------------------------------


def sbatch_options(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, str]:
    """sbatch options: the experiment's ``executor.slurm`` mapping, then the command line's flags
    (None = not given). Keys as sbatch spells them (``cpus_per_task`` -> ``cpus-per-task``)."""
    merged: dict[str, str] = {}
    for where, mapping in (("executor.slurm", defaults), ("command line", overrides)):
        for key, value in mapping.items():
            if value is None:
                continue
            name = str(key).removeprefix("--").replace("_", "-")
            if name in RESERVED:
                raise ValueError(f"{where}: {key!r} is set by `evomerge slurm submit` itself "
                                 f"(reserved: {', '.join(sorted(RESERVED))})")
            text = str(value)
            if not text or any(c.isspace() for c in text):
                raise ValueError(f"{where}: {key} = {value!r}: sbatch option values must be "
                                 "non-empty and without spaces")
            merged[name] = text
    return merged


def _option_lines(options: Mapping[str, str]) -> str:
    return "\n".join(f"#SBATCH --{k}={v}" for k, v in options.items()) or "# (none)"


@dataclass(frozen=True)
class Prepared:
    """What :func:`submit` writes and submits: the scripts and the driver's experiment."""

    run_dir: Path
    storage: str
    experiment: Experiment  # the driver's: executor.kind slurm, storage set, paths absolute
    worker_script: str
    driver_script: str

    @property
    def folder(self) -> Path:
        return self.run_dir / "slurm"


def prepare(experiment: Experiment, *, workers: int, options: Mapping[str, str],
            storage: str | None = None, poll_s: float = 0.5, signal_s: int = 60,
            python: str = sys.executable, workdir: Path | None = None) -> Prepared:
    """Render both scripts for ``experiment`` (no side effects). ``storage`` default: the
    experiment's, else SQLite in the run directory. Workers get SIGTERM ``signal_s`` before
    their time limit: ample to give a trial back (one storage write)."""
    if workers < 1:
        raise ValueError(f"workers: {workers}; an array needs at least one task")
    url = storage or storage_url(experiment.storage, experiment.run_path)
    executor = ExecutorConfig.model_validate({**experiment.executor.model_dump(), "kind": "slurm",
                                        "workers": workers, "slurm": dict(options)})
    driver_experiment = experiment.resolved().model_copy(
        update={"executor": executor, "storage": url})
    run_dir = driver_experiment.run_path
    folder = run_dir / "slurm"
    common = {"log_dir": shlex.quote(str(folder)), "python": shlex.quote(python),
              "workdir": shlex.quote(str(workdir or Path.cwd()))}
    worker = (TEMPLATES / "worker.sbatch").read_text().format(
        **common, last_task=workers - 1, job_name=worker_job_name(experiment.name),
        signal_s=signal_s, options=_option_lines(options),
        storage=shlex.quote(url), study=shlex.quote(experiment.name), poll_s=poll_s)
    driver = (TEMPLATES / "driver.sbatch").read_text().format(
        **common, job_name=f"evomerge-driver-{experiment.name}",
        options=_option_lines({k: v for k, v in options.items() if k not in WORKER_ONLY}),
        experiment=shlex.quote(str(folder / "experiment.yaml")))
    return Prepared(run_dir, url, driver_experiment, worker, driver)


def existing_trials(url: str, study: str) -> int:
    """How many trials ``study`` already holds at ``url`` (0 when neither exists): a new run
    must not be submitted over an old one."""
    path = storage_file(url)
    if path is not None and not path.exists():
        return 0
    storage = open_storage(url)
    try:
        study_id = storage.get_study_id_from_name(study)
    except KeyError:
        return 0
    return len(storage.get_all_trials(study_id, deepcopy=False))


def sbatch(script: Path, *extra: str) -> str:
    """Submit ``script``; its job id. RuntimeError with sbatch's message when it refuses."""
    if shutil.which("sbatch") is None:
        raise RuntimeError("sbatch not found: submit from a Slurm login node (or use --dry-run "
                           "to see the scripts)")
    out = subprocess.run(["sbatch", "--parsable", *extra, str(script)], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"sbatch {script} failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip().split(";")[0]


def submit(prepared: Prepared, *, driver_job: bool) -> dict[str, str]:
    """Write the scripts and the driver's experiment under ``RUN_DIR/slurm/`` and submit them:
    ``{"workers": id}`` plus ``"driver": id`` with ``driver_job``. The array then depends on the
    driver having started (``--dependency=after``), so workers never wait on a queued driver."""
    count = existing_trials(prepared.storage, prepared.experiment.name)
    if count:
        raise ValueError(f"{prepared.storage} already holds {count} trials of study "
                         f"{prepared.experiment.name!r}: continue it with `evomerge resume "
                         f"{prepared.run_dir}`, or remove it")
    folder = prepared.folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "experiment.yaml").write_text(prepared.experiment.to_yaml())
    (folder / "worker.sbatch").write_text(prepared.worker_script)
    (folder / "driver.sbatch").write_text(prepared.driver_script)
    jobs: dict[str, str] = {}
    extra: list[str] = []
    if driver_job:
        jobs["driver"] = sbatch(folder / "driver.sbatch")
        extra = [f"--dependency=after:{jobs['driver']}"]
    jobs["workers"] = sbatch(folder / "worker.sbatch", *extra)
    (folder / WORKER_JOB_FILE).write_text(jobs["workers"] + "\n")
    return jobs
