"""Progress in a log file (issue 16): ``evomerge run`` with stdout to a file, as under nohup or
SLURM, writes plain periodic lines (no live bar, which a file never shows) for the search and
for an IRT calibration, and ends naming the best recipe and model. ``EVOMERGE_PROGRESS_S`` sets
the seconds between lines: 0 gives a line per step, so the assertions count lines, never time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from run_helpers import build_zoo, experiment_data, write_experiment

from evomerge.progress import PROGRESS_ENV

BUDGET = 16


def run_to_file(experiment: Path, log: Path, interval: str) -> str:
    """``evomerge run EXPERIMENT`` with stdout and stderr in ``log`` (a file: no terminal, and
    Python's block buffering as under nohup); the log's text."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONUNBUFFERED", "FORCE_COLOR",
                                                           "TTY_COMPATIBLE", "COLUMNS")}
    env[PROGRESS_ENV] = interval
    with open(log, "wb") as out:
        proc = subprocess.run([sys.executable, "-m", "evomerge.cli", "run", str(experiment)],
                              stdout=out, stderr=subprocess.STDOUT, env=env, timeout=600,
                              check=False)
    text = log.read_text()
    assert proc.returncode == 0, text
    return text


def progress_lines(text: str, label: str) -> list[tuple[int, int, str]]:
    """``(done, total, line)`` of every plain progress line of ``label`` in a log."""
    pattern = re.compile(rf"^\[\d\d:\d\d:\d\d\] {re.escape(label)} (\d+)/(\d+)(.*)$",
                         re.MULTILINE)
    return [(int(m[1]), int(m[2]), m[0]) for m in pattern.finditer(text)]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.getbasetemp() / "digits-zoo")


@pytest.mark.slow
def test_a_run_logged_to_a_file_writes_periodic_progress_lines(zoo, tmp_path):
    """A line per trial at interval 0: every count from 0 to the budget, in order, each with
    the rate, elapsed time and (but for the last) an ETA; the last count again when the last
    generation changed the best (the driver learns it once the generation is complete), so the
    last line shows the run's best; no live bar's control codes; the final table and the paths
    of the best recipe and model after it."""
    data = experiment_data("cmaes", zoo, tmp_path / "run", budget=BUDGET, export=True)
    text = run_to_file(write_experiment(tmp_path / "exp.yaml", data), tmp_path / "log", "0")
    lines = progress_lines(text, "trials")
    counts = [done for done, _, _ in lines]
    assert counts[:BUDGET + 1] == list(range(BUDGET + 1)), text
    assert counts[BUDGET + 1:] in ([], [BUDGET]), text
    best = json.loads((tmp_path / "run" / "summary.json").read_text())["best"]["objectives"]
    assert f"best acc {best['acc']:.4f}," in lines[-1][2], (best, text)
    assert {total for _, total, _ in lines} == {BUDGET}
    for done, _, line in lines[1:]:
        assert re.search(r", [\d.]+ s/trial, elapsed \d\d:\d\d:\d\d", line), line
        assert ("ETA" in line) == (done < BUDGET), line
    assert "best acc" in lines[-1][2]
    assert "\x1b[" not in text and "\r" not in text, "a live display's control codes"
    run = tmp_path / "run"
    assert f"Best recipe: {run / 'best_recipe.yaml'}" in text
    assert f"Best model:  {run / 'best_model'}/" in text
    assert text.index("Best recipe:") > text.index("best (trial")


@pytest.mark.slow
def test_the_interval_spaces_the_lines(zoo, tmp_path):
    """An interval longer than the run: the first line and the last (again, with the run's
    best, when the last generation changed it), nothing between."""
    data = experiment_data("cmaes", zoo, tmp_path / "run", budget=BUDGET)
    text = run_to_file(write_experiment(tmp_path / "exp.yaml", data), tmp_path / "log", "3600")
    assert [done for done, _, _ in progress_lines(text, "trials")] in (
        [0, BUDGET], [0, BUDGET, BUDGET]), text


@pytest.mark.slow
def test_irt_calibration_logs_its_progress(tmp_path):
    """The calibration of an IRT-reduced fitness (sources + design scored on every search item)
    writes a line per model scored, before the search's lines."""
    from evomerge.zoo.tinylm import build_tinylm_zoo

    zoo = tmp_path / "zoo"
    build_tinylm_zoo(zoo, seed=0, size="tiny", progress=False)
    design = 4
    data = {
        "name": "tinylm_reduced",
        "models": {"base": str(zoo / "base"),
                   "sources": {t: str(zoo / f"expert_{t}") for t in ("add", "sort")}},
        "space": "task_arithmetic_per_source",
        "fitness": {"name": "lm", "suite": "tinylm", "max_items": 12,
                    "reduced": {"estimator": "gp-irt", "anchors": 4, "design": design,
                                "dim": 1}},
        "strategy": {"name": "random", "popsize": 4},
        "budget": 4,
        "run_dir": str(tmp_path / "run"),
        "export": False,
    }
    text = run_to_file(write_experiment(tmp_path / "exp.yaml", data), tmp_path / "log", "0")
    calibration = progress_lines(text, "IRT calibration (full search items)")
    assert [done for done, _, _ in calibration] == list(range(2 + design + 1)), text
    assert all(re.search(r"s/model", line) for _, _, line in calibration[1:])
    assert text.index(calibration[-1][2]) < text.index(progress_lines(text, "trials")[0][2])
    assert "search (IRT estimate)" in text and "search (full)" in text
