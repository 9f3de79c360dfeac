"""The public Python API: ``evomerge.run`` / ``resume`` / ``merge_config``, objects instead of
registered names, and the typed Summary.

Each object run is checked against the equivalent registered run with the same seed (the digits
zoo, about 2 s to build): the same best trial, values and recipe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from run_helpers import REPO, build_zoo, experiment_data, run_in_process, subprocess_env

import evomerge
import evomerge.zoo.digits_hf  # lets transformers allocate the digits MLP
from evomerge.experiment import ExperimentError
from evomerge.fitness.base import EvalResult
from evomerge.search.random_search import RandomSearch

BUDGET = 16


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.getbasetemp() / "digits-zoo")


def _search_split() -> tuple[torch.Tensor, torch.Tensor]:
    from evomerge.models.digits import digits_splits

    return tuple(torch.from_numpy(np.array(a)) for a in digits_splits()["search"])


def accuracy(model: torch.nn.Module) -> EvalResult:
    """What the registered ``digits`` fitness with ``{name: acc, classes: all}`` computes, written
    as a user would: accuracy on the search images."""
    pixels, labels = _search_split()
    with torch.inference_mode():
        correct = (model(pixels).argmax(dim=1) == labels).float().numpy()
    return EvalResult({"acc": float(correct.mean())}, {"digits": correct})


class _Stop(BaseException):
    """Escapes the worker's per-candidate ``except Exception``: the run dies mid-search."""


_calls = {"n": 0, "stop_at": None}


def stopping_accuracy(model: torch.nn.Module) -> EvalResult:
    """``accuracy`` that kills its run at call ``_calls["stop_at"]`` (None: never)."""
    _calls["n"] += 1
    if _calls["n"] == _calls["stop_at"]:
        raise _Stop
    return accuracy(model)


class Unregistered(RandomSearch):
    """A strategy no registry knows (random search's draws)."""


def _best(summary) -> tuple:
    return summary.best.trial, summary.best.objectives, summary.best.recipe


