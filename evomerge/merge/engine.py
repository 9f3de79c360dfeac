"""The Merger: source models resident once, candidates written in place, in bounded memory.

A merge search builds thousands of candidates from the same few checkpoints. mergekit reads every
source from disk and allocates a fresh model per merge; here the base and sources are loaded once
and ``build(recipe, into=model)`` overwrites one pre-allocated model tensor by tensor.

**Memory contract** (users bring 2-8 checkpoints of 1-8B parameters):

* Resident: the inputs - memory-mapped safetensors on the CPU (file pages the kernel may drop and
  re-read, not private memory), or on the device - plus the one build target the caller passes
  (or one allocation when it passes none). With ``device_budget`` smaller than the inputs, they
  stay in host memory instead and each layer group is copied to the device while the previous
  one merges (:class:`_Streamer`); only two groups are on the device at a time.
* Scratch: a fixed number of buffers of at most ``chunk`` elements in the work dtype (float32
  for 16-bit inputs, float64 for float32), one 2^20-element random block per source for
  DARE/DELLA, and the values of a magnitude bracket (about ``100 * sqrt(n)`` for an n-element
  tensor). Never proportional to the model.
* Statistics kept across builds: a scalar L1 norm and a sorted 1/256 sample of |delta| per
  (tensor, source): at most 1/64 of a bf16 source's bytes in float32.
* Nothing as large as a source is cached unless asked: ``cache="on"`` (or a byte budget, or
  ``"auto"`` = half the memory available when the Merger is made) keeps fully sorted |delta|
  (exact TIES/breadcrumbs thresholds without a pass) and DELLA's per-row ranks, tensor by tensor
  while they fit the budget.

:meth:`Merger.memory` reports each of these in bytes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.merge.checkpoints import (InputModelsError, check_compatible, check_finite, dtype_code,
                                        load_state_dict, nonfinite_problems)
from evomerge.merge.export import parse_size
from evomerge.merge.methods import DEFAULT_CHUNK, TensorInputs, Workspace, get_method, work_dtype
from evomerge.merge.names import model_names
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


def _distinct(models: Sequence[str | Path]) -> dict[str, str | Path]:
    """Each model once, by identity, as first named."""
    out: dict[str, str | Path] = {}
    for m in models:
        out.setdefault(_key(m), m)
    return out


def _cast(info, dtype: torch.dtype | None) -> torch.dtype | None:
    """``dtype`` when loading casts some floating-point tensor of ``info`` to it, else None."""
    stored = {m.dtype for m in info.tensors.values() if m.dtype in ("F64", "F32", "F16", "BF16")}
    return dtype if dtype is not None and stored - {dtype_code(dtype)} else None


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def available_memory(device: torch.device) -> int:
    """Bytes free now: ``MemAvailable`` of /proc/meminfo on the CPU, the CUDA free memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cache_budget(cache: str | int | bool | None, device: torch.device) -> float:
    """Bytes the opt-in cache may hold: off/None/False 0, on/True unlimited, auto half of what is
    available, or a size (``2GB``, bytes)."""
    if cache in (None, False, "off"):
        return 0
    if cache in (True, "on"):
        return math.inf
    if cache == "auto":
        return available_memory(device) / 2
    try:
        return parse_size(cache)
    except ValueError:
        raise ValueError(f"cache: expected off, on, auto or a size like '2GB', got {cache!r}"
                         ) from None


