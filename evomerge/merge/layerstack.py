"""Layer stacks: models assembled from other models' transformer blocks (DFS merges).

A :class:`~evomerge.recipe.layers.LayerRecipe` is plain data in mergekit's ``passthrough`` +
``slices`` syntax: an ordered list of layer ranges, each from one model, each optionally carrying
a *residual scale* ``s`` that multiplies what its blocks add to the residual stream (how
depends on the family, below). Embeddings come from the first slice's model, the final norm and
the head from the last slice's model -- mergekit's own convention. In models with tied
embeddings the head *is* the first slice's embedding matrix. A stacked model keeps each block's
own per-layer configuration: the config's ``layer_types`` (sliding or full attention: Gemma 2/3,
Mistral, Qwen, OLMo 3) and other per-layer lists (:data:`PER_LAYER_FIELDS`) are re-built to
follow the path.

mergekit: a recipe runs unchanged in ``mergekit-yaml`` and gives the same tensors (tested) when
it has no ``merged`` models and its scales are written as mergekit ``scale`` parameters -- which
they are exactly where multiplying the named tensors by the value is what the scale means:
pre-norm and OLMo-style families. Gemma 2/3 scales are ``norm_scale`` parameters (mergekit's
``scale`` would compute ``1 + s w``, another function); mergekit does not know them and ignores
them (it writes the unscaled stack), so :meth:`LayerRecipe.to_yaml` says so in a comment and such
recipes are materialised with ``evomerge merge``. mergekit changes only ``num_hidden_layers`` in
the config: for families with ``layer_types`` (Gemma 2/3, Qwen2/3, Mistral, OLMo 3 in
transformers 5) its stacks load only at the sources' depth and with the sources' layer types.

Hop scales
----------
Sakana's DFS multiplies the hidden state by a scale on every hop of the path
(:mod:`evomerge.spaces.dfs`: ``W[i, j]`` when the path goes from layer i to layer j, and, ours, a
scale on the first block's input, the embedding output). Let ``E`` be the embedding output, ``H_p``
the residual stream entering path block ``p`` (after its hop scale ``w_p``), ``c_p = w_0 w_1 ...
w_p`` and ``f_p`` what block ``p`` adds, so ``H_0 = w_0 E`` and ``H_{p+1} = w_{p+1} (H_p +
f_p(H_p))``. The stream ``g_p = H_p / c_p`` is never rescaled: ``g_0 = E`` (the embeddings are
used as they are) and

    g_{p+1} = (H_p + f_p(H_p)) / c_p = g_p + s_p f_p(g_p / s_p),    s_p = 1 / c_p

(:func:`fold_scales`: ``s_p`` is the scale of the slice holding block ``p``), and the final
norm reads ``s H`` (``s`` of the last block) where Sakana's model has ``H``. The first hop
``w_0`` is folded like every other: it is not the identity even though the norms are
scale-invariant, because it weighs the embedding against what the blocks add (a one-block
path ends in ``norm(w_0 E + f_0(w_0 E)) = norm(E + f_0(w_0 E) / w_0)``); folded, it puts a
factor ``1 / w_0`` into every ``s_p`` and leaves the embeddings as they are; with ``w_0 = 1``
the scales are those of the later hops alone. So a plain model of
the path's blocks computes Sakana's function when block ``p`` (a) reads its input as
``g_p / s_p`` and (b) has its contribution multiplied by ``s_p``, which the families allow as
follows (:data:`evomerge.recipe.layers.HOP_FORMS`):

* **Pre-norm** (Llama, Mistral, Qwen2/3, Phi-3, Gemma, GPT-2, GPT-NeoX -- parallel or
  sequential residual, both branches read the stream through their own input norm): each branch
  reads the stream through a scale-invariant norm (RMSNorm or LayerNorm, ``s > 0``), so (a)
  holds as is; a branch's contribution is its *output projection*'s output (``o_proj`` /
  ``down_proj``, GPT-2's ``c_proj``, NeoX's ``attention.dense`` / ``dense_4h_to_h``), linear in
  its weight and bias, so (b) multiplies both by ``s`` -- mergekit's ``scale``.
* **Sandwich norms** (Gemma 2, Gemma 3: a norm before *and after* each branch): (a) holds as
  above; the contribution is the post-branch norm's output ``x^ (1 + w)`` (scaling the output
  projection would be undone by that norm), so (b) multiplies that norm's output by ``s``:
  ``w -> s (1 + w) - 1``, exact. mergekit's ``scale`` would give ``1 + s w``, hence
  ``norm_scale``. The embeddings are not touched, so tied embeddings stay tied.
* **Post-branch norms, no input norms** (OLMo 2/3): a branch reads the raw stream, so (a)
  divides the weights (not the biases) of the maps that read it -- ``q/k/v_proj``,
  ``gate/up_proj`` -- by ``s``: ``W (g / s) + b``; the contribution is the post-branch norm's
  output ``w x^``, so (b) multiplies ``w`` by ``s``. Both are mergekit ``scale`` values (``s``
  on the norms, ``1 / s`` on ``*_proj.weight``).

Every form is exact but for the epsilon of the scale-invariant norms that read ``g`` instead of
``H`` (``x / sqrt(mean(x^2) + eps)``): all norms before a branch and the final norm in pre-norm
and sandwich families, only the final norm in OLMo. On trained models (``mean(x^2) >> eps``)
that is far below the dtype's rounding. A family outside the table cannot carry scales: the DFS
space refuses ``scales: true`` for it; a mergekit file's ``scale`` parameters are applied as
written (multiply the named tensors).

:class:`LayerStack` builds a recipe *by reference*: a shell model of the path's depth is made on
the meta device and its parameters are assigned the resident tensors of the source blocks (no
weight copies); scales are forward (pre-)hooks on the shell's own modules -- outputs times ``s``,
inputs divided by ``s`` -- so two positions of one source block can carry different scales, and
the stacked model is the function :meth:`LayerStack.materialise` writes as real tensors (scales
folded into the weights) for export.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from evomerge.merge.engine import BLOCK, layer_group
from evomerge.merge.names import model_names
from evomerge.recipe import LayerRecipe, MergeRecipe, RecipeError
from evomerge.recipe.layers import hop_form

__all__ = ["PER_LAYER_FIELDS", "LayerStack", "ResidentSources", "fold_scales"]


#: config fields holding one entry per block: a stack's entries follow its path
PER_LAYER_FIELDS: tuple[str, ...] = ("layer_types", "mlp_layer_types", "no_rope_layers")


def block_of(name: str) -> int | None:
    """The block index of a tensor name (``model.layers.3.mlp...`` -> 3), None outside blocks."""
    return layer_group(name).layer


def renumbered(name: str, index: int) -> str:
    """``name`` with its block index replaced by ``index``."""
    match = BLOCK.search(name)
    return name[:match.start(1)] + str(index) + name[match.end(1):] if match else name


def fold_scales(hops: Sequence[float]) -> list[float]:
    """Residual scales equal to multiplying the hidden state by ``hops[p]`` on entering path
    block ``p`` (``hops[0]``: the first block's input, the embedding output): block ``p`` gets
    ``s_p = 1 / (hops[0] * ... * hops[p])`` (derived in the module docstring)."""
    scales, running = [], 1.0
    for hop in hops:
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
    the shared HF config (equal hidden sizes are what make stacking possible; its per-layer
    fields are every source's); ``template`` is a real model of that config whose
    non-persistent buffers (rotary frequencies, Gemma's embedding scale) the shells borrow (only
    :meth:`build` needs it).
    """

    def __init__(self, tensors: Callable[[str], Mapping[str, torch.Tensor]], config: Any,
                 template: torch.nn.Module | None = None) -> None:
        self.tensors = tensors
        self.config = config
        self.buffers = dict(template.named_buffers()) if template is not None else {}
        self._blocks: dict[str, dict[int, list[str]]] = {}  # model -> block -> tensor names

    @property
    def family(self) -> str:
        return str(getattr(self.config, "model_type", None) or "unknown")

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
        """Stacked checkpoint tensor name -> resident source tensor, for the recipe's path."""
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

    def per_layer(self, blocks: Sequence[int]) -> dict[str, list[Any]]:
        """The config's per-layer fields (:data:`PER_LAYER_FIELDS`) for a stack of the source
        blocks ``blocks`` (one per position): each position keeps its block's entry."""
        depth = self.config.num_hidden_layers
        out = {}
        for name in PER_LAYER_FIELDS:
            values = getattr(self.config, name, None)
            if isinstance(values, (list, tuple)) and len(values) == depth:
                out[name] = [values[b] for b in blocks]
        return out

    def shell_config(self, blocks: Sequence[int]) -> Any:
        """The sources' config with the depth of ``blocks`` and per-layer fields following them."""
        config = copy.deepcopy(self.config)
        per_layer = self.per_layer(blocks)
        config.num_hidden_layers = len(blocks)
        for name, values in per_layer.items():
            setattr(config, name, values)
        return config

    def _check(self, recipe: LayerRecipe) -> None:
        """Scales this family's modules mean what the recipe says (the module docstring)."""
        if all(s.scale == 1.0 for s in recipe.slices):
            return
        form = hop_form(self.family)
        if recipe.offset and not (form is not None and form.offset):
            raise RecipeError(f"norm_scale: scales of (1 + weight) norms (Gemma 2/3) do not "
                              f"apply to {self.family} models; use mergekit's scale")
        if (form is not None and form.offset and not recipe.offset
                and set(recipe.projections) & set(form.outputs)):
            raise RecipeError(f"scale: {self.family} norms compute x (1 + weight), so scaling "
                              "their weights does not scale their outputs; write the scales as "
                              "norm_scale parameters")

    def build(self, recipe: LayerRecipe) -> torch.nn.Module:
        """The stacked model, sharing every weight with the resident sources."""
        from transformers import AutoModelForCausalLM

        self._check(recipe)
        path = recipe.path
        named = self._named(recipe)
        with torch.device("meta"):
            shell = AutoModelForCausalLM.from_config(self.shell_config([b for _, b, _ in path]))
        expected = shell.state_dict()
        # checkpoint names -> the class's (GPT-NeoX: embed_out -> lm_head), as from_pretrained
        targets = model_names(shell, list(named), expected)
        assigned = {targets[n]: t for n, t in named.items() if targets[n] in expected}
        missing = sorted(set(expected) - set(assigned))
        if self.config.tie_word_embeddings:
            missing = [n for n in missing if not _is_head(n)]
        if missing:
            raise RecipeError(f"cannot stack: no source tensor for {', '.join(missing[:5])}")
        shell.load_state_dict(assigned, strict=False, assign=True)
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
                _hook_scale(shell, position, recipe, scale)
        return shell.eval()

    def materialise(self, recipe: LayerRecipe) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Real tensors of the stacked model under the checkpoints' names (scales folded into the
        weights as the recipe's YAML says: mergekit's ``scale`` multiplies the named tensors,
        ``norm_scale`` makes ``1 + w`` into ``s (1 + w)``) and the config fields that differ
        from the sources' (depth, per-layer fields)."""
        self._check(recipe)
        path = recipe.path
        scales = {position: scale for position, (_, _, scale) in enumerate(path)}
        state: dict[str, torch.Tensor] = {}
        for name, tensor in self._named(recipe).items():
            position = block_of(name)
            scale = scales.get(position, 1.0) if position is not None else 1.0
            state[name] = _folded(name, tensor, scale, recipe)
        blocks = [b for _, b, _ in path]
        depth = getattr(self.config, "attribute_map", {}).get("num_hidden_layers",
                                                              "num_hidden_layers")
        return state, {depth: len(path), **self.per_layer(blocks)}


