"""``evomerge zoo build``: the offline model zoos (small real experts trained on this machine)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from enum import Enum
from pathlib import Path

import typer
from rich.table import Table

from evomerge.cli._common import console, err_console

app = typer.Typer(
    help="Build the offline model zoos (digits, toy, tiny-lm) that experiments and tests use: "
         "small real experts trained on this machine, no downloads; into models/NAME/.",
    rich_markup_mode="rich",
    no_args_is_help=True,
)


class ZooName(str, Enum):
    toy = "toy"
    digits = "digits"
    tiny_lm = "tiny-lm"


class ToyZooSize(str, Enum):
    small = "small"
    tiny = "tiny"


_BUILD_HELP = (
    "Build (or reuse) an offline model zoo and print each model's scores on each task.\n\n"
    "The [bold]toy[/bold] zoo trains a tiny Llama-architecture base on a mix of three generated "
    "sequence tasks ([italic]copy[/italic], [italic]reverse[/italic] and [italic]sort[/italic] a "
    "string of symbols), then fine-tunes one expert per task from it. Each model is saved as a "
    "Hugging Face directory (safetensors + tokenizer) under OUT, beside a "
    "[bold]zoo.json[/bold] manifest.\n\n"
    "The [bold]digits[/bold] zoo trains a small MLP base on scikit-learn's bundled 8x8 digits "
    "(all ten classes, briefly), then two experts from it on the classes 0-4 and 5-9 only; "
    "it prints each model's held-out accuracy on all digits, 0-4 and 5-9. A few seconds; "
    "--size and --eval-items do not apply.\n\n"
    "The [bold]tiny-lm[/bold] zoo trains a small Llama base (byte-level BPE tokenizer) on four "
    "generated text tasks ([italic]add[/italic], [italic]reverse[/italic], [italic]sort[/italic], "
    "[italic]translate[/italic] to a made-up second language), then one expert per task; it "
    "prints each model's held-out exact match. --size small: about 5 min on an idle core, "
    "8-10 min on two busy ones; tiny: seconds.\n\n"
    "Output: OUT (default models/NAME) gets one Hugging Face directory per model (base/, "
    "expert_*/) and the zoo.json manifest (seed, size, training losses, scores). A second run "
    "with the same seed and size reuses the built models (--force rebuilds)."
)


@app.command("build", help=_BUILD_HELP)
def zoo_build(
    name: ZooName = typer.Argument(
        ...,
        help="Which zoo. [bold]digits[/bold]: an MLP base plus two experts (expert_0_4, "
        "expert_5_9). [bold]toy[/bold]: a tiny Llama base plus three experts (expert_copy, "
        "expert_reverse, expert_sort). [bold]tiny-lm[/bold]: a small Llama base plus four "
        "experts (expert_add, expert_reverse, expert_sort, expert_translate).",
        show_default=False,
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Directory to build into. \\[default: models/NAME]",
        show_default=False,
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the whole build; same seed, same weights."),
    size: ToyZooSize = typer.Option(
        ToyZooSize.small,
        "--size",
        help="Toy and tiny-lm zoos. [bold]small[/bold]: toy 4 layers x 64 wide, 30-60 s on 2 CPU "
        "cores; tiny-lm 4 layers x 128 wide, 10-20 min. "
        "[bold]tiny[/bold]: 2 layers x 32 wide, a few seconds (for tests).",
    ),
    force: bool = typer.Option(
        False, "--force", help="Rebuild even if OUT already holds this seed and size."
    ),
    eval_items: int = typer.Option(
        256, "--eval-items", min=1,
        help="Toy zoo: held-out examples per task for the printed loss table."
    ),
) -> None:
    """Build (or reuse) an offline model zoo and print each model's scores on each task."""
    from evomerge.zoo.toy import build_toy_zoo, loss_table, toy_zoo_is_built

    out_dir = out if out is not None else Path("models") / name.value
    if name is ZooName.digits:
        _zoo_build_digits(out_dir, seed=seed, force=force)
        return
    if name is ZooName.tiny_lm:
        _zoo_build_tinylm(out_dir, seed=seed, size=size.value, force=force)
        return
    paths = _build_zoo(
        name.value, out_dir, f"size {size.value}, seed {seed}", 16, force,
        lambda: build_toy_zoo(out_dir, seed=seed, size=size.value, force=force),
        lambda: toy_zoo_is_built(out_dir, seed=seed, size=size.value))

    losses = loss_table(paths, n=eval_items)
    _print_loss_table(losses, eval_items)


