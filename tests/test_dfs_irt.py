"""The local calibration design (IRT reduction for spaces with a start point, e.g. DFS) and the
helpers of ``benchmarks/dfs_irt.py`` that validate it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from evomerge.spaces import DfsSpace
from evomerge.fitness.reduced import calibration_design, local_design, uniform_design

REPO = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("dfs_irt", REPO / "benchmarks" / "dfs_irt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dfs_space(scales="model_pairs"):
    """4 layer sources of 2 blocks, repeated twice: 16 inclusion switches, then hop scales."""
    sources = {f"e{i}": f"/nowhere/e{i}" for i in range(4)}
    return DfsSpace.from_dict({"kind": "dfs", "repeats": 2, "scales": scales,
                               "start": "e1"}).bind(sources, 2, "llama")


# --------------------------------------------------------------------------------------------
# local_design
# --------------------------------------------------------------------------------------------


def test_local_design_flips_one_to_four_switches_and_jitters_the_rest():
    switches, dim = 16, 40
    start = np.where(np.arange(switches) % 5 == 0, 0.5, -0.5)
    start = np.concatenate([start, np.ones(dim - switches)])
    lower = np.concatenate([-np.ones(switches), np.full(dim - switches, 0.5)])
    upper = np.concatenate([np.ones(switches), np.full(dim - switches, 1.5)])
    n = 2000
    points = local_design(start, lower, upper, n, seed=3, switches=switches)
    assert points.shape == (n, dim)
    flipped = points[:, :switches] != start[:switches]
    # a flip is exactly v -> -v; every point flips between 1 and 4 switches, each count
    # about equally often (U{1..4}: n/4 = 500 each, binomial sd sqrt(n p (1-p)) ~ 19.4)
    np.testing.assert_array_equal(points[:, :switches][flipped], -start[:switches][
        np.nonzero(flipped)[1]])
    counts = np.bincount(flipped.sum(axis=1), minlength=5)
    assert counts[0] == 0 and counts[1:].sum() == n
    assert np.all(np.abs(counts[1:] - n / 4) < 4 * np.sqrt(n * 0.25 * 0.75))
    # every switch is picked about as often: 2.5 flips per point over 16 switches
    per_switch = flipped.sum(axis=0)
    expected = n * 2.5 / switches
    assert np.all(np.abs(per_switch - expected) < 5 * np.sqrt(expected))
    # the rest: N(0, (0.1 * range)^2) around 1 (range 1: sd 0.1; clipping at +-5 sd is moot)
    rest = points[:, switches:] - 1.0
    assert abs(rest.std() - 0.1) < 0.005 and abs(rest.mean()) < 0.005
    assert np.all(points >= lower) and np.all(points <= upper)


def test_local_design_clips_to_the_bounds_and_is_seeded():
    start, lower, upper = np.array([0.5, 1.0]), np.array([-1.0, 0.9]), np.array([1.0, 1.1])
    a = local_design(start, lower, upper, 200, seed=1, switches=1, flips=(1, 1), jitter=1.0)
    assert np.all(a[:, 0] == -0.5)  # the one switch always flips
    assert np.all((a[:, 1] >= 0.9) & (a[:, 1] <= 1.1)) and {0.9, 1.1} <= set(a[:, 1])
    assert np.array_equal(a, local_design(start, lower, upper, 200, seed=1, switches=1,
                                          flips=(1, 1), jitter=1.0))


def test_local_design_turns_a_zero_switch_on():
    x = local_design(np.array([0.0, -0.5]), np.array([-1.0, -1.0]), np.array([1.0, 1.0]), 1,
                     switches=2, flips=(2, 2))
    np.testing.assert_array_equal(x, [[0.5, 0.5]])


def test_local_design_names_every_bad_setting():
    with pytest.raises(ValueError, match=r"switches=3, flips=\(2, 5\), jitter=-1"):
        local_design(np.zeros(2), -np.ones(2), np.ones(2), 1, switches=3, flips=(2, 5),
                     jitter=-1)


# --------------------------------------------------------------------------------------------
# calibration_design: chosen by the bound space
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scales", ["model_pairs", "layers", "none"])
def test_dfs_spaces_calibrate_on_perturbations_of_their_start_path(scales):
    space = dfs_space(scales)
    points, kind = calibration_design(space, 30, seed=0)
    assert kind == "local"
    t = len(space.slots)
    flipped = (points[:, :t] > 0) != (space.start_point[:t] > 0)
    assert np.all((flipped.sum(axis=1) >= 1) & (flipped.sum(axis=1) <= 4))
    # each path is the start's blocks with 1-4 slots switched: decodable, never empty
    for x in points:
        assert space.decode(x).slices
    np.testing.assert_array_equal(points, local_design(
        space.start_point, space.lower, space.upper, 30, 0, switches=t))


def test_spaces_without_a_start_point_keep_the_uniform_design():
    class Box:  # what calibration_design reads of a PS space: bounds, no start_point
        lower, upper = np.zeros(3), np.array([1.0, 2.0, 3.0])

    points, kind = calibration_design(Box(), 10, seed=4)
    assert kind == "uniform"
    np.testing.assert_array_equal(points, uniform_design(Box.lower, Box.upper, 10, 4))


# --------------------------------------------------------------------------------------------
# benchmarks/dfs_irt.py
# --------------------------------------------------------------------------------------------


def test_heldout_points_are_cma_like_draws_around_the_start():
    bench = load_benchmark()
    center = np.array([0.0, 1.0, -0.5])
    lower, upper = np.array([-1.0, 0.5, -1.0]), np.array([1.0, 1.5, 1.0])
    x = bench.heldout_points(center, lower, upper, 4000, 0.15, seed=0)
    assert np.all(x >= lower) and np.all(x <= upper)
    # sd 0.15 * range (0.3 and 0.15): the bounds are 3.3 sd away, so clipping is negligible
    z = (x[:, :2] - center[:2]) / (0.15 * (upper - lower)[:2])
    assert np.all(np.abs(z.std(axis=0) - 1) < 0.05) and np.all(np.abs(z.mean(axis=0)) < 0.05)
    # an off switch (-0.5) turns on when it crosses 0: P(N(0, 0.3^2) > 0.5) = P(Z > 1.667)
    # = 0.0478
    assert abs((x[:, 2] > 0).mean() - 0.0478) < 0.01


def test_summaries_and_verdict_follow_their_stated_rule():
    bench = load_benchmark()
    assert bench.summarise([1.0, 2.0, 4.0, None]) == pytest.approx(
        {"mean": 7 / 3, "std": np.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2)
                                        / 3), "n": 3})
    assert bench.summarise([None]) == {"mean": None, "std": None, "n": 0}

    def rows(mae, rho):
        return [{"estimator": "anchor", "anchors": 15, "mae_points": {"mean": 0.0},
                 "spearman": {"mean": 1.0}},
                {"estimator": "gp-irt", "anchors": 15, "mae_points": {"mean": mae},
                 "spearman": {"mean": rho}}]

    ps = rows(2.0, 0.9)
    assert bench.verdict(rows(3.0, 0.8), ps, 15)["validates"]  # 3.0 <= 1.5 * 2.0, 0.8 >= 0.8
    assert not bench.verdict(rows(3.01, 0.95), ps, 15)["validates"]
    assert not bench.verdict(rows(1.0, 0.79), ps, 15)["validates"]
    assert not bench.verdict(rows(1.0, None), ps, 15)["validates"]


@pytest.mark.slow
def test_benchmark_runs_end_to_end_and_reuses_its_scores(tmp_path, monkeypatch, capsys):
    """On the tiny zoo: every table present, the design it fits on is the run's own
    (calibration_design), and a second invocation scores nothing (cached responses)."""
    from evomerge.execution.evaluator import Evaluator
    from evomerge.zoo.tinylm import build_tinylm_zoo

    bench = load_benchmark()
    zoo = tmp_path / "zoo"
    build_tinylm_zoo(zoo, seed=0, size="tiny", progress=False)
    argv = ["--zoo", str(zoo), "--max-items", "6", "--design", "5", "--heldout", "3",
            "--seeds", "2", "--anchors", "2", "--decide-anchors", "2", "--dim", "1",
            "--out", str(tmp_path / "out"), "--json"]
    scored = []
    original = Evaluator.score_items
    monkeypatch.setattr(Evaluator, "score_items",
                        lambda self, recipes: scored.extend(recipes) or original(self, recipes))
    assert bench.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    # DFS: 4 sources + 2 seeds x 5 x (local, uniform) + 2 x 3 held-out; PS: 4 + 2 x 5 + 3
    assert len(scored) == (4 + 20 + 6) + (4 + 10 + 3)
    from evomerge.execution.plan import Plan
    from evomerge.experiment import Experiment

    space = Plan(Experiment.from_dict(bench.experiment_data(
        "tinylm_dfs", zoo, 6, tmp_path / "plan"))).space
    points, kind = calibration_design(space, 5, seed=0)
    assert kind == "local"
    assert [r.to_dict() for r in scored[4:9]] == [space.decode(x).to_dict() for x in points]
    assert [(t["space"], t["design"], t["heldout"]) for t in result["tables"]] == [
        ("DFS", "local", "sigma0"), ("DFS", "local", "2 sigma0"), ("DFS", "uniform", "sigma0"),
        ("PS", "uniform", "sigma0")]
    assert all(len(t["rows"]) == len(bench.ESTIMATORS) for t in result["tables"])
    assert set(result["verdict"]) >= {"validates", "dfs_mae", "ps_mae", "dfs_spearman"}
    scored.clear()
    assert bench.main(argv) == 0
    assert scored == []
    assert json.loads(capsys.readouterr().out)["tables"] == result["tables"]
