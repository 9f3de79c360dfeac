"""Specification tests for evomerge.spaces (SearchSpace -> BoundSpace: x <-> MergeRecipe).

Truths are worked out by hand: dimensions from the granularity formulas, the value every tensor
reads from a decoded recipe (through ``MergeRecipe.resolve``, i.e. mergekit's setting semantics),
and, on real tiny Llama checkpoints, the merged tensors of a layerwise task-arithmetic merge.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evomerge.merge.engine import Merger, gradient_position, layer_group
from evomerge.recipe import MergeRecipe
from evomerge.spaces import (
    CATALOG_DIR,
    BoundSpace,
    SearchSpace,
    SpaceError,
    catalog,
    load_space,
)

# ---- a fake Llama layout (no model needed) ---------------------------------------------------

EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
NON_LAYER = [EMBED, NORM, HEAD]
BASE, A, B, C = "/zoo/base", "/zoo/expert_a", "/zoo/expert_b", "/zoo/expert_c"


def attn(i: int) -> str:
    return f"model.layers.{i}.self_attn.q_proj.weight"


def mlp(i: int) -> str:
    return f"model.layers.{i}.mlp.up_proj.weight"


def ln(i: int) -> str:
    return f"model.layers.{i}.input_layernorm.weight"


def tensor_names(num_layers: int) -> list[str]:
    blocks = [n for i in range(num_layers) for n in (attn(i), mlp(i), ln(i))]
    return [EMBED, *blocks, NORM, HEAD]


def position(name: str, num_layers: int) -> float:
    """The gradient position mergekit (and the engine) give a tensor: i / (L - 1) in block i."""
    return gradient_position(layer_group(name), num_layers)


def space(text: str) -> SearchSpace:
    return SearchSpace.from_dict(yaml.safe_load(textwrap.dedent(text)))


def bind(sp: SearchSpace, sources=(A, B), base=BASE, layers: int = 3) -> BoundSpace:
    return sp.bind(base, list(sources), layers, NON_LAYER, tensor_names=tensor_names(layers))


def values_for(recipe: MergeRecipe, name: str, layers: int):
    return recipe.resolve(name, position(name, layers))


DARE_LAYERWISE = """
method: dare_ties
params:
  - {name: density, per: layer, bounds: [0.1, 1.0]}
  - {name: weight, per: layer, bounds: [0.0, 1.0]}
