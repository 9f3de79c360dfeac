"""``evomerge merge CONFIG --out DIR``: build a recipe file into a Hugging Face directory
(:func:`evomerge.merge.from_config.merge_config`)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from evomerge.cli._common import console, fail, track

HELP = (
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
    chunk: int | None = typer.Option(
        None, "--chunk", min=1, show_default=False,
        help="Elements per scratch chunk of the merge engine (default: the engine's)."),
) -> None:
    """Merge models as a mergekit-format YAML config says."""
    import torch

    from evomerge.execution.devices import DeviceError, resolve_device
    from evomerge.merge.checkpoints import CheckpointError
    from evomerge.merge.engine import cache_budget
    from evomerge.merge.from_config import merge_config
    from evomerge.recipe import LayerRecipe, RecipeError, SegmentRecipe

    started = time.perf_counter()
    cache = cache.strip().lower()
    try:
        cache_budget(cache, torch.device("cpu"))
    except ValueError as exc:
        fail(ValueError(f"--{exc}"))
    try:
        device = str(resolve_device(device))
    except DeviceError as exc:
        fail(ValueError(f"--{exc}"))
    try:
        merged = merge_config(config, out, device=device, shard_size=shard_size,
                              overwrite=overwrite, cache=cache, chunk=chunk,
                              track=lambda items, what: track(items, what, transient=True))
    except (RecipeError, CheckpointError, ValueError, OSError) as exc:
        fail(exc)
    recipe, seconds = merged.recipe, time.perf_counter() - started
    if isinstance(recipe, LayerRecipe):
        console.print(f"Stacked {len(recipe.path)} blocks from {len(recipe.slices)} slices into "
                      f"[bold]{out}[/bold] in {seconds:.1f} s.")
    elif isinstance(recipe, SegmentRecipe):
        console.print(f"Built {len(recipe.boundaries) - 1} segments over {len(recipe.models)} "
                      f"models into [bold]{out}[/bold] in {seconds:.1f} s.")
    else:
        console.print(f"Merged {merged.tensors} tensors with [bold]{recipe.merge_method}[/bold] "
                      f"into [bold]{out}[/bold] in {seconds:.1f} s.")