class Merger:
    """Holds base and sources; writes any recipe over them into a given model.

    Parameters
    ----------
    models: every checkpoint a recipe may name (local HF directories); the first is the default
        base. Compatibility (architecture, names, shapes, dtypes) is checked before loading.
    device: where merges run (``"cuda"`` on a GPU machine).
    dtype: load and merge in this dtype (default: the checkpoints' own, which must then agree;
        a cast makes private copies of the inputs).
    cache: ``"off"`` (default), ``"on"``, ``"auto"`` or a byte budget for source-sized caches
        (see the module docstring): faster TIES/breadcrumbs/DELLA builds for memory.
    chunk: elements per scratch chunk (default 2^20 on the CPU, 2^22 on a GPU).
    device_budget: bytes of inputs that may live on the device (``"auto"``: on a GPU, what is
        free after one output and scratch; on the CPU, unlimited). When the inputs are larger,
        they stay in host memory and stream to the device one layer group at a time.
    """

    def __init__(self, models: Sequence[str | Path], *, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str | None = None, cache: str | int | bool | None = "off",
                 chunk: int | None = None, device_budget: int | str | None = "auto",
                 progress: Callable[[Iterable], Iterable] | None = None) -> None:
        if not models:
            raise ValueError("Merger needs at least one model")
        if isinstance(dtype, str):
            dtype = _DTYPES[dtype]
        self.device = torch.device(device)
        if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"chunk: expected a positive number of elements, got {chunk!r}")
        self.chunk = chunk or (DEFAULT_CHUNK if self.device.type == "cpu" else 4 * DEFAULT_CHUNK)
        self._cache_budget = cache_budget(cache, self.device)
        # Checkpoints stored in different dtypes merge fine once cast to one explicit dtype.
        # Every problem of the inputs (headers, the config.json of the first, NaN/inf weights)
        # is raised as one error before the first build.
        try:
            self.infos = check_compatible(list(models), check_dtypes=dtype is None)
        except InputModelsError as exc:
            extra = check_finite(models)
            raise (InputModelsError if extra else type(exc))(exc.problems + extra) from None
        self.dtype = dtype
        self.paths = [Path(m) for m in models]
        self.streaming = self._streams(device_budget)
        home = torch.device("cpu") if self.streaming else self.device
        loader = progress or (lambda it: it)
        self.tensors: dict[str, dict[str, torch.Tensor]] = {
            _key(m): load_state_dict(m, device=home, dtype=dtype) for m in loader(models)
        }
        # One pass over the weights (see nonfinite_tensors for its cost): a NaN/inf input
        # would make every candidate NaN, found only as a search's worst scores.
        info = dict(zip(map(_key, models), self.infos))
        problems = [p for key, m in _distinct(models).items()
                    for p in nonfinite_problems(m, self.tensors[key], cast=_cast(info[key], dtype))]
        if problems:
            raise InputModelsError(problems)
        first = self._reference = next(iter(self.tensors.values()))
        self.names: list[str] = list(first)
        self.groups = {name: layer_group(name) for name in self.names}
        self.num_layers = 1 + max((g.layer for g in self.groups.values() if g.layer is not None),
                                  default=-1)
        order = {g: i for i, g in enumerate(self.group_names)}
        self._group_order: list[list[str]] = [[] for _ in order]
        for name in self.names:
            self._group_order[order[self.groups[name].name]].append(name)
        self._stats: dict[str, dict] = {name: {} for name in self.names}
        self._cache: dict[str, dict] = {}
        self._cache_reserved = 0
        self._same: dict[tuple[str, str], bool] = {}
        self._workspace = Workspace()

    def _streams(self, device_budget: int | str | None) -> bool:
        """Whether the inputs exceed what may live on the device (then they stream)."""
        sizes = [sum(m.numel * (self.dtype or m.torch_dtype).itemsize
                     for m in info.tensors.values()) for info in self.infos]
        inputs = sum(sizes)
        if device_budget is None:
            return False
        if device_budget == "auto":
            if self.device.type == "cpu":
                return False
            output = max(sizes)
            scratch = 16 * self.chunk * 8
            return inputs > available_memory(self.device) - output - scratch
        return inputs > parse_size(device_budget)

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
        """The tensors of one loaded model (read-only by convention; host tensors when
        streaming)."""
        return self.tensors[self._resolve_ref(model, "model")]

    def allocate(self) -> dict[str, torch.Tensor]:
        """A pre-allocated state dict on the device to build into (shapes/dtypes of the base)."""
        return {n: torch.empty(t.shape, dtype=t.dtype, device=self.device)
                for n, t in self._reference.items()}

    def memory(self) -> dict[str, int]:
        """Bytes held, by kind: ``inputs`` (mapped or resident), ``scratch``, ``stats``,
        ``cache`` (the opt-in one) - the terms of the memory contract."""
        stats = sum(v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 8
                    for entry in self._stats.values() for v in entry.values())
        cache = sum(_nbytes(entry.values()) for entry in self._cache.values())
        return {"inputs": sum(_nbytes(s.values()) for s in self.tensors.values()),
                "scratch": self._workspace.nbytes, "stats": stats, "cache": cache}

    def build(self, recipe: MergeRecipe, into: torch.nn.Module | dict[str, torch.Tensor] | None = None,
              *, progress: Callable[[Iterable[str]], Iterable[str]] | None = None
              ) -> dict[str, torch.Tensor]:
        """Write the merge described by ``recipe`` into ``into`` in place and return its tensors.

        ``into`` is an ``nn.Module`` that holds every checkpoint tensor (an HF model made from
        the base config; its names may differ from the checkpoint's where transformers renames
        on load, see :meth:`target_names`), a dict of tensors by checkpoint name (see
        :meth:`allocate`), or None for a fresh allocation. The tensors come back by checkpoint
        name. Every problem (unknown model, missing tensor) is raised before the first tensor
        is written.
        """
        method = get_method(recipe.merge_method)
        base_key = self._resolve_ref(recipe.base_model, "base_model") if recipe.base_model else None
        source_keys = [self._resolve_ref(e.model, f"models[{i}].model")
                       for i, e in enumerate(recipe.source_entries())]
        targets = self._targets(into)
        use_base = base_key is not None and method.base == "required"
        keys = list(dict.fromkeys(([base_key] if use_base else []) + source_keys))
        order = [name for group in self._group_order for name in group]
        names = iter(progress(order) if progress else order)
        with torch.inference_mode():
            for group, tensors in self._groups(keys):
                for name in group:
                    next(names, None)
                    if name not in targets:  # a tensor the target model does not keep
                        continue
                    shared, per_source = recipe.resolve(
                        name, gradient_position(self.groups[name], self.num_layers))
                    inputs = TensorInputs(
                        name=name,
                        base=tensors[base_key][name] if use_base else None,
                        sources=[tensors[k][name] for k in source_keys],
                        seed=recipe.seed,
                        chunk=self.chunk,
                        stats=self._stats[name],
                        cache=self._cache_for(name, len(keys)),
                        source_keys=source_keys,
                        base_key=base_key,
                        workspace=self._workspace,
                    )
                    method.fn(inputs, shared, per_source, targets[name])
            for _ in names:  # let a progress bar finish
                pass
        return targets

    def clear_cache(self) -> None:
        """Drop kept statistics and the opt-in cache (they are rebuilt on demand)."""
        for entry in self._stats.values():
            entry.clear()
        self._cache.clear()
        self._cache_reserved = 0

    # ---- helpers -----------------------------------------------------------------------------

    def _groups(self, keys: list[str]) -> Iterator[tuple[list[str], dict[str, dict]]]:
        """Layer groups in order with the input tensors they read, on the device."""
        if not self.streaming:
            for group in self._group_order:
                yield group, self.tensors
            return
        yield from _Streamer(self.tensors, keys, self._group_order, self.device)

    def _cache_for(self, name: str, models: int) -> dict | None:
        """The opt-in cache of one tensor, when its worst case still fits the budget."""
        if name in self._cache:
            return self._cache[name]
        ref = self._reference[name]
        need = ref.numel() * (work_dtype(ref.dtype).itemsize + 4) * models
        if not ref.is_floating_point() or self._cache_reserved + need > self._cache_budget:
            return None
        self._cache_reserved += need
        return self._cache.setdefault(name, {})

    def _resolve_ref(self, ref: str | Path, field: str) -> str:
        key = _key(ref)
        if key not in self.tensors:
            loaded = ", ".join(str(p) for p in self.paths)
            raise RecipeError(f"{field}: model {ref} is not loaded in this Merger (loaded: {loaded})")
        return key

    def target_names(self, model: torch.nn.Module) -> dict[str, str | None]:
        """Checkpoint tensor name -> the name ``model``'s state dict has for it (as transformers'
        ``from_pretrained`` maps it, e.g. GPT-NeoX ``embed_out.weight`` -> ``lm_head.weight``),
        or None for a tensor the model does not keep (old buffers it recomputes); see
        :mod:`evomerge.merge.names`."""
        return model_names(model, self.names)

    def copy(self, model: str | Path, into: torch.nn.Module | dict[str, torch.Tensor]
             ) -> dict[str, torch.Tensor]:
        """Write one loaded model's tensors, as they are, into ``into`` (a build target)."""
        state = self.state(model)
        targets = self._targets(into)
        with torch.inference_mode():
            for name in self.names:
                if name in targets:
                    targets[name].copy_(state[name])
        return targets

    def _same_everywhere(self, a: str, b: str) -> bool:
        """Whether every loaded model stores equal values under tensor names ``a`` and ``b``
        (computed once per pair: the inputs never change)."""
        key = (a, b)
        if key not in self._same:
            self._same[key] = all(torch.equal(t[a], t[b]) for t in self.tensors.values())
        return self._same[key]

    def _targets(self, into: torch.nn.Module | dict[str, torch.Tensor] | None
                 ) -> dict[str, torch.Tensor]:
        """The tensors to write, by checkpoint name (a model's own names translated; tensors
        the model does not keep are left out)."""
        if into is None:
            return self.allocate()
        names = self.names
        if isinstance(into, torch.nn.Module):
            state = {n: p.data for n, p in into.state_dict(keep_vars=True).items()}
            renamed = model_names(into, self.names, state)
            names = [n for n in names if renamed[n] is not None]
            into = {n: state[renamed[n]] for n in names if renamed[n] in state}
        missing = [n for n in names if n not in into]
        ref = self._reference
        wrong = [f"{n} {tuple(into[n].shape)} != {tuple(ref[n].shape)}"
                 for n in names if n in into and into[n].shape != ref[n].shape]
        # two checkpoint tensors in one target tensor (a tied model): harmless when every
        # checkpoint stores the same values under both names (written once, as from_pretrained
        # ties them); otherwise the second write would silently overwrite the first
        first: dict[tuple[int, int], str] = {}
        tied = []
        for n in names:
            if n in into and into[n].numel():
                where = (into[n].untyped_storage().data_ptr(), into[n].storage_offset())
                if where not in first:
                    first[where] = n
                elif self._same_everywhere(first[where], n):
                    into = {k: v for k, v in into.items() if k != n}
                else:
                    tied.append(f"{n} and {first[where]} are one tensor in the target (tied "
                                "weights) but the checkpoints store different values (transformers "
                                "unties such checkpoints on load: set tie_word_embeddings: false "
                                "in the base's config.json)")
        if missing or wrong or tied:
            lines = ([f"missing tensor {n}" for n in missing] + [f"shape {w}" for w in wrong]
                     + tied)
            raise ValueError("build target does not match the checkpoints:\n  " + "\n  ".join(lines))
        return into


