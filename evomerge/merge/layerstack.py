"""Layer stacks: models assembled from other models' transformer blocks (DFS merges).

A :class:`LayerRecipe` is plain data in mergekit's ``passthrough`` + ``slices`` syntax: an ordered
list of layer ranges, each from one model, each optionally scaling its blocks' *output
projections* (the last linear map of attention and of the MLP: ``o_proj`` and ``down_proj`` in
Llama-family models). Embeddings come from the first slice's model, the final norm and the head
from the last slice's model -- mergekit's own convention, so a recipe without ``merged`` models
runs unchanged in ``mergekit-yaml`` and gives the same checkpoint (tested). In models with tied
embeddings the head *is* the first slice's embedding matrix.

Why output-projection scales: Sakana's DFS multiplies the hidden state by ``W[i, j]`` when the
path hops from a layer of model i to one of model j. In a pre-norm decoder every block reads its
input through a scale-invariant norm and the head reads the final norm, so multiplying the
residual stream by ``s`` at one point is the same function (up to the norms' epsilon) as dividing
the output projections of every later block by ``s``. Written that way the scales are ordinary
weights: the exported checkpoint is a plain ``transformers`` model of ``len(path)`` blocks.

:class:`LayerStack` builds a recipe *by reference*: a shell model of the path's depth is made on
the meta device and its parameters are assigned the resident tensors of the source blocks (no
weight copies); scales are forward hooks on the shell's own output-projection modules, so two
positions of one source block can carry different scales. ``materialise`` writes the same
function as real tensors (scales folded into the weights) for export.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from evomerge.merge.engine import BLOCK, layer_group
from evomerge.recipe import FlowListDumper, MergeRecipe, RecipeError

__all__ = [
    "OUTPUT_PROJECTIONS",
    "LayerRecipe",
    "LayerSlice",
    "LayerStack",
    "output_projections",
    "parse_recipe",
]

#: Pre-norm decoder families and the substrings naming their blocks' output projections.
#: Families with norms *after* a block's branches (Gemma 2/3, OLMo 2) are not listed: scaling
#: their projections would be undone by the norm.
OUTPUT_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "llama": ("o_proj", "down_proj"),
    "mistral": ("o_proj", "down_proj"),
    "qwen2": ("o_proj", "down_proj"),
    "qwen3": ("o_proj", "down_proj"),
    "phi3": ("o_proj", "down_proj"),
    "gemma": ("o_proj", "down_proj"),
    "gpt2": ("c_proj",),
}



def output_projections(model_type: str | None) -> tuple[str, ...] | None:
    """The output-projection filters of a model family (None: unknown, scales unsupported)."""
    return OUTPUT_PROJECTIONS.get(model_type or "")


def block_of(name: str) -> int | None:
    """The block index of a tensor name (``model.layers.3.mlp...`` -> 3), None outside blocks."""
    return layer_group(name).layer


def renumbered(name: str, index: int) -> str:
    """``name`` with its block index replaced by ``index``."""
    match = BLOCK.search(name)
    return name[:match.start(1)] + str(index) + name[match.end(1):] if match else name


@dataclass(frozen=True)
class LayerSlice:
    """Blocks ``start .. end - 1`` of ``model``; ``scale`` multiplies their output projections."""

    model: str
    start: int
    end: int
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise RecipeError(f"layer_range [{self.start}, {self.end}] of {self.model}: need "
                              "0 <= start < end")
        if not (self.scale == self.scale and abs(self.scale) != float("inf")):
            raise RecipeError(f"scale of {self.model} [{self.start}, {self.end}] is not finite")


@dataclass(frozen=True)
class LayerRecipe:
    """A layer path as mergekit ``slices`` (see the module docstring).

    ``merged`` names in-memory merges that may serve as slice models (PS+DFS: the PS merge of
    the sources); in YAML they become earlier documents of a mergekit-multi file.
    """

    slices: tuple[LayerSlice, ...]
    projections: tuple[str, ...] = ()
    dtype: str | None = None
    merged: Mapping[str, MergeRecipe] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.slices:
            raise RecipeError("slices: a layer recipe needs at least one slice")
        if any(s.scale != 1.0 for s in self.slices) and not self.projections:
            raise RecipeError("slices: scales given but no output projections to apply them to")

    @property
    def path(self) -> list[tuple[str, int, float]]:
        """One ``(model, block, scale)`` per block of the stacked model, in order."""
        return [(s.model, i, s.scale) for s in self.slices for i in range(s.start, s.end)]

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(s.model for s in self.slices))

    # ---- plain data ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """mergekit's passthrough config; ``merged`` (when present) under its own key."""
        slices = []
        for s in self.slices:
            source: dict[str, Any] = {"model": s.model, "layer_range": [s.start, s.end]}
            if s.scale != 1.0:
                source["parameters"] = {"scale": [{"filter": f, "value": s.scale}
                                                  for f in self.projections]}
            slices.append({"sources": [source]})
        out: dict[str, Any] = {"merge_method": "passthrough", "slices": slices}
        if self.dtype:
            out["dtype"] = self.dtype
        if self.projections:
            out["output_projections"] = list(self.projections)
        if self.merged:
            out["merged"] = {name: r.to_dict() for name, r in self.merged.items()}
        return out

    def to_mergekit(self) -> dict[str, Any]:
        """The passthrough document alone, as ``mergekit-yaml`` reads it."""
        out = self.to_dict()
        out.pop("merged", None)
        out.pop("output_projections", None)
        return out

    def to_yaml(self) -> str:
        """mergekit YAML; with ``merged`` models, a mergekit-multi file (one document per merge,
        each named, the layer stack last and named ``dfs``)."""
        docs = [{"name": name, **r.to_dict()} for name, r in self.merged.items()]
        docs.append({"name": "dfs", **self.to_mergekit()} if docs else self.to_mergekit())
        return yaml.dump_all(docs, Dumper=FlowListDumper, sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> LayerRecipe:
        """A passthrough ``slices`` file, or a mergekit-multi file whose last document is one
        and whose earlier (named) documents are the merges it reads (what :meth:`to_yaml`
        writes)."""
        try:
            docs = list(yaml.safe_load_all(Path(path).read_text()))
        except (OSError, yaml.YAMLError) as exc:
            raise RecipeError(f"{path}: cannot read: {exc}") from None
        docs = [d for d in docs if d is not None]
        if not docs or not all(isinstance(d, Mapping) for d in docs):
            raise RecipeError(f"{path}: expected one or more YAML mappings")
        *stages, last = docs
        merged = {}
        for i, doc in enumerate(stages):
            name = doc.get("name")
            if not isinstance(name, str) or not name:
                raise RecipeError(f"{path}: document {i + 1} needs a 'name' (mergekit-multi)")
            merged[name] = {k: v for k, v in doc.items() if k != "name"}
        data = {k: v for k, v in last.items() if k != "name"}
        if merged:
            data["merged"] = merged
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "recipe") -> LayerRecipe:
        if data.get("merge_method") != "passthrough":
            raise RecipeError(f"{where}.merge_method: a layer recipe is 'passthrough', got "
                              f"{data.get('merge_method')!r}")
        unknown = sorted(set(data) - {"merge_method", "slices", "dtype", "output_projections",
                                      "merged"})
        if unknown:
            raise RecipeError(f"{where}: unknown key(s) {', '.join(unknown)}")
        projections = tuple(data.get("output_projections") or ()) or _filters_in(data)
        slices = []
        for i, entry in enumerate(data.get("slices") or []):
            sources = entry.get("sources") if isinstance(entry, Mapping) else None
            if not isinstance(sources, list) or len(sources) != 1:
                raise RecipeError(f"{where}.slices[{i}].sources: expected exactly one source")
            src = sources[0]
            lo, hi = src.get("layer_range", (None, None))
            scale = _scale_of(src.get("parameters") or {}, projections, f"{where}.slices[{i}]")
            slices.append(LayerSlice(str(src["model"]), int(lo), int(hi), scale))
        merged = {name: MergeRecipe.from_dict(r, where=f"{where}.merged.{name}")
                  for name, r in (data.get("merged") or {}).items()}
        return cls(tuple(slices), projections, data.get("dtype"), merged)


