"""The ``perplexity`` fitness: how well a causal LM predicts the user's own text.

Experiment block::

    fitness:
      name: perplexity
      data: my_corpus.txt        # .txt: one item per non-empty line; .jsonl: {"text": ...} per line
      heldout: my_heldout.jsonl  # optional; default: every fifth item of `data` (see below)
      objective: neg_log_ppl     # or `loss`; default neg_log_ppl
      max_items: 500             # optional: the first N items of each split
      max_length: 512            # tokens per item; default min(max_position_embeddings, 1024)
      batch_size: 8              # sequences per forward pass

**Items.** A ``.txt`` item is one non-empty line, verbatim (without its newline); lines holding
only whitespace are skipped. A ``.jsonl`` line is an object with a string ``text`` field (blank
lines are skipped). Each item is encoded on its own with the base model's tokenizer and its
default special tokens (``tokenizer.encode(text)``: a BOS where the tokenizer adds one). Items
longer than ``max_length`` tokens are **truncated** to their first ``max_length`` tokens, and
only those are scored (:attr:`PerplexityFitness.truncated` counts them per split). Every token
after the first is scored given the tokens before it; the first has no context and is not
scored. So an item's score is exactly ``-model(ids, labels=ids).loss`` of transformers on the
item's encoded ids, and an item needs at least 2 tokens. A missing or empty file, a file that is
neither ``.txt`` nor ``.jsonl``, a bad JSON line, a missing or non-string ``text`` field and an
item of fewer than 2 tokens are errors at construction, naming the file and line.

**Scores.** ``item_scores["text"][i]`` is item ``i``'s mean token log-likelihood (nats, <= 0).
The objective is **token-weighted over the split**, i.e. the corpus's true perplexity:
``neg_log_ppl = sum of all scored tokens' log-likelihoods / number of scored tokens`` =
``-log(perplexity)`` (maximised), or ``loss = -neg_log_ppl``, the mean next-token cross-entropy
(minimised); ``perplexity = exp(loss)``. Token weighting is what perplexity means (the
probability the model gives the whole text, per token), so a merge is not rewarded for getting
a few short lines right at the cost of the long passages that hold most of the text, and the
objective hardly depends on how the text is cut into lines. The mean of the item scores (every
line weighted alike) is still there in ``item_scores`` for anyone who wants it.

**Held-out split.** ``heldout`` names a file of held-out text, read like ``data``. Without it,
``data`` is split deterministically: every fifth item (the 5th, 10th, ...; the last one if there
are fewer than 5, so ``data`` then needs at least 2 items) is held out and the search sees the
rest, so the driver's final score of the winner is still on text the search never saw.
``max_items`` applies to each split after that (which items are held out does not depend on it).

**Not reducible.** ``reduced:`` (IRT reduction) is refused before any compute
(:func:`evomerge.fitness.reduced.check_reducible`): IRT models the probability that a model gets
an item *right*, a Bernoulli outcome in [0, 1] driven by ability minus difficulty, and its
estimators return task accuracies. A mean log-likelihood is unbounded and continuous, has no
"right", and the objective here is a token-weighted mean that the IRT estimates cannot produce.
A subset of the text already estimates a mean without a model of the items: for a cheaper
search, score fewer items (``max_items``). (Likewise M2N2's resource sharing assumes
non-negative per-item rewards; these scores are negative.)

Options also: ``device`` (where the data tensors and :meth:`new_model` live), ``dtype`` of
:meth:`new_model` (default ``auto``: the checkpoint config's, see
:func:`evomerge.fitness.base.resolve_dtype`; executors pass a concrete one), ``base_model`` (the
base checkpoint dir: config and tokenizer). Scoring runs under ``torch.inference_mode()``, one
batched forward per ``batch_size`` items (longest first, left-padded with explicit position ids,
so padding never changes a score), log-probabilities in float32 whatever the model's dtype.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge.fitness.base import EvalResult, Fitness, Objective, resolve_dtype
from evomerge.fitness.lm import _load_base, new_causal_lm
from evomerge.models.causal_lm import left_pad, sequence_loglikelihoods

__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_MAX_LENGTH", "OBJECTIVES", "TASK", "PerplexityFitness",
           "TextDataError", "read_texts"]

#: The one task name of ``item_scores``.
TASK = "text"
#: Objective name -> direction.
OBJECTIVES = {"neg_log_ppl": "maximize", "loss": "minimize"}
#: Sequences per forward pass: items are whole passages, and every scored position's logits are
#: kept (``batch x length x vocab`` floats), so fewer than the ``lm`` fitness's 64 short prompts.
DEFAULT_BATCH_SIZE = 8
#: Cap of the default ``max_length`` (the model's ``max_position_embeddings`` below it).
DEFAULT_MAX_LENGTH = 1024
#: Without a ``heldout`` file, items ``i`` with ``i % HELDOUT_EVERY == HELDOUT_EVERY - 1`` are
#: held out (the last item where there are fewer than ``HELDOUT_EVERY``).
HELDOUT_EVERY = 5
SPLITS = ("search", "heldout")


class TextDataError(ValueError):
    """A problem with a text data file; the message names the file (and line)."""


def read_texts(path: str | os.PathLike, option: str = "data") -> list[tuple[int, str]]:
    """``[(line number, text)]`` of a ``.txt`` or ``.jsonl`` file (see the module docstring)."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise TextDataError(f"{option}: {path}: expected a .txt or .jsonl file")
    if not path.is_file():
        raise TextDataError(f"{option}: no such file {path}")
    text = path.read_text(encoding="utf-8")
    items = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not items:
        raise TextDataError(f"{option}: {path}: no items (every line is empty)")
    if path.suffix == ".jsonl":
        items = [(n, _jsonl_text(line, f"{path}:{n}")) for n, line in items]
    return items


