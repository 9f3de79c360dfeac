"""`evomerge run` end to end on the digits zoo: outputs, results, validation, failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from run_helpers import run_in_process
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.experiment import ExperimentError
from evomerge.fitness.base import FITNESSES, register
from evomerge.fitness.digits import DigitsFitness
from evomerge.recipe import MergeRecipe
from evomerge.zoo.digits import build_digits_zoo


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_digits_zoo(tmp_path_factory.mktemp("digits"), seed=0, progress=False)


def experiment(zoo, tmp_path, **changes):
    data = {
        "name": "t",
        "models": {"base": str(zoo["base"]),
                   "sources": {"expert_0_4": str(zoo["expert_0_4"]),
                               "expert_5_9": str(zoo["expert_5_9"])}},
        "space": {"method": "task_arithmetic",
                  "params": [{"name": "weight", "per": "layer", "bounds": [0.0, 1.5]}]},
        "fitness": {"name": "digits"},
        "strategy": {"name": "cmaes", "popsize": 8, "sigma0": 0.2},
        "budget": 40,
        "seed": 0,
        "run_dir": str(tmp_path / "run"),
    }
    data.update(changes)
    return data


def test_cmaes_run_writes_every_output_and_beats_every_source(zoo, tmp_path):
    summary = run_in_process(experiment(zoo, tmp_path, budget=64))
    run = tmp_path / "run"
    for name in ("study.db", "summary.json", "best_recipe.yaml", "convergence.png",
                 "experiment.yaml", "provenance.json", "best_model/model.safetensors",
                 "best_model/recipe.yaml", "best_model/config.json"):
        assert (run / name).exists(), name
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("experiment", "strategy", "n_trials", "n_failed", "wall_s", "best", "pareto",
                "sources", "final"):
        assert key in summary
    assert summary["n_trials"] == 64 and summary["n_failed"] == 0
    assert summary["strategy"] == "cmaes"
    # the study is the source of truth: best trial and value come from Optuna
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{run / 'study.db'}")
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 64
    assert summary["best"]["trial"] == study.best_trial.number
    assert summary["best"]["objectives"]["acc"] == pytest.approx(study.best_value)
    # held-out: the best merge beats every source model
    final = summary["final"]
    assert all(final["best"]["acc"] > final[s]["acc"] for s in ("expert_0_4", "expert_5_9"))
    # the exported model is the best recipe, and scores what the summary says on held-out items
    recipe = MergeRecipe.from_yaml(run / "best_recipe.yaml")
    assert recipe.to_dict() == summary["best"]["recipe"]
    from evomerge.models.digits import DigitsMLP

    exported = DigitsMLP.from_pretrained(run / "best_model")
    fitness = DigitsFitness(base_model=zoo["base"])
    assert fitness.evaluate(exported, "heldout").objectives["acc"] == pytest.approx(
        final["best"]["acc"])
    # the base (not a source) is reported beside them, scored as it is
    base = DigitsMLP.from_pretrained(zoo["base"])
    for split in ("search", "heldout"):
        assert summary["base"][split]["acc"] == pytest.approx(
            fitness.evaluate(base, split).objectives["acc"])
    # every trial carries its recipe, generation, timings and per-item scores
    trial = study.best_trial
    assert trial.user_attrs["evomerge"]["recipe"] == summary["best"]["recipe"]
    assert {"build_s", "eval_s", "item_scores"} <= set(trial.user_attrs["result"])
    provenance = json.loads((run / "provenance.json").read_text())
    assert provenance["seed"] == 0 and "optuna" in provenance["packages"]


def test_budget_is_exact_when_it_is_not_a_multiple_of_popsize(zoo, tmp_path):
    summary = run_in_process(experiment(zoo, tmp_path, budget=21))
    assert summary["n_trials"] == 21


def test_same_seed_same_search(zoo, tmp_path):
    a = run_in_process(experiment(zoo, tmp_path / "a", budget=24))
    b = run_in_process(experiment(zoo, tmp_path / "b", budget=24))
    assert a["best"] == b["best"]


@pytest.mark.slow
def test_nsga2_experiment_front_has_five_points_none_dominated_by_a_source(zoo, tmp_path):
    """The shipped experiments/digits_nsga2.yaml, on this zoo, as a user runs it."""
    data = yaml.safe_load(open(Path(__file__).parents[1] / "experiments" / "digits_nsga2.yaml"))
    data["models"] = experiment(zoo, tmp_path)["models"]
    data["run_dir"] = str(tmp_path / "run")
    summary = run_in_process(data)
    front = sorted({(p["objectives"]["acc_0_4"], p["objectives"]["acc_5_9"])
                    for p in summary["pareto"]})  # distinct points: equal merges may repeat
    assert len(front) >= 5
    for source in summary["sources"].values():
        s = (source["acc_0_4"], source["acc_5_9"])
        for f in front:
            dominated = all(a >= b for a, b in zip(s, f)) and any(a > b for a, b in zip(s, f))
            assert not dominated, (s, f)
    # the front is mutually non-dominated
    for f in front:
        assert not any(all(a >= b for a, b in zip(g, f)) and g != f for g in front)
    assert (tmp_path / "run" / "pareto.png").exists()


@pytest.mark.parametrize("change, field", [
    ({"budgett": 3}, "budgett"),
    ({"strategy": {"name": "cmaz"}}, "strategy.name"),
    ({"fitness": {"name": "digitz"}}, "fitness.name"),
    ({"budget": 4}, "budget"),
    ({"space": {"method": "task_arithmetic",
                "params": [{"name": "weight", "per": "layer", "bounds": [1.0, 0.5]}]}}, "bounds"),
    ({"space": {"method": "tiez", "params": []}}, "method"),
    ({"strategy": {"name": "cmaes", "sigma0": 7}}, "sigma0"),
    ({"strategy": {"name": "cmaes", "popsiz": 7}}, "popsiz"),
    ({"fitness": {"name": "digits", "objectives": [{"name": "a", "classes": [11]}]}}, "classes"),
])
def test_invalid_experiments_fail_before_compute_naming_the_field(zoo, tmp_path, change, field):
    with pytest.raises(ExperimentError, match=field):
        run_in_process(experiment(zoo, tmp_path, **change))
    assert not (tmp_path / "run" / "study.db").exists()


def test_missing_model_directory_is_named(zoo, tmp_path):
    data = experiment(zoo, tmp_path)
    data["models"]["sources"]["expert_5_9"] = str(tmp_path / "nope")
    with pytest.raises(ExperimentError, match=r"models\.sources\.expert_5_9"):
        run_in_process(data)


@register("flaky_digits_for_tests")
class FlakyDigits(DigitsFitness):
    """Digits accuracy that raises on every third evaluation and is NaN on every fifth."""

    calls = 0

    def evaluate(self, model, split="search"):
        if split == "search":
            FlakyDigits.calls += 1
            if FlakyDigits.calls % 3 == 0:
                raise RuntimeError("CUDA out of memory (simulated)")
            if FlakyDigits.calls % 5 == 0:
                result = super().evaluate(model, split)
                result.objectives["acc"] = float("nan")
                return result
        return super().evaluate(model, split)


def test_failed_candidates_are_recorded_with_their_reason_and_the_run_goes_on(zoo, tmp_path):
    assert "flaky_digits_for_tests" in FITNESSES
    FlakyDigits.calls = 0
    summary = run_in_process(experiment(
        zoo, tmp_path, fitness={"name": "flaky_digits_for_tests"}, budget=24))
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    errors = [t.user_attrs["result"]["error"] for t in failed]
    assert sum("out of memory" in e for e in errors) == 8  # calls 3, 6, ..., 24
    assert sum("non-finite" in e for e in errors) == 3  # calls 5, 10, 20 (15 raised first)
    assert summary["n_trials"] == 24 and summary["n_failed"] == 11
    # the sources' search scores are calls 25 and 26; the base, a reference only, fails at call
    # 27: the summary records why instead of being lost
    assert summary["base"] == {"error": "RuntimeError: CUDA out of memory (simulated)"}


def test_too_many_failures_stop_the_run_with_a_clear_message(zoo, tmp_path):
    FlakyDigits.calls = 0
    with pytest.raises(RuntimeError, match="max_fail_share"):
        run_in_process(experiment(zoo, tmp_path, fitness={"name": "flaky_digits_for_tests"},
                                  max_fail_share=0.1))


def test_cli_run_prints_the_final_table_and_overrides_budget_and_seed(zoo, tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment(zoo, tmp_path)))
    result = CliRunner().invoke(app, ["run", str(path), "--budget", "16", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "best (trial" in result.output and "expert_0_4" in result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["n_trials"] == 16
    recorded = yaml.safe_load((tmp_path / "run" / "experiment.yaml").read_text())
    assert recorded["seed"] == 3 and recorded["budget"] == 16


def test_cli_budget_items_ends_a_full_evaluation_run_after_the_generation_that_reaches_it(
        zoo, tmp_path):
    """Digits scores every search image per candidate (no reduction): a cap of 2.5
    generations' items ends the run after its third generation."""
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment(zoo, tmp_path, budget=16)))
    assert CliRunner().invoke(app, ["run", str(path)]).exit_code == 0
    per_candidate = json.loads((tmp_path / "run" / "summary.json").read_text())[
        "item_evaluations"]["search"] // 16
    cap = int(2.5 * 8 * per_candidate)
    result = CliRunner().invoke(app, ["run", str(path), "--budget", "40", "--budget-items",
                                      str(cap), "--run-dir", str(tmp_path / "capped")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "capped" / "summary.json").read_text())
    assert summary["n_trials"] == 24 and summary["budget"] == 40
    assert summary["budget_items"] == cap
    assert summary["item_evaluations"]["total"] == 24 * per_candidate
    assert "item budget reached" in result.output
    assert f"Item evaluations spent: {24 * per_candidate:,} (budget_items {cap:,})" in \
        " ".join(result.output.split())
    recorded = yaml.safe_load((tmp_path / "capped" / "experiment.yaml").read_text())
    assert recorded["budget_items"] == cap


