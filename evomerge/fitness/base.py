"""The fitness interface: ``evaluate(model) -> EvalResult(objectives, item_scores)``.

Objectives are derived from per-item scores (1.0 right, 0.0 wrong, or a graded score), which are
returned too: the store keeps them with the trial, and later M2N2's resource competition and IRT
reduction need them. A fitness also owns the model object that the merge engine writes each
candidate into, so a worker allocates it once and never re-instantiates it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

Direction = Literal["maximize", "minimize"]
Split = Literal["search", "heldout"]


@dataclass(frozen=True)
class Objective:
    name: str
    direction: Direction = "maximize"


@dataclass
class EvalResult:
    """Objective values by name, per-item scores by task (1-D float arrays), and ``info``:
    what the evaluation was, recorded with the trial (an IRT-reduced fitness says whether the
    values are an estimate from anchors or a full score, and its estimate)."""

    objectives: dict[str, float]
    item_scores: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def values(self, objectives: list[Objective]) -> list[float]:
        """Objective values in the given order (what a strategy is told)."""
        return [float(self.objectives[o.name]) for o in objectives]


class Fitness(ABC):
    """Scores models of one architecture on one or more tasks.

    ``base_model`` is the directory of the base checkpoint: the fitness reads its config to
    allocate :meth:`new_model`. Data are loaded and prepared once per fitness object (once per
    worker), never per candidate.
    """

    objectives: list[Objective]

    @abstractmethod
    def new_model(self) -> torch.nn.Module:
        """A model with the checkpoints' tensor names, for ``Merger.build(recipe, into=...)``."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, split: Split = "search") -> EvalResult:
        """Score ``model`` on the ``search`` items (seen by the search) or the ``heldout`` ones."""


#: ``dtype`` options of model-owning fitnesses (``auto``: the checkpoint's own, see below).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, config: Any) -> torch.dtype:
    """The dtype a fitness allocates its model in. ``auto`` is what transformers'
    ``from_pretrained(dtype="auto")`` uses: the config's ``dtype`` (``torch_dtype`` in older
    configs), else float32. Executors pass the checkpoints' weight dtype explicitly."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(found, str):
            found = DTYPES.get(found.removeprefix("torch."))
        return found if isinstance(found, torch.dtype) and found in DTYPES.values() \
            else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


FITNESSES: dict[str, Callable[..., Fitness]] = {}


def register(name: str) -> Callable[[type[Fitness]], type[Fitness]]:
    """Class decorator: make a fitness available to experiments by name."""
    def wrap(cls: type[Fitness]) -> type[Fitness]:
        if name in FITNESSES:
            raise ValueError(f"fitness {name!r} is already registered")
        FITNESSES[name] = cls
        return cls
    return wrap


def fitness_class(name: str) -> Callable[..., Fitness]:
    """The registered fitness ``name`` (KeyError listing the known names)."""
    _load_builtin()
    try:
        return FITNESSES[name]
    except KeyError:
        raise KeyError(f"unknown fitness {name!r}; known: {', '.join(sorted(FITNESSES))}") from None


def make_fitness(name: str, **options: Any) -> Fitness:
    return fitness_class(name)(**options)


def _load_builtin() -> None:
    """Import the built-in fitness modules so their ``@register`` runs."""
    import evomerge.fitness.digits  # noqa: F401
    import evomerge.fitness.lm  # noqa: F401
    import evomerge.fitness.lmeval  # noqa: F401
    import evomerge.fitness.perplexity  # noqa: F401
