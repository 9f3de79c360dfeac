"""Tensor names: a checkpoint's, and those of the transformers class it loads into.

A checkpoint does not always name its tensors as the model class does. transformers 5 renames on
load and back on save with per-architecture *conversion mappings*: GPT-NeoX (Pythia) checkpoints
store the head as ``embed_out.weight`` while ``GPTNeoXForCausalLM`` calls it ``lm_head.weight``;
legacy checkpoints say ``LayerNorm.gamma``/``beta`` for ``weight``/``bias``; a bare base-model
checkpoint lacks the ``base_model_prefix`` (``model.``) of its ``*ForCausalLM`` class. Old
checkpoints also hold buffers the class no longer keeps (Pythia's ``attention.bias`` /
``masked_bias`` causal masks, per-layer ``rotary_emb.inv_freq``), which ``from_pretrained``
ignores.

:func:`model_names` asks transformers itself, the way ``from_pretrained`` does: the model's
:func:`~transformers.conversion_mapping.get_model_conversion_mapping` renamings, the base-model
prefix rule, and the model's ignore-on-load patterns. A search builds each candidate into a model
by these names; what it exports goes back under the checkpoint's names, so the result has the
sources' layout (mergekit and older tools read it) and loads in transformers like the sources.
Models that are not transformers ``PreTrainedModel`` s (the digits MLP) keep the checkpoint's
names, as does everything on a transformers version without conversion mappings.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Mapping

import torch

__all__ = ["FusedTensorError", "model_names"]

# buffers that old checkpoints store and every transformers model recomputes: from_pretrained adds
# these to each model's ignore-on-load patterns (PreTrainedModel._adjust_missing_and_unexpected_keys)
_ALWAYS_IGNORED = (r"rotary_emb\.inv_freq", r"(^|\.)position_ids$", r"(^|\.)masked_bias$")

_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple[str, ...], dict]] = (
    weakref.WeakKeyDictionary())


class FusedTensorError(ValueError):
    """A checkpoint tensor that the model class fuses or splits on load (no one-to-one name)."""


def _transforms(model: torch.nn.Module) -> tuple[list, list] | None:
    """transformers' (renamings, converters) for ``model``; None when it has none to give."""
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # transformers < 5: names load as they are
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    transforms = get_model_conversion_mapping(model)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def _ignored(model: torch.nn.Module) -> re.Pattern[str]:
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    return re.compile("|".join(f"({p})" for p in (*sorted(patterns), *_ALWAYS_IGNORED)))


def model_names(model: torch.nn.Module, names: Iterable[str],
                state: Mapping[str, torch.Tensor] | None = None) -> dict[str, str | None]:
    """For each checkpoint tensor name, the name ``model``'s state dict has for it (as
    ``from_pretrained`` maps it), or None for a tensor the model ignores on load.

    A name that maps to nothing in the model and is not ignored is returned unchanged: the
    caller reports it as missing. Raises :class:`FusedTensorError` for a tensor that transformers
    fuses or splits on load (MoE experts stored one by one, ...), which has no single target.
    ``state``: the model's state dict when the caller has it. Cached per model and names.
    """
    names = tuple(names)
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == names:
        return cached[1]
    found = _transforms(model)
    if state is None:
        state = model.state_dict()
    if found is None:
        out: dict[str, str | None] = {n: n for n in names}
    else:
        from transformers.core_model_loading import apply_converters, rename_source_key

        renamings, converters = found
        prefix = getattr(model, "base_model_prefix", None) or None
        ignored = _ignored(model)
        out, fused = {}, []
        for name in names:
            if name in state:
                out[name] = name
                continue
            target, _ = rename_source_key(name, renamings, [], prefix, state)
            if target in state:
                out[name] = target
            elif ignored.search(name) or ignored.search(target):
                out[name] = None
            else:
                if apply_converters(target, converters)[1] is not None:
                    fused.append(name)
                out[name] = name
        if fused:
            raise FusedTensorError(
                f"{type(model).__name__} fuses or splits {len(fused)} checkpoint tensors on load "
                f"(e.g. {fused[0]}); evomerge builds only into models that hold each checkpoint "
                "tensor under one name")
    _CACHE[model] = (names, out)
    return out