def _filters_in(data: Mapping[str, Any]) -> tuple[str, ...]:
    """The output projections a mergekit file scales (its first ``scale`` setting's filters)."""
    for entry in data.get("slices") or []:
        for src in (entry.get("sources") or []) if isinstance(entry, Mapping) else []:
            setting = (src.get("parameters") or {}).get("scale") if isinstance(src, Mapping) else None
            if isinstance(setting, list):
                return tuple(str(c.get("filter")) for c in setting if isinstance(c, Mapping))
    return ()


def _scale_of(params: Mapping[str, Any], projections: Sequence[str], where: str) -> float:
    setting = params.get("scale")
    if setting is None:
        return 1.0
    if not isinstance(setting, list) or not all(isinstance(c, Mapping) and "value" in c
                                                 for c in setting):
        raise RecipeError(f"{where}.parameters.scale: expected a list of {{filter, value}}")
    values = {c.get("filter"): float(c["value"]) for c in setting}
    if set(values) != set(projections) or len(set(values.values())) != 1:
        raise RecipeError(f"{where}.parameters.scale: expected one value for each output "
                          f"projection {list(projections)}, got {setting}")
    return next(iter(values.values()))


def parse_recipe(data: Mapping[str, Any], *, where: str = "recipe") -> MergeRecipe | LayerRecipe:
    """A stored recipe of either kind: layer stacks have ``slices``."""
    if "slices" in data:
        return LayerRecipe.from_dict(data, where=where)
    return MergeRecipe.from_dict(data, where=where)


