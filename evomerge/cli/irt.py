"""``evomerge irt validate``: how close an IRT-reduced fitness comes to full evaluation on a zoo
(the measurement is :mod:`evomerge.execution.irt_validation`)."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from evomerge.cli._common import console, err_console, fail, track

app = typer.Typer(
    help="IRT reduction of a fitness suite (tinyBenchmarks / MERGE^3 anchor estimators).",
    rich_markup_mode="rich",
    no_args_is_help=True,
)


@app.command("validate")
def irt_validate(
    suite: str = typer.Argument(..., metavar="FITNESS.yaml", show_default=False,
                                help="A fitness suite file (or catalog name, e.g. tinylm)."),
    models: Path = typer.Option(Path("models/tiny-lm"), "--models",
                                help="Zoo directory: base/ plus one directory per expert."),
    merges: int = typer.Option(60, "--merges", min=6,
                               help="Random task-arithmetic merges (half fit, half held out)."),
    anchors: str = typer.Option("10,20,50,100", "--anchors", help="Anchors per task to try."),
    dim: int = typer.Option(2, "--dim", min=1, help="IRT dimension."),
    max_items: int | None = typer.Option(None, "--max-items", min=1,
                                            show_default=False,
                                            help="Only the first N items of every task "
                                                 "\\[default: all]."),
    cache: Path | None = typer.Option(None, "--cache",
                                         show_default=False,
                                         help="Keep the response matrix here; reruns reuse it "
                                              "\\[default: none kept]."),
    json_out: Path | None = typer.Option(None, "--json", show_default=False,
                                            help="Write the rows as JSON here "
                                                 "\\[default: not written]."),
    results: bool = typer.Option(False, "--results",
                                 help="Write the table to benchmarks/RESULTS.md (section irt)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the merge design and of k-means."),
) -> None:
    """Score the zoo's sources and random merges on the FULL search items, fit the IRT
    reduction on the sources plus the first half of the merges, and report for each estimator
    and anchor count the error against full evaluation on the other half: MAE in accuracy
    points, Spearman rank correlation of the macro-mean accuracy, and the reduction factor.

    Prints the table; writes files only when asked: --cache (the response matrix), --json
    (the rows), --results (benchmarks/RESULTS.md)."""
    import json

    from evomerge.execution.irt_validation import (
        TARGET,
        format_rho,
        meets_target,
        open_zoo,
        validate_zoo,
        write_results,
    )

    started = time.perf_counter()
    try:
        counts = [int(a) for a in anchors.split(",")]
        if not counts or min(counts) < 1:
            raise ValueError(f"--anchors: expected positive integers, got {anchors!r}")
        zoo = open_zoo(models, suite, max_items=max_items)
    except (ValueError, OSError) as exc:
        fail(exc)
    validation = validate_zoo(
        zoo, merges=merges, anchors=counts, dim=dim, seed=seed, cache=cache,
        track=lambda recipes: track(recipes, "full evaluation", on=err_console))
    elapsed = time.perf_counter() - started
    rows = validation.rows
    table = Table(title=f"IRT reduction on {validation.suite}: {merges - merges // 2} "
                        f"held-out merges, fit on {validation.sources} sources + {merges // 2} "
                        "merges")
    for col in ("estimator", "anchors/task", "MAE (points)", "Spearman", "reduction"):
        table.add_column(col, justify="left" if col == "estimator" else "right")
    for r in rows:
        table.add_row(r["estimator"], str(r["anchors"]), f"{r['mae_points']:.2f}",
                      format_rho(r["spearman"]), f"{r['reduction']:.1f}x")
    console.print(table)
    hits = [f"{r['estimator']}@{r['anchors']}" for r in rows if meets_target(r)]
    verdict = f"met by {', '.join(hits)}" if hits else "not met"
    console.print(f"Target ({TARGET}): {verdict}. {elapsed:.0f} s.")
    if json_out:
        json_out.write_text(json.dumps(rows, indent=2))
    if results:
        try:
            write_results(validation, elapsed=elapsed)
        except FileNotFoundError as exc:
            fail(ValueError(f"--results: {exc}"))
