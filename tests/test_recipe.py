"""Specification tests for evomerge.recipe (MergeRecipe: mergekit's YAML merge-config format).

Expected values are worked out by hand in comments; the last section cross-checks against
mergekit 0.1.5 itself (its config model and its ``evaluate_setting``) when it is importable.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evomerge.recipe import Conditional, MergeRecipe, RecipeError, evaluate_setting

DARE_TIES_YAML = """\
merge_method: dare_ties
base_model: org/base
dtype: bfloat16
seed: 17
parameters:
  int8_mask: true
  density: 0.5
models:
  - model: org/base
  - model: org/math
    parameters:
      weight: [0, 1]
      density:
        - filter: self_attn
          value: 0.3
        - filter: mlp
          value: [0.2, 0.4, 1.0]
  - model: org/code
    parameters:
      weight: 0.7
"""

ATTN = "model.layers.0.self_attn.q_proj.weight"
MLP = "model.layers.0.mlp.up_proj.weight"
EMBED = "model.embed_tokens.weight"


def recipe_from(text: str) -> MergeRecipe:
    return MergeRecipe.from_yaml(text)


def error_of(text: str) -> str:
    with pytest.raises(RecipeError) as info:
        MergeRecipe.from_yaml(text)
    return str(info.value)


# ============================================================================================
# Reading and writing
# ============================================================================================


def test_from_yaml_reads_a_mergekit_config_string():
    recipe = recipe_from(DARE_TIES_YAML)
    assert recipe.merge_method == "dare_ties"
    assert recipe.base_model == "org/base"
    assert recipe.dtype == "bfloat16"
    assert recipe.seed == 17
    assert [e.model for e in recipe.models] == ["org/base", "org/math", "org/code"]
    # base first, then the other models in order, each once
    assert recipe.model_paths() == ["org/base", "org/math", "org/code"]
    # for a task-vector method the base is not a source
    assert [e.model for e in recipe.source_entries()] == ["org/math", "org/code"]
    density = recipe.models[1].parameters["density"]
    assert density == [Conditional(filter="self_attn", value=0.3),
                       Conditional(filter="mlp", value=[0.2, 0.4, 1.0])]


def test_from_yaml_reads_a_file_given_as_path_or_string(tmp_path: Path):
    path = tmp_path / "merge.yaml"
    path.write_text(DARE_TIES_YAML)
    expected = recipe_from(DARE_TIES_YAML)
    assert MergeRecipe.from_yaml(path) == expected
    assert MergeRecipe.from_yaml(str(path)) == expected
    with pytest.raises(RecipeError, match="no such recipe file"):
        MergeRecipe.from_yaml(tmp_path / "missing.yaml")


def test_invalid_yaml_is_a_recipe_error():
    with pytest.raises(RecipeError, match="not valid YAML"):
        MergeRecipe.from_yaml("merge_method: [ties\nmodels: }\n")
    with pytest.raises(RecipeError, match="mapping"):
        MergeRecipe.from_yaml("- just\n- a list\n")


def test_yaml_round_trip_is_the_identity():
    recipe = recipe_from(DARE_TIES_YAML)
    text = recipe.to_yaml()
    assert MergeRecipe.from_yaml(text) == recipe
    # gradients are written inline, like mergekit's own dumper
    assert "weight: [0, 1]" in text
    assert "[0.2, 0.4, 1.0]" in text


def test_round_trip_of_a_minimal_recipe_omits_defaults():
    recipe = recipe_from("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
                         "  - model: b\n    parameters: {weight: 3}\n")
    data = yaml.safe_load(recipe.to_yaml())
    assert data == {"merge_method": "linear",
                    "models": [{"model": "a", "parameters": {"weight": 1}},
                               {"model": "b", "parameters": {"weight": 3}}]}
    assert MergeRecipe.from_yaml(recipe.to_yaml()) == recipe


def test_with_models_renames_references():
    recipe = recipe_from(DARE_TIES_YAML).with_models({"org/base": "/m/base", "org/code": "/m/code"})
    assert recipe.base_model == "/m/base"
    assert [e.model for e in recipe.models] == ["/m/base", "org/math", "/m/code"]
    assert recipe.models[2].parameters == {"weight": 0.7}


# ============================================================================================
# resolve(): the parameter values of one tensor
# ============================================================================================


def test_resolve_shared_values_global_and_defaults():
    shared, _ = recipe_from(DARE_TIES_YAML).resolve(ATTN, t=0.0)
    # int8_mask set globally; normalize/rescale/lambda are dare_ties' defaults (False, True, 1.0)
    assert shared == {"int8_mask": True, "normalize": False, "rescale": True, "lambda": 1.0}


def test_resolve_gradient_and_filters_by_hand():
    recipe = recipe_from(DARE_TIES_YAML)
    _, (math_, code) = recipe.resolve(ATTN, t=0.25)
    # weight [0, 1] at t=0.25: 0 + 0.25 * (1 - 0) = 0.25; density: filter "self_attn" -> 0.3
    assert math_ == {"weight": 0.25, "density": 0.3}
    # code has no density of its own -> the global 0.5
    assert code == {"weight": 0.7, "density": 0.5}

    _, (math_, code) = recipe.resolve(MLP, t=0.75)
    # weight -> 0.75; density [0.2, 0.4, 1.0] at 0.75: position 0.75 * 2 = 1.5, between
    # 0.4 and 1.0 halfway: 0.4 + 0.5 * 0.6 = 0.7
    assert math_["weight"] == pytest.approx(0.75)
    assert math_["density"] == pytest.approx(0.7)
    assert code["density"] == 0.5

    # no filter matches the embedding -> falls through to the global density 0.5
    _, (math_, _) = recipe.resolve(EMBED, t=1.0)
    assert math_ == {"weight": 1.0, "density": 0.5}


def test_resolve_model_level_beats_global():
    recipe = recipe_from("""\