def fold_scales(hops: Sequence[float]) -> list[float]:
    """Output-projection scales equal to multiplying the hidden state by ``hops[p]`` on entering
    block ``p`` (``hops[0]`` is unused: nothing precedes the first block): block ``p`` gets
    ``1 / prod(hops[1..p])``."""
    scales, running = [], 1.0
    for p, hop in enumerate(hops):
        if p:
            running *= hop
        scales.append(1.0 / running)
    return scales


class ResidentSources:
    """Tensors by model reference: a Merger's resident checkpoints, plus named merges (PS+DFS)
    built once each and kept while their recipe is unchanged."""

    def __init__(self, merger: Any) -> None:
        self.merger = merger
        self._merged: dict[str, dict[str, torch.Tensor]] = {}
        self._recipes: dict[str, MergeRecipe] = {}

    def prepare(self, merged: Mapping[str, MergeRecipe]) -> None:
        """Build the named merges not built yet (called per candidate: a field comparison,
        not a serialisation, decides)."""
        for name, merge in merged.items():
            if self._recipes.get(name) != merge:
                self._merged[name] = self.merger.build(merge)
                self._recipes[name] = merge

    def __call__(self, ref: str) -> Mapping[str, torch.Tensor]:
        return self._merged[ref] if ref in self._merged else self.merger.state(ref)