def _zoo_build_digits(out_dir: Path, *, seed: int, force: bool) -> None:
    from evomerge.models.digits import digits_splits
    from evomerge.zoo.digits import accuracy_table, build_digits_zoo, digits_zoo_is_built

    paths = _build_zoo(
        "digits", out_dir, f"seed {seed}", 16, force,
        lambda: build_digits_zoo(out_dir, seed=seed, force=force),
        lambda: digits_zoo_is_built(out_dir, seed=seed))

    acc = accuracy_table(paths, split="heldout")
    n = len(digits_splits()["heldout"][1])
    _print_best_table(acc, "Held-out accuracy (higher = better)", f"{n} held-out images", max,
                      mean=False, label=lambda s: s if s == "all" else f"digits {s}")


def _zoo_build_tinylm(out_dir: Path, *, seed: int, size: str, force: bool) -> None:
    import json

    from evomerge.zoo._common import MANIFEST
    from evomerge.zoo.tinylm import TINYLM_SIZES, build_tinylm_zoo, tinylm_zoo_is_built

    _build_zoo(
        "tiny-lm", out_dir, f"size {size}, seed {seed}", 18, force,
        lambda: build_tinylm_zoo(out_dir, seed=seed, size=size, force=force),
        lambda: tinylm_zoo_is_built(out_dir, seed=seed, size=size))

    acc = json.loads((out_dir / MANIFEST).read_text())["heldout_exact_match"]
    _print_best_table(acc, "Held-out exact match (greedy, higher = better)",
                      f"{TINYLM_SIZES[size].table_items} held-out items per task", max,
                      mean=True)


def _print_loss_table(losses: dict[str, dict[str, float]], n: int) -> None:
    _print_best_table(losses, "Answer-token loss (nats, lower = better)",
                      f"{n} held-out items per task", min, mean=False)


def _build_zoo(label: str, out_dir: Path, settings: str, width: int, force: bool,
               build: Callable[[], dict[str, Path]], is_built: Callable[[], bool],
               ) -> dict[str, Path]:
    """Build (or reuse) a zoo, say which, where and how long, and list its models; a failure to
    write (disk full, permissions) exits 1 with one line."""
    cached = not force and is_built()
    started = time.perf_counter()
    try:
        paths = build()
    except OSError as exc:
        err_console.print(f"[red]error:[/red] could not build the {label} zoo in {out_dir}: {exc}")
        raise typer.Exit(1) from exc
    elapsed = time.perf_counter() - started
    verb = "Reused" if cached else "Built"
    tail = "; pass --force to rebuild." if cached else f" in {elapsed:.1f} s."
    console.print(f"{verb} the {label} zoo in [bold]{out_dir}[/bold] ({settings}){tail}")
    for model_name, path in paths.items():
        console.print(f"  {model_name:<{width}} {path}")
    return paths


def _print_best_table(rows: dict[str, dict[str, float]], title: str, caption: str,
                      best_of: Callable[[Iterable[float]], float], *, mean: bool,
                      label: Callable[[str], str] = str) -> None:
    """A model x task table with each task's best (``best_of`` its column) in green; ``label``
    names a task's column."""
    tasks = list(next(iter(rows.values())))
    best = {t: best_of(row[t] for row in rows.values()) for t in tasks}
    table = Table(title=title, caption=f"{caption}; best in green", title_justify="left",
                  caption_justify="left")
    table.add_column("model")
    for task in tasks:
        table.add_column(label(task), justify="right")
    if mean:
        table.add_column("mean", justify="right")
    for model_name, row in rows.items():
        cells = [
            f"[bold green]{row[t]:.3f}[/bold green]" if row[t] == best[t] else f"{row[t]:.3f}"
            for t in tasks
        ]
        extra = [f"{sum(row.values()) / len(row):.3f}"] if mean else []
        table.add_row(model_name, *cells, *extra)
    console.print(table)

