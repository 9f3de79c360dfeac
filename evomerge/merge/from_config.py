"""Merge a recipe file into a Hugging Face directory: what ``evomerge merge CONFIG --out DIR`` does.

A file holds one of three recipes, told apart by its shape:

- a mergekit ``models:`` config (:class:`~evomerge.recipe.MergeRecipe`): built by the
  :class:`~evomerge.merge.engine.Merger`; config and tokenizer from the base model (else the
  first model), as in mergekit;
- a layer stack (:class:`~evomerge.recipe.LayerRecipe`, what DFS runs export):
  ``merge_method: passthrough`` with ``slices:``, or a mergekit-multi file of several documents;
- an M2N2 weight-space member (:class:`~evomerge.recipe.SegmentRecipe`,
  ``merge_method: segments``); config and tokenizer from its first model.

Model references are local directories or Hugging Face Hub ids; every reference that is neither is
reported at once, before anything is downloaded. The recipe written beside the model pins each Hub
id to the commit merged (``org/name@sha``), so the output says exactly what it was built from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from evomerge import hub
from evomerge.merge.checkpoints import CheckpointError
from evomerge.merge.engine import Merger
from evomerge.merge.export import export_dtype, export_model, parse_size
from evomerge.merge.layerstack import LayerStack, ResidentSources
from evomerge.merge.segments import build_into
from evomerge.recipe import LayerRecipe, MergeRecipe, RecipeError, SegmentRecipe

T = TypeVar("T")
Track = Callable[[Iterable[T], str], Iterable[T]]
"""Wraps a loop with a progress display: ``track(items, description)`` yields ``items``."""


@dataclasses.dataclass(frozen=True)
class Merged:
    """What :func:`merge_config` wrote: the recipe as built (Hub ids resolved to local
    snapshots) and how many tensors it built."""

    recipe: MergeRecipe | LayerRecipe | SegmentRecipe
    tensors: int


def merge_config(config: str | Path, out: str | Path, *, device: str = "cpu",
                 shard_size: str = "5GB", overwrite: bool = False, track: Track | None = None,
                 **engine: Any) -> Merged:
    """Build the recipe in ``config`` and write it to ``out`` (config, safetensors shards of at
    most ``shard_size``, tokenizer, recipe.yaml), atomically. ``engine`` are the Merger's keywords
    (cache, chunk); ``track`` shows the loading and merging loops.

    Raises RecipeError, CheckpointError, ValueError or OSError, with the file, field or tensor
    that was wrong, before any model is loaded where it can.
    """
    config, out, track = Path(config), Path(out), track or _untracked
    if _is_layer_recipe(config):
        return _merge_layers(config, out, device, shard_size, overwrite, track, engine)
    if _is_segment_recipe(config):
        return _merge_segments(config, out, device, shard_size, overwrite, track, engine)
    recipe = MergeRecipe.from_yaml(config)
    _check_out(out, shard_size, overwrite)
    fields = [("base_model", recipe.base_model)] if recipe.base_model else []
    fields += [(f"models[{i}].model", e.model) for i, e in enumerate(recipe.models)]
    hub_models = _resolve_models(fields)
    written = recipe.with_models({ref: r.pinned for ref, r in hub_models.items()})
    recipe = recipe.with_models({ref: r.path for ref, r in hub_models.items()})
    merger = Merger.for_recipe(recipe, device=device, **engine,
                               progress=lambda m: track(m, "loading models"))
    state = merger.build(recipe, progress=lambda names: track(names, "merging tensors"))
    # out_dtype, else dtype, else the sources' own: bf16 in, bf16 out
    dtype = export_dtype(recipe.out_dtype, recipe.dtype, sources=recipe.model_paths())
    export_model(state, out, base_dir=_tokenizer_source(recipe), recipe_yaml=written.to_yaml(),
                 max_shard_size=shard_size, dtype=dtype, overwrite=overwrite, progress=True)
    return Merged(recipe, len(merger.names))


def _untracked(items: Iterable[T], description: str) -> Iterable[T]:
    return items


def _check_out(out: Path, shard_size: str, overwrite: bool) -> None:
    parse_size(shard_size)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: already exists; pass --overwrite to replace it")


def _is_layer_recipe(config: Path) -> bool:
    """A passthrough ``slices`` file or a mergekit-multi file (what DFS runs export)."""
    try:
        docs = [d for d in yaml.safe_load_all(config.read_text()) if d is not None]
    except (OSError, yaml.YAMLError):
        return False  # MergeRecipe.from_yaml reports it
    return len(docs) > 1 or (len(docs) == 1 and isinstance(docs[0], dict) and "slices" in docs[0])


def _is_segment_recipe(config: Path) -> bool:
    """An M2N2 weight-space member (``merge_method: segments``, what weights-space runs export)."""
    try:
        data = yaml.safe_load(config.read_text())
    except (OSError, yaml.YAMLError):
        return False  # MergeRecipe.from_yaml reports it
    return isinstance(data, dict) and data.get("merge_method") == "segments"


def _merge_segments(config: Path, out: Path, device: str, shard_size: str, overwrite: bool,
                    track: Track, engine: dict[str, Any]) -> Merged:
    """Materialise a segments recipe (:mod:`evomerge.merge.segments`) as a checkpoint; config
    and tokenizer from its first model."""
    recipe = SegmentRecipe.from_yaml(config)
    _check_out(out, shard_size, overwrite)
    hub_models = _resolve_models([(f"models[{i}]", m) for i, m in enumerate(recipe.models)])
    written = recipe.with_models({ref: r.pinned for ref, r in hub_models.items()})
    recipe = recipe.with_models({ref: r.path for ref, r in hub_models.items()})
    merger = Merger(recipe.model_paths(), device=device, dtype=recipe.dtype, **engine,
                    progress=lambda m: track(m, "loading models"))
    state = build_into(recipe, merger, merger.allocate())
    dtype = export_dtype(recipe.dtype, sources=recipe.model_paths())
    export_model(state, out, base_dir=Path(recipe.models[0]), recipe_yaml=written.to_yaml(),
                 max_shard_size=shard_size, dtype=dtype, overwrite=overwrite, progress=True)
    return Merged(recipe, len(state))


def _merge_layers(config: Path, out: Path, device: str, shard_size: str, overwrite: bool,
                  track: Track, engine: dict[str, Any]) -> Merged:
    """Materialise a layer stack (DFS / PS+DFS recipe) as a checkpoint; config and tokenizer
    from the first model it reads."""
    import transformers

    recipe = LayerRecipe.from_yaml(config)
    _check_out(out, shard_size, overwrite)
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
    sources = ResidentSources(Merger(paths, device=device, dtype=recipe.dtype, **engine,
                                     progress=lambda m: track(m, "loading models")))
    sources.prepare(recipe.merged)
    stack = LayerStack(sources, transformers.AutoConfig.from_pretrained(paths[0]))
    state, updates = stack.materialise(recipe)
    # the stack's dtype, else the sources' own: bf16 in, bf16 out
    dtype = export_dtype(recipe.dtype, sources=paths)
    export_model(state, out, base_dir=paths[0], recipe_yaml=written.to_yaml(),
                 max_shard_size=shard_size, dtype=dtype, overwrite=overwrite, progress=True,
                 config_updates=updates)
    return Merged(recipe, len(state))


def _tokenizer_source(recipe: MergeRecipe) -> Path:
    """Config and tokenizer come from the base model (else the first model), as in mergekit
    (``recipe``'s Hub ids already resolved to local snapshots by :func:`_resolve_models`)."""
    return Path(recipe.base_model or recipe.models[0].model)


def _resolve_models(fields: list[tuple[str, str]]) -> dict[str, hub.Resolved]:
    """``{hub id: Resolved}`` for the Hub ids among ``(field, reference)``, after one RecipeError
    naming every reference that is neither a local directory nor resolvable (checked before
    anything is downloaded)."""
    problems = hub.missing(fields)
    if problems:
        raise RecipeError("models not found (local Hugging Face directories, or Hub ids "
                          "org/name[@revision]):\n  " + "\n  ".join(problems))
    return {ref: hub.resolve(ref) for _, ref in fields if hub.is_hub_id(ref)}


def _rename_layer_models(recipe: LayerRecipe, mapping: dict[str, str]) -> LayerRecipe:
    """A LayerRecipe whose model references (slices and ``merged`` recipes) are renamed."""
    return dataclasses.replace(
        recipe, slices=tuple(dataclasses.replace(s, model=mapping.get(s.model, s.model))
                             for s in recipe.slices),
        merged={name: r.with_models(mapping) for name, r in recipe.merged.items()})
