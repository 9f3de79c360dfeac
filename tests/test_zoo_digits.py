"""The digits zoo: class-half experts, deterministic, cached, mergeable into a better model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.merge.checkpoints import CheckpointError
from evomerge.merge.engine import Merger, layer_group
from evomerge.models.digits import DigitsMLP, digits_config, digits_splits
from evomerge.recipe import MergeRecipe
from evomerge.zoo import accuracy_table, build_digits_zoo, digits_zoo_is_built
from evomerge.zoo.digits import MANIFEST

MODEL_NAMES = ["base", "expert_0_4", "expert_5_9"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> tuple[dict[str, Path], float]:
    out = tmp_path_factory.mktemp("digits") / "zoo"
    started = time.perf_counter()
    paths = build_digits_zoo(out, seed=0, progress=False)
    return paths, time.perf_counter() - started


@pytest.fixture(scope="module")
def heldout_acc(zoo) -> dict[str, dict[str, float]]:
    return accuracy_table(zoo[0], split="heldout")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _accuracy(state: dict[str, torch.Tensor], split: str, classes=range(10)) -> float:
    model = DigitsMLP.from_config(digits_config())
    model.load_state_dict(state)
    xs, ys = digits_splits()[split]
    with torch.inference_mode():
        pred = model(torch.from_numpy(np.array(xs))).argmax(1).numpy()
    keep = np.isin(ys, list(classes))
    return float((pred[keep] == ys[keep]).mean())


# ---- the data -------------------------------------------------------------------------------


def test_splits_are_a_stratified_60_20_20_partition_of_all_digits():
    splits = digits_splits()
    assert {k: len(v[1]) for k, v in splits.items()} == {"train": 1078, "search": 359,
                                                           "heldout": 360}
    digits = load_digits()
    everything = np.concatenate([x for x, _ in splits.values()])
    # Together the splits are exactly the dataset (as a multiset of rows), scaled to [0, 1].
    want = np.sort((digits.data / 16.0).astype(np.float32).view("V256").ravel())
    got = np.sort(np.ascontiguousarray(everything).view("V256").ravel())
    assert np.array_equal(got, want)
    for x, y in splits.values():
        assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape[1] == 64
        assert 0.0 <= x.min() and x.max() <= 1.0
        # Stratified: each class's share of a split is within one image of its overall share.
        overall = np.bincount(digits.target, minlength=10) / len(digits.target)
        assert np.all(np.abs(np.bincount(y, minlength=10) - overall * len(y)) <= 1.0)


def test_splits_are_deterministic_read_only_and_depend_on_the_split_seed():
    a, b = digits_splits(), digits_splits()
    for name in a:
        assert np.array_equal(a[name][0], b[name][0]) and np.array_equal(a[name][1], b[name][1])
        assert not a[name][0].flags.writeable
    other = digits_splits(seed=1)
    assert not np.array_equal(other["heldout"][1], a["heldout"][1])


# ---- the model ------------------------------------------------------------------------------


def test_mlp_tensor_names_put_each_linear_in_its_own_layer_group():
    model = DigitsMLP.from_config(digits_config([64, 32, 16, 10]))
    names = list(model.state_dict())
    assert names == [f"layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    assert [layer_group(n).name for n in names[::2]] == ["layers.0", "layers.1", "layers.2"]
    assert model(torch.zeros(5, 64)).shape == (5, 10)


def test_from_config_rejects_a_config_that_is_not_a_digits_mlp():
    with pytest.raises(ValueError, match="model_type"):
        DigitsMLP.from_config({"model_type": "llama", "layer_sizes": [64, 10]})
    with pytest.raises(ValueError, match="layer_sizes"):
        DigitsMLP.from_config({**digits_config(), "layer_sizes": [64]})
    with pytest.raises(ValueError, match="layer_sizes"):
        DigitsMLP.from_config({**digits_config(), "layer_sizes": [64, 0, 10]})


def test_save_pretrained_round_trips_and_refuses_to_overwrite_by_default(tmp_path):
    torch.manual_seed(0)
    model = DigitsMLP()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json",
                                                                  "model.safetensors"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "evomerge-digits-mlp"
    assert config["layer_sizes"] == [64, 128, 128, 10]
    loaded = DigitsMLP.from_pretrained(tmp_path / "m")
    x = torch.rand(7, 64)
    assert torch.equal(loaded(x), model(x))
    assert not loaded.training
    with pytest.raises(CheckpointError, match="exists"):
        model.save_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "m", overwrite=True)


def test_from_pretrained_refuses_pickle_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(digits_config()))
    torch.save(DigitsMLP().state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors"):
        DigitsMLP.from_pretrained(tmp_path)


# ---- the build ------------------------------------------------------------------------------


def test_build_writes_loadable_model_dirs_and_a_manifest_fast(zoo):
    paths, seconds = zoo
    assert list(paths) == MODEL_NAMES
    for path in paths.values():
        assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
        DigitsMLP.from_pretrained(path)
    manifest = json.loads((paths["base"].parent / MANIFEST).read_text())
    assert (manifest["kind"], manifest["seed"]) == ("digits", 0)
    assert manifest["experts"] == {"expert_0_4": [0, 1, 2, 3, 4], "expert_5_9": [5, 6, 7, 8, 9]}
    assert manifest["split"]["sizes"] == {"train": 1078, "search": 359, "heldout": 360}
    assert seconds < 30


def test_build_is_deterministic_per_seed_and_differs_across_seeds(zoo, tmp_path):
    paths, _ = zoo
    again = build_digits_zoo(tmp_path / "again", seed=0, progress=False)
    other = build_digits_zoo(tmp_path / "other", seed=1, progress=False)
    for name in MODEL_NAMES:
        a, b, c = _tensors(paths[name]), _tensors(again[name]), _tensors(other[name])
        assert a.keys() == b.keys() == c.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert not all(torch.equal(a[k], c[k]) for k in a), name


def test_second_build_reuses_the_cache_without_retraining(zoo):
    paths, _ = zoo
    root = paths["base"].parent
    before = _mtimes(root)
    assert digits_zoo_is_built(root, seed=0)
    assert build_digits_zoo(root, seed=0, progress=False) == paths
    assert _mtimes(root) == before
    assert not digits_zoo_is_built(root, seed=1)  # another seed is another zoo


def test_an_incomplete_zoo_is_rebuilt(tmp_path):
    paths = build_digits_zoo(tmp_path, seed=0, progress=False)
    (paths["expert_5_9"] / "model.safetensors").unlink()
    assert not digits_zoo_is_built(tmp_path, seed=0)
    build_digits_zoo(tmp_path, seed=0, progress=False)
    assert digits_zoo_is_built(tmp_path, seed=0)


def test_build_leaves_the_callers_torch_rng_and_threads_alone(tmp_path):
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_digits_zoo(tmp_path, seed=0, progress=False, force=True)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


def test_each_expert_is_best_on_its_own_half_and_weak_on_the_other(heldout_acc):
    acc = heldout_acc
    assert acc["expert_0_4"]["0-4"] > 0.95 and acc["expert_0_4"]["5-9"] < 0.5
    assert acc["expert_5_9"]["5-9"] > 0.95 and acc["expert_5_9"]["0-4"] < 0.5
    # The base is a moderately good all-rounder between them.
    assert 0.6 < acc["base"]["all"] < 0.9
    assert acc["base"]["0-4"] < acc["expert_0_4"]["0-4"]
    assert acc["base"]["5-9"] < acc["expert_5_9"]["5-9"]
    assert acc["base"]["all"] > max(acc["expert_0_4"]["all"], acc["expert_5_9"]["all"])


def test_a_task_arithmetic_merge_chosen_on_search_beats_every_source_on_heldout(zoo, heldout_acc):
    paths, _ = zoo
    merger = Merger([paths["base"], paths["expert_0_4"], paths["expert_5_9"]])
    grid = np.round(np.arange(0.2, 1.01, 0.1), 2)
    best = (-1.0, None)
    into = merger.allocate()
    for w1 in grid:
        for w2 in grid:
            recipe = MergeRecipe.from_dict({
                "merge_method": "task_arithmetic",
                "base_model": str(paths["base"]),
                "models": [
                    {"model": str(paths["expert_0_4"]), "parameters": {"weight": float(w1)}},
                    {"model": str(paths["expert_5_9"]), "parameters": {"weight": float(w2)}},
                ],
            })
            state = merger.build(recipe, into=into)
            score = _accuracy(state, "search")
            if score > best[0]:
                best = (score, {k: v.clone() for k, v in state.items()})
    heldout = _accuracy(best[1], "heldout")
    sources = max(row["all"] for row in heldout_acc.values())
    assert heldout > sources + 0.05, (heldout, heldout_acc)


# ---- the CLI --------------------------------------------------------------------------------


def test_cli_zoo_build_digits_prints_models_and_accuracy_table_then_reuses(tmp_path):
    runner = CliRunner()
    out = tmp_path / "digits"
    args = ["zoo", "build", "digits", "--out", str(out), "--seed", "3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Built the digits zoo" in result.output
    for name in MODEL_NAMES:
        assert name in result.output
        assert (out / name / "model.safetensors").is_file()
    for column in ("all", "0-4", "5-9"):
        assert column in result.output
    assert json.loads((out / "zoo.json").read_text())["seed"] == 3
    expected = accuracy_table({n: out / n for n in MODEL_NAMES})
    assert f"{expected['base']['all']:.3f}" in result.output

    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "Reused the digits zoo" in again.output
