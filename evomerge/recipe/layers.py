"""LayerRecipe: a layer stack (DFS merge) as plain data, in mergekit's ``passthrough`` + ``slices``.

An ordered list of layer ranges, each from one model, each optionally carrying a *residual scale*
``s`` that multiplies what its blocks add to the residual stream. Where a family's blocks take
that scale is a :class:`HopForm` (:data:`HOP_FORMS`); why each form computes Sakana's hop scales
exactly, and how a stack is built, is :mod:`evomerge.merge.layerstack`'s part. A recipe without
``merged`` models whose scales are mergekit ``scale`` parameters runs unchanged in
``mergekit-yaml``; Gemma's ``norm_scale`` is evomerge's own (:data:`NORM_SCALE_NOTE`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from evomerge.recipe.base import FlowListDumper, RecipeError
from evomerge.recipe.mergekit_config import MergeRecipe


@dataclass(frozen=True)
class HopForm:
    """Where a family's blocks take a slice's residual scale ``s`` (derived in the module
    docstring). Names are tensor-name filters, matched as mergekit matches them (substring).

    ``outputs``: modules whose output is multiplied by ``s`` (weight and bias, or a norm's
    weight); ``inputs``: linear maps whose input is divided by ``s`` (their weight only: the
    filters end in ``.weight``); ``offset``: the outputs are Gemma norms, ``x^ (1 + w)``, folded as
    ``w -> s (1 + w) - 1`` and written as ``norm_scale``, not mergekit's ``scale``.
    """

    kind: str
    outputs: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    offset: bool = False


_PRE_NORM = HopForm("pre-norm", ("o_proj", "down_proj"))
_SANDWICH = HopForm("sandwich norms", ("post_attention_layernorm", "post_feedforward_layernorm"),
                    offset=True)
_POST_NORM = HopForm("post-branch norms", ("post_attention_layernorm",
                                           "post_feedforward_layernorm"),
                     inputs=("q_proj.weight", "k_proj.weight", "v_proj.weight",
                             "gate_proj.weight", "up_proj.weight"))

#: model_type -> how its blocks carry hop scales (families not listed cannot carry them)
HOP_FORMS: dict[str, HopForm] = {
    "llama": _PRE_NORM,
    "mistral": _PRE_NORM,
    "qwen2": _PRE_NORM,
    "qwen3": _PRE_NORM,
    "phi3": _PRE_NORM,
    "gemma": _PRE_NORM,
    "gpt2": HopForm("pre-norm", ("c_proj",)),
    "gpt_neox": HopForm("pre-norm", ("attention.dense", "dense_4h_to_h")),
    "gemma2": _SANDWICH,
    "gemma3_text": _SANDWICH,
    "olmo2": _POST_NORM,
    "olmo3": _POST_NORM,
}

def hop_form(model_type: str | None) -> HopForm | None:
    """How a family carries hop scales (None: unknown, scales unsupported)."""
    return HOP_FORMS.get(model_type or "")


@dataclass(frozen=True)
class LayerSlice:
    """Blocks ``start .. end - 1`` of ``model``; ``scale`` is their residual scale: what they add
    to the residual stream is multiplied by it (see the module docstring for how)."""

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

    ``projections``: filters of the tensors a slice's scale multiplies (the :class:`HopForm`'s
    ``outputs``); ``inputs``: filters of the tensors it divides; ``offset``: the projections are
    Gemma ``(1 + w)`` norms (scales written as ``norm_scale``). ``merged`` names in-memory merges
    that may serve as slice models (PS+DFS: the PS merge of the sources); in YAML they become
    earlier documents of a mergekit-multi file.
    """

    slices: tuple[LayerSlice, ...]
    projections: tuple[str, ...] = ()
    dtype: str | None = None
    merged: Mapping[str, MergeRecipe] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    offset: bool = False

    def __post_init__(self) -> None:
        if not self.slices:
            raise RecipeError("slices: a layer recipe needs at least one slice")
        if any(s.scale != 1.0 for s in self.slices) and not self.projections:
            raise RecipeError("slices: scales given but no output projections to apply them to")
        if self.inputs and any(s.scale == 0.0 for s in self.slices):
            raise RecipeError("slices: a zero scale cannot divide the input projections "
                              f"{list(self.inputs)}")

    @classmethod
    def of_form(cls, slices: Sequence[LayerSlice], form: HopForm | None, dtype: str | None = None,
                merged: Mapping[str, MergeRecipe] | None = None) -> LayerRecipe:
        """A recipe whose scales a family carries as ``form`` says (None: no scales)."""
        if form is None:
            return cls(tuple(slices), (), dtype, dict(merged or {}))
        return cls(tuple(slices), form.outputs, dtype, dict(merged or {}), form.inputs,
                   form.offset)

    @property
    def path(self) -> list[tuple[str, int, float]]:
        """One ``(model, block, scale)`` per block of the stacked model, in order."""
        return [(s.model, i, s.scale) for s in self.slices for i in range(s.start, s.end)]

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(s.model for s in self.slices))

    @property
    def scale_parameter(self) -> str:
        """The slice parameter the scales are written as: mergekit's ``scale`` (multiply the
        named tensors), or ``norm_scale`` for Gemma's ``(1 + w)`` norms."""
        return "norm_scale" if self.offset else "scale"

    # ---- plain data ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """mergekit's passthrough config; ``merged`` (when present) under its own key."""
        slices = []
        for s in self.slices:
            source: dict[str, Any] = {"model": s.model, "layer_range": [s.start, s.end]}
            if s.scale != 1.0:
                setting = [{"filter": f, "value": s.scale} for f in self.projections]
                setting += [{"filter": f, "value": 1.0 / s.scale} for f in self.inputs]
                source["parameters"] = {self.scale_parameter: setting}
            slices.append({"sources": [source]})
        out: dict[str, Any] = {"merge_method": "passthrough", "slices": slices}
        if self.dtype:
            out["dtype"] = self.dtype
        if self.projections:
            out["output_projections"] = list(self.projections)
        if self.inputs:
            out["input_projections"] = list(self.inputs)
        if self.offset:
            out["offset_norms"] = True
        if self.merged:
            out["merged"] = {name: r.to_dict() for name, r in self.merged.items()}
        return out

    def to_mergekit(self) -> dict[str, Any]:
        """The passthrough document alone, as ``mergekit-yaml`` reads it."""
        out = self.to_dict()
        for key in ("merged", *_FORM_KEYS):
            out.pop(key, None)
        return out

    def to_yaml(self) -> str:
        """mergekit YAML; with ``merged`` models, a mergekit-multi file (one document per merge,
        each named, the layer stack last and named ``dfs``)."""
        docs = [{"name": name, **r.to_dict()} for name, r in self.merged.items()]
        docs.append({"name": "dfs", **self.to_mergekit()} if docs else self.to_mergekit())
        text = yaml.dump_all(docs, Dumper=FlowListDumper, sort_keys=False)
        if self.offset and any(s.scale != 1.0 for s in self.slices):
            text = NORM_SCALE_NOTE + text
        return text

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
        unknown = sorted(set(data) - {"merge_method", "slices", "dtype", "merged", *_FORM_KEYS})
        if unknown:
            raise RecipeError(f"{where}: unknown key(s) {', '.join(unknown)}")
        offset = bool(data.get("offset_norms")) or _setting_in(data, "norm_scale") is not None
        parameter = "norm_scale" if offset else "scale"
        projections = tuple(data.get("output_projections") or ())
        inputs = tuple(data.get("input_projections") or ())
        if not projections:
            projections, inputs = _filters_in(data, parameter)
        slices = []
        for i, entry in enumerate(data.get("slices") or []):
            sources = entry.get("sources") if isinstance(entry, Mapping) else None
            if not isinstance(sources, list) or len(sources) != 1:
                raise RecipeError(f"{where}.slices[{i}].sources: expected exactly one source")
            src = sources[0]
            lo, hi = src.get("layer_range", (None, None))
            scale = _scale_of(src.get("parameters") or {}, parameter, projections, inputs,
                              f"{where}.slices[{i}]")
            slices.append(LayerSlice(str(src["model"]), int(lo), int(hi), scale))
        merged = {name: MergeRecipe.from_dict(r, where=f"{where}.merged.{name}")
                  for name, r in (data.get("merged") or {}).items()}
        return cls(tuple(slices), projections, data.get("dtype"), merged, inputs, offset)