merge_method: ties
base_model: b
parameters: {weight: 0.1, density: 0.9}
models:
  - model: x
    parameters: {weight: 0.6}
  - model: y
""")
    _, (x, y) = recipe.resolve(ATTN)
    assert x == {"weight": 0.6, "density": 0.9}
    assert y == {"weight": 0.1, "density": 0.9}


def test_resolve_first_matching_filter_wins_and_star_matches_everything():
    recipe = recipe_from("""\
merge_method: task_arithmetic
base_model: b
parameters:
  lambda:
    - {filter: proj, value: 0.1}
    - {filter: q_proj, value: 0.9}
    - {filter: "*", value: 0.5}
models:
  - model: x
    parameters:
      weight:
        - {filter: mlp, value: 2}
        - {value: 3}
""")
    shared, (x,) = recipe.resolve(ATTN)  # contains both "proj" and "q_proj": the first wins
    assert shared["lambda"] == 0.1 and x["weight"] == 3.0  # no filter: matches everything
    shared, (x,) = recipe.resolve(EMBED)  # only "*" matches
    assert shared["lambda"] == 0.5 and x["weight"] == 3.0
    shared, (x,) = recipe.resolve(MLP)
    assert shared["lambda"] == 0.1 and x["weight"] == 2.0


def test_resolve_unmatched_filter_falls_back_to_the_default():
    recipe = recipe_from("""\
merge_method: ties
base_model: b
parameters:
  normalize: [{filter: mlp, value: false}]
models:
  - model: x
    parameters:
      weight: 1
      density: [{filter: self_attn, value: 0.2}]
""")
    shared, (x,) = recipe.resolve(EMBED)
    assert shared["normalize"] is True  # ties' default
    assert x["density"] == 1.0  # density's default
    shared, (x,) = recipe.resolve(MLP)
    assert shared["normalize"] is False


def test_resolve_types_values_like_their_parameter():
    recipe = recipe_from("merge_method: ties\nbase_model: b\nmodels:\n"
                         "  - model: x\n    parameters: {weight: 1, density: 1}\n")
    _, (x,) = recipe.resolve(ATTN)
    assert type(x["weight"]) is float and type(x["density"]) is float


def test_yaml_scientific_notation_string_is_accepted_as_a_number():
    # YAML 1.1 (PyYAML) reads 1e-1 without a dot as the string "1e-1"; mergekit accepts it.
    recipe = recipe_from("merge_method: ties\nbase_model: b\nmodels:\n"
                         "  - model: x\n    parameters: {weight: 1e-1, density: 5e-1}\n")
    assert recipe.models[0].parameters["weight"] == "1e-1"  # what YAML produced
    _, (x,) = recipe.resolve(ATTN)
    assert x == {"weight": 0.1, "density": 0.5}


def test_gradient_of_scientific_notation_strings_interpolates_like_numbers():
    # mergekit validates each endpoint as a float before interpolating (config.evaluate_setting),
    # so density [1e-3, 1e-1] at t = 0.5 is 0.5 * 0.001 + 0.5 * 0.1 = 0.0505, not a pick of one end.
    recipe = recipe_from("merge_method: ties\nbase_model: b\nmodels:\n"
                         "  - model: x\n    parameters: {weight: 1, density: [1e-3, 1e-1]}\n")
    _, (x,) = recipe.resolve(MLP, t=0.5)
    assert x["density"] == pytest.approx(0.0505)


def test_linear_base_model_is_a_weighted_input():
    recipe = recipe_from("""\
