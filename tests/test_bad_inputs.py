"""Bad inputs are refused before any compute, every problem of one input in one error.

NaN/inf recipe parameters are recipe errors naming the field; checkpoints holding NaN/inf are
refused when the Merger loads them, naming the model and a few tensors with counts; the model a
merge's config.json comes from must have one; a recipe or experiment file with several mistakes
reports all of them in one run.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.execution.driver import run_experiment
from evomerge.experiment import Experiment, ExperimentError
from evomerge.merge import checkpoints, export
from evomerge.merge.engine import Merger
from evomerge.recipe import MergeRecipe, RecipeError

try:
    from helpers import Family, make_family
except ImportError:  # tests/ imported as a package
    from tests.helpers import Family, make_family


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Family:
    return make_family(tmp_path_factory.mktemp("bad_inputs"), n_sources=2)


def poisoned(src: Path, dst: Path, values: dict[str, list[float]]) -> Path:
    """A copy of ``src`` whose tensors ``name`` start with ``values[name]``."""
    shutil.copytree(src, dst)
    file = dst / "model.safetensors"
    state = safetensors.torch.load_file(file)
    for name, head in values.items():
        state[name].view(-1)[: len(head)] = torch.tensor(head)
    safetensors.torch.save_file(state, file, metadata={"format": "pt"})
    return dst


def flat(text: str) -> str:
    return " ".join(text.split())


def run_cli(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def ties(family: Family, sources: list[Path], **params) -> dict:
    return {"merge_method": "ties", "base_model": str(family.base), "dtype": "float32",
            "models": [{"model": str(s), "parameters": {"weight": 1.0, "density": 0.5, **params}}
                       for s in sources]}


# ---- recipe parameters ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", "-inf"])
def test_a_non_finite_parameter_is_a_recipe_error_naming_the_field(value):
    data = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}},
                                                 {"model": "b", "parameters": {"weight": value}}]}
    with pytest.raises(RecipeError) as caught:
        MergeRecipe.from_dict(data)
    assert "models[1].parameters.weight" in str(caught.value)
    assert "not a finite number" in str(caught.value)
    assert "models[0]" not in str(caught.value)


def test_non_finite_values_in_a_gradient_or_a_conditional_are_refused():
    data = {"merge_method": "ties", "base_model": "b",
            "models": [{"model": "x", "parameters": {"weight": [0.0, float("nan"), 1.0],
                                                     "density": [{"filter": "mlp",
                                                                  "value": float("inf")},
                                                                 {"value": 0.5}]}}]}
    with pytest.raises(RecipeError) as caught:
        MergeRecipe.from_dict(data)
    message = str(caught.value)
    assert "models[0].parameters.weight: nan" in message
    assert "models[0].parameters.density: inf" in message


def test_merge_with_a_nan_weight_exits_2_before_loading_and_writes_nothing(family, tmp_path):
    config = tmp_path / "nan.yaml"
    config.write_text(yaml.safe_dump(ties(family, list(family.sources))).replace(
        "weight: 1.0", "weight: .nan", 1))
    out = tmp_path / "out"
    result = run_cli("merge", config, "--out", out)
    assert result.exit_code == 2
    assert "models[0].parameters.weight: nan is not a finite number" in flat(result.output)
    assert "Traceback" not in result.output and not out.exists()


# ---- checkpoints holding NaN/inf ----------------------------------------------------------------


def test_nonfinite_tensors_counts_nan_and_both_infinities_and_skips_integers():
    state = {"ok": torch.randn(100), "nan": torch.zeros(5, 7), "inf": torch.ones(3),
             "ints": torch.arange(4), "bf16": torch.zeros(9, dtype=torch.bfloat16),
             "empty": torch.zeros(0)}
    state["nan"][2, 3] = float("nan")
    state["nan"][4, 6] = float("nan")
    state["inf"][0] = -float("inf")
    state["bf16"][8] = float("inf")
    assert checkpoints.nonfinite_tensors(state) == {"nan": 2, "inf": 1, "bf16": 1}


def test_a_large_tensor_is_counted_in_chunks(monkeypatch):
    monkeypatch.setattr(checkpoints, "_FINITE_CHUNK", 1000)
    t = torch.zeros(10_007)
    t[[0, 999, 1000, 10_006]] = float("nan")
    assert checkpoints.nonfinite_tensors({"t": t}) == {"t": 4}


def test_a_non_contiguous_tensor_is_counted_without_a_copy(monkeypatch):
    monkeypatch.setattr(checkpoints, "_FINITE_CHUNK", 3)
    t = torch.zeros(6, 5)
    t[1, 2] = t[4, 0] = float("inf")
    assert checkpoints.nonfinite_tensors({"t": t.T}) == {"t": 2}
    assert all(part._base is not None or part.data_ptr() == t.data_ptr()
               for part in checkpoints._chunks(t.T))


def test_float8_tensors_are_checked_too():
    t = torch.zeros(4).to(torch.float8_e5m2)
    assert checkpoints.nonfinite_tensors({"f8": t}) == {}
    t[2] = float("inf")
    assert checkpoints.nonfinite_tensors({"f8": t}) == {"f8": 1}


def test_a_source_with_nan_weights_is_refused_at_load_naming_model_tensors_and_counts(
        family, tmp_path):
    names = list(safetensors.torch.load_file(family.sources[1] / "model.safetensors"))
    bad = poisoned(family.sources[1], tmp_path / "nan_source",
                   {n: [float("nan")] * (i + 1) for i, n in enumerate(names[:5])})
    with pytest.raises(checkpoints.InputModelsError) as caught:
        Merger([family.base, family.sources[0], bad])
    message = str(caught.value)
    assert len(caught.value.problems) == 1
    assert f"{bad}: 5 tensor(s) hold NaN/inf values" in message
    assert f"{names[0]} (1 of " in message and f"{names[2]} (3 of " in message
    assert names[3] not in message and "and 2 more" in message  # a few listed, then a count
    assert str(family.base) not in message and str(family.sources[0]) not in message
    # the error crosses process boundaries intact
    assert pickle.loads(pickle.dumps(caught.value)).problems == caught.value.problems


def test_an_infinity_from_casting_on_load_names_the_cast(family, tmp_path):
    name = next(iter(safetensors.torch.load_file(family.sources[0] / "model.safetensors")))
    big = poisoned(family.sources[0], tmp_path / "big", {name: [1e6]})  # beyond float16
    with pytest.raises(checkpoints.InputModelsError, match="as cast to float16 on load") as caught:
        Merger([family.base, big], dtype=torch.float16)
    assert f"{name} (1 of " in str(caught.value)
    Merger([family.base, big])  # finite as stored


def test_merge_of_a_nan_source_exits_2_with_one_error_and_writes_nothing(family, tmp_path):
    name = next(iter(safetensors.torch.load_file(family.sources[1] / "model.safetensors")))
    bad = poisoned(family.sources[1], tmp_path / "nan_source", {name: [float("inf")]})
    config = tmp_path / "ties.yaml"
    config.write_text(yaml.safe_dump(ties(family, [family.sources[0], bad])))
    out = tmp_path / "out"
    result = run_cli("merge", config, "--out", out)
    assert result.exit_code == 2, result.output
    assert f"{bad}: 1 tensor(s) hold NaN/inf values: {name} (1 of" in flat(result.output)
    assert "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


# ---- config.json --------------------------------------------------------------------------------


def test_a_base_without_config_json_is_refused_before_loading(family, tmp_path):
    base = shutil.copytree(family.base, tmp_path / "base")
    (base / "config.json").unlink()
    with pytest.raises(checkpoints.CheckpointError, match="no config.json") as caught:
        Merger([base, *family.sources])
    assert str(base) in str(caught.value)
    Merger([family.sources[0], base])  # a source without one is fine: the config is s0's


def test_merge_with_a_config_less_base_exits_2_and_writes_nothing(family, tmp_path):
    base = shutil.copytree(family.base, tmp_path / "base")
    (base / "config.json").unlink()
    recipe = ties(family, list(family.sources)) | {"base_model": str(base)}
    config = tmp_path / "ties.yaml"
    config.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    result = run_cli("merge", config, "--out", out)
    assert result.exit_code == 2
    assert f"{base}: no config.json" in flat(result.output)
    assert not out.exists()


def test_export_refuses_a_base_dir_without_config_json_before_writing(family, tmp_path):
    base = shutil.copytree(family.base, tmp_path / "base")
    (base / "config.json").unlink()
    out = tmp_path / "out"
    with pytest.raises(checkpoints.CheckpointError, match="no config.json"):
        export.export_model(checkpoints.load_state_dict(family.base), out, base_dir=base)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_every_problem_of_the_inputs_in_one_error(family, tmp_path):
    """A config-less base, a NaN source and an incompatible one: one error names all three."""
    base = shutil.copytree(family.base, tmp_path / "base")
    (base / "config.json").unlink()
    name = next(iter(safetensors.torch.load_file(family.sources[0] / "model.safetensors")))
    bad = poisoned(family.sources[0], tmp_path / "nan_source", {name: [float("nan")]})
    wider = make_family(tmp_path / "wider", n_sources=1, hidden=48).sources[0]
    with pytest.raises(checkpoints.InputModelsError) as caught:
        Merger([base, bad, wider])
    message = str(caught.value)
    assert f"{base}: no config.json" in message
    assert f"{bad}: 1 tensor(s) hold NaN/inf values" in message
    assert f"{wider}: tensor" in message and "shape" in message
    assert checkpoints.check_finite([bad, base, bad]) == [p for p in caught.value.problems if "NaN" in p]


# ---- several mistakes, one error ----------------------------------------------------------------


def test_a_recipe_file_with_three_mistakes_reports_all_three(family, tmp_path):
    recipe = ties(family, [family.sources[0], tmp_path / "not-downloaded"])
    recipe["models"][0]["parameters"]["density"] = 1.5
    recipe["models"][1]["parameters"]["weight"] = float("nan")
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    result = run_cli("merge", config, "--out", out)
    assert result.exit_code == 2
    message = flat(result.output)
    assert "models[0].parameters.density: 1.5 is outside [0.0, 1.0]" in message
    assert "models[1].parameters.weight: nan is not a finite number" in message
    assert "models[1].model:" in message and "not-downloaded is not a directory" in message
    assert message.count("error:") == 1 and not out.exists()


def test_a_top_level_typo_does_not_hide_the_recipes_other_mistakes(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("merge_method: ties\nbase_model: b\nseed: abc\nparamters: {}\n"
                      "models:\n  - model: x\n    parameters: {weight: .inf, densty: 0.5}\n")
    with pytest.raises(RecipeError) as caught:
        MergeRecipe.from_yaml(config)
    message = str(caught.value)
    for needle in ("seed:", "paramters:", "models[0].parameters.weight: inf",
                   "models[0].parameters.densty: unknown parameter", "base_model: b is not",
                   "models[0].model: x is not"):
        assert needle in message, needle


def test_a_recipe_given_as_text_does_not_check_its_models():
    """Only a recipe file's references are paths to check; data may name anything."""
    with pytest.raises(RecipeError) as caught:
        MergeRecipe.from_yaml("merge_method: ties\nbase_model: b\nmodels:\n  - model: x\n"
                              "    parameters: {weight: .nan}\n")
    assert "not a directory" not in str(caught.value)