def test_import_evomerge_does_not_import_torch():
    heavy = "[m for m in ('torch', 'optuna', 'transformers') if m in sys.modules]"
    out = subprocess.run([sys.executable, "-c", f"import sys, evomerge; print({heavy})"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert set(evomerge.__all__) == {"__version__", *evomerge._EXPORTS}
    assert all(getattr(evomerge, name) is not None for name in evomerge.__all__)
    assert {"run", "resume", "merge_config", "Experiment", "MergeRecipe", "Merger", "Summary",
            "FITNESSES", "STRATEGIES", "METHODS", "EXECUTORS"} <= set(evomerge.__all__)


def test_function_fitness_finds_the_registered_fitness_best(zoo, tmp_path):
    registered = run_in_process(experiment_data("cmaes", zoo, tmp_path / "reg", budget=BUDGET))
    data = experiment_data("cmaes", zoo, tmp_path / "fn", budget=BUDGET)
    summary = evomerge.run(data, fitness=accuracy)
    assert isinstance(summary, evomerge.Summary)
    assert _best(summary) == (registered["best"]["trial"], registered["best"]["objectives"],
                              registered["best"]["recipe"])
    assert summary.objectives == {"acc": "maximize"}
    recorded = (tmp_path / "fn" / "experiment.yaml").read_text()
    assert "name: test_api:accuracy" in recorded and "classes" not in recorded


def test_budget_items_needs_a_fitness_that_scores_items(zoo, tmp_path):
    """A function fitness returns objectives only: an item budget would never be reached, so it
    is refused before the run directory exists."""
    data = {**experiment_data("cmaes", zoo, tmp_path / "fn", budget=BUDGET), "budget_items": 100}
    with pytest.raises(ExperimentError, match=r"budget_items: .* scores no items"):
        evomerge.run(data, fitness=accuracy)
    assert not (tmp_path / "fn").exists()


def test_strategy_class_runs_as_its_registered_twin(zoo, tmp_path):
    data = experiment_data("cmaes", zoo, tmp_path / "reg", budget=BUDGET)
    registered = run_in_process({**data, "strategy": {"name": "random", "popsize": 8}})
    summary = evomerge.run({**data, "run_dir": str(tmp_path / "obj")}, strategy=Unregistered)
    assert summary.strategy == "test_api:Unregistered"
    assert _best(summary)[1:] == (registered["best"]["objectives"],
                                  registered["best"]["recipe"])


def test_overrides_are_validated_with_the_file_in_one_error(zoo, tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(json.dumps(experiment_data("cmaes", zoo, tmp_path / "run", budget=BUDGET)))
    with pytest.raises(ExperimentError) as info:
        evomerge.run(path, budget=0, seed="one", colour="red")
    message = str(info.value)
    assert all(field in message for field in ("budget", "seed", "colour", str(path)))
    assert not (tmp_path / "run").exists()


def test_resume_after_a_run_died_ends_as_the_uninterrupted_run(zoo, tmp_path):
    reference = evomerge.run(experiment_data("cmaes", zoo, tmp_path / "ref", budget=BUDGET),
                             fitness=stopping_accuracy)
    run_dir = tmp_path / "killed"
    _calls.update(n=0, stop_at=11)  # dies in the second generation
    with pytest.raises(_Stop):
        evomerge.run(experiment_data("cmaes", zoo, run_dir, budget=BUDGET),
                     fitness=stopping_accuracy)
    _calls.update(stop_at=None)
    # the function imports by its recorded name, so resume needs no object
    summary = evomerge.resume(run_dir)
    assert summary.resume["interrupted"] == 1 and summary.resume["replayed"] == 10
    assert summary.n_trials == BUDGET
    assert _best(summary) == _best(reference)
    with pytest.raises(ExperimentError, match="was run with 'test_api:stopping_accuracy'"):
        evomerge.resume(run_dir, fitness=accuracy)


def test_resume_of_a_run_made_with_an_instance_needs_it_again(zoo, tmp_path):
    from evomerge.fitness.digits import DigitsFitness

    data = experiment_data("cmaes", zoo, tmp_path / "run", budget=8)
    fitness = DigitsFitness(zoo["base"])
    first = evomerge.run(data, fitness=fitness)
    assert first.best.objectives == run_in_process(
        {**data, "run_dir": str(tmp_path / "reg")})["best"]["objectives"]
    with pytest.raises(ExperimentError, match="must be given again"):
        evomerge.resume(tmp_path / "run")
    assert _best(evomerge.resume(tmp_path / "run", fitness=fitness)) == _best(first)


@pytest.mark.parametrize("kind", ["slurm", "ray"])
@pytest.mark.parametrize("field, given", [("fitness", accuracy), ("strategy", Unregistered)])
def test_remote_executor_with_an_object_says_it_needs_importable_names(
        zoo, tmp_path, kind, field, given):
    data = {**experiment_data("cmaes", zoo, tmp_path / "run", budget=BUDGET),
            "executor": {"kind": kind, "workers": 2}}
    with pytest.raises(ExperimentError, match=f"^{field}: .*remote executors need importable "
                                              "names"):
        evomerge.run(data, **{field: given})
    assert not (tmp_path / "run").exists()


def test_local_workers_refuse_a_fitness_they_cannot_import(zoo, tmp_path):
    data = experiment_data("cmaes", zoo, tmp_path / "run", budget=BUDGET, workers=2)
    with pytest.raises(ExperimentError, match="local workers are separate processes"):
        evomerge.run(data, fitness=lambda model: accuracy(model))
    assert not (tmp_path / "run").exists()


def test_local_workers_import_a_module_level_fitness(zoo, tmp_path):
    reference = evomerge.run(experiment_data("cmaes", zoo, tmp_path / "ref", budget=8),
                             fitness=accuracy)
    summary = evomerge.run(experiment_data("cmaes", zoo, tmp_path / "run", budget=8, workers=1),
                           fitness=accuracy)
    assert summary.devices["workers"]  # evaluated by the worker process
    assert _best(summary) == _best(reference)


def test_summary_fields_are_summary_json(zoo, tmp_path):
    summary = evomerge.run(experiment_data("cmaes", zoo, tmp_path / "run", budget=8,
                                           export=True))
    data = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary == evomerge.Summary.read(tmp_path / "run")
    assert (summary.experiment, summary.strategy, summary.n_trials, summary.n_failed,
            summary.budget, summary.wall_s) == (data["experiment"], data["strategy"],
                                                data["n_trials"], data["n_failed"],
                                                data["budget"], data["wall_s"])
    assert summary.best.trial == data["best"]["trial"]
    assert summary.best.rule == data["best"]["rule"]
    assert [t.trial for t in summary.pareto] == [t["trial"] for t in data["pareto"]]
    assert summary.final == data["final"] and summary.sources == data["sources"]
    assert summary.best_model == tmp_path / "run" / "best_model" and summary.best_model.is_dir()
    assert evomerge.MergeRecipe.from_yaml(summary.best_recipe).to_dict() == summary.best.recipe


def test_merge_config_writes_what_evomerge_merge_writes(zoo, tmp_path):
    from safetensors.torch import load_file

    summary = evomerge.run(experiment_data("cmaes", zoo, tmp_path / "run", budget=8))
    evomerge.merge_config(summary.best_recipe, tmp_path / "api")
    subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(summary.best_recipe),
                    "--out", str(tmp_path / "cli")], check=True, env=subprocess_env(),
                   capture_output=True)
    api, cli = (load_file(tmp_path / d / "model.safetensors") for d in ("api", "cli"))
    assert api.keys() == cli.keys()
    assert all(torch.equal(api[k], cli[k]) for k in api)


def test_readme_example_runs(zoo, tmp_path):
    """examples/custom_fitness.py, from a directory laid out as the repository is."""
    (tmp_path / "models").mkdir()
    os.symlink(zoo["base"].parent, tmp_path / "models" / "digits")
    os.symlink(REPO / "experiments", tmp_path / "experiments")
    out = subprocess.run([sys.executable, str(REPO / "examples" / "custom_fitness.py")],
                         cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    summary = evomerge.Summary.read(tmp_path / "runs" / "custom_fitness")
    assert summary.n_trials == 32 and summary.strategy == "cmaes"
    assert f"best acc {summary.best.objectives['acc']:.3f}" in out.stdout
