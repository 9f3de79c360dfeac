"""The ``evomerge`` command line (console script ``evomerge = evomerge.cli:app``).

One module per command group: :mod:`.zoo`, :mod:`.merge`, :mod:`.run` (run, resume, worker),
:mod:`.dashboard`, :mod:`.slurm` and :mod:`.irt`. Commands are thin: they parse arguments, call
the library, and print; :mod:`._common` holds the consoles and the one way a command fails. Heavy
imports (torch, transformers) happen inside the commands so that ``evomerge --help`` stays fast.
"""

from __future__ import annotations

import typer

from evomerge import __version__
from evomerge.cli import dashboard, irt, merge, run, slurm, zoo
from evomerge.cli._common import console

app = typer.Typer(
    name="evomerge",
    help=(
        "[bold]evomerge[/bold]: find good merge recipes for a set of fine-tuned models.\n\n"
        "Quick start (the README's; under a minute on 2 CPU cores): train the digits experts "
        "with [green]evomerge zoo build digits[/green] (into models/digits/), search their "
        "per-layer merge with [green]evomerge run experiments/digits_cmaes.yaml[/green] "
        "(results in runs/digits_cmaes/), and browse its trials with "
        "[green]evomerge dashboard runs/digits_cmaes[/green].\n\n"
        "[green]evomerge COMMAND --help[/green] says what a command does, its defaults and "
        "where its output goes."
    ),
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"evomerge {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False,
        "--version",
        "-V",
        help="Print the evomerge version and exit.",
        callback=_version_callback,
        is_eager=True,
    ),
) -> None:
    """[bold]evomerge[/bold]: find good merge recipes for a set of fine-tuned models."""


app.command("merge", help=merge.HELP)(merge.merge)
app.command("run", help=run.HELP)(run.run)
app.command("resume")(run.resume)
app.command("dashboard", help=dashboard.HELP)(dashboard.dashboard)
app.command("worker")(run.worker)
app.add_typer(zoo.app, name="zoo")
app.add_typer(slurm.app, name="slurm")
app.add_typer(irt.app, name="irt")

__all__ = ["app"]