def test_required_parameters_are_reported_with_the_other_problems():
    data = {"merge_method": "ties", "base_model": "b", "dtype": "float8",
            "models": [{"model": "x", "parameters": {"density": 0.5}}]}
    with pytest.raises(RecipeError) as caught:
        MergeRecipe.from_dict(data)
    assert "dtype: 'float8'" in str(caught.value)
    assert "models[0].parameters.weight: required by ties" in str(caught.value)


def test_an_experiment_reports_field_errors_and_unknown_names_together(family):
    data = {"name": "x", "models": {"base": str(family.base),
                                    "sources": {"a": str(family.sources[0])}},
            "space": "ties_per_source", "fitness": {"name": "digitz"},
            "strategy": {"name": "cmaess"}, "budget": -1}
    with pytest.raises(ExperimentError) as caught:
        Experiment.from_dict(data)
    message = str(caught.value)
    assert "budget:" in message
    assert "strategy.name: unknown strategy 'cmaess'" in message
    assert "fitness.name: unknown fitness 'digitz'" in message
    assert message.count("unknown strategy") == 1


def test_an_experiment_with_several_mistakes_reports_them_all_before_any_compute(tmp_path):
    """A missing model, a misspelt space parameter and an unknown fitness option: one error
    naming all three (not three runs), with no run directory created."""
    from run_helpers import build_zoo

    zoo = build_zoo(tmp_path / "zoo")
    data = {"name": "bad", "run_dir": str(tmp_path / "run"),
            "models": {"base": str(zoo["base"]),
                       "sources": {"a": str(zoo["expert_0_4"]), "b": str(tmp_path / "nope")}},
            "space": {"method": "task_arithmetic",
                      "params": [{"name": "wieght", "per": "layer", "bounds": [0.0, 1.5]}]},
            "fitness": {"name": "digits", "bogus_option": 3},
            "strategy": {"name": "cmaes", "popsize": 8}, "budget": 16}
    with pytest.raises(ExperimentError) as err:
        run_experiment(Experiment.from_dict(data), progress=False)
    message = str(err.value)
    assert "models.sources.b:" in message
    assert "'wieght' is not a parameter of task_arithmetic" in message
    assert "bogus_option" in message
    assert "space: space:" not in message
    assert not (tmp_path / "run").exists()


def test_an_experiment_with_a_nan_source_is_refused_before_the_run_directory(tmp_path):
    from run_helpers import build_zoo

    zoo = build_zoo(tmp_path / "zoo")
    name = sorted(checkpoints.inspect_model(zoo["expert_0_4"]).tensors)[0]
    bad = poisoned(zoo["expert_0_4"], tmp_path / "nan_expert", {name: [float("nan")]})
    data = {"name": "nan", "run_dir": str(tmp_path / "run"),
            "models": {"base": str(zoo["base"]), "sources": {"a": str(bad),
                                                             "b": str(zoo["expert_5_9"])}},
            "space": "task_arithmetic_per_source",
            "fitness": {"name": "digits"}, "strategy": {"name": "random", "popsize": 2},
            "budget": 2}
    with pytest.raises(ExperimentError) as err:
        run_experiment(Experiment.from_dict(data), progress=False)
    assert "nan_expert" in str(err.value) and name in str(err.value)
    assert not (tmp_path / "run").exists()