def _is_head(name: str) -> bool:
    return "lm_head" in name or "embed_out" in name


def _is_post(name: str) -> bool:
    """Tensors after the blocks: the final norm and the head (taken from the last slice)."""
    return layer_group(name).name in ("final_norm", "head")


def _template_name(name: str) -> str:
    """A shell buffer's name in the template: block buffers map to block 0 (they are equal)."""
    return renumbered(name, 0) if block_of(name) is not None else name


def _role(name: str, recipe: LayerRecipe) -> str | None:
    """``"out"`` for a tensor a slice's scale multiplies, ``"in"`` for one it divides, else None
    (mergekit's rule: the first filter contained in the name decides)."""
    for f in recipe.projections:
        if f in name:
            return "out"
    for f in recipe.inputs:
        if f in name:
            return "in"
    return None


def _folded(name: str, tensor: torch.Tensor, scale: float, recipe: LayerRecipe) -> torch.Tensor:
    """One stacked tensor with its slice's scale folded in (a copy)."""
    role = _role(name, recipe) if scale != 1.0 else None
    if role == "out" and recipe.offset:  # x (1 + w) * s = x (1 + (s (1 + w) - 1))
        return ((1.0 + tensor.float()) * scale - 1.0).to(tensor.dtype)
    if role == "out":
        return tensor * scale
    if role == "in":
        return tensor * (1.0 / scale)  # as mergekit applies the written value 1 / s
    return tensor.clone()