merge_method: linear
base_model: b
parameters: {weight: 0.5}
models:
  - model: x
    parameters: {weight: 2}
""")
    # mergekit appends a base that is not listed as an ordinary input (last)
    assert [e.model for e in recipe.source_entries()] == ["x", "b"]
    shared, per = recipe.resolve(ATTN)
    assert shared == {"normalize": True}
    assert per == [{"weight": 2.0}, {"weight": 0.5}]


# ============================================================================================
# evaluate_setting by hand
# ============================================================================================


@pytest.mark.parametrize("setting,t,expected", [
    (0.3, 0.9, 0.3),
    ([0, 1], 0.25, 0.25),
    ([0.2, 0.4, 1.0], 0.75, 0.7),   # 1.5 -> 0.4 + 0.5 * (1.0 - 0.4)
    ([0.2, 0.4, 1.0], 1.0, 1.0),    # the last endpoint exactly
    ([1, 3, 2, 0], 0.5, 2.5),       # 0.5 * 3 = 1.5 -> 3 + 0.5 * (2 - 3)
    ([True, False], 0.4, True),     # bools pick: int(0.4 * 1) = 0
    ([True, False], 1.0, False),
    ([], 0.5, None),
    (None, 0.5, None),
])
def test_evaluate_setting_by_hand(setting, t, expected):
    value = evaluate_setting(setting, ATTN, t)
    if isinstance(expected, float):
        assert value == pytest.approx(expected)
    else:
        assert value == expected


def test_evaluate_setting_conditionals():
    setting = [Conditional(filter="mlp", value=[0, 1]), Conditional(filter="attn", value=7)]
    assert evaluate_setting(setting, MLP, 0.5) == pytest.approx(0.5)
    assert evaluate_setting(setting, ATTN, 0.5) == 7
    assert evaluate_setting(setting, EMBED, 0.5) is None
    assert evaluate_setting(Conditional(value=4), EMBED, 0.0) == 4


# ============================================================================================
# Errors: RecipeError naming the field
# ============================================================================================

TIES_HEAD = "merge_method: ties\nbase_model: b\n"


def test_recipe_error_is_a_value_error():
    assert issubclass(RecipeError, ValueError)


def test_unknown_method_lists_the_known_ones():
    message = error_of("merge_method: tiess\nbase_model: b\nmodels:\n  - model: x\n")
    assert "merge_method" in message and "'tiess'" in message
    for name in ("linear", "ties", "dare_ties", "slerp", "model_stock", "breadcrumbs"):
        assert name in message


def test_ties_without_a_base_model():
    message = error_of("merge_method: ties\nmodels:\n  - model: x\n    parameters: {weight: 1}\n")
    assert "base_model" in message and "ties" in message


def test_unknown_parameter_names_its_location_and_the_valid_names():
    message = error_of(TIES_HEAD + "models:\n  - model: x\n"
                       "    parameters: {weight: 1, densty: 0.5}\n")
    assert "models[0].parameters.densty" in message
    assert "density" in message  # the valid names are listed


def test_unknown_global_parameter():
    message = error_of(TIES_HEAD + "parameters: {lamda: 2}\nmodels:\n  - model: x\n"
                       "    parameters: {weight: 1}\n")
    assert "parameters.lamda" in message


@pytest.mark.parametrize("value", ["1.5", "-0.1", "[0.5, 1.2]", "[{filter: mlp, value: 2}]"])
def test_out_of_range_density(value):
    message = error_of(TIES_HEAD + "models:\n  - model: x\n"
                       f"    parameters:\n      weight: 1\n      density: {value}\n")
    assert "models[0].parameters.density" in message
    assert "outside" in message


def test_wrong_types():
    message = error_of(TIES_HEAD + "parameters: {normalize: 3}\nmodels:\n  - model: x\n"
                       "    parameters: {weight: 1}\n")
    assert "parameters.normalize" in message and "true/false" in message
    message = error_of(TIES_HEAD + "models:\n  - model: x\n    parameters: {weight: heavy}\n")
    assert "models[0].parameters.weight" in message and "number" in message


def test_slerp_takes_exactly_two_models():
    message = error_of("merge_method: slerp\nbase_model: a\nparameters: {t: 0.5}\n"
                       "models:\n  - model: a\n  - model: b\n  - model: c\n")
    assert "models" in message and "slerp" in message and "3" in message
    # the base plus one other is fine (the base need not be listed)
    recipe = recipe_from("merge_method: slerp\nbase_model: a\nparameters: {t: 0.5}\n"
                         "models:\n  - model: b\n")
    assert recipe.resolve(ATTN) == ({"t": 0.5}, [{}])


def test_model_stock_needs_three_models_including_the_base():
    message = error_of("merge_method: model_stock\nbase_model: a\n"
                       "models:\n  - model: a\n  - model: b\n")
    assert "models" in message and "model_stock" in message and "3" in message
    recipe_from("merge_method: model_stock\nbase_model: a\nmodels:\n  - model: b\n  - model: c\n")


def test_missing_required_weight():
    message = error_of(TIES_HEAD + "models:\n  - model: b\n  - model: x\n"
                       "    parameters: {density: 0.5}\n  - model: y\n    parameters: {weight: 1}\n")
    assert "models[1].parameters.weight" in message
    assert "models[2]" not in message  # y has its weight; the base needs none
    # a global weight satisfies every model
    recipe_from(TIES_HEAD + "parameters: {weight: 1}\nmodels:\n  - model: x\n")


def test_missing_required_shared_parameter_is_reported_at_load_time():
    # validate_recipe promises "every problem ... empty when the recipe is mergeable"; a slerp
    # without t cannot be merged (mergekit: "Missing required parameter t").
    message = error_of("merge_method: slerp\nbase_model: a\nmodels:\n  - model: a\n  - model: b\n")
    assert "parameters.t" in message


def test_slices_form_is_rejected_clearly():
    message = error_of("""\
