"""The Merger: source models resident once, candidates written in place.

A merge search builds thousands of candidates from the same few checkpoints. mergekit reads every
source from disk and allocates a fresh model per merge; here the base and sources are loaded once
(onto the GPU where there is one), per-source derived tensors that do not depend on the recipe
(task vectors, sorted magnitudes for TIES/breadcrumbs, DELLA ranks) are cached on first use, and
``build(recipe, into=model)`` overwrites one pre-allocated model tensor by tensor. Scratch is
bounded by the largest tensor times the number of sources; nothing is re-instantiated and
nothing touches the disk.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.merge.io import check_compatible, load_state_dict
from evomerge.merge.methods import TensorInputs, Workspace
from evomerge.recipe import MergeRecipe, RecipeError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}

# Block containers of HF decoders: Llama/Mistral/Qwen "model.layers.N", GPT-2 "transformer.h.N",
# BLOOM "h.N", GPT-NeoX "gpt_neox.layers.N", Falcon "transformer.h.N", MPT "blocks.N",
# BERT-style "encoder.layer.N".
BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
_EMBED = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "tok_embeddings")
_HEAD = ("lm_head", "embed_out", "output.weight", "score.")


@dataclass(frozen=True)
class LayerGroup:
    """Where a tensor sits: ``embed``, ``layers.{i}``, ``final_norm``, ``head`` or ``other``."""

    name: str
    layer: int | None = None


def layer_group(tensor_name: str) -> LayerGroup:
    """Assign a tensor of any HF decoder to its layer group, from its name alone."""
    match = BLOCK.search(tensor_name)
    if match:
        index = int(match.group(1))
        return LayerGroup(f"layers.{index}", index)
    if any(key in tensor_name for key in _HEAD):  # before embed: NeoX's head is "embed_out"
        return LayerGroup("head")
    if any(key in tensor_name for key in _EMBED):
        return LayerGroup("embed")
    if "norm" in tensor_name or "ln_f" in tensor_name:
        return LayerGroup("final_norm")
    return LayerGroup("other")


def gradient_position(group: LayerGroup, num_layers: int) -> float:
    """mergekit's ``t`` for gradient settings: i / (L - 1) in block i, 0 outside blocks."""
    if group.layer is None:
        return 0.0
    return group.layer / (num_layers - 1) if num_layers > 1 else 1.0


def _key(ref: str | Path) -> str:
    """One identity per model whether written relative, absolute or with trailing slashes."""
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else str(ref)


