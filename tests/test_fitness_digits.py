"""Digits fitness: per-class-subset accuracy objectives and per-item correctness of digits MLPs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score

from evomerge.fitness import EvalResult, Objective, make_fitness
from evomerge.fitness.digits import DigitsFitness
from evomerge.merge.engine import Merger
from evomerge.merge.export import export_model
from evomerge.models.digits import DigitsMLP, digits_splits
from evomerge.recipe import MergeRecipe
from evomerge.zoo import build_digits_zoo

HALVES = [
    {"name": "acc_0_4", "classes": [0, 1, 2, 3, 4]},
    {"name": "acc_5_9", "classes": [5, 6, 7, 8, 9]},
]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    return build_digits_zoo(tmp_path_factory.mktemp("digits") / "zoo", seed=0, progress=False)


@pytest.fixture(scope="module")
def fitness(zoo) -> DigitsFitness:
    return DigitsFitness(zoo["base"])


@pytest.fixture(scope="module")
def halves(zoo) -> DigitsFitness:
    return DigitsFitness(zoo["base"], objectives=HALVES)


def _sklearn_accuracy(path: Path, split: str, classes=range(10)) -> float:
    """Accuracy computed independently: numpy forward pass of the saved weights + sklearn."""
    from safetensors.numpy import load_file

    w = load_file(path / "model.safetensors")
    x, y = digits_splits()[split]
    h = x
    for i in range(3):
        h = h @ w[f"layers.{i}.weight"].T + w[f"layers.{i}.bias"]
        if i < 2:
            h = np.maximum(h, 0)
    keep = np.isin(y, list(classes))
    return accuracy_score(y[keep], h.argmax(1)[keep])


def test_digits_fitness_is_registered_by_name(zoo):
    fit = make_fitness("digits", base_model=zoo["base"], objectives=HALVES)
    assert isinstance(fit, DigitsFitness)
    assert fit.objectives == [Objective("acc_0_4"), Objective("acc_5_9")]


def test_default_objective_is_all_digit_accuracy(fitness):
    assert fitness.objectives == [Objective("acc", "maximize")]


@pytest.mark.parametrize("split", ["search", "heldout"])
@pytest.mark.parametrize("name", ["base", "expert_0_4", "expert_5_9"])
def test_accuracy_equals_sklearn_accuracy_score_on_the_same_split(zoo, fitness, halves, name,
                                                                  split):
    model = DigitsMLP.from_pretrained(zoo[name])
    result = fitness.evaluate(model, split)
    assert isinstance(result, EvalResult)
    assert result.objectives["acc"] == pytest.approx(_sklearn_accuracy(zoo[name], split), abs=1e-6)
    by_half = halves.evaluate(model, split).objectives
    assert by_half["acc_0_4"] == pytest.approx(
        _sklearn_accuracy(zoo[name], split, range(5)), abs=1e-6)
    assert by_half["acc_5_9"] == pytest.approx(
        _sklearn_accuracy(zoo[name], split, range(5, 10)), abs=1e-6)


def test_search_is_the_default_split(zoo, fitness):
    model = DigitsMLP.from_pretrained(zoo["base"])
    assert fitness.evaluate(model).objectives == fitness.evaluate(model, "search").objectives


def test_item_scores_cover_the_split_and_average_to_each_objective(zoo, halves):
    model = DigitsMLP.from_pretrained(zoo["expert_0_4"])
    for split in ("search", "heldout"):
        result = halves.evaluate(model, split)
        items = result.item_scores["digits"]
        _, y = digits_splits()[split]
        assert items.dtype == np.float32 and items.shape == (len(y),)
        assert halves.num_items(split) == len(y)
        assert set(np.unique(items)) <= {0.0, 1.0}
        assert items[y < 5].mean() == pytest.approx(result.objectives["acc_0_4"])
        assert items[y >= 5].mean() == pytest.approx(result.objectives["acc_5_9"])
        assert result.values(halves.objectives) == [result.objectives["acc_0_4"],
                                                   result.objectives["acc_5_9"]]


def test_objectives_on_overlapping_and_single_classes(zoo):
    fit = DigitsFitness(zoo["base"], objectives=[
        {"name": "three", "classes": [3]},
        {"name": "odd", "classes": [1, 3, 5, 7, 9], "direction": "maximize"},
        {"name": "all", "classes": "all"},
    ])
    result = fit.evaluate(DigitsMLP.from_pretrained(zoo["base"]), "heldout")
    items = result.item_scores["digits"]
    _, y = digits_splits()["heldout"]
    assert result.objectives["three"] == pytest.approx(items[y == 3].mean())
    assert result.objectives["odd"] == pytest.approx(items[y % 2 == 1].mean())
    assert result.objectives["all"] == pytest.approx(items.mean())


@pytest.mark.parametrize(
    ("objectives", "field"),
    [
        ([], "objectives"),
        ({"name": "acc"}, "objectives"),
        ([{"name": "acc", "classes": [1, 10]}], r"objectives\[0\]\.classes: unknown class 10"),
        ([{"name": "acc", "classes": [-1]}], r"objectives\[0\]\.classes: unknown class -1"),
        ([{"name": "acc", "classes": []}], r"objectives\[0\]\.classes: empty"),
        ([{"name": "acc", "classes": "some"}], r"objectives\[0\]\.classes"),
        ([{"name": "acc", "classes": [1, 1]}], r"objectives\[0\]\.classes: repeated"),
        ([{"name": "acc", "classes": [True]}], r"objectives\[0\]\.classes"),
        ([{"name": "a"}, {"name": "a", "classes": [1]}], r"objectives\[1\]\.name: duplicate"),
        ([{"name": ""}], r"objectives\[0\]\.name"),
        ([{"classes": [1]}], r"objectives\[0\]\.name"),
        ([{"name": "acc", "direction": "up"}], r"objectives\[0\]\.direction"),
        ([{"name": "acc", "clases": [1]}], r"objectives\[0\]: unknown key\(s\) 'clases'"),
        (["acc"], r"objectives\[0\]"),
    ],
)
def test_invalid_objectives_raise_value_errors_naming_the_field(zoo, objectives, field):
    with pytest.raises(ValueError, match=field):
        DigitsFitness(zoo["base"], objectives=objectives)


def test_unknown_split_and_missing_base_config_are_rejected(zoo, fitness, tmp_path):
    with pytest.raises(ValueError, match="split"):
        fitness.evaluate(fitness.new_model(), "train")
    with pytest.raises(ValueError, match="base_model"):
        DigitsFitness(tmp_path)


def test_new_model_has_the_checkpoint_tensor_names_and_shapes_without_drawing_randomness(
    zoo, fitness
):
    state = torch.manual_seed(7).get_state()
    model = fitness.new_model()
    assert torch.equal(torch.get_rng_state(), state)
    base = DigitsMLP.from_pretrained(zoo["base"]).state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in base.items()}
    assert fitness.new_model() is not model


def test_evaluate_of_an_in_place_merge_matches_the_exported_merge(zoo, halves, tmp_path):
    merger = Merger([zoo["base"], zoo["expert_0_4"], zoo["expert_5_9"]])
    recipe = MergeRecipe.from_dict({
        "merge_method": "task_arithmetic",
        "base_model": str(zoo["base"]),
        "models": [
            {"model": str(zoo["expert_0_4"]), "parameters": {"weight": 0.4}},
            {"model": str(zoo["expert_5_9"]), "parameters": {"weight": 0.4}},
        ],
    })
    model = halves.new_model()
    state = merger.build(recipe, into=model)
    in_place = {split: halves.evaluate(model, split) for split in ("search", "heldout")}

    export_model(state, tmp_path / "merged", base_dir=zoo["base"])
    exported = DigitsMLP.from_pretrained(tmp_path / "merged")
    for split, result in in_place.items():
        again = halves.evaluate(exported, split)
        assert again.objectives == result.objectives
        assert np.array_equal(again.item_scores["digits"], result.item_scores["digits"])
    # And the merge is a real merge: better than the base on both halves of held-out.
    base = halves.evaluate(DigitsMLP.from_pretrained(zoo["base"]), "heldout").objectives
    assert all(in_place["heldout"].objectives[k] > base[k] for k in base)
