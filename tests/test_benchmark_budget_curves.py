"""benchmarks/budget_curves.py's arithmetic on hand-made curves: the targets compare the default
with full evaluation seed by seed (mean difference and its standard error, worked by hand), full
evaluation "at equal time" ("at equal items") is its best found by the default's wall time (item
evaluations), and a mean difference of exactly zero is a tie, not a win. (The runs themselves are the shipped experiment, measured by
the script; too long for a test.)"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import budget_curves


def curve(arm: str, seed: int, heldout: list[float], wall: list[float],
          records: list[tuple[float, float]] = (), items: list[int] = (0, 0)) -> dict:
    """Full evaluation's records: (wall s, held-out); each record's candidate costs 100 items."""
    return {"arm": arm, "seed": seed,
            "points": [{"n": n, "heldout": h, "wall_s": w, "items": i}
                       for n, h, w, i in zip((50, 100), heldout, wall, items)],
            "records": [{"wall_s": w, "heldout": h, "items": 100 * (k + 1)}
                        for k, (w, h) in enumerate(records)]}


def test_targets_are_same_seed_differences_with_their_standard_error():
    curves = [
        # seed 0: full found 0.50 at 10 s, 0.58 at 60 s, 0.61 at 95 s
        curve("full", 0, [0.58, 0.61], [60, 95], [(10, 0.50), (60, 0.58), (95, 0.61)]),
        curve("default", 0, [0.60, 0.60], [40, 70], items=[250, 300]),
        # seed 1: full found 0.55 at 20 s, 0.62 at 90 s
        curve("full", 1, [0.55, 0.62], [45, 90], [(20, 0.55), (90, 0.62)]),
        curve("default", 1, [0.55, 0.63], [50, 80], items=[150, 200]),
    ]
    first, second = budget_curves.targets(curves, [50, 100])
    # equal candidates at 50: differences +0.02 and 0.00 -> mean 0.01, std 0.0141, se 0.01
    assert first["equal_candidates"] == pytest.approx(0.01)
    assert first["equal_candidates_se"] == pytest.approx(np.std([0.02, 0.0], ddof=1) / np.sqrt(2))
    # equal time at 50: full's best by 40 s is 0.50 (seed 0), by 50 s 0.55 (seed 1)
    assert first["equal_time"] == pytest.approx(((0.60 - 0.50) + (0.55 - 0.55)) / 2)
    # at 100: equal candidates -0.01 and +0.01 -> 0; equal time: by 70 s 0.58, by 80 s 0.55
    assert second["equal_candidates"] == pytest.approx(0.0)
    assert second["equal_time"] == pytest.approx(((0.60 - 0.58) + (0.63 - 0.55)) / 2)
    assert first["equal_candidates_ok"] and first["equal_time_ok"]
    # equal items at 50: full's 2nd record (200 items) by 250 items (seed 0: 0.58), its 1st
    # (100 items) by 150 (seed 1: 0.55); at 100: 3rd record by 300 (0.61), 2nd by 200 (0.62)
    assert first["equal_items"] == pytest.approx(((0.60 - 0.58) + (0.55 - 0.55)) / 2)
    assert second["equal_items"] == pytest.approx(((0.60 - 0.61) + (0.63 - 0.62)) / 2)
    assert second["equal_items_se"] == pytest.approx(np.std([-0.01, 0.01], ddof=1) / np.sqrt(2))


def test_a_mean_difference_of_exactly_zero_is_a_tie():
    # 0.1 + 0.2 - 0.3 is 5.6e-17 in floating point: the same scores must not count as a win
    curves = [curve("full", 0, [0.3, 0.3], [10, 20], [(10, 0.3)]),
              curve("default", 0, [0.1 + 0.2, 0.3], [10, 20])]
    tie = budget_curves.targets(curves, [50, 100])[0]
    assert tie["equal_time"] > 0  # the float noise the check must see through
    assert not tie["equal_time_ok"] and tie["equal_candidates_ok"]


def test_full_at_equal_time_or_items_is_its_first_best_when_it_had_found_nothing_yet():
    full = curve("full", 0, [0.5, 0.6], [30, 60], [(30, 0.5), (60, 0.6)])
    assert budget_curves.full_at(full, "wall_s", 10) == 0.5  # generous to full evaluation
    assert budget_curves.full_at(full, "wall_s", 59.9) == 0.5
    assert budget_curves.full_at(full, "wall_s", 60) == 0.6
    assert budget_curves.full_at(full, "items", 199) == 0.5
    assert budget_curves.full_at(full, "items", 200) == 0.6


def test_the_absolute_target_is_checked_on_the_shipped_seed_and_on_the_mean():
    """The shipped experiment's seed is 0: its run is the one a user gets."""
    def point(arm, seed, heldout):
        return {"arm": arm, "seed": seed, "records": [{"wall_s": 1, "items": 1, "heldout": 0.5}],
                "points": [{"n": 600, "heldout": heldout, "wall_s": 9, "items": 9}]}

    curves = [point("full", 0, 0.648), point("default", 0, 0.652),
              point("full", 1, 0.644), point("default", 1, 0.646),
              point("full", 2, 0.640), point("default", 2, 0.634)]
    out = budget_curves.long_targets(curves)
    assert out["shipped_seed"] == 0
    assert out["shipped"] == {"full": 0.648, "default": 0.652} and out["shipped_ok"]
    assert not out["target_ok"]  # mean (0.652 + 0.646 + 0.634) / 3 = 0.644
    # same-seed differences +0.004, +0.002, -0.006: mean 0, standard error std / sqrt(3)
    assert out["vs_full"] == pytest.approx(0.0, abs=1e-12) and out["vs_full_ok"]
    assert out["vs_full_se"] == pytest.approx(np.std([0.004, 0.002, -0.006], ddof=1) / np.sqrt(3))
    # exactly the target counts (0.65 as a mean of counts / 1,200 may come out 0.6499999...)
    assert budget_curves.long_targets([point("full", 0, 0.6), point("default", 0, 0.65)])[
        "shipped_ok"]
    assert budget_curves.long_targets([point("full", 5, 0.6), point("default", 5, 0.7)])[
        "shipped"] is None  # the shipped seed was not run


def test_a_run_made_in_another_checkout_is_read_with_this_checkouts_zoo():
    zoo = budget_curves.REPO / "models" / "tiny-lm"
    recipe = {"merge_method": "dare_ties", "base_model": "/elsewhere/models/tiny-lm/base",
              "models": [{"model": "/elsewhere/models/tiny-lm/expert_add",
                          "parameters": {"weight": 0.5}},
                         {"model": "/data/other/expert_x", "parameters": {"weight": 0.5}}]}
    moved = budget_curves.in_this_checkout(recipe)
    assert moved["base_model"] == str(zoo / "base")
    assert [m["model"] for m in moved["models"]] == [str(zoo / "expert_add"),
                                                     "/data/other/expert_x"]
    assert moved["models"][0]["parameters"] == {"weight": 0.5}
    assert recipe["base_model"] == "/elsewhere/models/tiny-lm/base"  # the stored one unchanged