merge_method: slerp
base_model: a
slices:
  - sources:
      - {model: a, layer_range: [0, 4]}
      - {model: b, layer_range: [0, 4]}
parameters: {t: 0.5}
""")
    assert "slices" in message and "layer recipes" in message


def test_dtype_and_tokenizer_source_are_checked():
    message = error_of(TIES_HEAD + "dtype: fp8\ntokenizer_source: union\nparameters: {weight: 1}\n"
                       "models:\n  - model: x\n")
    assert "dtype" in message and "tokenizer_source" in message


def test_unknown_top_level_key_is_rejected():
    message = error_of(TIES_HEAD + "parameter: {weight: 1}\nmodels:\n  - model: x\n")
    assert "parameter" in message


def test_several_problems_are_reported_in_one_error():
    message = error_of("""\
merge_method: ties
parameters: {normalize: 3}
models:
  - model: x
    parameters: {weight: 1, densty: 0.5}
  - model: y
    parameters: {weight: 1, density: 1.5}
""")
    for field in ("base_model", "parameters.normalize", "models[0].parameters.densty",
                  "models[1].parameters.density"):
        assert field in message, field


def test_resolve_names_the_model_when_a_required_value_is_absent_for_a_tensor():
    recipe = recipe_from(TIES_HEAD + "models:\n  - model: x\n"
                         "    parameters:\n      weight: [{filter: mlp, value: 1}]\n")
    assert recipe.resolve(MLP)[1] == [{"weight": 1.0, "density": 1.0}]
    with pytest.raises(RecipeError, match="x.*weight"):
        recipe.resolve(ATTN)


# ============================================================================================
# Cross-check against mergekit 0.1.5 itself
# ============================================================================================


@pytest.fixture(scope="module")
def mergekit_config():
    return pytest.importorskip("mergekit.config")


@pytest.mark.parametrize("text", [
    DARE_TIES_YAML,
    "merge_method: linear\nbase_model: b\nparameters: {weight: 0.5, normalize: false}\n"
    "models:\n  - model: x\n    parameters: {weight: 2}\n",
    "merge_method: slerp\nbase_model: a\nparameters:\n  t: [0, 0.5, 1]\nmodels:\n  - model: a\n"
    "  - model: b\n",
    "merge_method: della\nbase_model: a\nparameters: {epsilon: 1e-1, lambda: 1.1}\n"
    "models:\n  - model: b\n    parameters: {weight: 1, density: 0.5}\n",
])
def test_mergekit_accepts_our_yaml(mergekit_config, text):
    recipe = recipe_from(text)
    config = mergekit_config.MergeConfiguration.model_validate(yaml.safe_load(recipe.to_yaml()))
    assert config.merge_method == recipe.merge_method
    assert (config.base_model.model.path if config.base_model else None) == recipe.base_model
    assert [m.model.model.path for m in config.models] == [e.model for e in recipe.models]


SETTINGS_YAML = """\
scalar: 0.3
int_scalar: 2
sci: 1e-1
gradient2: [0, 1]
gradient3: [0.2, 0.4, 1.0]
gradient4: [1, 3, 2, 0]
bools: [true, false, true]
conditional: {filter: mlp, value: [0.1, 0.9]}
conditionals:
  - {filter: self_attn, value: 0.3}
  - {filter: mlp, value: [0.2, 0.4, 1.0]}
  - {filter: "*", value: 0.05}