class _Streamer:
    """Layer groups' input tensors copied to the device while the previous group merges.

    A background thread copies group g + 1 (host -> pinned staging -> device on a side CUDA
    stream; on the CPU, from the memory map into private memory, the same code path) while the
    caller merges group g; the caller's stream waits for the copy's event before reading it. At
    most two groups of inputs are on the device at once.
    """

    def __init__(self, host: dict[str, dict[str, torch.Tensor]], keys: list[str],
                 order: list[list[str]], device: torch.device) -> None:
        self.host, self.keys, self.order, self.device = host, keys, order, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _copy(self, names: list[str]) -> tuple[dict[str, dict[str, torch.Tensor]], object]:
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            staged, event = {}, None
            for key in self.keys:
                staged[key] = {}
                for name in names:
                    t = self.host[key][name]
                    if self.stream is not None:
                        staged[key][name] = t.pin_memory().to(self.device, non_blocking=True)
                    else:
                        staged[key][name] = t.to(self.device, copy=True)
            if self.stream is not None:
                event = torch.cuda.Event()
                event.record(self.stream)
        return staged, event

    def __iter__(self) -> Iterator[tuple[list[str], dict[str, dict[str, torch.Tensor]]]]:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="evomerge-stream") as pool:
            ahead = pool.submit(self._copy, self.order[0]) if self.order else None
            for i, group in enumerate(self.order):
                staged, event = ahead.result()
                if i + 1 < len(self.order):
                    ahead = pool.submit(self._copy, self.order[i + 1])
                if event is not None:
                    torch.cuda.current_stream(self.device).wait_event(event)
                yield group, staged
                del staged