def _jsonl_text(line: str, where: str) -> str:
    """The ``text`` field of one JSON line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TextDataError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(row, dict) or "text" not in row:
        raise TextDataError(f"{where}: expected an object with a 'text' field")
    if not isinstance(row["text"], str):
        raise TextDataError(f"{where}: text: expected a string, got {row['text']!r}")
    return row["text"]


@dataclass(frozen=True)
class _Split:
    """One split's items, encoded once: left-padded ids, lengths, where each item came from."""

    ids: torch.Tensor      # [N, W] on the fitness's device
    lengths: torch.Tensor  # [N] tokens per item (after truncation), on the CPU
    origin: tuple[str, ...]  # "FILE:LINE" of each item
    truncated: int


def _check_int(name: str, value: Any, low: int = 1, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}{' or null' * optional}, "
                         f"got {value!r}")


class PerplexityFitness(Fitness):
    """Token-weighted log-perplexity of a causal LM on the user's text (module docstring)."""

    #: Why ``reduced:`` is refused (read by :func:`evomerge.fitness.reduced.check_reducible`).
    not_reducible = ("its item scores are continuous mean log-likelihoods, not right/wrong "
                     "answers that an IRT model describes, and its objective is a token-weighted "
                     "mean that IRT accuracy estimates cannot give; use max_items for a cheaper "
                     "search instead")

    def __init__(
        self,
        base_model: str | os.PathLike,
        data: str | os.PathLike,
        heldout: str | os.PathLike | None = None,
        objective: str = "neg_log_ppl",
        max_items: int | None = None,
        max_length: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "auto",
    ) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {', '.join(OBJECTIVES)}, "
                             f"got {objective!r}")
        _check_int("batch_size", batch_size, optional=False)
        _check_int("max_items", max_items)
        _check_int("max_length", max_length, low=2)
        self.objectives = [Objective(objective, OBJECTIVES[objective])]
        self.batch_size, self.max_items = batch_size, max_items
        self.device = torch.device(device)
        self.base_model = Path(base_model)
        self.config, self.tokenizer = _load_base(self.base_model)
        self.dtype = resolve_dtype(dtype, self.config)
        limit = getattr(self.config, "max_position_embeddings", None)
        if max_length is not None and limit is not None and max_length > limit:
            raise ValueError(f"max_length: {max_length} exceeds the model's "
                             f"max_position_embeddings={limit}")
        self.max_length = max_length or min(limit or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
        self.data_paths = {"search": Path(data), "heldout": Path(heldout) if heldout else None}
        texts = {"search": [(str(self.data_paths["search"]), n, t)
                            for n, t in read_texts(data, "data")]}
        if heldout is not None:
            texts["heldout"] = [(str(heldout), n, t) for n, t in read_texts(heldout, "heldout")]
        else:
            texts = _split_every(texts["search"], str(data))
        self._data = {split: self._encode(rows[:max_items]) for split, rows in texts.items()}

    @property
    def truncated(self) -> dict[str, int]:
        """Items per split that were longer than ``max_length`` tokens (scored truncated)."""
        return {split: d.truncated for split, d in self._data.items()}

    def _encode(self, rows: list[tuple[str, int, str]]) -> _Split:
        encoded, truncated = [], 0
        for path, lineno, text in rows:
            ids = self.tokenizer.encode(text)
            if len(ids) < 2:
                raise TextDataError(
                    f"{path}:{lineno}: the text encodes to {len(ids)} token(s); an item needs at "
                    "least 2 (the first token is only context)")
            truncated += len(ids) > self.max_length
            encoded.append(ids[:self.max_length])
        ids, lengths = left_pad(encoded, self.tokenizer.pad_token_id)
        return _Split(ids.to(self.device), lengths, tuple(f"{p}:{n}" for p, n, _ in rows),
                      truncated)

    def _split(self, split: str) -> _Split:
        try:
            return self._data[split]
        except KeyError:
            raise ValueError(f"split: unknown split {split!r}; expected one of "
                             f"{', '.join(SPLITS)}") from None

    def num_items(self, split: str = "search") -> dict[str, int]:
        """Items of ``split`` (after ``max_items``): the length of ``item_scores["text"]``."""
        return {TASK: len(self._split(split).origin)}

    def item_ids(self, split: str = "search") -> dict[str, list[str]]:
        """``FILE:LINE`` of every item of ``split``, in ``item_scores`` order."""
        return {TASK: list(self._split(split).origin)}

    def new_model(self) -> torch.nn.Module:
        """A freshly initialised model of the base's config on ``device``, in eval mode."""
        return new_causal_lm(self.config, self.dtype, self.device)

    def evaluate(self, model: torch.nn.Module, split: str = "search") -> EvalResult:
        """Per-item mean token log-likelihoods and the token-weighted objective on ``split``."""
        data = self._split(split)
        scored = data.lengths - 1  # the first token of every item is context only
        model.eval()
        with torch.inference_mode():
            total = sequence_loglikelihoods(model, data.ids, data.lengths, scored,
                                            self.batch_size).numpy()
        counts = scored.numpy().astype(np.float64)
        neg_log_ppl = float(total.sum() / counts.sum())
        value = neg_log_ppl if self.objectives[0].name == "neg_log_ppl" else -neg_log_ppl
        return EvalResult({self.objectives[0].name: value}, {TASK: total / counts})


def _split_every(rows: list[tuple[str, int, str]], path: str
                 ) -> dict[str, list[tuple[str, int, str]]]:
    """Every :data:`HELDOUT_EVERY`-th item held out (the last one if there are fewer)."""
    if len(rows) < 2:
        raise TextDataError(f"data: {path}: has 1 item; without a heldout file it needs at "
                            "least 2 (one is held out)")
    held = {i for i in range(len(rows)) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1} \
        or {len(rows) - 1}
    return {"search": [r for i, r in enumerate(rows) if i not in held],
            "heldout": [r for i, r in enumerate(rows) if i in held]}