def _hook_scale(shell: torch.nn.Module, position: int, recipe: LayerRecipe,
                scale: float) -> None:
    """Block ``position``'s scale as hooks on the shell's own modules (the same source block
    elsewhere in the path is unaffected): a module all of whose tensors the scale multiplies
    gets its output multiplied, a linear map whose weight alone it divides gets its input
    divided -- the functions of the folded tensors."""
    hooked = 0
    for name, module in shell.named_modules():
        if block_of(name + ".") != position:
            continue
        roles = {p: _role(f"{name}.{p}", recipe)
                 for p, _ in module.named_parameters(recurse=False)}
        if roles and all(r == "out" for r in roles.values()):
            module.register_forward_hook(lambda _m, _i, out, s=scale: out * s)
        elif roles.get("weight") == "in" and roles.get("bias") is None and len(
                [r for r in roles.values() if r]) == 1:
            module.register_forward_pre_hook(
                lambda _m, args, s=1.0 / scale: (args[0] * s, *args[1:]))
        elif any(roles.values()):
            raise RecipeError(f"scale filters select only some tensors of {name} "
                              f"({', '.join(p for p, r in roles.items() if r)}): a stacked "
                              "model scales whole module outputs or linear inputs")
        else:
            continue
        hooked += 1
    if not hooked:
        raise RecipeError(f"no output projection {list(recipe.projections)} in block {position}")
