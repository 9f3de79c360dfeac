"""Recipes: merges as plain, validated data; what crosses a process boundary, never weights.

Three kinds, each readable from and written to YAML: :class:`MergeRecipe` (a mergekit weight
merge, :mod:`.mergekit_config`), :class:`LayerRecipe` (a layer stack, mergekit's passthrough
slices, :mod:`.layers`) and :class:`SegmentRecipe` (an M2N2 weight-space member, :mod:`.segments`).
They validate against the parameter table of :mod:`.params`. Nothing here imports torch or the
merge engine: a recipe is checked wherever it is read and built only where models are resident.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from evomerge.recipe.base import RecipeError
from evomerge.recipe.layers import LayerRecipe, LayerSlice
from evomerge.recipe.mergekit_config import (Conditional, MergeRecipe, Setting, evaluate_setting,
                                             validate_recipe)
from evomerge.recipe.params import METHODS, MethodSpec, ParamSpec
from evomerge.recipe.segments import SegmentRecipe

__all__ = [
    "METHODS", "Conditional", "LayerRecipe", "LayerSlice", "MergeRecipe", "MethodSpec",
    "ParamSpec", "Recipe", "RecipeError", "SegmentRecipe", "Setting", "evaluate_setting",
    "parse_recipe",
    "validate_recipe",
]

Recipe = MergeRecipe | LayerRecipe | SegmentRecipe


def parse_recipe(data: Mapping[str, Any], *, where: str = "recipe",
                 validated: bool = False) -> Recipe:
    """A stored recipe of any kind: layer stacks have ``slices``, M2N2 weight-space members
    ``merge_method: segments``, everything else is a mergekit merge.

    ``validated``: ``data`` is what a recipe validated in this process's version wrote (a
    trial the driver stored), so a mergekit merge skips validating it again
    (:meth:`MergeRecipe.from_validated`; layer and segment recipes check only their own
    fields, and always do)."""
    if "slices" in data:
        return LayerRecipe.from_dict(data, where=where)
    if data.get("merge_method") == "segments":
        return SegmentRecipe.from_dict(data, where=where)
    if validated:
        return MergeRecipe.from_validated(data)
    return MergeRecipe.from_dict(data, where=where)
