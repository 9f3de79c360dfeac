"""What ``evomerge irt validate`` reports, apart from the measurement (tests/test_irt.py runs that):
the target verdict and the RESULTS.md section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evomerge.execution.irt_validation import Validation, meets_target, results_section


def row(reduction: float, mae: float, rho: float | None) -> dict:
    return {"estimator": "gp-irt", "anchors": 10, "mae_points": mae, "spearman": rho,
            "reduction": reduction}


@pytest.mark.parametrize(("reduction", "mae", "rho", "met"), [
    (20.0, 2.5, 0.9, True),     # the bar itself is met
    (19.9, 2.5, 0.9, False),    # too few items saved
    (20.0, 2.51, 0.9, False),   # too far from full evaluation
    (20.0, 2.5, 0.89, False),   # ranks merges differently
    (40.0, 1.0, None, False),   # constant scores: no rank correlation to speak of
])
def test_the_target_is_20x_fewer_items_mae_2_5_points_and_spearman_0_9(reduction, mae, rho, met):
    assert meets_target(row(reduction, mae, rho)) is met


def test_the_results_section_is_one_marked_table_of_every_row(tmp_path: Path):
    (tmp_path / "zoo.json").write_text(json.dumps({"size": "tiny"}))
    rows = [row(25.0, 1.234, 0.95), {**row(5.0, 0.5, None), "estimator": "random"}]
    validation = Validation(rows, "tinylm.yaml", tmp_path, merges=9, sources=5,
                            items={"add": 30, "sort": 12}, dim=2, seed=3)
    text = results_section(validation, elapsed=61.4, machine="a test CPU")
    lines = text.splitlines()
    assert lines[0] == "<!-- irt:start -->" and lines[-1] == "<!-- irt:end -->"
    assert "42 search items: add 30, sort 12" in text and "(size tiny)" in text
    assert "fit on 5 sources + 4 random task-arithmetic merges, scored on 5 held-out" in text
    assert "| gp-irt | 10 | 1.23 | 0.950 | 25.0x |" in lines
    assert "| random | 10 | 0.50 | n/a | 5.0x |" in lines
    assert "61 s on a test CPU." in lines