"""

# ============================================================================================
# Dimensions and names
# ============================================================================================


@pytest.mark.parametrize("name, sources, layers, expected", [
    ("task_arithmetic_per_source", (A, B), 3, 2),          # 1 weight x 2 sources
    ("task_arithmetic_per_source", (A, B, C), 7, 3),
    ("ties_per_source", (A, B), 3, 4),                     # (weight, density) x 2 sources
    ("dare_ties_layerwise", (A, B), 3, 16),                # 2 params x 2 sources x (3 + 1)
    ("dare_ties_layerwise", (A, B, C), 5, 36),             # 2 x 3 x (5 + 1)
    ("slerp_layerwise", (A,), 3, 4),                       # t x (3 + 1)
    ("slerp_layerwise", (A,), 32, 33),
    ("linear_per_source", (A, B), 3, 3),                   # the base is a weighted input too
    ("ties_attn_mlp", (A, B), 3, 8),                       # 2 weights + 2 x (attn, mlp, rest)
])
def test_catalog_dims_by_hand(name, sources, layers, expected):
    bound = bind(load_space(name), sources, layers=layers)
    assert bound.dim == expected == len(bound.names) == bound.lower.size == bound.upper.size


def test_dims_per_granularity_by_hand():
    assert bind(space("""
        method: task_arithmetic
        params: [{name: weight, per: global, bounds: [0, 1]}]
    """)).dim == 1
    assert bind(space("""
        method: ties
        params: [{name: weight, per: global, bounds: [0, 1]},
                 {name: density, per: filter, filters: [self_attn, mlp], rest: false,
                  bounds: [0, 1]}]
    """)).dim == 1 + 2 * 2
    assert bind(space("""
        method: ties
        fixed: {weight: 1.0}
        params: [{name: weight, per: source, sources: [expert_b], bounds: [0, 2]},
                 {name: lambda, per: layer, bounds: [0.5, 1.5]}]
    """), (A, B, C)).dim == 1 + (3 + 1)
    linear = load_space("linear_per_source")
    assert linear.bind(None, [A, B], 3, NON_LAYER).dim == 2  # no base: only the sources


def test_names_are_readable_and_ordered_source_major():
    bound = bind(space(DARE_LAYERWISE), layers=2)
    assert bound.names == (
        "density[expert_a][layers.0]", "density[expert_a][layers.1]",
        "density[expert_a][embed+final_norm+head]",
        "density[expert_b][layers.0]", "density[expert_b][layers.1]",
        "density[expert_b][embed+final_norm+head]",
        "weight[expert_a][layers.0]", "weight[expert_a][layers.1]",
        "weight[expert_a][embed+final_norm+head]",
        "weight[expert_b][layers.0]", "weight[expert_b][layers.1]",
        "weight[expert_b][embed+final_norm+head]",
    )
    filt = bind(load_space("ties_attn_mlp"))
    assert filt.names == ("weight[expert_a]", "weight[expert_b]",
                          "density[expert_a][self_attn]", "density[expert_a][mlp]",
                          "density[expert_a][rest]", "density[expert_b][self_attn]",
                          "density[expert_b][mlp]", "density[expert_b][rest]")
    # two models with one directory name keep their full reference
    same = bind(load_space("task_arithmetic_per_source"), ("/x/m", "/y/m"))
    assert same.names == ("weight[/x/m]", "weight[/y/m]")


def test_bounds_x0_and_init():
    bound = bind(space("""
        method: ties
        params:
          - {name: weight, per: source, bounds: [0.0, 2.0], init: 1.5}
          - {name: density, per: source, bounds: [0.2, 0.6]}
    """))
    np.testing.assert_array_equal(bound.lower, [0.0, 0.0, 0.2, 0.2])
    np.testing.assert_array_equal(bound.upper, [2.0, 2.0, 0.6, 0.6])
    np.testing.assert_allclose(bound.x0, [1.5, 1.5, 0.4, 0.4])
    assert bound.bounds[0] is bound.lower and bound.bounds[1] is bound.upper
    with pytest.raises(ValueError):
        bound.lower[0] = -1.0  # read-only: a strategy cannot corrupt the space
    np.testing.assert_array_equal(bound.clip([-1, 3, 0.3, 0.9]), [0.0, 2.0, 0.3, 0.6])


# ============================================================================================
# decode: every tensor reads its coordinate's value
# ============================================================================================


def test_decode_layerwise_by_hand_every_tensor_reads_its_coordinate():
    bound = bind(space(DARE_LAYERWISE), layers=3)
    # density[a]: layers 0..2, non-layer; density[b]: ...; weight[a]: ...; weight[b]: ...
    x = [0.11, 0.12, 0.13, 0.19,
         0.21, 0.22, 0.23, 0.29,
         0.31, 0.32, 0.33, 0.39,
         0.41, 0.42, 0.43, 0.49]
    recipe = bound.decode(x)
    assert recipe.merge_method == "dare_ties" and recipe.base_model == BASE
    assert [e.model for e in recipe.models] == [A, B]
    assert recipe.parameters is None and recipe.seed == 0
    for i in range(3):
        for name in (attn(i), mlp(i), ln(i)):
            shared, (pa, pb) = values_for(recipe, name, 3)
            assert pa == {"density": x[i], "weight": x[8 + i]}, name
            assert pb == {"density": x[4 + i], "weight": x[12 + i]}, name
            assert shared == {"int8_mask": False, "normalize": False, "rescale": True,
                              "lambda": 1.0}
    for name in NON_LAYER:
        for t in (0.0, 0.3, 1.0):  # whatever position a tool gives them
            _, (pa, pb) = recipe.resolve(name, t)
            assert pa == {"density": 0.19, "weight": 0.39}, (name, t)
            assert pb == {"density": 0.29, "weight": 0.49}, (name, t)


def test_decode_layerwise_is_mergekit_syntax():
    recipe = bind(space(DARE_LAYERWISE), layers=3).decode(np.linspace(0.1, 0.9, 16))
    data = yaml.safe_load(recipe.to_yaml())
    density = data["models"][0]["parameters"]["density"]
    assert density[:3] == [{"filter": n, "value": pytest.approx(0.1 + 3 * 0.8 / 15)}
                           for n in NON_LAYER]
    assert density[3] == {"value": pytest.approx(list(np.linspace(0.1, 0.9, 16)[:3]))}
    assert MergeRecipe.from_yaml(recipe.to_yaml()) == recipe


@pytest.mark.parametrize("layers", [1, 2, 5, 22])
def test_layer_gradient_gives_each_block_exactly_its_value(layers):
    bound = bind(load_space("slerp_layerwise"), (A,), layers=layers)
    x = np.random.default_rng(layers).uniform(0, 1, bound.dim)
    recipe = bound.decode(x)
    for name in tensor_names(layers):
        shared, _ = values_for(recipe, name, layers)
        group = layer_group(name)
        expected = x[group.layer] if group.layer is not None else x[layers]
        assert shared["t"] == expected, name


@pytest.mark.parametrize("layers", [23, 32, 40, 80])
def test_layer_gradient_deep_models_within_rounding(layers):
    # mergekit's (i / (L - 1)) * (L - 1) lands one ulp beside i for some (L, i) (first at L = 23):
    # block i then blends in a neighbour's value with weight ulp(i) ~ i * 2.2e-16.
    bound = bind(load_space("slerp_layerwise"), (A,), layers=layers)
    x = np.random.default_rng(layers).uniform(0, 1, bound.dim)
    recipe = bound.decode(x)
    assert (15 / 22) * 22 != 15  # the float effect itself (L = 23, block 15)
    for name in tensor_names(layers):
        shared, _ = values_for(recipe, name, layers)
        i = layer_group(name).layer
        if i is None:
            assert shared["t"] == x[layers]
            continue
        step = max(abs(x[i] - x[max(i - 1, 0)]), abs(x[min(i + 1, layers - 1)] - x[i]))
        tolerance = 2 * np.spacing(float(i)) * step + 2 * np.spacing(x[i])
        assert abs(shared["t"] - x[i]) <= tolerance, name


def test_decode_model_with_only_blocks_uses_a_plain_gradient():
    # an MLP whose tensors are all ``layers.{i}.*`` (the digits zoo) has no non-block value
    names = [f"layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    bound = load_space("dare_ties_layerwise").bind(BASE, [A, B], 3, [], tensor_names=names)
    assert bound.dim == 2 * 2 * 3
    assert bound.names[:3] == ("density[expert_a][layers.0]", "density[expert_a][layers.1]",
                               "density[expert_a][layers.2]")
    x = np.linspace(0.1, 0.9, 12)
    recipe = bound.decode(x)
    assert recipe.models[0].parameters["density"] == pytest.approx(list(x[:3]))
    for name in names:
        i = layer_group(name).layer
        _, (pa, pb) = values_for(recipe, name, 3)
        assert (pa["density"], pb["density"], pa["weight"], pb["weight"]) == (
            x[i], x[3 + i], x[6 + i], x[9 + i]), name
    assert np.array_equal(bound.encode(recipe), x)


def test_decode_model_without_blocks_uses_a_scalar():
    sp = load_space("slerp_layerwise")
    bound = sp.bind(BASE, [A], 0, ["fc1.weight", "fc2.weight"])
    assert bound.dim == 1 and bound.names == ("t[other]",)
    recipe = bound.decode([0.3])
    assert recipe.parameters == {"t": 0.3}
    assert bound.encode(recipe) == pytest.approx([0.3])


def test_decode_per_filter_by_hand():
    bound = bind(load_space("ties_attn_mlp"))
    x = [0.7, 0.2, 0.31, 0.32, 0.33, 0.41, 0.42, 0.43]
    recipe = bound.decode(x)
    for name in tensor_names(3):
        _, (pa, pb) = values_for(recipe, name, 3)
        k = 0 if "self_attn" in name else 1 if "mlp" in name else 2
        assert pa == {"weight": 0.7, "density": x[2 + k]}, name
        assert pb == {"weight": 0.2, "density": x[5 + k]}, name


def test_decode_per_filter_without_rest_falls_back_to_fixed():
    bound = bind(space("""
        method: ties
        fixed: {density: 0.9, weight: 1.0}
        params:
          - {name: density, per: filter, filters: [mlp], rest: false, bounds: [0.1, 1.0]}
    """))
    assert bound.names == ("density[expert_a][mlp]", "density[expert_b][mlp]")
    recipe = bound.decode([0.25, 0.75])
    for name in tensor_names(3):
        _, (pa, pb) = values_for(recipe, name, 3)
        if "mlp" in name:
            assert (pa["density"], pb["density"]) == (0.25, 0.75), name
        else:
            assert (pa["density"], pb["density"]) == (0.9, 0.9), name
        assert pa["weight"] == pb["weight"] == 1.0


def test_decode_global_and_shared_params():
    bound = bind(space("""
        method: task_arithmetic
        fixed: {normalize: true}
        params:
          - {name: weight, per: global, bounds: [0, 1]}
          - {name: lambda, per: filter, filters: [self_attn], bounds: [0.5, 2.0]}
    """))
    assert bound.names == ("weight", "lambda[self_attn]", "lambda[rest]")
    recipe = bound.decode([0.4, 1.5, 0.75])
    assert all(e.parameters is None for e in recipe.models)
    for name in tensor_names(3):
        shared, per_source = values_for(recipe, name, 3)
        assert per_source == [{"weight": 0.4, "density": 1.0}] * 2
        assert shared["lambda"] == (1.5 if "self_attn" in name else 0.75)
        assert shared["normalize"] is True


def test_decode_source_subset_leaves_the_others_fixed():
    bound = bind(space("""
        method: task_arithmetic
        fixed: {weight: 1.0}
        params: [{name: weight, per: source, sources: [expert_c, 0], bounds: [0, 1]}]
    """), (A, B, C))
    assert bound.names == ("weight[expert_a]", "weight[expert_c]")
    _, per_source = bound.decode([0.1, 0.3]).resolve(attn(0), 0.0)
    assert [p["weight"] for p in per_source] == [0.1, 1.0, 0.3]


def test_decode_linear_weights_the_base_as_an_input():
    bound = bind(load_space("linear_per_source"))
    recipe = bound.decode([0.2, 0.3, 0.5])
    assert recipe.base_model == BASE
    assert [e.model for e in recipe.source_entries()] == [A, B, BASE]
    _, per_source = recipe.resolve(EMBED)
    assert [p["weight"] for p in per_source] == [0.2, 0.3, 0.5]


def test_decode_carries_seed_and_dtype():
    sp = SearchSpace.from_dict(yaml.safe_load(DARE_LAYERWISE) | {"seed": 7, "dtype": "bfloat16"})
    recipe = bind(sp).decode(bind(sp).x0)
    assert (recipe.seed, recipe.dtype) == (7, "bfloat16")


def test_decode_is_pure():
    sp = load_space("ties_attn_mlp")
    bound = bind(sp)
    x = np.array([0.7, 0.2, 0.31, 0.32, 0.33, 0.41, 0.42, 0.43])
    before = x.copy()
    first = bound.decode(x)
    assert np.array_equal(x, before)
    # mutating a returned recipe's containers touches neither the space nor later decodes
    first.models[0].parameters["weight"] = 99.0
    assert bound.decode(x) == bound.decode(x.tolist())
    assert bound.decode(x).models[0].parameters["weight"] == 0.7
    fixed = bind(load_space("linear_per_source"))
    r = fixed.decode(fixed.x0)
    r.parameters["normalize"] = False
    assert fixed.space.fixed == {"normalize": True}
    assert fixed.decode(fixed.x0).parameters == {"normalize": True}


# ============================================================================================
# encode / round trips
# ============================================================================================


def catalog_bindings():
    for name in catalog():
        sources = (A,) if name.startswith("slerp") else (A, B, C)
        yield name, sources


@pytest.mark.parametrize("name, sources", list(catalog_bindings()))
@pytest.mark.parametrize("layers", [1, 4, 30])
def test_round_trips_for_every_catalog_space(name, sources, layers):
    bound = bind(load_space(name), sources, layers=layers)
    rng = np.random.default_rng(layers)
    for x in [bound.lower, bound.upper, bound.x0, *rng.uniform(bound.lower, bound.upper,
                                                               (5, bound.dim))]:
        recipe = bound.decode(x)
        x_back = bound.encode(recipe)
        assert np.array_equal(x_back, x), name
        assert bound.decode(x_back) == recipe
        # through mergekit YAML text as well (what an exported recipe looks like)
        assert np.array_equal(bound.encode(MergeRecipe.from_yaml(recipe.to_yaml())), x)


def test_encode_a_hand_written_mergekit_recipe():
    bound = bind(load_space("ties_per_source"))
    recipe = MergeRecipe.from_yaml(textwrap.dedent(f"""\
        merge_method: ties
        base_model: {BASE}
        models:
          - model: {A}
            parameters: {{weight: 1, density: 0.5}}
          - model: {B}
            parameters: {{density: 1e-1, weight: 0.25}}
    """))
    np.testing.assert_array_equal(bound.encode(recipe), [1.0, 0.25, 0.5, 0.1])


@pytest.mark.parametrize("change, field", [
    (lambda d: d | {"merge_method": "task_arithmetic"}, "merge_method"),
    (lambda d: d | {"base_model": "/elsewhere"}, "base_model"),
    (lambda d: d | {"models": d["models"][::-1]}, "models"),
    (lambda d: d | {"parameters": {"lambda": 0.5}}, "parameters.lambda"),
    (lambda d: d | {"seed": 3}, "seed"),
])
def test_encode_rejects_recipes_outside_the_space(change, field):
    bound = bind(load_space("ties_per_source"))
    data = bound.decode(bound.x0).to_dict()
    with pytest.raises(ValueError, match=rf"^{field}:"):
        bound.encode(MergeRecipe.from_dict(change(data)))


def test_encode_errors_name_the_parameter():
    bound = bind(space(DARE_LAYERWISE), layers=3)
    good = bound.decode(bound.x0).to_dict()
    # a weight given as one scalar instead of the layerwise form
    data = yaml.safe_load(yaml.safe_dump(good))
    data["models"][1]["parameters"]["weight"] = 0.5
    with pytest.raises(ValueError, match=r"models\[1\]\.parameters\.weight: expected a list of 4"):
        bound.encode(MergeRecipe.from_dict(data))
    # a gradient of the wrong length
    data = yaml.safe_load(yaml.safe_dump(good))
    data["models"][0]["parameters"]["density"][-1]["value"] = [0.5, 0.5]
    with pytest.raises(ValueError, match=r"models\[0\]\.parameters\.density: .*exactly 3"):
        bound.encode(MergeRecipe.from_dict(data))
    # non-block tensors with different values
    data = yaml.safe_load(yaml.safe_dump(good))
    data["models"][0]["parameters"]["density"][1]["value"] = 0.9
    with pytest.raises(ValueError, match=r"models\[0\]\.parameters\.density\[1\]\.value"):
        bound.encode(MergeRecipe.from_dict(data))
    # a missing searched parameter
    data = yaml.safe_load(yaml.safe_dump(good))
    del data["models"][0]["parameters"]["density"]
    with pytest.raises(ValueError, match=r"models\[0\]\.parameters\.density: missing"):
        bound.encode(MergeRecipe.from_dict(data))
    # a value outside the space's bounds (though inside the method's range)
    data = yaml.safe_load(yaml.safe_dump(good))
    data["models"][0]["parameters"]["density"][-1]["value"] = [0.05, 0.5, 0.5]
    with pytest.raises(ValueError, match=r"models\[0\]\.parameters\.density: value 0\.05 .*"
                                         r"density\[expert_a\]\[layers\.0\]"):
        bound.encode(MergeRecipe.from_dict(data))


# ============================================================================================
# decode errors
# ============================================================================================


def test_decode_rejects_wrong_length_and_shape():
    bound = bind(load_space("ties_per_source"))
    with pytest.raises(ValueError, match=r"^x: expected a vector of length 4"):
        bound.decode([0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"^x: expected a vector of length 4"):
        bound.decode(np.full((2, 2), 0.5))
    with pytest.raises(ValueError, match=r"^x: expected 4 numbers"):
        bound.decode(["a", "b", "c", "d"])


@pytest.mark.parametrize("i, value", [(0, -0.01), (3, 1.2), (2, 0.05), (1, float("nan"))])
def test_decode_rejects_points_outside_the_bounds_naming_the_coordinate(i, value):
    bound = bind(load_space("ties_per_source"))
    x = bound.x0.copy()
    x[i] = value
    with pytest.raises(ValueError, match="^" + re.escape(f"x[{i}] ({bound.names[i]}) = ")):
        bound.decode(x)


# ============================================================================================
# Definition validation: every error names its field
# ============================================================================================


@pytest.mark.parametrize("data, field", [
    ({"method": "tiez", "params": []}, "method: unknown merge method 'tiez'"),
    ({"method": "ties", "params": [{"name": "weigth", "per": "source", "bounds": [0, 1]}]},
     r"params\[0\]\.name: 'weigth' is not a parameter of ties"),
    ({"method": "ties", "fixed": {"weight": 1},
      "params": [{"name": "normalize", "per": "global", "bounds": [0, 1]}]},
     r"params\[0\]\.name: 'normalize' is a bool parameter"),
    ({"method": "slerp", "params": [{"name": "t", "per": "source", "bounds": [0, 1]}]},
     r"params\[0\]\.per: 't' is one value shared"),
    ({"method": "ties", "fixed": {"weight": 1},
      "params": [{"name": "lambda", "per": "global", "sources": [0], "bounds": [0, 1]}]},
     r"params\[0\]\.sources: 'lambda' is shared"),
    ({"method": "ties", "fixed": {"weight": 1},
      "params": [{"name": "density", "per": "source", "bounds": [0, 1.5]}]},
     r"params\[0\]\.bounds: \[0\.0, 1\.5\] is outside the range of ties\.density: \[0\.0, 1\.0\]"),
    ({"method": "ties", "fixed": {"weight": 1},
      "params": [{"name": "density", "per": "source", "bounds": [0.8, 0.2]}]},
     r"params\[0\]\.bounds: lower bound 0\.8 must be below upper bound 0\.2"),
    ({"method": "ties", "fixed": {"weight": 1},
      "params": [{"name": "density", "per": "source", "bounds": [0.5, 0.5]}]},
     r"params\[0\]\.bounds: lower bound"),
    ({"method": "ties", "params": [{"name": "density", "per": "source", "bounds": [0, 1]}]},
     r"params: ties requires 'weight'; search it \(params\) or fix it \(fixed\)"),
    ({"method": "slerp"}, r"params: slerp requires 't'"),
    ({"method": "ties", "params": [{"name": "weight", "per": "source", "sources": [0],
                                    "bounds": [0, 1]}]},
     r"params\[0\]\.sources: ties requires 'weight' for every source"),
    ({"method": "ties", "params": [{"name": "weight", "per": "filter", "filters": ["mlp"],
                                    "rest": False, "bounds": [0, 1]}]},
     r"params\[0\]\.rest: ties requires 'weight' for every tensor"),
    ({"method": "ties", "params": [{"name": "weight", "per": "source", "bounds": [0, 1],
                                    "step": 0.1}]},
     r"params\[0\]\.step: Extra inputs are not permitted"),
    ({"method": "ties", "fixed": {"weight": 1}, "budget": 10}, r"budget: Extra inputs"),
    ({"method": "ties", "params": [{"name": "weight", "per": "block", "bounds": [0, 1]}]},
     r"params\[0\]\.per: Input should be 'global', 'source', 'layer' or 'filter'"),
    ({"method": "ties", "params": [{"name": "weight", "per": "filter", "bounds": [0, 1]}]},
     r"params\[0\]\.filters: per: filter needs 'filters'"),
    ({"method": "ties", "params": [{"name": "weight", "per": "source", "filters": ["mlp"],
                                    "bounds": [0, 1]}]},
     r"params\[0\]\.filters: only used with per: filter"),
    ({"method": "ties", "params": [{"name": "weight", "per": "filter", "filters": ["mlp", "*"],
                                    "bounds": [0, 1]}]},
     r"params\[0\]\.filters: '\*' is not a usable filter"),
    ({"method": "ties", "params": [{"name": "weight", "per": "source", "bounds": [0, 1],
                                    "init": 2}]},
     r"params\[0\]\.init: 2\.0 is outside bounds"),
    ({"method": "ties", "params": [{"name": "weight", "per": "source", "bounds": [0, 1]},
                                   {"name": "weight", "per": "global", "bounds": [0, 1]}]},
     r"params\[1\]\.name: 'weight' is already searched by params\[0\]"),
    ({"method": "ties", "fixed": {"weight": 1},
      "params": [{"name": "weight", "per": "source", "bounds": [0, 1]}]},
     r"fixed\.weight: also searched by params\[0\]"),
    ({"method": "ties", "fixed": {"weight": 1, "density": 2}},
     r"fixed\.density: 2 is outside \[0\.0, 1\.0\]"),
    ({"method": "ties", "fixed": {"weight": 1, "colour": 2}},
     r"fixed\.colour: unknown parameter for ties"),
    ({"method": "ties", "fixed": {"weight": 1}, "dtype": "int8"}, r"dtype: 'int8' is not one of"),
    ({"method": "ties", "fixed": {"weight": 1}, "seed": -1}, r"seed: seed must be >= 0"),
    ({"method": "ties", "params": [{"per": "source", "bounds": [0, 1]}], "fixed": {"weight": 1}},
     r"params\[0\]\.name: Field required"),
])
def test_validation_errors_name_the_field(data, field):
    with pytest.raises(SpaceError, match=rf"(?m)^  {field}"):
        SearchSpace.from_dict(data)


def test_a_file_error_names_the_file_and_every_field(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: ties\nparams:\n  - {name: density, per: source, bounds: [1, 0]}\n"
                    "  - {name: gamma, per: global, bounds: [0, 1]}\n")
    with pytest.raises(SpaceError) as err:
        load_space(path)
    text = str(err.value)
    assert text.startswith(f"{path}: invalid search space")
    assert "params[0].bounds: lower bound 1.0 must be below upper bound 0.0" in text


def test_space_errors_are_value_errors_and_direct_construction_validates():
    assert issubclass(SpaceError, ValueError)
    with pytest.raises(ValueError, match="unknown merge method"):
        SearchSpace(method="nope")


def test_space_is_frozen():
    sp = load_space("ties_per_source")
    with pytest.raises(Exception):
        sp.method = "linear"
    with pytest.raises(Exception):
        sp.params[0].bounds = (0.0, 2.0)


# ============================================================================================
# Catalog and loader
# ============================================================================================


def test_catalog_has_the_documented_spaces_and_all_validate():
    names = catalog()
    for required in ("task_arithmetic_per_source", "ties_per_source", "dare_ties_layerwise",
                     "linear_per_source", "slerp_layerwise"):
        assert required in names
    for name in names:
        sp = load_space(name)
        assert sp.description
        # by path as well, and the dump loads back to the same space
        assert load_space(CATALOG_DIR / f"{name}.yaml") == sp
        assert SearchSpace.from_dict(yaml.safe_load(sp.to_yaml())) == sp


def test_catalog_choices():
    dare = load_space("dare_ties_layerwise")
    assert dare.method == "dare_ties" and {a.name: a.per for a in dare.params} == {
        "density": "layer", "weight": "layer"}
    assert load_space("slerp_layerwise").params[0].per == "layer"


def test_load_space_errors(tmp_path: Path):
    with pytest.raises(SpaceError, match=r"'nonesuch': not in the catalog .*known: .*ties_per"):
        load_space("nonesuch")
    with pytest.raises(SpaceError, match=r"no such search-space file"):
        load_space(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("method: [ties\n")
    with pytest.raises(SpaceError, match=r"broken\.yaml: not valid YAML"):
        load_space(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- ties\n")
    with pytest.raises(SpaceError, match=r"list\.yaml: expected a mapping"):
        load_space(str(tmp_path / "list.yaml"))


def test_loader_uses_safe_load(tmp_path: Path):
    (tmp_path / "evil.yaml").write_text("method: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(SpaceError, match="not valid YAML"):
        load_space(tmp_path / "evil.yaml")


# ============================================================================================
# Binding errors
# ============================================================================================


def test_bind_errors():
    ties = load_space("ties_per_source")
    with pytest.raises(ValueError, match=r"base_model: ties needs a base model"):
        ties.bind(None, [A, B], 3, NON_LAYER)
    with pytest.raises(ValueError, match=r"sources: the base model .* is also listed"):
        ties.bind(BASE, [BASE, A], 3, NON_LAYER)
    with pytest.raises(ValueError, match=r"sources: at least one"):
        ties.bind(BASE, [], 3, NON_LAYER)
    with pytest.raises(ValueError, match=r"sources: listed twice"):
        ties.bind(BASE, [A, A], 3, NON_LAYER)
    with pytest.raises(ValueError, match=r"models: slerp needs exactly 2 input models"):
        load_space("slerp_layerwise").bind(BASE, [A, B], 3, NON_LAYER)
    subset = space("""
        method: task_arithmetic
        fixed: {weight: 1}
        params: [{name: weight, per: source, sources: [expert_z], bounds: [0, 1]}]
    """)
    with pytest.raises(ValueError, match=r"params\[0\]\.sources: 'expert_z' is not one of"):
        bind(subset)
    filt = load_space("ties_attn_mlp")
    with pytest.raises(ValueError, match=r"params\[1\]\.filters: 'mlp' matches no tensor"):
        filt.bind(BASE, [A, B], 1, NON_LAYER, tensor_names=[EMBED, attn(0), NORM, HEAD])
    with pytest.raises(ValueError, match=r"non_layer_tensors: .* is part of block tensor"):
        ties.bind(BASE, [A], 1, ["q_proj.weight"], tensor_names=["q_proj.weight", attn(0)])


# ============================================================================================
# mergekit agrees (when importable)
# ============================================================================================


def test_mergekit_reads_decoded_recipes_the_same_way():
    config = pytest.importorskip("mergekit.config")
    from pydantic import TypeAdapter

    bound = bind(space(DARE_LAYERWISE), layers=4)
    x = np.random.default_rng(0).uniform(bound.lower, bound.upper)
    recipe = bound.decode(x)
    theirs = config.MergeConfiguration.model_validate(yaml.safe_load(recipe.to_yaml()))
    as_float = TypeAdapter(float).validate_python
    for k, model in enumerate(theirs.models):
        for name in tensor_names(4):
            t = position(name, 4)
            _, per_source = recipe.resolve(name, t)
            for param in ("density", "weight"):
                got = config.evaluate_setting(name, model.parameters[param], t, validate=as_float)
                assert got == pytest.approx(per_source[k][param], rel=1e-15), (k, name, param)


# ============================================================================================
# A real Merger over tiny Llama checkpoints
# ============================================================================================


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    try:
        from helpers import make_family
    except ImportError:  # tests/ imported as a package
        from tests.helpers import make_family

    return make_family(tmp_path_factory.mktemp("spaces_family"), n_sources=2, layers=3, seed=3)


@pytest.fixture(scope="module")
def merger(family):
    return Merger([str(p) for p in family.all])


def test_from_merger_binds_to_the_checkpoints(family, merger):
    base, (a, b) = str(family.base), [str(s) for s in family.sources]
    bound = BoundSpace.from_merger(load_space("dare_ties_layerwise"), merger, base, [a, b])
    non_layer = [n for n in merger.names if ".layers." not in n]
    assert set(non_layer) == {EMBED, NORM, HEAD}
    assert bound.num_layers == 3 and set(bound.non_layer_tensors) == set(non_layer)
    assert bound.dim == 2 * 2 * (3 + 1)
    assert bound.names[0] == "density[s0][layers.0]"
    recipe = bound.decode(np.random.default_rng(1).uniform(bound.lower, bound.upper))
    out = merger.build(recipe)
    assert set(out) == set(merger.names)
    assert all(torch.isfinite(t).all() for t in out.values())
    with pytest.raises(ValueError, match=r"sources\[1\]: /not/loaded is not loaded"):
        BoundSpace.from_merger(load_space("ties_per_source"), merger, base, [a, "/not/loaded"])


def test_layerwise_task_arithmetic_merge_by_hand(family, merger):
    """Each tensor of the built model is base + w_a * (a - base) + w_b * (b - base) with the
    weights of its own layer coordinate: decode, recipe semantics and engine agree end to end."""
    base, (a, b) = str(family.base), [str(s) for s in family.sources]
    sp = space("""
        method: task_arithmetic
        params: [{name: weight, per: layer, bounds: [0.0, 1.0]}]
    """)
    bound = BoundSpace.from_merger(sp, merger, base, [a, b])
    assert bound.dim == 2 * (3 + 1)
    x = np.array([0.1, 0.5, 0.9, 0.3,    # a: layers 0..2, non-layer
                  0.8, 0.0, 0.4, 0.6])   # b
    out = merger.build(bound.decode(x))
    sb, sa, sbb = merger.state(base), merger.state(a), merger.state(b)
    for name in merger.names:
        layer = layer_group(name).layer
        i = layer if layer is not None else 3
        expected = sb[name] + x[i] * (sa[name] - sb[name]) + x[4 + i] * (sbb[name] - sb[name])
        torch.testing.assert_close(out[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    assert bound.encode(bound.decode(x)) == pytest.approx(x, abs=0)


def test_every_catalog_space_builds_on_a_real_merger(family, merger):
    base, sources = str(family.base), [str(s) for s in family.sources]
    for name in catalog():
        srcs = sources[:1] if name.startswith("slerp") else sources
        bound = BoundSpace.from_merger(load_space(name), merger, base, srcs)
        out = merger.build(bound.decode(bound.x0))
        assert all(torch.isfinite(t).all() for t in out.values()), name


def test_mergekit_merges_a_decoded_layerwise_recipe_the_same_way(family, merger, tmp_path):
    """mergekit's own run_merge of a decoded recipe: every tensor gets its coordinate's weights
    (the exact-name filters single out embed/norm/head; blocks read the L-entry gradient)."""
    pytest.importorskip("mergekit")
    import random

    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    try:
        from helpers import load_weights
    except ImportError:  # tests/ imported as a package
        from tests.helpers import load_weights

    base, (a, b) = str(family.base), [str(s) for s in family.sources]
    sp = space("""
        method: task_arithmetic
        dtype: float32
        params: [{name: weight, per: layer, bounds: [0.0, 1.0]}]
    """)
    bound = BoundSpace.from_merger(sp, merger, base, [a, b])
    x = np.array([0.1, 0.5, 0.9, 0.3, 0.8, 0.0, 0.4, 0.6])
    recipe = bound.decode(x)
    options = MergeOptions(device="cpu", copy_tokenizer=False, write_model_card=False, quiet=True,
                           lazy_unpickle=False)
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(recipe.to_yaml())),
                  str(tmp_path / "mk"), options=options)
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
    theirs = load_weights(tmp_path / "mk")
    ours = merger.build(recipe)
    sb, sa, sbb = merger.state(base), merger.state(a), merger.state(b)
    assert set(theirs) == set(merger.names)
    for name in merger.names:
        layer = layer_group(name).layer
        i = layer if layer is not None else 3
        expected = sb[name] + x[i] * (sa[name] - sb[name]) + x[4 + i] * (sbb[name] - sb[name])
        torch.testing.assert_close(theirs[name], expected, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", ["task_arithmetic_per_source", "dare_ties_layerwise",
                                  "ties_per_source", "linear_per_source"])
def test_source_points_build_each_source_alone(family, merger, name):
    """``init: sources`` for M2N2: each point's merge is that source's checkpoint."""
    base, (a, b) = str(family.base), [str(p) for p in family.sources]
    bound = BoundSpace.from_merger(load_space(name), merger, base, [a, b])
    for k, point in enumerate(bound.source_points()):
        built = merger.build(bound.decode(point))
        source = merger.state([a, b][k])
        for tensor in built:
            torch.testing.assert_close(built[tensor], source[tensor], atol=1e-6, rtol=1e-6,
                                       msg=f"{name} source {k} {tensor}")


def test_source_points_are_refused_where_no_point_is_one_source():
    with pytest.raises(ValueError, match="searches t: no point is known"):
        bind(load_space("slerp_layerwise"), sources=(A,)).source_points()
    one_weight = space("method: linear\nparams:\n  - {name: weight, per: global, bounds: [0, 1]}")
    with pytest.raises(ValueError, match="per-source weight searched for every input"):
        bind(one_weight).source_points()
    narrow = space("method: task_arithmetic\nparams:\n"
                   "  - {name: weight, per: source, bounds: [0.2, 1]}")
    with pytest.raises(ValueError, match=r"weight: 0.0 is outside the bounds \[0.2, 1.0\]"):
        bind(narrow).source_points()
