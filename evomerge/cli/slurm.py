"""``evomerge slurm submit``: a search on SLURM, an array of ``evomerge worker`` jobs plus its
driver (:mod:`evomerge.execution.slurm` writes and submits the scripts)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from evomerge.cli._common import console, err_console, fail
from evomerge.cli.run import run_and_report

app = typer.Typer(help="Run a search on SLURM: a driver plus an array of workers.",
                  rich_markup_mode="rich", no_args_is_help=True)


class DriverWhere(str, Enum):
    job = "job"
    here = "here"


_SBATCH = " \\[default: executor.slurm's, else sbatch's]"


@app.command("submit")
def slurm_submit(
    experiment_file: Path = typer.Argument(..., metavar="EXPERIMENT.yaml", show_default=False,
                                           help="Experiment YAML."),
    workers: int = typer.Option(..., "--workers", "-n", min=1, show_default=False,
                                help="Array tasks (one `evomerge worker` each)."),
    partition: str | None = typer.Option(None, "--partition", help=f"sbatch --partition.{_SBATCH}"),
    gres: str | None = typer.Option(None, "--gres", help="sbatch --gres (workers only), "
                                       f"e.g. gpu:1.{_SBATCH}"),
    time_limit: str | None = typer.Option(None, "--time", help=f"sbatch --time.{_SBATCH}"),
    mem: str | None = typer.Option(None, "--mem", help=f"sbatch --mem.{_SBATCH}"),
    account: str | None = typer.Option(None, "--account", help=f"sbatch --account.{_SBATCH}"),
    cpus_per_task: int | None = typer.Option(None, "--cpus-per-task", min=1,
                                                help=f"sbatch --cpus-per-task.{_SBATCH}"),
    storage: str | None = typer.Option(None, "--storage", help="Storage URL \\[default: the "
                                          "experiment's, else sqlite in the run directory]."),
    driver: DriverWhere = typer.Option(DriverWhere.job, "--driver", help="[bold]job[/bold]: "
                                       "submit the driver as a job too; [bold]here[/bold]: run "
                                       "it in this process after submitting the array."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the scripts; submit nothing."),
) -> None:
    """Submit a search: an array of N workers (slurm/worker.sbatch) and its driver
    (slurm/driver.sbatch, or here). sbatch options: the experiment's executor.slurm mapping,
    overridden by the flags (unset: sbatch's defaults). Scripts, logs and job ids go to
    RUN_DIR/slurm/ (RUN_DIR: the experiment's run_dir, default runs/NAME); the run's results go
    to RUN_DIR as with [green]evomerge run[/green]."""
    from evomerge.execution import slurm
    from evomerge.experiment import Experiment, ExperimentError

    flags = {"partition": partition, "gres": gres, "time": time_limit, "mem": mem,
             "account": account, "cpus-per-task": cpus_per_task}
    try:
        experiment = Experiment.from_yaml(experiment_file)
        options = slurm.sbatch_options(experiment.executor.slurm, flags)
        prepared = slurm.prepare(experiment, workers=workers, options=options, storage=storage)
    except (ExperimentError, ValueError, OSError) as exc:
        fail(exc)
    if prepared.storage.startswith("sqlite") and driver is DriverWhere.job:  # (here: it warns)
        err_console.print(f"[yellow]warning:[/yellow] {prepared.storage} serves workers on one "
                          "node only; for several nodes pass --storage journal:///PATH (a "
                          "shared filesystem) or postgresql://...", soft_wrap=True)
    if dry_run:
        print(f"# {prepared.folder}/worker.sbatch\n{prepared.worker_script}")
        if driver is DriverWhere.job:
            print(f"# {prepared.folder}/driver.sbatch\n{prepared.driver_script}")
        print(f"# dry run: nothing submitted (driver: {driver.value})")
        return
    try:
        jobs = slurm.submit(prepared, driver_job=driver is DriverWhere.job)
    except (ValueError, RuntimeError, OSError) as exc:
        fail(exc)
    for role, job in jobs.items():
        console.print(f"Submitted {role}: job {job}")
    console.print(f"Logs and scripts: [bold]{prepared.folder}[/bold]")
    if driver is DriverWhere.here:
        run_and_report(prepared.experiment, resume=False)
