"""The fitness interface: ``evaluate(model) -> EvalResult(objectives, item_scores)``.

Objectives are derived from per-item scores (1.0 right, 0.0 wrong, or a graded score), which are
returned too: the store keeps them with the trial, and later M2N2's resource competition and IRT
reduction need them. A fitness also owns the model object that the merge engine writes each
candidate into, so a worker allocates it once and never re-instantiates it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from evomerge.registry import Registry

Direction = Literal["maximize", "minimize"]
_DIRECTIONS = ("maximize", "minimize")
T = TypeVar("T")
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


def parse_objective_specs(objectives: Any, target: str,
                          parse_target: Callable[[Any, str], T]) -> list[tuple[Objective, T]]:
    """Objective specs ``[{name, <target>, direction}]`` (the digits fitness's ``classes``,
    lm-eval's ``tasks``; ``"all"`` when left out) validated in one place, so every fitness
    words its config errors alike: ``[(Objective, parse_target(spec[target], where))]``, a
    ValueError naming the field otherwise."""
    keys = ("name", target, "direction")
    if isinstance(objectives, (str, bytes, Mapping)) or not isinstance(objectives, Sequence):
        raise ValueError(  # noqa: TRY004 - config errors are ValueErrors for the CLI
            f"objectives: expected a list of {{name, {target}, direction}} mappings, "
            f"got {type(objectives).__name__}"
        )
    if not objectives:
        raise ValueError(f"objectives: empty; give at least one {{name, {target}}} objective")
    parsed: list[tuple[Objective, T]] = []
    seen: set[str] = set()
    for i, spec in enumerate(objectives):
        where = f"objectives[{i}]"
        if not isinstance(spec, Mapping):
            raise ValueError(  # noqa: TRY004 - config errors are ValueErrors for the CLI
                f"{where}: expected a mapping with name and {target}, got {spec!r}"
            )
        unknown = [k for k in spec if k not in keys]
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(keys)}"
            )
        name = spec.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}.name: expected a non-empty string, got {name!r}")
        if name in seen:
            raise ValueError(f"{where}.name: duplicate objective name {name!r}")
        seen.add(name)
        chosen = parse_target(spec.get(target, "all"), f"{where}.{target}")
        direction = spec.get("direction", "maximize")
        if direction not in _DIRECTIONS:
            raise ValueError(
                f"{where}.direction: expected one of {', '.join(_DIRECTIONS)}, got {direction!r}"
            )
        parsed.append((Objective(name, direction), chosen))
    return parsed


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


#: name -> Fitness class. The built-ins are lazy targets, so this module imports none of them and
#: naming one imports only its module; plugins: entry-point group ``evomerge.fitnesses``.
FITNESSES: Registry[Callable[..., Fitness]] = Registry("fitness", "evomerge.fitnesses", {
    "digits": "evomerge.fitness.digits:DigitsFitness",
    "lm": "evomerge.fitness.lm:LMFitness",
    "lm-eval": "evomerge.fitness.lmeval:LmEvalFitness",
    "perplexity": "evomerge.fitness.perplexity:PerplexityFitness",
})
#: class decorator: ``@register("name")`` makes a fitness available to experiments by name
register = FITNESSES.register


def fitness_class(name: str) -> Callable[..., Fitness]:
    """The registered fitness ``name`` (KeyError listing the known names)."""
    return FITNESSES[name]


def make_fitness(name: str, **options: Any) -> Fitness:
    return fitness_class(name)(**options)
