"""Check an IRT-reduced fitness against full evaluation on a model zoo (``evomerge irt validate``).

The zoo's sources and random task-arithmetic merges of them are scored on the FULL search items;
the reduction is fit on the sources plus the first half of the merges, and each estimator at each
anchor count is scored against full evaluation on the other half
(:func:`evomerge.fitness.reduced.validate`): MAE in accuracy points, Spearman rank correlation of
the macro-mean accuracy, and the reduction factor (full items / evaluated items).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.fitness.base import make_fitness
from evomerge.fitness.reduced import (
    cached_responses,
    random_merges,
    response_matrix,
    source_recipe,
    validate,
)
from evomerge.merge.engine import Merger
from evomerge.recipe import MergeRecipe

TARGET = ">= 20x fewer items, MAE <= 2.5 points, Spearman >= 0.9"
"""What a reduction must reach to replace full evaluation in a search (MERGE^3's bar)."""

Track = Callable[[Sequence[MergeRecipe]], Iterable[MergeRecipe]]
"""Wraps the loop over the recipes being scored in full with a progress display."""


@dataclass(frozen=True)
class Zoo:
    """A zoo ready to score merges on: its base and expert directories, the suite's fitness
    (cut to ``max_items`` items per task) and one Merger over all of them."""

    models: Path
    base: Path
    experts: list[Path]
    fitness: Any
    merger: Merger
    max_items: int | None


@dataclass(frozen=True)
class Validation:
    """The error rows of :func:`validate_zoo` and what they were measured on."""

    rows: list[dict[str, Any]]
    suite: str
    models: Path
    merges: int
    sources: int
    items: dict[str, int]
    dim: int
    seed: int


def open_zoo(models: Path, suite: str, *, max_items: int | None = None) -> Zoo:
    """The zoo in ``models`` (``base/`` plus one directory per expert) with the lm fitness of
    ``suite`` (a file or catalog name), cut to the first ``max_items`` items of every task.

    Raises ValueError or OSError when the directory is not a zoo or the suite does not load.
    """
    base = models / "base"
    experts = sorted(p for p in models.iterdir()
                     if p.is_dir() and p != base and (p / "config.json").is_file())
    if not (base / "config.json").is_file() or not experts:
        raise ValueError(f"--models: {models} needs base/ and expert directories "
                         "(evomerge zoo build tiny-lm)")
    fitness = make_fitness("lm", base_model=str(base), suite=suite, max_items=max_items)
    merger = Merger([str(base), *map(str, experts)])
    return Zoo(models, base, experts, fitness, merger, max_items)


def validate_zoo(zoo: Zoo, *, merges: int, anchors: Sequence[int], dim: int, seed: int,
                 cache: Path | None = None, track: Track | None = None) -> Validation:
    """Score the zoo's sources and ``merges`` random merges in full (reusing the response matrix
    kept in ``cache`` when its suite and items match), fit on the sources plus the first half of
    the merges, and measure every estimator at every anchor count on the other half."""
    endpoints = [source_recipe(p) for p in [zoo.base, *zoo.experts]]
    design = random_merges(str(zoo.base), [str(p) for p in zoo.experts], merges, seed=seed)
    model = zoo.fitness.new_model()

    def score(recipes: Sequence[MergeRecipe]) -> list[dict[str, Any]]:
        out = []
        for recipe in track(recipes) if track else recipes:
            zoo.merger.build(recipe, into=model)
            out.append(zoo.fitness.evaluate(model, "search").item_scores)
        return out

    items = zoo.fitness.num_items("search")
    fingerprint = {"suite": str(zoo.fitness.suite.path), "max_items": zoo.max_items,
                   "items": items}
    recipes = endpoints + design
    responses = (cached_responses(score, recipes, cache, fingerprint)[0] if cache
                 else response_matrix(score(recipes)))
    rows = validate(responses, num_endpoints=len(endpoints), num_train=merges // 2,
                    anchors=list(anchors), dim=dim, seed=seed)
    return Validation(rows, zoo.fitness.suite.path.name, zoo.models, merges, len(endpoints),
                      items, dim, seed)


def meets_target(row: dict[str, Any]) -> bool:
    """Whether one row reaches :data:`TARGET`."""
    return (row["reduction"] >= 20 and row["mae_points"] <= 2.5
            and (row["spearman"] or 0) >= 0.9)


def format_rho(rho: float | None) -> str:
    """A Spearman correlation for a table (``n/a`` when undefined: constant scores)."""
    return "n/a" if rho is None else f"{rho:.3f}"


def write_results(validation: Validation, *, elapsed: float) -> Path:
    """Rewrite the ``irt`` section of benchmarks/RESULTS.md with this validation's table and
    return the file; FileNotFoundError outside a source checkout (no benchmarks/_results.py)."""
    root = Path(__file__).resolve().parents[2]
    helper = root / "benchmarks" / "_results.py"
    if not helper.is_file():
        raise FileNotFoundError(f"{helper} not found (needs a source checkout)")
    spec = importlib.util.spec_from_file_location("_evomerge_bench_results", helper)
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    load = results.loadavg()
    machine = results.cpu_name() + (f" (load {load:.1f})" if load is not None else "")
    path = root / "benchmarks" / "RESULTS.md"
    results.write_section(path, results_section(validation, elapsed=elapsed, machine=machine),
                          "<!-- irt:start -->", "<!-- irt:end -->")
    return path


def results_section(v: Validation, *, elapsed: float, machine: str) -> str:
    """The Markdown ``irt`` section of benchmarks/RESULTS.md, between its markers."""
    held_out = v.merges - v.merges // 2
    lines = ["<!-- irt:start -->", "## IRT reduction (`evomerge irt validate`)", "",
             f"Suite `{v.suite}` ({sum(v.items.values())} search items: "
             + ", ".join(f"{t} {n}" for t, n in v.items.items()) + f"), zoo `{v.models}` "
             f"(size {_zoo_size(v.models)}); "
             f"fit on {v.sources} sources + {v.merges // 2} random task-arithmetic merges, "
             f"scored on {held_out} held-out merges; IRT dim {v.dim}, seed {v.seed}. MAE over "
             "(merge, task) in accuracy points; Spearman of the macro-mean accuracy over merges; "
             "reduction = full items / evaluated items.", "",
             "| estimator | anchors/task | MAE (points) | Spearman | reduction |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['estimator']} | {r['anchors']} | {r['mae_points']:.2f} | "
              f"{format_rho(r['spearman'])} | {r['reduction']:.1f}x |" for r in v.rows]
    lines += ["", f"{elapsed:.0f} s on {machine}.", "<!-- irt:end -->"]
    return "\n".join(lines)


def _zoo_size(models: Path) -> str:
    """The zoo's size from its manifest (``tiny`` numbers are a smoke test, not a result)."""
    try:
        return str(json.loads((models / "zoo.json").read_text()).get("size", "unknown"))
    except (OSError, ValueError):
        return "unknown"