#: the first lines of a recipe file with Gemma norm scales
NORM_SCALE_NOTE = ("# norm_scale: the residual scale of Gemma's (1 + weight) post-branch norms, "
                   "weight -> s (1 + weight) - 1.\n# It is evomerge's own parameter: mergekit "
                   "ignores it; materialise this file with `evomerge merge`.\n")

#: recipe keys that say how the scales apply (evomerge's own: not in mergekit's document)
_FORM_KEYS = ("output_projections", "input_projections", "offset_norms")


def _setting_in(data: Mapping[str, Any], parameter: str) -> Any:
    """The first slice setting of ``parameter`` in a passthrough file, None if there is none."""
    for entry in data.get("slices") or []:
        for src in (entry.get("sources") or []) if isinstance(entry, Mapping) else []:
            params = src.get("parameters") if isinstance(src, Mapping) else None
            if isinstance(params, Mapping) and params.get(parameter) is not None:
                return params[parameter]
    return None


def _filters_in(data: Mapping[str, Any], parameter: str) -> tuple[tuple[str, ...],
                                                                  tuple[str, ...]]:
    """(multiplied, divided) filters of a mergekit file's scales, from its first ``parameter``
    setting: all multiplied, unless they are a :class:`HopForm`'s outputs and inputs (OLMo)."""
    setting = _setting_in(data, parameter)
    if not isinstance(setting, list):
        return (), ()
    filters = tuple(str(c.get("filter")) for c in setting if isinstance(c, Mapping))
    for form in HOP_FORMS.values():
        if form.inputs and set(filters) == {*form.outputs, *form.inputs}:
            return form.outputs, form.inputs
    return filters, ()


def _scale_of(params: Mapping[str, Any], parameter: str, projections: Sequence[str],
              inputs: Sequence[str], where: str) -> float:
    other = "scale" if parameter == "norm_scale" else "norm_scale"
    if params.get(other) is not None:
        raise RecipeError(f"{where}.parameters.{other}: this recipe's scales are {parameter} "
                          "parameters (one kind per recipe)")
    setting = params.get(parameter)
    if setting is None:
        return 1.0
    if not isinstance(setting, list) or not all(isinstance(c, Mapping) and "value" in c
                                                 for c in setting):
        raise RecipeError(f"{where}.parameters.{parameter}: expected a list of {{filter, value}}")
    values = {c.get("filter"): float(c["value"]) for c in setting}
    scales = {values.get(f) for f in projections}
    if set(values) != {*projections, *inputs} or len(scales) != 1:
        raise RecipeError(f"{where}.parameters.{parameter}: expected one value for each output "
                          f"projection {list(projections)}"
                          + (f" and its inverse for each input {list(inputs)}" if inputs else "")
                          + f", got {setting}")
    scale = next(iter(scales))
    if any(abs(values[f] * scale - 1.0) > 1e-9 for f in inputs):
        raise RecipeError(f"{where}.parameters.{parameter}: the inputs {list(inputs)} must be "
                          f"scaled by 1 / {scale}, got {setting}")
    return scale
