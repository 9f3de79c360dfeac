"""Language-model evaluators and the ``lm`` fitness over a suite of tasks.

The scorers (greedy generation, choice log-likelihoods) and the tokenization boundary they share
with lm-evaluation-harness are :mod:`evomerge.models.causal_lm`.

The ``lm`` fitness (``lm`` in :data:`~evomerge.fitness.base.FITNESSES`) reads a suite
(:mod:`evomerge.fitness.suite`), tokenizes every task's items once into left-padded tensors, and
scores each candidate: ``generate`` items by exact match of the stripped prediction with the
stripped answer, ``multiple_choice`` items by whether the gold choice has the highest
log-likelihood. ``item_scores[task]`` holds those 1.0 / 0.0 values; each
objective is the macro mean of its tasks' accuracies.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge.fitness.base import EvalResult, Fitness, Objective, resolve_dtype
from evomerge.fitness.suite import (
    SPLITS,
    ChoiceItem,
    GenerateItem,
    ObjectiveSpec,
    SuiteError,
    combine_objectives,
    load_items,
    load_suite,
    resolve_objectives,
)
from evomerge.models.causal_lm import (DEFAULT_BATCH_SIZE, ensure_pad_token, generate_rows, left_pad,
                                       scored_pair, sequence_loglikelihoods)

__all__ = ["LMFitness"]


# --------------------------------------------------------------------------------------------
# The suite fitness
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TaskData:
    """One task's split, tokenized once: left-padded rows and what each item is scored against.

    generate: one row per item (the prompt), ``answers`` the expected texts. multiple_choice: one
    row per (item, choice) (prompt + delimiter + choice), item ``i``'s rows are
    ``offsets[i]:offsets[i + 1]``, ``gold`` the right choice of each item.
    """

    item_ids: tuple[str, ...]
    ids: torch.Tensor
    lengths: torch.Tensor
    answers: tuple[str, ...] = ()
    cont_lengths: torch.Tensor | None = None
    offsets: np.ndarray | None = None
    gold: np.ndarray | None = None


class LMFitness(Fitness):
    """Accuracy of a causal LM on the tasks of a suite (``generate`` and ``multiple_choice``).

    Options: ``suite`` (a suite file, or a catalog name such as ``tinylm``), ``tasks`` (use
    only these tasks of the suite; an IRT-reduced fitness then anchors only them), ``objectives``
    (overrides the suite's; default one per task), ``batch_size``, ``device`` (where the data
    tensors and :meth:`new_model` live; a model elsewhere still works, batches follow it),
    ``max_items`` (the first N items of every task and split; for smoke runs),
    ``search_items`` (the first N items of every task's *search* split only: a cheaper search
    whose winner is still judged on every held-out item), ``dtype`` of :meth:`new_model`
    (default ``auto``: the base config's, see :func:`evomerge.fitness.base.resolve_dtype`;
    executors pass a concrete one), and ``base_model`` (the base checkpoint dir: its config and
    tokenizer).
    """

    def __init__(
        self,
        base_model: str | os.PathLike,
        suite: str | os.PathLike,
        objectives: Sequence[Mapping[str, Any] | ObjectiveSpec] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        device: str | torch.device = "cpu",
        max_items: int | None = None,
        search_items: int | None = None,
        dtype: str | torch.dtype = "auto",
        tasks: Sequence[str] | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        for key, value in (("max_items", max_items), ("search_items", search_items)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{key}: expected an integer >= 1 or null, got {value!r}")
        self.search_items = search_items
        if dtype != "auto":
            resolve_dtype(dtype, None)  # a bad dtype is refused before any file is read
        self.batch_size, self.max_items = batch_size, max_items
        self.device = torch.device(device)
        self.suite = load_suite(suite).select(tasks)
        self._objectives = resolve_objectives(
            objectives if objectives is not None else self.suite.objectives,
            self.suite.task_names,
            where="objectives" if objectives is not None else f"{self.suite.path}: objectives")
        self.objectives: list[Objective] = [obj for obj, _ in self._objectives]
        self.base_model = Path(base_model)
        self.config, self.tokenizer = _load_base(self.base_model)
        self.dtype = resolve_dtype(dtype, self.config)
        self._data = {split: {task.name: self._prepare(task, split) for task in self.suite.tasks}
                      for split in SPLITS}

    # ---- data --------------------------------------------------------------------------------

    def _prepare(self, task: Any, split: str) -> _TaskData:
        """Read, validate and tokenize one task's split; errors name the file and the item."""
        path = self.suite.data_file(task, split)
        limits = [n for n in (self.max_items, self.search_items if split == "search" else None)
                  if n is not None]
        items = load_items(path, task.kind)[:min(limits, default=None)]
        limit = getattr(self.config, "max_position_embeddings", None)
        pad = self.tokenizer.pad_token_id
        if task.kind == "generate":
            rows = [self.tokenizer.encode(it.prompt) for it in items]
            for it, row in zip(items, rows):
                _check_fits(path, it, len(row) + task.max_new_tokens, limit)
            ids, lengths = left_pad(rows, pad)
            return _TaskData(tuple(it.id for it in items), ids.to(self.device), lengths,
                             answers=tuple(it.answer for it in items))
        rows, conts, counts = [], [], []
        for it in items:
            counts.append(len(it.choices))
            for choice in it.choices:
                try:
                    ctx, cont = scored_pair(self.tokenizer, it.prompt,
                                             task.target_delimiter + choice)
                except ValueError as exc:
                    raise SuiteError(f"{path}: item {it.id!r}: {exc}") from None
                _check_fits(path, it, len(ctx) + len(cont) - 1, limit)
                rows.append(ctx + cont)
                conts.append(len(cont))
        ids, lengths = left_pad(rows, pad)
        return _TaskData(tuple(it.id for it in items), ids.to(self.device), lengths,
                         cont_lengths=torch.tensor(conts), offsets=np.cumsum([0, *counts]),
                         gold=np.array([it.gold for it in items]))

    def num_items(self, split: str = "search") -> dict[str, int]:
        """Items per task of ``split`` (after ``max_items``): the lengths of ``item_scores``."""
        return {task: len(d.item_ids) for task, d in self._split(split).items()}

    def item_ids(self, split: str = "search") -> dict[str, list[str]]:
        """The ``id`` of every item per task of ``split``, in file (and ``item_scores``) order."""
        return {task: list(d.item_ids) for task, d in self._split(split).items()}

    def objectives_from_task_scores(self, task_scores: Mapping[str, float]) -> dict[str, float]:
        """Objective values from per-task accuracies (exact or estimated): macro means."""
        return combine_objectives(task_scores, self._objectives)

    def new_model(self) -> torch.nn.Module:
        """A freshly initialised model of the base's config on ``device``, in eval mode."""
        return new_causal_lm(self.config, self.dtype, self.device)

    # ---- scoring -----------------------------------------------------------------------------

    def evaluate(self, model: torch.nn.Module, split: str = "search",
                 items: Mapping[str, Sequence[int] | np.ndarray] | None = None) -> EvalResult:
        """Score ``model`` on ``split``; with ``items``, only those items of the tasks named.

        ``items`` maps task -> item indices; ``item_scores[task]`` then holds exactly those items'
        scores in that order, and objectives use the mean over them. Tasks not named are scored
        in full.
        """
        data = self._split(split)
        subset = self._subset(data, items)
        model.eval()
        scores: dict[str, np.ndarray] = {}
        with torch.inference_mode():
            for task in self.suite.tasks:
                idx = subset[task.name]
                uniq, inverse = np.unique(idx, return_inverse=True)
                scores[task.name] = (self._score(model, task, data[task.name], uniq)[inverse]
                                     if len(uniq) else np.zeros(0))
        task_scores = {t: float(s.mean()) for t, s in scores.items() if len(s)}
        return EvalResult(self.objectives_from_task_scores(task_scores), scores)

    def _score(self, model: torch.nn.Module, task: Any, data: _TaskData,
               idx: np.ndarray) -> np.ndarray:
        """1.0 / 0.0 per item of ``idx`` (sorted, unique)."""
        rows = torch.from_numpy(idx)
        if task.kind == "generate":
            preds = generate_rows(model, self.tokenizer, data.ids[rows], data.lengths[rows],
                                  task.max_new_tokens, task.stop, self.batch_size)
            return np.array([p.strip() == data.answers[i].strip() for p, i in zip(preds, idx)],
                            dtype=np.float64)
        starts, ends = data.offsets[idx], data.offsets[idx + 1]
        rows = torch.from_numpy(np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)]))
        ll = sequence_loglikelihoods(model, data.ids[rows], data.lengths[rows],
                                     data.cont_lengths[rows], self.batch_size).numpy()
        bounds = np.cumsum([0, *(ends - starts)])
        picks = np.array([np.argmax(ll[a:b]) for a, b in itertools.pairwise(bounds)])
        return (picks == data.gold[idx]).astype(np.float64)

    def _split(self, split: str) -> dict[str, _TaskData]:
        try:
            return self._data[split]
        except KeyError:
            raise ValueError(
                f"split: unknown split {split!r}; expected one of {', '.join(SPLITS)}") from None

    def _subset(self, data: Mapping[str, _TaskData],
                items: Mapping[str, Sequence[int] | np.ndarray] | None) -> dict[str, np.ndarray]:
        """Validated item indices per task (all items where ``items`` names none)."""
        chosen = {task: np.arange(len(d.item_ids)) for task, d in data.items()}
        if items is None:
            return chosen
        if not isinstance(items, Mapping):
            raise TypeError(f"items: expected a mapping task -> indices, got "
                             f"{type(items).__name__}")
        for task, raw in items.items():
            if task not in data:
                raise ValueError(f"items: unknown task {task!r}; the suite has "
                                 f"{', '.join(data)}")
            idx = np.asarray(raw)
            if idx.size == 0:
                idx = idx.astype(np.int64).reshape(0)
            if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
                raise ValueError(f"items[{task!r}]: expected a 1-D array of integer indices, got "
                                 f"dtype {idx.dtype} shape {idx.shape}")
            n = len(data[task].item_ids)
            bad = idx[(idx < 0) | (idx >= n)]
            if len(bad):
                raise ValueError(f"items[{task!r}]: index {int(bad[0])} out of range; the task "
                                 f"has {n} items")
            chosen[task] = idx.astype(np.int64)
        for obj, tasks in self._objectives:
            empty = [t for t in tasks if not len(chosen[t])]
            if empty:
                raise ValueError(f"items: objective {obj.name!r} needs task(s) "
                                 f"{', '.join(empty)}, which have no items selected")
        return chosen


def new_causal_lm(config: Any, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A model of ``config`` in ``dtype`` on ``device``, in eval mode, laid out as
    ``from_pretrained(dtype=...)`` lays it out: parameters in ``dtype``, buffers the class
    computes in float32 (rotary ``inv_freq``) left in float32. A blanket ``.to(dtype)`` would
    round those too, and the model a search scores would not be the one it exports."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()


def _check_fits(path: Path, item: GenerateItem | ChoiceItem, positions: int,
                limit: int | None) -> None:
    if limit is not None and positions > limit:
        raise SuiteError(f"{path}: item {item.id!r} needs {positions} positions; the model has "
                         f"max_position_embeddings={limit}")


def _load_base(base_model: Path) -> tuple[Any, Any]:
    """The base checkpoint's config and tokenizer (local files only; pad = eos if missing)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(base_model, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(base_model, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"base_model: cannot read a config and tokenizer from {base_model} "
                         f"({exc}); pass a Hugging Face model directory") from None
    try:
        ensure_pad_token(tokenizer)
    except ValueError as exc:
        raise ValueError(f"base_model: {base_model}: {exc}") from None
    return config, tokenizer