class Merger:
    """Holds base and sources resident; writes any recipe over them into a given model.

    Parameters
    ----------
    models: every checkpoint a recipe may name (local HF directories); the first is the default
        base. Compatibility (architecture, names, shapes, dtypes) is checked before loading.
    device: where tensors live and merges run (``"cuda"`` on a GPU machine).
    dtype: load and merge in this dtype (default: the checkpoints' own, which must then agree).
    cache: keep recipe-independent derived tensors (task vectors, sort statistics) across builds.
        Costs up to two extra copies of each source for TIES-like methods; turn off when memory
        is tighter than time.
    """

    def __init__(self, models: Sequence[str | Path], *, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str | None = None, cache: bool = True,
                 progress: Callable[[Iterable], Iterable] | None = None) -> None:
        if not models:
            raise ValueError("Merger needs at least one model")
        if isinstance(dtype, str):
            dtype = _DTYPES[dtype]
        # Checkpoints stored in different dtypes merge fine once cast to one explicit dtype.
        self.infos = check_compatible(list(models), check_dtypes=dtype is None)
        self.device = torch.device(device)
        self.dtype = dtype
        self.cache_enabled = cache
        self.paths = [Path(m) for m in models]
        loader = progress or (lambda it: it)
        self.tensors: dict[str, dict[str, torch.Tensor]] = {
            _key(m): load_state_dict(m, device=self.device, dtype=dtype) for m in loader(models)
        }
        first = self._reference = next(iter(self.tensors.values()))
        self.names: list[str] = list(first)
        self.groups = {name: layer_group(name) for name in self.names}
        self.num_layers = 1 + max((g.layer for g in self.groups.values() if g.layer is not None),
                                  default=-1)
        self._cache: dict[str, dict] = {name: {} for name in self.names}
        self._workspace = Workspace()

    @classmethod
    def for_recipe(cls, recipe: MergeRecipe, **kwargs) -> Merger:
        """A Merger over exactly the models a recipe reads, in the recipe's dtype.

        Model references that are not directories are reported together, by recipe field,
        before anything is loaded.
        """
        fields = [("base_model", recipe.base_model)] if recipe.base_model else []
        fields += [(f"models[{i}].model", e.model) for i, e in enumerate(recipe.models)]
        missing = [f"{field}: {ref} is not a directory" for field, ref in fields
                   if not Path(ref).expanduser().is_dir()]
        if missing:
            raise RecipeError("models not found (evomerge reads local Hugging Face directories "
                              "only; download them first):\n  " + "\n  ".join(missing))
        kwargs.setdefault("dtype", recipe.dtype)
        return cls(recipe.model_paths(), **kwargs)

    @property
    def group_names(self) -> list[str]:
        """Layer groups in model order: embed, layers.0 .. layers.{L-1}, final_norm, head."""
        order = {"embed": (0, 0), "final_norm": (2, 0), "head": (3, 0), "other": (4, 0)}
        groups = {g.name: order.get(g.name, (1, g.layer)) for g in self.groups.values()}
        return sorted(groups, key=groups.__getitem__)

    def state(self, model: str | Path) -> Mapping[str, torch.Tensor]:
        """The resident tensors of one loaded model (read-only by convention)."""
        return self.tensors[self._resolve_ref(model, "model")]

    def allocate(self) -> dict[str, torch.Tensor]:
        """A pre-allocated state dict to build into (same shapes/dtypes as the base)."""
        return {n: torch.empty_like(t) for n, t in self._reference.items()}

    def build(self, recipe: MergeRecipe, into: torch.nn.Module | dict[str, torch.Tensor] | None = None,
              *, progress: Callable[[Iterable[str]], Iterable[str]] | None = None
              ) -> dict[str, torch.Tensor]:
        """Write the merge described by ``recipe`` into ``into`` in place and return its tensors.

        ``into`` is an ``nn.Module`` whose state dict has the checkpoint's tensor names (an HF
        model made from the base config), a dict of tensors (see :meth:`allocate`), or None for a
        fresh allocation. Every problem (unknown model, missing tensor) is raised before the first
        tensor is written.
        """
        method = recipe.method
        base_key = self._resolve_ref(recipe.base_model, "base_model") if recipe.base_model else None
        source_keys = [self._resolve_ref(e.model, f"models[{i}].model")
                       for i, e in enumerate(recipe.source_entries())]
        targets = self._targets(into)
        base = self.tensors[base_key] if base_key and method.base == "required" else None
        sources = [self.tensors[k] for k in source_keys]
        names = progress(self.names) if progress else self.names
        with torch.inference_mode():
            for name in names:
                group = self.groups[name]
                shared, per_source = recipe.resolve(name, gradient_position(group, self.num_layers))
                inputs = TensorInputs(
                    name=name,
                    base=base[name] if base is not None else None,
                    sources=[s[name] for s in sources],
                    seed=recipe.seed,
                    cache=self._cache[name] if self.cache_enabled else {},
                    source_keys=source_keys,
                    base_key=base_key,
                    workspace=self._workspace,
                )
                method.fn(inputs, shared, per_source, targets[name])
        return targets

    def clear_cache(self) -> None:
        """Drop cached task vectors and statistics (they are rebuilt on demand)."""
        for entry in self._cache.values():
            entry.clear()

    # ---- helpers -----------------------------------------------------------------------------

    def _resolve_ref(self, ref: str | Path, field: str) -> str:
        key = _key(ref)
        if key not in self.tensors:
            loaded = ", ".join(str(p) for p in self.paths)
            raise RecipeError(f"{field}: model {ref} is not loaded in this Merger (loaded: {loaded})")
        return key

    def _targets(self, into: torch.nn.Module | dict[str, torch.Tensor] | None
                 ) -> dict[str, torch.Tensor]:
        if into is None:
            return self.allocate()
        if isinstance(into, torch.nn.Module):
            into = {n: p.data for n, p in into.state_dict(keep_vars=True).items()}
        missing = [n for n in self.names if n not in into]
        ref = self._reference
        wrong = [f"{n} {tuple(into[n].shape)} != {tuple(ref[n].shape)}"
                 for n in self.names if n in into and into[n].shape != ref[n].shape]
        if missing or wrong:
            lines = [f"missing tensor {n}" for n in missing] + [f"shape {w}" for w in wrong]
            raise ValueError("build target does not match the checkpoints:\n  " + "\n  ".join(lines))
        return into