unmatched:
  - {filter: lm_head, value: 1}
"""


def test_evaluate_setting_agrees_with_mergekit(mergekit_config):
    from pydantic import TypeAdapter

    from evomerge.recipe import Setting

    raw = yaml.safe_load(SETTINGS_YAML)
    ours = {k: TypeAdapter(Setting).validate_python(v) for k, v in raw.items()}
    theirs = {k: TypeAdapter(mergekit_config.ParameterSetting).validate_python(v)
              for k, v in raw.items()}
    as_float = TypeAdapter(float).validate_python
    as_bool = TypeAdapter(bool).validate_python
    checked = 0
    for name in raw:
        validate = as_bool if name == "bools" else as_float
        for tensor in (ATTN, MLP, EMBED):
            for t in (0.0, 0.25, 0.5, 0.75, 1.0):
                expected = mergekit_config.evaluate_setting(tensor, theirs[name], t,
                                                            validate=validate)
                got = evaluate_setting(ours[name], tensor, t)
                got = None if got is None else validate(got)
                assert got == pytest.approx(expected), (name, tensor, t)
                checked += 1
    assert checked == len(raw) * 3 * 5


# ---- a stored recipe is validated once ------------------------------------------------------------

STORED = [
    {"merge_method": "dare_ties", "base_model": "base", "seed": 3, "dtype": "bfloat16",
     "parameters": {"lambda": 1.0, "rescale": "inverse_p", "int8_mask": True},
     "models": [{"model": f"m{i}", "parameters": {
         "weight": [0.1 * i, 0.2, 0.4], "density": [{"filter": "mlp", "value": [0.5, 0.6]},
                                                   {"value": 0.7}]}} for i in range(3)]},
    {"merge_method": "linear",
     "models": [{"model": "a", "parameters": {"weight": 1}}, {"model": "b"}],
     "parameters": {"weight": 2.5}},
    {"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}],
     "parameters": {"t": [{"filter": "self_attn", "value": 0.3}, {"value": [0.1, 0.9]}]}},
]


@pytest.mark.parametrize("data", STORED, ids=[d["merge_method"] for d in STORED])
def test_a_stored_recipe_rebuilt_without_validation_is_the_validated_one(data, monkeypatch):
    from evomerge.recipe import mergekit_config, parse_recipe

    recipe = MergeRecipe.from_dict(data)
    stored = recipe.to_dict()

    class Revalidated(Exception):  # not a ValueError: pydantic would turn that into a recipe error
        pass

    def no_validation(_: MergeRecipe) -> list[str]:
        raise Revalidated

    monkeypatch.setattr(mergekit_config, "validate_recipe", no_validation)
    rebuilt = parse_recipe(stored, validated=True)
    assert rebuilt == recipe
    assert rebuilt.to_yaml() == recipe.to_yaml()
    for tensor in (ATTN, MLP, EMBED):
        for t in (0.0, 0.5, 1.0):
            assert rebuilt.resolve(tensor, t) == recipe.resolve(tensor, t)
    with pytest.raises(Revalidated):
        parse_recipe(stored)  # what a user wrote is always checked