class LayerStack:
    """Builds layer recipes over resident tensors.

    ``tensors(model)`` returns one model's resident state dict (checkpoint names); ``config`` is
    the shared HF config (equal hidden sizes are what make stacking possible); ``template`` is a
    real model of that config whose non-persistent buffers (rotary frequencies) the shells borrow
    (only :meth:`build` needs it).
    """

    def __init__(self, tensors: Callable[[str], Mapping[str, torch.Tensor]], config: Any,
                 template: torch.nn.Module | None = None) -> None:
        self.tensors = tensors
        self.config = config
        self.buffers = dict(template.named_buffers()) if template is not None else {}
        self._blocks: dict[str, dict[int, list[str]]] = {}  # model -> block -> tensor names

    def _block_names(self, model: str, state: Mapping[str, torch.Tensor]) -> dict[int, list[str]]:
        """Tensor names per block of one model, read once (every candidate needs them)."""
        if model not in self._blocks:
            blocks: dict[int, list[str]] = {}
            for name in state:
                block = block_of(name)
                if block is not None:
                    blocks.setdefault(block, []).append(name)
            self._blocks[model] = blocks
        return self._blocks[model]

    def _named(self, recipe: LayerRecipe) -> dict[str, torch.Tensor]:
        """Shell tensor name -> resident source tensor, for the recipe's path."""
        path = recipe.path
        first, last = self.tensors(path[0][0]), self.tensors(path[-1][0])
        out: dict[str, torch.Tensor] = {}
        for name, tensor in first.items():
            if block_of(name) is None and not _is_post(name):
                out[name] = tensor
        for name, tensor in last.items():
            if block_of(name) is None and _is_post(name):
                out[name] = tensor
        for position, (model, block, _) in enumerate(path):
            state = self.tensors(model)
            names = self._block_names(model, state).get(block)
            if not names:
                raise RecipeError(f"slices: {model} has no block {block}")
            for name in names:
                out[renumbered(name, position)] = state[name]
        return out

    def shell_config(self, depth: int) -> Any:
        config = copy.deepcopy(self.config)
        config.num_hidden_layers = depth
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and types:
            if len(set(types)) > 1:
                raise RecipeError("layer stacks of models with mixed layer types (sliding and "
                                  "full attention) are not supported")
            config.layer_types = [types[0]] * depth
        return config

    def build(self, recipe: LayerRecipe) -> torch.nn.Module:
        """The stacked model, sharing every weight with the resident sources."""
        from transformers import AutoModelForCausalLM

        path = recipe.path
        with torch.device("meta"):
            shell = AutoModelForCausalLM.from_config(self.shell_config(len(path)))
        named = self._named(recipe)
        expected = set(shell.state_dict())
        missing = sorted(expected - set(named))
        if self.config.tie_word_embeddings:
            missing = [n for n in missing if not _is_head(n)]
        if missing:
            raise RecipeError(f"cannot stack: no source tensor for {', '.join(missing[:5])}")
        shell.load_state_dict({n: t for n, t in named.items() if n in expected}, strict=False,
                              assign=True)
        if self.config.tie_word_embeddings:
            shell.tie_weights()
        for name, buffer in list(shell.named_buffers()):
            if buffer.is_meta:
                module_name, _, attr = name.rpartition(".")
                source = self.buffers.get(_template_name(name))
                if source is None:
                    raise RecipeError(f"cannot stack: no buffer {name} in the template model")
                setattr(shell.get_submodule(module_name), attr, source)
        for position, (_, _, scale) in enumerate(path):
            if scale != 1.0:
                _scale_outputs(shell, position, recipe.projections, scale)
        return shell.eval()

    def materialise(self, recipe: LayerRecipe) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Real tensors of the stacked model (scales folded into the output projections) and the
        config fields that differ from the sources' (``num_hidden_layers``, ``layer_types``)."""
        scales = {position: scale for position, (_, _, scale) in enumerate(recipe.path)}
        state: dict[str, torch.Tensor] = {}
        for name, tensor in self._named(recipe).items():
            position = block_of(name)
            scale = scales.get(position, 1.0) if position is not None else 1.0
            if scale != 1.0 and any(f in name for f in recipe.projections):
                state[name] = tensor * scale
            else:
                state[name] = tensor.clone()
        config = self.shell_config(len(recipe.path))
        updates = {"num_hidden_layers": config.num_hidden_layers}
        if getattr(config, "layer_types", None):
            updates["layer_types"] = list(config.layer_types)
        return state, updates


def _is_head(name: str) -> bool:
    return "lm_head" in name or "embed_out" in name


def _is_post(name: str) -> bool:
    """Tensors after the blocks: the final norm and the head (taken from the last slice)."""
    return layer_group(name).name in ("final_norm", "head")


def _template_name(name: str) -> str:
    """A shell buffer's name in the template: block buffers map to block 0 (they are equal)."""
    return renumbered(name, 0) if block_of(name) is not None else name


def _scale_outputs(shell: torch.nn.Module, position: int, projections: Sequence[str],
                   scale: float) -> None:
    """Multiply the outputs of block ``position``'s projection modules by ``scale`` (the shell's
    own module objects: the same source block elsewhere in the path is unaffected)."""
    hooked = 0
    for name, module in shell.named_modules():
        if block_of(name + ".") == position and name.rsplit(".", 1)[-1] in projections:
            module.register_forward_hook(lambda _m, _i, out, s=scale: out * s)
            hooked += 1
    if not hooked:
        raise RecipeError(f"no output projection {list(projections)} in block {position}")
