"""The tiny-LM experiments at test scale, on the session's ``mini`` zoo (tests/conftest.py),
whose experts master reverse, sort and translate: ``experiments/tinylm_ps_cmaes.yaml`` and
``tinylm_perplexity.yaml`` as shipped (a few items per task, a small design and budget; everything
else is the file's own, so CI runs the experiment a new user runs), a search that must beat every
source, and an lm-eval fitness."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers
import yaml

from evomerge.experiment import Experiment
from evomerge.fitness.lm import LMFitness

REPO = Path(__file__).resolve().parents[1]
#: The tasks the ``mini`` zoo learns (each expert 0.8-1.0 on its own, the base 0.1-0.4).
LEARNT = ("reverse", "sort", "translate")


def rescored_export(run_dir: Path, zoo: Path, fitness: dict) -> dict[str, float]:
    """The exported ``best_model``, loaded by transformers, scored on the held-out items by a
    fresh fitness of the experiment's configuration."""
    model = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "best_model").eval()
    config = {k: v for k, v in fitness.items() if k not in ("name", "reduced")}
    return LMFitness(base_model=zoo / "base", **config).evaluate(model, "heldout").objectives


@pytest.mark.slow
def test_tinylm_ps_cmaes_runs_end_to_end_and_exports_the_evaluated_model(learning_zoo, tmp_path):
    zoo = learning_zoo
    data = yaml.safe_load((REPO / "experiments" / "tinylm_ps_cmaes.yaml").read_text())
    data["models"] = {"base": str(zoo / "base"),
                      "sources": {k: str(zoo / Path(v).name)
                                  for k, v in data["models"]["sources"].items()}}
    data["fitness"]["max_items"] = 10
    data["fitness"]["reduced"].update(anchors=3)
    data.update(budget=2 * data["strategy"]["popsize"], run_dir=str(tmp_path / "run"))

    summary = Experiment.from_dict(data).run(progress=False)

    assert summary["n_trials"] == data["budget"]
    assert set(summary["final"]) == {"best", *data["models"]["sources"]}
    facts = summary["fitness_reduction"]
    assert facts["full_items"] == 4 * 10 and facts["items_per_candidate"] <= 4 * 3
    assert (tmp_path / "run" / "best_recipe.yaml").is_file()
    evaluated = summary["final"]["best"]
    assert evaluated["mean_acc"] > 0  # the learning zoo: a wrong export would score differently
    assert rescored_export(tmp_path / "run", zoo, data["fitness"]) == evaluated


@pytest.mark.slow
def test_a_task_arithmetic_search_beats_every_source_on_the_heldout_items(learning_zoo, tmp_path):
    """The three experts that master their task, merged by CMA-ES over one task-arithmetic weight
    each: 16 candidates find a merge that keeps several skills, which no expert does (measured:
    0.700 held out against 0.500 for the best expert, expert_reverse; a weight of 0.7 for all
    three scores 0.505 against 0.38 on 100 items per task)."""
    zoo = learning_zoo
    fitness = {"name": "lm", "suite": "tinylm", "tasks": list(LEARNT), "max_items": 20,
               "objectives": [{"name": "mean_acc", "tasks": "all"}]}
    data = {
        "name": "tinylm_ta",
        "models": {"base": str(zoo / "base"),
                   "sources": {f"expert_{t}": str(zoo / f"expert_{t}") for t in LEARNT}},
        "space": "task_arithmetic_per_source",
        "fitness": fitness,
        "strategy": {"name": "cmaes", "popsize": 8},
        "budget": 16,
        "seed": 0,
        "executor": {"kind": "local", "threads": 1},
        "run_dir": str(tmp_path / "run"),
    }
    summary = Experiment.from_dict(data).run(progress=False)

    final = {name: scores["mean_acc"] for name, scores in summary["final"].items()}
    best_source = max(final[name] for name in data["models"]["sources"])
    assert final["best"] >= best_source + 0.1, final
    assert summary["best"]["objectives"]["mean_acc"] > max(
        s["mean_acc"] for s in summary["sources"].values())  # on the search items too
    assert rescored_export(tmp_path / "run", zoo, fitness) == summary["final"]["best"]


@pytest.mark.slow
def test_an_lm_eval_fitness_runs_a_search_with_the_harness_scoring_every_candidate(
        learning_zoo, tmp_path):
    zoo = learning_zoo
    keys = ("sort", "sort_mc")
    data = {
        "name": "tinylm_lmeval",
        "models": {"base": str(zoo / "base"),
                   "sources": {t: str(zoo / f"expert_{t}") for t in ("reverse", "sort")}},
        "space": "task_arithmetic_per_source",
        "fitness": {"name": "lm-eval", "limit": 6,
                    "split_tasks": {split: {k: f"tinylm_{k}_{split}" for k in keys}
                                    for split in ("search", "heldout")}},
        "strategy": {"name": "random", "popsize": 2},
        "budget": 4,
        "run_dir": str(tmp_path / "run"),
        "export": False,
    }
    summary = Experiment.from_dict(data).run(progress=False)
    assert summary["n_trials"] == 4 and summary["n_failed"] == 0
    assert set(summary["final"]["best"]) == set(keys)
    assert all(0.0 <= v <= 1.0 for v in summary["final"]["best"].values())
    # the harness sees the skills: the sort expert sorts, the reverse expert mostly does not
    # (the zoo's own table: 0.82 against 0.20 held out)
    assert summary["final"]["sort"]["sort"] > summary["final"]["reverse"]["sort"]


@pytest.mark.slow
def test_tinylm_perplexity_runs_end_to_end_and_beats_its_sources(learning_zoo, tmp_path):
    """``experiments/tinylm_perplexity.yaml`` as shipped (its data files too), with the mini
    zoo and a short budget: bf16 is not involved (the zoo is float32), device auto is the CPU."""
    zoo = learning_zoo
    data = yaml.safe_load((REPO / "experiments" / "tinylm_perplexity.yaml").read_text())
    data["models"].update(base=str(zoo / "base"),
                          sources={k: str(zoo / Path(v).name)
                                   for k, v in data["models"]["sources"].items()})
    for key in ("data", "heldout"):
        data["fitness"][key] = str(REPO / data["fitness"][key])
    data["fitness"]["max_items"] = 40
    data.update(budget=2 * data["strategy"]["popsize"], run_dir=str(tmp_path / "run"))

    summary = Experiment.from_dict(data).run(progress=False)

    assert summary["n_trials"] == data["budget"] and summary["n_failed"] == 0
    best = summary["best"]["objectives"]["neg_log_ppl"]
    assert best < 0
    # 16 candidates already find a merge that models the text better than every expert alone
    # (measured: -4.203 against -4.225 for the best expert, expert_reverse)
    assert best > max(s["neg_log_ppl"] for s in summary["sources"].values())
    assert summary["devices"]["workers"]["in-process"]["device"] == "cpu"
    assert (tmp_path / "run" / "best_model" / "model.safetensors").is_file()