def test_cli_run_reports_a_bad_experiment_with_exit_code_2(zoo, tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment(zoo, tmp_path, budget=-1)))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert "budget" in result.output


def test_strategy_sees_decoded_candidates_inside_the_space(zoo, tmp_path):
    run_in_process(experiment(zoo, tmp_path, budget=16))
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    for trial in study.trials:
        x = np.array([trial.params[n] for n in study.user_attrs["evomerge:params"]])
        assert np.all(x >= 0.0) and np.all(x <= 1.5)
        weights = [m["parameters"]["weight"] for m in trial.user_attrs["evomerge"]["recipe"]["models"]]
        assert np.allclose(np.concatenate(weights), x)  # layer gradients, source-major


def test_executor_threads_pin_torch_during_the_run_and_are_restored(zoo, tmp_path, monkeypatch):
    import torch

    seen = []
    original = DigitsFitness.evaluate
    monkeypatch.setattr(DigitsFitness, "evaluate", lambda self, model, split="search": (
        seen.append(torch.get_num_threads()) or original(self, model, split)))
    before = torch.get_num_threads()
    data = experiment(zoo, tmp_path, budget=8, executor={"kind": "local", "threads": 1},
                      export=False)
    pinned = run_in_process(data)
    assert set(seen) == {1}  # search, source and held-out scores alike
    assert torch.get_num_threads() == before
    unpinned = run_in_process(experiment(zoo, tmp_path / "b", budget=8, export=False))
    assert pinned["best"] == unpinned["best"]  # the same search either way
