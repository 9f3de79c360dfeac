"""A plain Python function as a fitness: ``score(model) -> EvalResult``, no registration.

What :func:`evomerge.run` builds when it is given a callable instead of a :class:`Fitness`. The
function knows how to score a model, not which model to build into nor which objectives it
returns, so both come from elsewhere, known before anything is built or scored:

- the objectives from the experiment's ``fitness.objectives``: names, or ``{name, direction}``
  mappings (direction ``maximize`` unless said; other keys belong to whatever fitness the
  experiment named before and are not read);
- the model from the base checkpoint's ``config.json`` as transformers allocates it
  (``AutoModelForCausalLM`` for a causal LM, else ``AutoModel``) in the worker's dtype and
  device: architectures transformers does not know must be registered with its Auto classes
  where the function is defined (``import evomerge.zoo.digits_hf`` for the digits MLP).

A function has one split: it scores held-out requests (the final table) the same way as search
ones. Subclass :class:`Fitness` for a separate held-out split.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch

from evomerge.fitness.base import EvalResult, Fitness, Objective, Split

#: a fitness as the evaluator builds it: ``factory(base_model=..., [device=, dtype=,] **options)``
FitnessFactory = Callable[..., Fitness]


def parse_objectives(objectives: Any) -> list[Objective]:
    """``[acc]`` or ``[{name: loss, direction: minimize}, ...]`` as Objectives (ValueError
    naming the entry that is wrong)."""
    if isinstance(objectives, (str, Mapping)) or not isinstance(objectives, Sequence) \
            or not objectives:
        raise ValueError("fitness.objectives: a function fitness needs the objectives it returns "
                         "named, e.g. [acc] or [{name: loss, direction: minimize}]")
    out = []
    for i, spec in enumerate(objectives):
        name = spec if isinstance(spec, str) else spec.get("name") \
            if isinstance(spec, Mapping) else None
        direction = spec.get("direction", "maximize") if isinstance(spec, Mapping) else "maximize"
        if not isinstance(name, str) or direction not in ("maximize", "minimize"):
            raise ValueError(f"fitness.objectives[{i}]: expected a name or {{name, direction: "
                             f"maximize | minimize}}, got {spec!r}")
        out.append(Objective(name, direction))
    return out


class FunctionFitness(Fitness):
    """``fn(model) -> EvalResult`` with the objectives named in the experiment."""

    def __init__(self, fn: Callable[[torch.nn.Module], EvalResult],
                 base_model: str | os.PathLike, objectives: Any = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype | str = "auto") -> None:
        from transformers import AutoConfig

        from evomerge.fitness.base import resolve_dtype

        self.fn = fn
        self.objectives = parse_objectives(objectives)
        self.device = torch.device(device)
        self.config = AutoConfig.from_pretrained(base_model, local_files_only=True)
        self.dtype = resolve_dtype(dtype, self.config)

    def new_model(self) -> torch.nn.Module:
        """The base's architecture as transformers allocates it, in eval mode."""
        from transformers import AutoModel

        from evomerge.fitness.lm import new_causal_lm

        try:
            return new_causal_lm(self.config, self.dtype, self.device)
        except ValueError:  # not a causal LM (an encoder, a classifier, the digits MLP)
            return AutoModel.from_config(self.config, dtype=self.dtype).to(self.device).eval()

    def evaluate(self, model: torch.nn.Module, split: Split = "search") -> EvalResult:
        result = self.fn(model)
        if not isinstance(result, EvalResult):
            raise TypeError(f"{getattr(self.fn, '__qualname__', self.fn)} returned "
                            f"{type(result).__name__}; a fitness function returns an EvalResult")
        return result


def _given(fitness: Fitness, base_model: Any = None, **_: Any) -> Fitness:
    """The factory of a fitness that is already built: that very object."""
    return fitness


def fitness_factory(obj: Any) -> FitnessFactory:
    """How the evaluator builds a fitness given as a Python object: a :class:`Fitness` instance
    as it is, a Fitness subclass as registered ones are built (``cls(base_model=..., **options)``),
    any other callable as a :class:`FunctionFitness`."""
    if isinstance(obj, Fitness):
        return partial(_given, obj)
    if isinstance(obj, type) and issubclass(obj, Fitness):
        return obj
    if callable(obj):
        return partial(FunctionFitness, obj)
    raise TypeError(f"fitness: expected a Fitness, a Fitness subclass or a function "
                    f"model -> EvalResult, got {type(obj).__name__}")
