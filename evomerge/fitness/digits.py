"""Digits fitness: accuracy of a :class:`~evomerge.models.digits.DigitsMLP` on class subsets.

Each objective is the accuracy over the items of a set of classes of one split (``search`` during
a search, ``heldout`` for final scores; see :func:`evomerge.models.digits.digits_splits`)::

    objectives:                       # default: [{name: acc, classes: all}]
      - {name: acc_0_4, classes: [0, 1, 2, 3, 4]}
      - {name: acc_5_9, classes: [5, 6, 7, 8, 9], direction: maximize}

The per-item scores (``item_scores["digits"]``) are the correctness (1.0 / 0.0) of every image of
the split, in split order, so each objective is the mean of its classes' entries.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge.fitness.base import EvalResult, Fitness, Objective, parse_objective_specs
from evomerge.models.digits import NUM_CLASSES, NUM_FEATURES, DigitsMLP, digits_splits

__all__ = ["DigitsFitness", "parse_objectives"]

TASK = "digits"
_SPLITS = ("search", "heldout")
DEFAULT_OBJECTIVES: tuple[dict[str, Any], ...] = ({"name": "acc", "classes": "all"},)


def parse_objectives(
    objectives: Sequence[Mapping[str, Any]] | None,
) -> list[tuple[Objective, tuple[int, ...]]]:
    """Validate objective specs; ``[(Objective, classes)]``. Raises ValueError naming the field."""
    return parse_objective_specs(DEFAULT_OBJECTIVES if objectives is None else objectives,
                                 "classes", _parse_classes)


def _parse_classes(classes: Any, where: str) -> tuple[int, ...]:
    if classes == "all":
        return tuple(range(NUM_CLASSES))
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise ValueError(f"{where}: expected 'all' or a list of digits 0-9, got {classes!r}")
    if not classes:
        raise ValueError(f"{where}: empty; give 'all' or at least one digit 0-9")
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
            raise ValueError(f"{where}: class {c!r} is not an int; digits are 0-9")
        if not 0 <= c < NUM_CLASSES:
            raise ValueError(f"{where}: unknown class {c}; digits are 0-9")
    if len(set(classes)) != len(classes):
        raise ValueError(f"{where}: repeated class in {list(classes)}")
    return tuple(sorted(int(c) for c in classes))


class DigitsFitness(Fitness):
    """Accuracy of digits MLPs on class subsets of the digits ``search`` / ``heldout`` split.

    ``base_model`` is a digits zoo model directory (its ``config.json`` sizes :meth:`new_model`).
    The split tensors are prepared once, on ``device``; :meth:`evaluate` is one batched forward.
    """

    def __init__(
        self,
        base_model: str | os.PathLike,
        objectives: Sequence[Mapping[str, Any]] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.base_model = Path(base_model)
        self.device = torch.device(device)
        self._specs = parse_objectives(objectives)
        self.objectives: list[Objective] = [obj for obj, _ in self._specs]
        cfg_file = self.base_model / "config.json"
        try:
            self.config = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"base_model: cannot read {cfg_file} ({exc}); pass a digits zoo model directory "
                "(evomerge zoo build digits)"
            ) from exc
        sizes = DigitsMLP.from_config(self.config, init=False).layer_sizes
        if sizes[0] != NUM_FEATURES or sizes[-1] != NUM_CLASSES:
            raise ValueError(
                f"base_model: {cfg_file} has layer_sizes {list(sizes)}; a digits model maps "
                f"{NUM_FEATURES} pixels to {NUM_CLASSES} classes"
            )
        splits = digits_splits()
        self._data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._masks: dict[str, list[torch.Tensor]] = {}
        for split in _SPLITS:
            xs, ys = splits[split]
            x = torch.from_numpy(np.array(xs)).to(self.device)
            y = torch.from_numpy(np.array(ys)).to(self.device)
            self._data[split] = (x, y)
            self._masks[split] = [
                torch.isin(y, torch.tensor(classes, device=self.device))
                for _, classes in self._specs
            ]

    def new_model(self) -> DigitsMLP:
        """A zero-filled model of the base's shape on ``device`` (no RNG draws), in eval mode."""
        return DigitsMLP.from_config(self.config, init=False).to(self.device).eval()

    def num_items(self, split: str = "search") -> int:
        """How many images ``split`` has (the length of ``item_scores["digits"]``)."""
        return len(self._split(split)[1])

    def evaluate(self, model: torch.nn.Module, split: str = "search") -> EvalResult:
        x, y = self._split(split)
        model.eval()
        with torch.inference_mode():
            correct = (model(x).argmax(dim=1) == y).to(torch.float32)
        objectives = {
            obj.name: float(correct[mask].mean())
            for (obj, _), mask in zip(self._specs, self._masks[split])
        }
        return EvalResult(objectives, {TASK: correct.cpu().numpy()})

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self._data[split]
        except KeyError:
            raise ValueError(
                f"split: unknown split {split!r}; expected one of {', '.join(_SPLITS)}"
            ) from None
