"""``evomerge run | resume | worker``: a merge search from its experiment YAML, its continuation
after a kill, and a worker serving a run's queue from anywhere its storage reaches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from evomerge.cli._common import console, fail, progress_bar

if TYPE_CHECKING:
    from evomerge.experiment import Experiment

HELP = (
    "Run a merge search described by an experiment YAML.\n\n"
    "The experiment names the models (base + sources), a search space (a catalog name from "
    "search_spaces/, an inline mapping, kind: dfs for a layer path through the sources' "
    "blocks, or kind: weights for M2N2's crossover of the sources' flattened weights), a "
    "fitness, a strategy (cmaes, nsga2, optuna, random, map, m2n2) "
    "and a budget of evaluations. Every candidate is recorded in an Optuna study "
    "(default sqlite at runs/NAME/study.db) before it is evaluated; the run directory receives "
    "summary.json, best_recipe.yaml (mergekit format), the exported best model (best_model/) "
    "and PNG plots. The whole file is checked before any compute; a run directory that already "
    "holds trials is refused.\n\n"
    "Killed runs continue with [green]evomerge resume runs/NAME[/green]; "
    "[green]evomerge dashboard runs/NAME[/green] shows the trials, also while it runs.\n\n"
    "A from-scratch config (a [bold]setting:[/bold] key instead of models/space, e.g. "
    "experiments/digits_m2n2_scratch.yaml) runs each of its [bold]seeds[/bold] in its own process "
    "in RUN_DIR/seed_<s>/; summary.json holds each seed's held-out accuracy, wall time and peak "
    "RSS, and the mean and std over the seeds."
)


def run_and_report(experiment: Experiment, resume: bool) -> None:
    """Run (or resume) ``experiment`` through :mod:`evomerge.api` and print its summary; a bad
    experiment or checkpoint exits 2, a run that fails on the way exits 1."""
    from evomerge import api
    from evomerge.experiment import ExperimentError
    from evomerge.merge.checkpoints import CheckpointError
    from evomerge.report import SUMMARY, print_summary

    try:
        summary = (api.resume(experiment.run_path, progress=True) if resume
                   else api.run(experiment, progress=True))
    except (ExperimentError, CheckpointError) as exc:
        fail(exc)
    except RuntimeError as exc:
        fail(exc, 1)
    # the table is of summary.json as the run wrote it (fields the typed Summary leaves out too)
    print_summary(json.loads((summary.run_dir / SUMMARY).read_text()), console)
    console.print(f"Run directory: [bold]{experiment.run_path}[/bold]")


def run(
    experiment_file: Path = typer.Argument(..., metavar="EXPERIMENT.yaml", show_default=False,
                                           help="Experiment YAML."),
    budget: int | None = typer.Option(None, "--budget", min=1, show_default=False,
                                         help="Evaluations to run \\[default: the experiment's "
                                              "budget]."),
    budget_items: int | None = typer.Option(
        None, "--budget-items", min=1, show_default=False,
        help="Also stop starting generations once the run spent this many item evaluations "
             "(an IRT reduction's calibration included), so cheap reduced candidates buy more "
             "search \\[default: the experiment's budget_items, else no cap]."),
    seed: int | None = typer.Option(None, "--seed", show_default=False,
                                       help="Seed of the strategy \\[default: the experiment's "
                                            "seed]."),
    run_dir: Path | None = typer.Option(None, "--run-dir", show_default=False,
                                           help="Where to write the run \\[default: the "
                                                "experiment's run_dir, else runs/NAME]."),
) -> None:
    """Run a merge search described by an experiment YAML."""
    from evomerge.reproductions.scratch import scratch_config
    from evomerge.experiment import Experiment, ExperimentError

    scratch = scratch_config(experiment_file)
    if scratch is not None:  # a from-scratch config (`setting:`), not a merge
        if budget_items is not None:
            fail(ValueError("--budget-items: a from-scratch config scores no items to count; "
                            "use --budget"))
        if budget is not None:
            scratch["budget"] = budget
        if seed is not None:
            scratch.pop("seeds", None)
            scratch["seed"] = seed
        _run_scratch(scratch, run_dir=run_dir, resume=False, where=str(experiment_file))
        return
    try:
        experiment = Experiment.from_yaml(experiment_file, budget=budget, seed=seed,
                                          budget_items=budget_items,
                                          run_dir=str(run_dir) if run_dir else None)
    except ExperimentError as exc:
        fail(exc)
    run_and_report(experiment, resume=False)


def resume(run_dir: Path = typer.Argument(..., metavar="RUN_DIR", show_default=False,
                                          help="A run directory, e.g. runs/digits_cmaes.")) -> None:
    """Continue a run that was interrupted: replay the stored trials into the seeded strategy
    and evaluate only what is missing; the run ends with exactly the budgeted trials (or where
    the run's budget_items ends it, as the interrupted run would have).

    The experiment is RUN_DIR/experiment.yaml (written by [green]evomerge run[/green]); the
    trials go to the run's study and the summary, recipe, best model and plots to RUN_DIR, as
    [green]evomerge run[/green] writes them. From-scratch runs resume each seed's journal."""
    from evomerge.reproductions.scratch import scratch_config
    from evomerge.experiment import Experiment, ExperimentError

    scratch = scratch_config(run_dir / "experiment.yaml")
    if scratch is not None:
        _run_scratch(scratch, run_dir=run_dir, resume=True,
                     where=str(run_dir / "experiment.yaml"))
        return
    try:
        experiment = Experiment.from_yaml(run_dir / "experiment.yaml")
    except ExperimentError as exc:
        fail(exc)
    run_and_report(experiment, resume=True)


def _run_scratch(config: dict, run_dir: Path | None, resume: bool, where: str) -> None:
    """A from-scratch config's every seed (evomerge.reproductions.scratch.run_seeds), one
    progress bar per seed, then a table of the seeds and the mean +- std of the held-out
    accuracy."""
    from evomerge.reproductions.scratch import run_seeds

    bars: dict[int, int] = {}
    try:
        with progress_bar() as bar:
            def tick(seed: int, done: int, total: int) -> None:
                if seed not in bars:
                    bars[seed] = bar.add_task(f"seed {seed}", total=total)
                bar.update(bars[seed], completed=done)

            summary = run_seeds(config, run_dir=run_dir, resume=resume, progress=tick,
                                where=where)
    except (ValueError, TypeError, OSError) as exc:
        fail(exc)
    except RuntimeError as exc:
        fail(exc, 1)
    table = Table(title=f"{summary['name']}: {summary['strategy']}, {summary['budget']} "
                        "evaluations per seed", caption=summary["metric"],
                  title_justify="left", caption_justify="left")
    for col in ("seed", "test acc", "train acc", "evaluations", "wall s", "peak RSS MB"):
        table.add_column(col, justify="right")
    for r in summary["per_seed"]:
        table.add_row(str(r["seed"]), f"{r['test_acc']:.4f}", f"{r['train_acc']:.4f}",
                      f"{r['evaluations']} ({r['replayed']} replayed)" if r["replayed"]
                      else str(r["evaluations"]), f"{r['wall_s']:.1f}", f"{r['peak_rss_mb']:.0f}")
    console.print(table)
    std = summary["test_acc_std"]
    console.print(f"Held-out accuracy over {len(summary['per_seed'])} seed(s): "
                  f"{summary['test_acc_mean']:.4f}" + ("" if std is None else f" ± {std:.4f}"))
    if "note" in summary:
        console.print(f"Note: {summary['note']}")
    console.print(f"Run directory: [bold]{summary['run_dir']}[/bold]")


def worker(
    storage: str = typer.Option(..., "--storage", help="The run's storage URL (sqlite:///..., "
                                "journal:///..., postgresql://...).", show_default=False),
    study: str = typer.Option(..., "--study", help="The study name (the experiment's name).",
                              show_default=False),
    poll: float = typer.Option(1.0, "--poll", min=0.01, help="Seconds between queue polls."),
    max_trials: int | None = typer.Option(None, "--max-trials", min=1, show_default=False,
                                          help="Stop after this many trials \\[default: no "
                                               "limit]."),
    wait: float = typer.Option(600.0, "--wait", min=0,
                               help="Seconds to wait for the driver to create the study."),
) -> None:
    """Serve a run's queue: evaluate its trials until the study is finished and the queue empty.

    The experiment comes from the study (stored there by [green]evomerge run[/green]); each
    result is written to that study, nothing to local files. Waits up to --wait seconds for the
    driver to create the study, polls the queue every --poll seconds. SIGTERM (scancel,
    preemption, a time limit's --signal) gives the running trial back and exits 0.
    """
    from evomerge.execution.worker import serve
    from evomerge.experiment import ExperimentError
    from evomerge.merge.checkpoints import CheckpointError

    try:
        served = serve(storage, study, poll_s=poll, max_trials=max_trials, wait_s=wait)
    except (LookupError, ExperimentError, CheckpointError) as exc:
        fail(exc)
    if served["terminated"]:
        back = ", ".join(map(str, served["given_back"])) or "none"
        console.print(f"SIGTERM: stopped after {served['trials']} trials; gave back: {back}")
    else:
        console.print(f"Served {served['trials']} trials of study {study}.")


slurm_app = typer.Typer(help="Run a search on SLURM: a driver plus an array of workers.",
                        rich_markup_mode="rich", no_args_is_help=True)
