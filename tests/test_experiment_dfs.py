"""``experiments/tinylm_dfs.yaml`` and ``tinylm_ps_dfs.yaml`` as shipped, at test scale: the
``mini`` tiny-LM zoo, a few items per task, two generations. Everything else (space, fitness,
strategy) is the file's own. The exported best is loaded with plain ``transformers`` and
re-scored: it must be the model the search evaluated."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import transformers
import yaml

from evomerge.execution.driver import run_experiment
from evomerge.experiment import Experiment, ExperimentError
from evomerge.fitness.lm import LMFitness

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def zoo(learning_zoo: Path) -> Path:
    """The session's ``mini`` zoo (tests/conftest.py): its experts score well above zero, so an
    export that is not the evaluated model shows in the scores."""
    return learning_zoo


def shipped(name: str, zoo: Path, run_dir: Path) -> dict:
    data = yaml.safe_load((REPO / "experiments" / f"{name}.yaml").read_text())
    data["models"] = {"base": str(zoo / "base"),
                      "sources": {k: str(zoo / Path(v).name)
                                  for k, v in data["models"]["sources"].items()}}
    data["fitness"]["max_items"] = 6
    data.update(budget=2 * data["strategy"]["popsize"], run_dir=str(run_dir))
    return data


def rescored_export(summary: dict, run_dir: Path, zoo: Path) -> float:
    """The exported checkpoint, loaded by transformers, scored on the held-out items."""
    model = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "best_model").eval()
    recipe = summary["best"]["recipe"]
    depth = sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0]
                for s in recipe["slices"])
    assert model.config.num_hidden_layers == depth
    fitness = LMFitness(base_model=zoo / "base", suite="tinylm",
                        tasks=["add", "reverse", "sort", "translate"],
                        objectives=[{"name": "mean_acc", "tasks": "all"}], max_items=6)
    return fitness.evaluate(model, "heldout").objectives["mean_acc"]


@pytest.mark.slow
def test_tinylm_dfs_runs_end_to_end(zoo, tmp_path):
    data = shipped("tinylm_dfs", zoo, tmp_path / "run")
    summary = run_experiment(Experiment.from_dict(data), progress=False)

    assert summary["n_trials"] == data["budget"] and summary["n_failed"] == 0
    assert set(summary["final"]) == {"best", *data["models"]["sources"]}
    assert summary["best"]["recipe"]["merge_method"] == "passthrough"
    evaluated = summary["final"]["best"]["mean_acc"]
    assert evaluated > 0  # the learning zoo: a wrong export would score differently
    assert rescored_export(summary, tmp_path / "run", zoo) == pytest.approx(
        evaluated, abs=1 / 24)  # at most one item of 24 flips


@pytest.mark.slow
def test_tinylm_ps_dfs_routes_through_the_ps_merge(zoo, tmp_path):
    data = shipped("tinylm_ps_dfs", zoo, tmp_path / "run")
    # the shipped PS recipe, pointed at the tiny zoo
    ps = yaml.safe_load((REPO / data["space"]["merged"]["ps"]).read_text())
    text = yaml.safe_dump(ps).replace("models/tiny-lm/", f"{zoo}/")
    (tmp_path / "ps.yaml").write_text(text)
    data["space"]["merged"] = {"ps": os.path.relpath(tmp_path / "ps.yaml")}
    summary = run_experiment(Experiment.from_dict(data), progress=False)

    assert set(summary["final"]) == {"best", "ps", *data["models"]["sources"]}
    # the printed table: the PS merge (held-out only) and the base beside the sources
    from rich.console import Console

    from evomerge.report import print_summary

    console = Console(record=True, width=200)
    print_summary(summary, console)
    lines = console.export_text().splitlines()
    (ps_row,) = [line for line in lines if line.strip("│ ").startswith("ps ")]
    assert "-" in ps_row and f"{summary['final']['ps']['mean_acc']:.4f}" in ps_row
    assert any("base (not a source)" in line for line in lines)
    recorded = yaml.safe_load((tmp_path / "run" / "experiment.yaml").read_text())
    assert Path(recorded["space"]["merged"]["ps"]).is_absolute()  # resume from anywhere
    recipe = summary["best"]["recipe"]
    assert set(recipe["merged"]) <= {"ps"}
    docs = list(yaml.safe_load_all((tmp_path / "run" / "best_recipe.yaml").read_text()))
    assert docs[-1]["merge_method"] == "passthrough"
    evaluated = summary["final"]["best"]["mean_acc"]
    assert evaluated > 0
    assert rescored_export(summary, tmp_path / "run", zoo) == pytest.approx(evaluated, abs=1 / 24)


def test_dfs_space_errors_name_the_field_before_compute(zoo, tmp_path):
    data = shipped("tinylm_dfs", zoo, tmp_path / "run")
    data["space"] = {**data["space"], "start": "expert_zz"}
    with pytest.raises(ExperimentError, match="(?s)space: .*start: 'expert_zz'"):
        run_experiment(Experiment.from_dict(data), progress=False)
    data["space"] = {"kind": "dfs", "repeats": 0}
    with pytest.raises(ExperimentError, match="repeats"):
        run_experiment(Experiment.from_dict(data), progress=False)
    assert not (tmp_path / "run" / "study.db").exists()


@pytest.mark.parametrize("name, scales, dim", [
    # 4 experts x 4 blocks = 16 layers, x 2 repeats = 32 slots; W over layers (16 + 1) x 16
    ("tinylm_dfs", "layers", 32 + 17 * 16),
    ("tinylm_dfs_pairs", "model_pairs", 32 + 4 * 4),
    ("tinylm_dfs_factored", "factored", 32 + 5 * 4 + 16),  # P (embed + 4) x 4, q per layer
    # ps + 4 experts: 20 layers, 40 slots; (20 + 1) x 20, or 5 x 5
    ("tinylm_ps_dfs", "layers", 40 + 21 * 20),
    ("tinylm_ps_dfs_pairs", "model_pairs", 40 + 5 * 5),
])
def test_shipped_dfs_spaces_have_the_coordinates_their_comments_say(name, scales, dim):
    from evomerge.spaces import DfsSpace

    text = (REPO / "experiments" / f"{name}.yaml").read_text()
    data = yaml.safe_load(text)
    models = data["models"]
    loaded = [str(REPO / p) for p in (models["base"], *models["sources"].values())]
    sources = {k: str(REPO / v) for k, v in models["sources"].items()}
    space = DfsSpace.from_dict({**data["space"], "merged": {
        k: str(REPO / v) for k, v in data["space"].get("merged", {}).items()}})
    bound = space.bind(sources, 4, "llama", loaded=loaded)
    assert (bound.scales, bound.dim) == (scales, dim)
    assert f"{dim} coordinates" in " ".join(line.lstrip("# ") for line in text.splitlines())
