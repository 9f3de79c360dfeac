"""``experiments/tinylm_ps_cmaes.yaml`` as shipped, at test scale: the tiny zoo, a few items per
task, a small design and budget. Everything else (space, fitness, reduction, strategy) is the
file's own, so CI runs the experiment a new user runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evomerge.experiment import Experiment

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tinylm_ps_cmaes_runs_end_to_end_on_the_tiny_zoo(tmp_path):
    from evomerge.zoo.tinylm import build_tinylm_zoo

    zoo = tmp_path / "zoo"
    build_tinylm_zoo(zoo, seed=0, size="tiny", progress=False)
    data = yaml.safe_load((REPO / "experiments" / "tinylm_ps_cmaes.yaml").read_text())
    data["models"] = {"base": str(zoo / "base"),
                      "sources": {k: str(zoo / Path(v).name)
                                  for k, v in data["models"]["sources"].items()}}
    data["fitness"]["max_items"] = 10
    data["fitness"]["reduced"].update(anchors=3, design=6)
    data.update(budget=2 * data["strategy"]["popsize"], run_dir=str(tmp_path / "run"))

    summary = Experiment.from_dict(data).run(progress=False)

    assert summary["n_trials"] == data["budget"]
    assert set(summary["final"]) == {"best", *data["models"]["sources"]}
    facts = summary["fitness_reduction"]
    assert facts["full_items"] == 4 * 10 and facts["items_per_candidate"] <= 4 * 3
    assert (tmp_path / "run" / "best_model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "best_recipe.yaml").is_file()


@pytest.mark.slow
def test_an_lm_eval_fitness_runs_a_search_with_the_harness_scoring_every_candidate(tmp_path):
    from evomerge.zoo.tinylm import build_tinylm_zoo

    zoo = tmp_path / "zoo"
    build_tinylm_zoo(zoo, seed=0, size="tiny", progress=False)
    keys = ("add", "sort_mc")
    data = {
        "name": "tinylm_lmeval",
        "models": {"base": str(zoo / "base"),
                   "sources": {t: str(zoo / f"expert_{t}") for t in ("add", "sort")}},
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


@pytest.mark.slow
def test_tinylm_perplexity_runs_end_to_end_and_beats_its_sources(tmp_path):
    """``experiments/tinylm_perplexity.yaml`` as shipped (its data files too), with the tiny
    zoo and a short budget: bf16 is not involved (the zoo is float32), device auto is the CPU."""
    from evomerge.zoo.tinylm import build_tinylm_zoo

    zoo = tmp_path / "zoo"
    build_tinylm_zoo(zoo, seed=0, size="tiny", progress=False)
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
