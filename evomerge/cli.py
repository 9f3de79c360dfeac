"""The ``evomerge`` command line (console script ``evomerge = evomerge.cli:app``).

Commands are thin: they parse arguments, call the library, and print. Heavy imports (torch,
transformers) happen inside the commands so that ``evomerge --help`` stays fast.
"""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from evomerge import __version__

console = Console()
err_console = Console(stderr=True)

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


# =============================================================================================
# evomerge zoo ...  — offline model zoos (small real experts trained on this machine)
# =============================================================================================

zoo_app = typer.Typer(
    help="Build the offline model zoos (digits, toy, tiny-lm) that experiments and tests use: "
         "small real experts trained on this machine, no downloads; into models/NAME/.",
    rich_markup_mode="rich",
    no_args_is_help=True,
)
app.add_typer(zoo_app, name="zoo")


class ZooName(str, Enum):
    toy = "toy"
    digits = "digits"
    tiny_lm = "tiny-lm"


class ToyZooSize(str, Enum):
    small = "small"
    tiny = "tiny"


_ZOO_BUILD_HELP = (
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


@zoo_app.command("build", help=_ZOO_BUILD_HELP)
def zoo_build(
    name: ZooName = typer.Argument(
        ...,
        help="Which zoo. [bold]digits[/bold]: an MLP base plus two experts (expert_0_4, "
        "expert_5_9). [bold]toy[/bold]: a tiny Llama base plus three experts (expert_copy, "
        "expert_reverse, expert_sort). [bold]tiny-lm[/bold]: a small Llama base plus four "
        "experts (expert_add, expert_reverse, expert_sort, expert_translate).",
        show_default=False,
    ),
    out: Optional[Path] = typer.Option(
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
    cached = not force and toy_zoo_is_built(out_dir, seed=seed, size=size.value)
    started = time.perf_counter()
    try:
        paths = build_toy_zoo(out_dir, seed=seed, size=size.value, force=force)
    except OSError as exc:
        err_console.print(f"[red]error:[/red] could not build the toy zoo in {out_dir}: {exc}")
        raise typer.Exit(1) from exc
    elapsed = time.perf_counter() - started

    if cached:
        console.print(
            f"Reused the {name.value} zoo in [bold]{out_dir}[/bold] "
            f"(size {size.value}, seed {seed}); pass --force to rebuild."
        )
    else:
        console.print(
            f"Built the {name.value} zoo in [bold]{out_dir}[/bold] "
            f"(size {size.value}, seed {seed}) in {elapsed:.1f} s."
        )
    for model_name, path in paths.items():
        console.print(f"  {model_name:<16} {path}")

    losses = loss_table(paths, n=eval_items)
    _print_loss_table(losses, eval_items)


def _zoo_build_digits(out_dir: Path, *, seed: int, force: bool) -> None:
    from evomerge.zoo.digits import (
        accuracy_table,
        build_digits_zoo,
        digits_splits,
        digits_zoo_is_built,
    )

    cached = not force and digits_zoo_is_built(out_dir, seed=seed)
    started = time.perf_counter()
    try:
        paths = build_digits_zoo(out_dir, seed=seed, force=force)
    except OSError as exc:
        err_console.print(f"[red]error:[/red] could not build the digits zoo in {out_dir}: {exc}")
        raise typer.Exit(1) from exc
    elapsed = time.perf_counter() - started
    if cached:
        console.print(
            f"Reused the digits zoo in [bold]{out_dir}[/bold] (seed {seed}); "
            "pass --force to rebuild."
        )
    else:
        console.print(
            f"Built the digits zoo in [bold]{out_dir}[/bold] (seed {seed}) in {elapsed:.1f} s."
        )
    for model_name, path in paths.items():
        console.print(f"  {model_name:<16} {path}")

    acc = accuracy_table(paths, split="heldout")
    subsets = list(next(iter(acc.values())))
    best = {s: max(row[s] for row in acc.values()) for s in subsets}
    n = len(digits_splits()["heldout"][1])
    table = Table(
        title="Held-out accuracy (higher = better)",
        caption=f"{n} held-out images; best in green",
        title_justify="left",
        caption_justify="left",
    )
    table.add_column("model")
    for subset in subsets:
        table.add_column(subset if subset == "all" else f"digits {subset}", justify="right")
    for model_name, row in acc.items():
        cells = [
            f"[bold green]{row[s]:.3f}[/bold green]" if row[s] == best[s] else f"{row[s]:.3f}"
            for s in subsets
        ]
        table.add_row(model_name, *cells)
    console.print(table)


def _zoo_build_tinylm(out_dir: Path, *, seed: int, size: str, force: bool) -> None:
    import json

    from evomerge.zoo._common import MANIFEST
    from evomerge.zoo.tinylm import TINYLM_SIZES, build_tinylm_zoo, tinylm_zoo_is_built

    cached = not force and tinylm_zoo_is_built(out_dir, seed=seed, size=size)
    started = time.perf_counter()
    try:
        paths = build_tinylm_zoo(out_dir, seed=seed, size=size, force=force)
    except OSError as exc:
        err_console.print(f"[red]error:[/red] could not build the tiny-lm zoo in {out_dir}: {exc}")
        raise typer.Exit(1) from exc
    elapsed = time.perf_counter() - started
    verb = "Reused" if cached else "Built"
    tail = "; pass --force to rebuild." if cached else f" in {elapsed:.1f} s."
    console.print(
        f"{verb} the tiny-lm zoo in [bold]{out_dir}[/bold] (size {size}, seed {seed}){tail}"
    )
    for model_name, path in paths.items():
        console.print(f"  {model_name:<18} {path}")

    acc = json.loads((out_dir / MANIFEST).read_text())["heldout_exact_match"]
    tasks = list(next(iter(acc.values())))
    best = {t: max(row[t] for row in acc.values()) for t in tasks}
    table = Table(
        title="Held-out exact match (greedy, higher = better)",
        caption=f"{TINYLM_SIZES[size].table_items} held-out items per task; best in green",
        title_justify="left",
        caption_justify="left",
    )
    table.add_column("model")
    for task in [*tasks, "mean"]:
        table.add_column(task, justify="right")
    for model_name, row in acc.items():
        cells = [
            f"[bold green]{row[t]:.3f}[/bold green]" if row[t] == best[t] else f"{row[t]:.3f}"
            for t in tasks
        ]
        table.add_row(model_name, *cells, f"{sum(row.values()) / len(row):.3f}")
    console.print(table)


def _print_loss_table(losses: dict[str, dict[str, float]], n: int) -> None:
    tasks = list(next(iter(losses.values())))
    best = {task: min(row[task] for row in losses.values()) for task in tasks}
    table = Table(
        title="Answer-token loss (nats, lower = better)",
        caption=f"{n} held-out items per task; best in green",
        title_justify="left",
        caption_justify="left",
    )
    table.add_column("model")
    for task in tasks:
        table.add_column(task, justify="right")
    for model_name, row in losses.items():
        cells = [
            f"[bold green]{row[t]:.3f}[/bold green]" if row[t] == best[t] else f"{row[t]:.3f}"
            for t in tasks
        ]
        table.add_row(model_name, *cells)
    console.print(table)


# =============================================================================================
# evomerge merge CONFIG.yaml --out DIR
# =============================================================================================

_MERGE_HELP = (
    "Merge models as a mergekit-format YAML config says, and write a Hugging Face directory.\n\n"
    "CONFIG uses mergekit's [bold]models:[/bold] form: merge_method, base_model, models (each with "
    "its parameters), global parameters, dtype/out_dtype. Methods: linear, task_arithmetic, "
    "ties, dare_linear, dare_ties, della, della_linear, breadcrumbs, breadcrumbs_ties, slerp, "
    "model_stock. Models are local directories (relative to the current directory) or Hugging "
    "Face Hub ids, org/name or org/name@revision: read from the Hugging Face cache, downloaded "
    "(safetensors weights, config, tokenizer only) unless HF_HUB_OFFLINE is set; an existing "
    "local directory is always a path (write ./org/name to force one). OUT's recipe.yaml pins "
    "each Hub id to the commit merged (org/name@sha, which mergekit reads too).\n\n"
    "Layer stacks (what DFS searches export) are read too: merge_method passthrough with "
    "[bold]slices:[/bold] (one source per slice, layer_range, optional scale parameters), or a "
    "mergekit-multi file whose earlier named documents are merges the slices read.\n\n"
    "OUT receives config, safetensors shards, the base model's tokenizer and recipe.yaml; it is "
    "written to a temporary sibling and renamed, so an interrupted merge leaves nothing behind."
)


@app.command("merge", help=_MERGE_HELP)
def merge(
    config: Path = typer.Argument(..., help="mergekit-format merge YAML.", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", show_default=False,
                             help="Output model directory (must not exist unless --overwrite)."),
    device: str = typer.Option(
        "auto", "--device",
        help="Where to merge: auto (the first GPU torch sees, else the CPU), cpu, cuda, "
             "cuda:1 ... Inputs that do not fit the GPU stay in host memory and stream to it "
             "one layer group at a time."),
    shard_size: str = typer.Option("5GB", "--shard-size",
                                   help="Largest safetensors shard (e.g. 500MB, 2GB)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    cache: str = typer.Option(
        "off", "--cache",
        help="Source-sized caches of the merge engine (sorted |delta| for TIES/breadcrumbs, "
             "DELLA ranks): off, on, auto (half the free memory) or a budget such as 2GB. One "
             "merge builds once, so off is right here; searches gain from it."),
    chunk: Optional[int] = typer.Option(
        None, "--chunk", min=1, show_default=False,
        help="Elements per scratch chunk of the merge engine (default: the engine's)."),
) -> None:
    """Merge models as a mergekit-format YAML config says."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    import torch

    from evomerge.merge.engine import Merger, cache_budget
    from evomerge.merge.io import CheckpointError, export_dtype, export_model, parse_size
    from evomerge.recipe import RecipeError, MergeRecipe

    from evomerge.execution.devices import DeviceError, resolve_device

    started = time.perf_counter()
    options: dict[str, Any] = {"cache": cache.strip().lower(), "chunk": chunk}  # engine keywords
    try:
        cache_budget(options["cache"], torch.device("cpu"))
    except ValueError as exc:
        _fail(ValueError(f"--{exc}"))
    try:
        device = str(resolve_device(device))
    except DeviceError as exc:
        _fail(ValueError(f"--{exc}"))
    if _is_layer_recipe(config):
        _merge_layers(config, out, device, shard_size, overwrite, started, options)
        return
    if _is_segment_recipe(config):
        _merge_segments(config, out, device, shard_size, overwrite, started, options)
        return
    try:
        recipe = MergeRecipe.from_yaml(config)
        parse_size(shard_size)
        if out.exists() and not overwrite:
            raise CheckpointError(f"{out}: already exists; pass --overwrite to replace it")
        fields = [("base_model", recipe.base_model)] if recipe.base_model else []
        fields += [(f"models[{i}].model", e.model) for i, e in enumerate(recipe.models)]
        hub_models = _resolve_models(fields)
        written = recipe.with_models({ref: r.pinned for ref, r in hub_models.items()})
        recipe = recipe.with_models({ref: r.path for ref, r in hub_models.items()})
        columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            def track(items, what):
                items = list(items)
                return bar.track(items, total=len(items), description=what)

            merger = Merger.for_recipe(recipe, device=device, **options,
                                       progress=lambda m: track(m, "loading models"))
            state = merger.build(recipe, progress=lambda names: track(names, "merging tensors"))
        # out_dtype, else dtype, else the sources' own: bf16 in, bf16 out
        dtype = export_dtype(recipe.out_dtype, recipe.dtype, sources=recipe.model_paths())
        export_model(state, out, base_dir=_tokenizer_source(recipe), recipe_yaml=written.to_yaml(),
                     max_shard_size=shard_size, dtype=dtype, overwrite=overwrite,
                     progress=True)
    except (RecipeError, CheckpointError, ValueError, OSError) as exc:
        _fail(exc)
    console.print(
        f"Merged {len(merger.names)} tensors with [bold]{recipe.merge_method}[/bold] into "
        f"[bold]{out}[/bold] in {time.perf_counter() - started:.1f} s."
    )


def _is_layer_recipe(config: Path) -> bool:
    """A passthrough ``slices`` file or a mergekit-multi file (what DFS runs export)."""
    import yaml

    try:
        docs = [d for d in yaml.safe_load_all(config.read_text()) if d is not None]
    except (OSError, yaml.YAMLError):
        return False  # MergeRecipe.from_yaml reports it
    return len(docs) > 1 or (len(docs) == 1 and isinstance(docs[0], dict) and "slices" in docs[0])


def _is_segment_recipe(config: Path) -> bool:
    """An M2N2 weight-space member (``merge_method: segments``, what weights-space runs export)."""
    import yaml

    try:
        data = yaml.safe_load(config.read_text())
    except (OSError, yaml.YAMLError):
        return False  # MergeRecipe.from_yaml reports it
    return isinstance(data, dict) and data.get("merge_method") == "segments"


def _merge_segments(config: Path, out: Path, device: str, shard_size: str, overwrite: bool,
                    started: float, options: dict[str, Any]) -> None:
    """Materialise a segments recipe (:mod:`evomerge.merge.segments`) as a checkpoint; config
    and tokenizer from its first model."""
    from evomerge.merge.engine import Merger
    from evomerge.merge.io import CheckpointError, export_dtype, export_model, parse_size
    from evomerge.merge.segments import build_into
    from evomerge.recipe import RecipeError, SegmentRecipe

    try:
        recipe = SegmentRecipe.from_yaml(config)
        parse_size(shard_size)
        if out.exists() and not overwrite:
            raise CheckpointError(f"{out}: already exists; pass --overwrite to replace it")
        hub_models = _resolve_models([(f"models[{i}]", m) for i, m in enumerate(recipe.models)])
        written = recipe.with_models({ref: r.pinned for ref, r in hub_models.items()})
        recipe = recipe.with_models({ref: r.path for ref, r in hub_models.items()})
        with console.status("loading models"):
            merger = Merger(recipe.model_paths(), device=device, dtype=recipe.dtype, **options)
        state = build_into(recipe, merger, merger.allocate())
        dtype = export_dtype(recipe.dtype, sources=recipe.model_paths())
        export_model(state, out, base_dir=Path(recipe.models[0]), recipe_yaml=written.to_yaml(),
                     max_shard_size=shard_size, dtype=dtype, overwrite=overwrite, progress=True)
    except (RecipeError, CheckpointError, ValueError, OSError) as exc:
        _fail(exc)
    console.print(f"Built {len(recipe.boundaries) - 1} segments over {len(recipe.models)} models "
                  f"into [bold]{out}[/bold] in {time.perf_counter() - started:.1f} s.")


def _merge_layers(config: Path, out: Path, device: str, shard_size: str, overwrite: bool,
                  started: float, options: dict[str, Any] | None = None) -> None:
    """Materialise a layer stack (DFS / PS+DFS recipe) as a checkpoint; ``options`` are the
    Merger's engine keywords (cache, chunk)."""
    import transformers

    from evomerge.merge.engine import Merger
    from evomerge.merge.io import CheckpointError, export_dtype, export_model, parse_size
    from evomerge.merge.layerstack import LayerStack, ResidentSources
    from evomerge.recipe import LayerRecipe, RecipeError

    try:
        recipe = LayerRecipe.from_yaml(config)
        parse_size(shard_size)
        if out.exists() and not overwrite:
            raise CheckpointError(f"{out}: already exists; pass --overwrite to replace it")
        fields: dict[str, str] = {}  # reference -> the first field naming it
        for i, s in enumerate(recipe.slices):
            if s.model not in recipe.merged:
                fields.setdefault(s.model, f"slices[{i}].sources[0].model")
        for name, r in recipe.merged.items():
            if r.base_model:
                fields.setdefault(r.base_model, f"merged.{name}.base_model")
            for j, e in enumerate(r.models):
                fields.setdefault(e.model, f"merged.{name}.models[{j}].model")
        hub_models = _resolve_models([(field, ref) for ref, field in fields.items()])
        written = _rename_layer_models(recipe, {k: r.pinned for k, r in hub_models.items()})
        recipe = _rename_layer_models(recipe, {k: r.path for k, r in hub_models.items()})
        paths = [m for m in recipe.models if m not in recipe.merged]
        paths += [p for r in recipe.merged.values() for p in r.model_paths()]
        paths = list(dict.fromkeys(paths))
        with console.status("loading models"):
            sources = ResidentSources(Merger(paths, device=device, dtype=recipe.dtype,
                                             **(options or {})))
            sources.prepare(recipe.merged)
        stack = LayerStack(sources, transformers.AutoConfig.from_pretrained(paths[0]))
        state, updates = stack.materialise(recipe)
        # the stack's dtype, else the sources' own: bf16 in, bf16 out
        dtype = export_dtype(recipe.dtype, sources=paths)
        export_model(state, out, base_dir=paths[0], recipe_yaml=written.to_yaml(),
                     max_shard_size=shard_size, dtype=dtype, overwrite=overwrite, progress=True,
                     config_updates=updates)
    except (RecipeError, CheckpointError, ValueError, OSError) as exc:
        _fail(exc)
    console.print(f"Stacked {len(recipe.path)} blocks from {len(recipe.slices)} slices into "
                  f"[bold]{out}[/bold] in {time.perf_counter() - started:.1f} s.")


def _tokenizer_source(recipe) -> Path:
    """Config and tokenizer come from the base model (else the first model), as in mergekit
    (``recipe``'s Hub ids already resolved to local snapshots by :func:`_resolve_models`)."""
    return Path(recipe.base_model or recipe.models[0].model)


def _resolve_models(fields: list[tuple[str, str]]) -> dict[str, Any]:
    """``{hub id: evomerge.hub.Resolved}`` for the Hub ids among ``(field, reference)``, after
    one RecipeError naming every reference that is neither a local directory nor resolvable
    (checked before anything is downloaded)."""
    from evomerge import hub
    from evomerge.recipe import RecipeError

    problems = hub.missing(fields)
    if problems:
        raise RecipeError("models not found (local Hugging Face directories, or Hub ids "
                          "org/name[@revision]):\n  " + "\n  ".join(problems))
    return {ref: hub.resolve(ref) for _, ref in fields if hub.is_hub_id(ref)}


def _rename_layer_models(recipe, mapping: dict[str, str]):
    """A LayerRecipe whose model references (slices and ``merged`` recipes) are renamed."""
    import dataclasses

    return dataclasses.replace(
        recipe, slices=tuple(dataclasses.replace(s, model=mapping.get(s.model, s.model))
                             for s in recipe.slices),
        merged={name: r.with_models(mapping) for name, r in recipe.merged.items()})


# =============================================================================================
# evomerge run | resume | dashboard
# =============================================================================================

_RUN_HELP = (
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


def _fail(exc: BaseException, code: int = 2) -> None:
    from rich.markup import escape

    err_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
    raise typer.Exit(code)


def _run(experiment, resume: bool) -> None:
    from evomerge.experiment import ExperimentError
    from evomerge.merge.io import CheckpointError
    from evomerge.report import print_summary

    try:
        summary = experiment.run(resume=resume)
    except (ExperimentError, CheckpointError) as exc:
        _fail(exc)
    except RuntimeError as exc:
        _fail(exc, 1)
    print_summary(summary, console)
    console.print(f"Run directory: [bold]{experiment.run_path}[/bold]")


@app.command("run", help=_RUN_HELP)
def run(
    experiment_file: Path = typer.Argument(..., metavar="EXPERIMENT.yaml", show_default=False,
                                           help="Experiment YAML."),
    budget: Optional[int] = typer.Option(None, "--budget", min=1, show_default=False,
                                         help="Evaluations to run \\[default: the experiment's "
                                              "budget]."),
    seed: Optional[int] = typer.Option(None, "--seed", show_default=False,
                                       help="Seed of the strategy \\[default: the experiment's "
                                            "seed]."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", show_default=False,
                                           help="Where to write the run \\[default: the "
                                                "experiment's run_dir, else runs/NAME]."),
) -> None:
    """Run a merge search described by an experiment YAML."""
    from evomerge.execution.scratch import scratch_config
    from evomerge.experiment import Experiment, ExperimentError

    scratch = scratch_config(experiment_file)
    if scratch is not None:  # a from-scratch config (`setting:`), not a merge
        if budget is not None:
            scratch["budget"] = budget
        if seed is not None:
            scratch.pop("seeds", None)
            scratch["seed"] = seed
        _run_scratch(scratch, run_dir=run_dir, resume=False, where=str(experiment_file))
        return
    try:
        experiment = Experiment.from_yaml(experiment_file, budget=budget, seed=seed,
                                          run_dir=str(run_dir) if run_dir else None)
    except ExperimentError as exc:
        _fail(exc)
    _run(experiment, resume=False)


@app.command("resume")
def resume(run_dir: Path = typer.Argument(..., metavar="RUN_DIR", show_default=False,
                                          help="A run directory, e.g. runs/digits_cmaes.")) -> None:
    """Continue a run that was interrupted: replay the stored trials into the seeded strategy
    and evaluate only what is missing; the run ends with exactly the budgeted trials.

    The experiment is RUN_DIR/experiment.yaml (written by [green]evomerge run[/green]); the
    trials go to the run's study and the summary, recipe, best model and plots to RUN_DIR, as
    [green]evomerge run[/green] writes them. From-scratch runs resume each seed's journal."""
    from evomerge.execution.scratch import scratch_config
    from evomerge.experiment import Experiment, ExperimentError

    scratch = scratch_config(run_dir / "experiment.yaml")
    if scratch is not None:
        _run_scratch(scratch, run_dir=run_dir, resume=True,
                     where=str(run_dir / "experiment.yaml"))
        return
    try:
        experiment = Experiment.from_yaml(run_dir / "experiment.yaml")
    except ExperimentError as exc:
        _fail(exc)
    _run(experiment, resume=True)


def _run_scratch(config: dict, run_dir: Path | None, resume: bool, where: str) -> None:
    """A from-scratch config's every seed (evomerge.execution.scratch.run_seeds), one progress
    bar per seed, then a table of the seeds and the mean +- std of the held-out accuracy."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from evomerge.execution.scratch import run_seeds

    bars: dict[int, int] = {}
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as bar:
            def tick(seed: int, done: int, total: int) -> None:
                if seed not in bars:
                    bars[seed] = bar.add_task(f"seed {seed}", total=total)
                bar.update(bars[seed], completed=done)

            summary = run_seeds(config, run_dir=run_dir, resume=resume, progress=tick,
                                where=where)
    except (ValueError, TypeError, OSError) as exc:
        _fail(exc)
    except RuntimeError as exc:
        _fail(exc, 1)
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


_DASHBOARD_HELP = (
    "Serve optuna-dashboard for a run's study: trials, parameters, objectives, Pareto front, "
    "and the run's plots when RUN_DIR/artifacts holds them.\n\n"
    "Safe by default: the server binds 127.0.0.1 (this machine only), is [bold]read-only[/bold] "
    "(any request but GET/HEAD is refused with 405, so nobody can rename, delete or annotate "
    "studies through it; --allow-writes lifts that), and answers only requests whose Host header "
    "is localhost, 127.0.0.1 or \\[::1] with the port, plus --host and --allow-host (403 "
    "otherwise, which stops DNS-rebinding pages). Ctrl-C or SIGTERM stops it and frees the "
    "port.\n\n"
    "The study is the one in RUN_DIR (default sqlite RUN_DIR/study.db, else the experiment's "
    "storage); nothing is written to RUN_DIR. Open the printed URL in a browser."
)


@app.command("dashboard", help=_DASHBOARD_HELP)
def dashboard(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", show_default=False,
                                   help="A run directory, e.g. runs/digits_cmaes."),
    host: str = typer.Option("127.0.0.1", "--host",
                             help="Interface to bind; the default serves this machine only. "
                                  "Requests naming this host are accepted too."),
    port: int = typer.Option(8080, "--port", min=0, max=65535,
                             help="Port to listen on (0: any free port)."),
    allow_writes: bool = typer.Option(
        False, "--allow-writes",
        help="Let the dashboard change the study (notes, renames, deletes, tells). Off: every "
             "request but GET/HEAD gets 405."),
    allow_host: list[str] = typer.Option(
        [], "--allow-host", show_default=False,
        help="Another Host header name to accept (repeatable), e.g. the machine's name when "
             "--host 0.0.0.0 \\[default: none]."),
    seed: int | None = typer.Option(None, "--seed", help="From-scratch runs: which seed's study "
                                    "\\[default: the first]."),
) -> None:
    """Serve optuna-dashboard for a run's study, read-only, on 127.0.0.1."""
    from evomerge import dashboard as board
    from evomerge.execution.scratch import scratch_config

    try:
        import optuna_dashboard  # noqa: F401
    except ImportError:
        _fail(RuntimeError("optuna-dashboard is not installed: pip install optuna-dashboard"))
    if scratch_config(run_dir / "experiment.yaml") is not None:
        storage, where = _scratch_storage(run_dir, seed)
    else:
        storage, where = _run_storage(run_dir)
    try:
        server = board.make_server(storage, host=host, port=port, allow_writes=allow_writes,
                                   allow_hosts=allow_host, artifact_dir=run_dir / board.ARTIFACTS)
    except OSError as exc:
        _fail(OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc} "
                      "(another --port, or stop what holds it)"))
    bound = server.server_address[1]
    mode = "read-write (--allow-writes)" if allow_writes else "read-only"
    console.print(f"optuna-dashboard for {where}, {mode}, on {board.url(host, bound)}",
                  soft_wrap=True)
    console.print("Ctrl-C stops it.")
    board.serve(server)


def _run_storage(run_dir: Path) -> tuple[Any, str]:
    """The study of the run in ``run_dir`` (the directory given, even when the run was copied or
    moved there: a storage file inside the recorded run directory is looked up in ``run_dir``);
    a missing SQLite file is an error rather than a new, empty study."""
    from evomerge.experiment import Experiment, ExperimentError
    from evomerge.store import open_storage, storage_url

    try:
        recorded = Experiment.from_yaml(run_dir / "experiment.yaml")
    except ExperimentError as exc:
        _fail(exc)
    url = storage_url(recorded.storage, run_dir.absolute())
    prefix = next((p for p in ("sqlite:///", "journal://") if url.startswith(p)), None)
    if prefix is not None:
        path = Path(url.removeprefix(prefix)).absolute()
        try:
            path = run_dir.absolute() / path.relative_to(recorded.run_path)
        except ValueError:
            pass  # a store outside the recorded run directory stays where it is
        if not path.is_file():
            _fail(FileNotFoundError(f"{run_dir}: no study at {path} yet (has the run started?)"))
        url = prefix + str(path)
    return open_storage(url), url


def _scratch_storage(run_dir: Path, seed: int | None) -> tuple[Any, str]:
    """A from-scratch run's journal study: one per seed (``RUN_DIR/seed_<s>/study.log``)."""
    from evomerge.execution.scratch import journal, seed_journals

    logs = seed_journals(run_dir)
    if not logs:
        _fail(FileNotFoundError(f"{run_dir}: no seed_<s>/study.log yet (has the run started?)"))
    if seed is not None and seed not in logs:
        _fail(ValueError(f"--seed {seed}: {run_dir} has seeds {', '.join(map(str, logs))}"))
    log = logs[seed if seed is not None else min(logs)]
    return journal(log), str(log)


# =============================================================================================
# evomerge worker | slurm submit  — workers anywhere the storage reaches, SLURM array jobs
# =============================================================================================


@app.command("worker")
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
    from evomerge.merge.io import CheckpointError

    try:
        served = serve(storage, study, poll_s=poll, max_trials=max_trials, wait_s=wait)
    except (LookupError, ExperimentError, CheckpointError) as exc:
        _fail(exc)
    if served["terminated"]:
        back = ", ".join(map(str, served["given_back"])) or "none"
        console.print(f"SIGTERM: stopped after {served['trials']} trials; gave back: {back}")
    else:
        console.print(f"Served {served['trials']} trials of study {study}.")


slurm_app = typer.Typer(help="Run a search on SLURM: a driver plus an array of workers.",
                        rich_markup_mode="rich", no_args_is_help=True)
app.add_typer(slurm_app, name="slurm")


class DriverWhere(str, Enum):
    job = "job"
    here = "here"


_SBATCH = " \\[default: executor.slurm's, else sbatch's]"


@slurm_app.command("submit")
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
        _fail(exc)
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
        _fail(exc)
    for role, job in jobs.items():
        console.print(f"Submitted {role}: job {job}")
    console.print(f"Logs and scripts: [bold]{prepared.folder}[/bold]")
    if driver is DriverWhere.here:
        _run(prepared.experiment, resume=False)


# =============================================================================================
# evomerge irt ...  — IRT-reduced fitness: validate the estimators against full evaluation
# =============================================================================================

irt_app = typer.Typer(
    help="IRT reduction of a fitness suite (tinyBenchmarks / MERGE^3 anchor estimators).",
    rich_markup_mode="rich",
    no_args_is_help=True,
)
app.add_typer(irt_app, name="irt")


@irt_app.command("validate")
def irt_validate(
    suite: str = typer.Argument(..., metavar="FITNESS.yaml", show_default=False,
                                help="A fitness suite file (or catalog name, e.g. tinylm)."),
    models: Path = typer.Option(Path("models/tiny-lm"), "--models",
                                help="Zoo directory: base/ plus one directory per expert."),
    merges: int = typer.Option(60, "--merges", min=6,
                               help="Random task-arithmetic merges (half fit, half held out)."),
    anchors: str = typer.Option("10,20,50,100", "--anchors", help="Anchors per task to try."),
    dim: int = typer.Option(2, "--dim", min=1, help="IRT dimension."),
    max_items: Optional[int] = typer.Option(None, "--max-items", min=1,
                                            show_default=False,
                                            help="Only the first N items of every task "
                                                 "\\[default: all]."),
    cache: Optional[Path] = typer.Option(None, "--cache",
                                         show_default=False,
                                         help="Keep the response matrix here; reruns reuse it "
                                              "\\[default: none kept]."),
    json_out: Optional[Path] = typer.Option(None, "--json", show_default=False,
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

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from evomerge.fitness.base import make_fitness
    from evomerge.fitness.reduced import (
        cached_responses,
        random_merges,
        response_matrix,
        source_recipe,
        validate,
    )
    from evomerge.merge.engine import Merger

    started = time.perf_counter()
    try:
        counts = [int(a) for a in anchors.split(",")]
        if not counts or min(counts) < 1:
            raise ValueError(f"--anchors: expected positive integers, got {anchors!r}")
        base = models / "base"
        experts = sorted(p for p in models.iterdir()
                         if p.is_dir() and p != base and (p / "config.json").is_file())
        if not (base / "config.json").is_file() or not experts:
            raise ValueError(f"--models: {models} needs base/ and expert directories "
                             "(evomerge zoo build tiny-lm)")
        fitness = make_fitness("lm", base_model=str(base), suite=suite, max_items=max_items)
        merger = Merger([str(base), *map(str, experts)])
    except (ValueError, OSError) as exc:
        _fail(exc)
    endpoints = [source_recipe(p) for p in [base, *experts]]
    design = random_merges(str(base), [str(p) for p in experts], merges, seed=seed)
    model = fitness.new_model()
    columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())

    def score(recipes):
        out = []
        with Progress(*columns, console=err_console) as bar:
            for recipe in bar.track(recipes, description="full evaluation"):
                merger.build(recipe, into=model)
                out.append(fitness.evaluate(model, "search").item_scores)
        return out

    fingerprint = {"suite": str(fitness.suite.path), "max_items": max_items,
                   "items": fitness.num_items("search")}
    recipes = endpoints + design
    responses = (cached_responses(score, recipes, cache, fingerprint)[0] if cache
                 else response_matrix(score(recipes)))
    rows = validate(responses, num_endpoints=len(endpoints), num_train=merges // 2,
                    anchors=counts, dim=dim, seed=seed)
    elapsed = time.perf_counter() - started
    table = Table(title=f"IRT reduction on {fitness.suite.path.name}: {merges - merges // 2} "
                        f"held-out merges, fit on {len(endpoints)} sources + {merges // 2} merges")
    for col in ("estimator", "anchors/task", "MAE (points)", "Spearman", "reduction"):
        table.add_column(col, justify="left" if col == "estimator" else "right")
    for r in rows:
        table.add_row(r["estimator"], str(r["anchors"]), f"{r['mae_points']:.2f}",
                      _fmt_rho(r["spearman"]), f"{r['reduction']:.1f}x")
    console.print(table)
    hits = [f"{r['estimator']}@{r['anchors']}" for r in rows if r["reduction"] >= 20
            and r["mae_points"] <= 2.5 and (r["spearman"] or 0) >= 0.9]
    verdict = f"met by {', '.join(hits)}" if hits else "not met"
    console.print(f"Target (>= 20x fewer items, MAE <= 2.5 points, Spearman >= 0.9): {verdict}. "
                  f"{elapsed:.0f} s.")
    if json_out:
        json_out.write_text(json.dumps(rows, indent=2))
    if results:
        _write_irt_results(rows, suite=fitness.suite.path.name, models=models, merges=merges,
                           sources=len(endpoints), items=fitness.num_items("search"), dim=dim,
                           seed=seed, elapsed=elapsed)


def _zoo_size(models: Path) -> str:
    """The zoo's size from its manifest (``tiny`` numbers are a smoke test, not a result)."""
    import json

    try:
        return str(json.loads((models / "zoo.json").read_text()).get("size", "unknown"))
    except (OSError, ValueError):
        return "unknown"


def _fmt_rho(rho: float | None) -> str:
    return "n/a" if rho is None else f"{rho:.3f}"


def _write_irt_results(rows: list[dict], *, suite: str, models: Path, merges: int, sources: int,
                       items: dict[str, int], dim: int, seed: int, elapsed: float) -> None:
    """Rewrite the ``irt`` section of benchmarks/RESULTS.md with this run's table."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    helper = root / "benchmarks" / "_results.py"
    if not helper.is_file():
        _fail(ValueError(f"--results: {helper} not found (needs a source checkout)"))
    spec = importlib.util.spec_from_file_location("_evomerge_bench_results", helper)
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)

    lines = ["<!-- irt:start -->", "## IRT reduction (`evomerge irt validate`)", "",
             f"Suite `{suite}` ({sum(items.values())} search items: "
             + ", ".join(f"{t} {n}" for t, n in items.items()) + f"), zoo `{models}` "
             f"(size {_zoo_size(models)}); "
             f"fit on {sources} sources + {merges // 2} random task-arithmetic merges, scored on "
             f"{merges - merges // 2} held-out merges; IRT dim {dim}, seed {seed}. MAE over "
             "(merge, task) in accuracy points; Spearman of the macro-mean accuracy over merges; "
             "reduction = full items / evaluated items.", "",
             "| estimator | anchors/task | MAE (points) | Spearman | reduction |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['estimator']} | {r['anchors']} | {r['mae_points']:.2f} | "
              f"{_fmt_rho(r['spearman'])} | {r['reduction']:.1f}x |" for r in rows]
    load = results.loadavg()
    lines += ["", f"{elapsed:.0f} s on {results.cpu_name()}"
              + (f" (load {load:.1f})" if load is not None else "") + ".", "<!-- irt:end -->"]
    results.write_section(root / "benchmarks" / "RESULTS.md", "\n".join(lines),
                          "<!-- irt:start -->", "<!-- irt:end -->")


if __name__ == "__main__":
    app()
