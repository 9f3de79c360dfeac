"""Every space kind binds one way and its bound space answers the same questions (issue 14).

The registered kinds (``SPACE_KINDS``: ps, dfs, weights) are each read by :func:`parse_space`
and bound by ``bind_to(BindTarget)`` to a tiny Llama family; each bound space has the same
attributes, and each of its source points (its start point too, when it has one) decodes to a
recipe that ``evomerge merge`` builds into exactly that source's checkpoint. The driver never
asks which kind it holds: its source carries none of the old per-kind special cases.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from helpers import make_family

from evomerge.merge.checkpoints import check_compatible
from evomerge.merge.from_config import merge_config
from evomerge.search import STRATEGIES
from evomerge.spaces import SPACE_KINDS, BindTarget, Bound, parse_space, strategy_options

#: one experiment ``space`` per registered kind
CONFIGS = {
    "ps": "ties_per_source",
    "dfs": {"kind": "dfs", "repeats": 1},
    "weights": {"kind": "weights"},
}
BUDGET = 12
EXECUTION = Path(__file__).resolve().parents[1] / "evomerge" / "execution"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("protocol-family"), n_sources=2, layers=2)


@pytest.fixture(scope="module")
def target(family) -> BindTarget:
    info = check_compatible(family.all)[0]
    sources = {"a": str(family.sources[0]), "b": str(family.sources[1])}
    return BindTarget(str(family.base), sources, info.tensors, info.config.get("model_type"),
                      BUDGET)


def test_every_registered_kind_is_covered_here():
    assert sorted(SPACE_KINDS) == sorted(CONFIGS)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_every_kind_binds_one_way_to_a_space_with_the_same_attributes(kind, target):
    definition = parse_space(CONFIGS[kind])
    assert isinstance(definition, SPACE_KINDS[kind])
    bound = definition.bind_to(target)
    assert isinstance(bound, Bound) and bound.kind == kind
    lower, upper = bound.bounds
    assert bound.dim == len(bound.names) == len(lower) == len(upper) > 0
    assert len(set(bound.names)) == bound.dim  # the trials' parameter names
    assert np.all(lower <= upper)
    assert isinstance(bound.method, str) and bound.method
    assert set(bound.model_names()) <= {target.base, *target.sources.values()}
    assert bound.start_point is None or bound.start_point.shape == (bound.dim,)
    assert isinstance(bound.implied_options(), dict)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_every_kinds_source_points_and_start_decode_to_the_sources_themselves(kind, target,
                                                                              tmp_path):
    bound = parse_space(CONFIGS[kind]).bind_to(target)
    points = bound.source_points()
    assert len(points) == len(target.sources)
    if bound.start_point is not None:  # a start is one of the models (DFS: the first source)
        assert any(np.array_equal(bound.start_point, p) for p in points)
    for k, (point, source) in enumerate(zip(points, target.sources.values())):
        assert np.all((bound.lower <= point) & (point <= bound.upper))
        recipe = bound.decode(point)
        file = tmp_path / f"recipe{k}.yaml"
        file.write_text(recipe.to_yaml())
        merge_config(file, tmp_path / f"out{k}")
        built = safetensors.torch.load_file(tmp_path / f"out{k}" / "model.safetensors")
        want = safetensors.torch.load_file(Path(source) / "model.safetensors")
        assert built.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(built[name], want[name], atol=1e-6, rtol=1e-6,
                                       msg=f"{kind}: source {k}, {name}")


@pytest.mark.parametrize(("kind", "strategy", "implied"), [
    ("ps", "cmaes", set()),                         # no start: CMA-ES starts at its default
    ("dfs", "cmaes", {"x0"}),                       # the start model's blocks
    ("dfs", "nsga2", set()),                        # NSGA-II takes no start
    ("weights", "m2n2", {"crossover", "geometry"}),  # M2N2 crosses members
])
def test_a_space_implies_options_only_to_strategies_that_take_them(kind, strategy, implied,
                                                                   target):
    bound = parse_space(CONFIGS[kind]).bind_to(target)
    options = strategy_options(bound, {"popsize": 4}, STRATEGIES[strategy])
    assert set(options) - {"popsize"} == implied
    if "x0" in implied:
        assert options["x0"] == bound.start_point.tolist()
    if kind == "weights":
        assert options["crossover"] == "weights"
        given = strategy_options(bound, {"crossover": "coefficients"}, STRATEGIES[strategy])
        assert given["crossover"] == "coefficients"  # the experiment's own option wins


def test_init_sources_becomes_the_spaces_source_points(target):
    bound = parse_space(CONFIGS["ps"]).bind_to(target)
    options = strategy_options(bound, {"init": "sources"}, STRATEGIES["m2n2"])
    assert options["init"] == [p.tolist() for p in bound.source_points()]


def test_an_unknown_kind_names_the_known_ones():
    with pytest.raises(ValueError, match=r"space.kind: unknown space kind 'dsf'; known: dfs, "
                                         r"ps, weights"):
        parse_space({"kind": "dsf"})


@pytest.mark.parametrize("pattern", [
    r"""["'](dfs|weights)["']""",  # kind == "dfs", .get("kind") == "weights"
    r"\bis_weight_space\b", r"\bdecode_member\b", r"\b_takes_x0\b", r"\bstart_point\b",
    r"""\[["']member["']\]""", r"evomerge\.(dfs|weight_space)\b",
])
def test_execution_has_no_per_kind_special_cases(pattern):
    for path in sorted(EXECUTION.glob("*.py")):
        source = path.read_text()
        assert re.search(pattern, source) is None, f"{path.name}: {pattern}"
