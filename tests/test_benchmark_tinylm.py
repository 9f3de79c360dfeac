"""Smoke test of benchmarks/tinylm_merges.py on the mini tiny-LM zoo: it runs the shipped DFS
experiment as a user would (model paths relative to the working directory), prints one JSON
object whose rows are the runs' own summary.json numbers, and reuses a finished run instead of
re-running it. Its table reads back as the rows it was written from (what ``--only
--write-results`` carries over for the experiments it does not re-run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "tinylm_merges.py"


def test_table_reads_back_as_its_rows():
    sys.path.insert(0, str(SCRIPT.parent))
    import tinylm_merges

    rows = [
        {"experiment": "tinylm_ps_cmaes", "method": "PS (CMA-ES)", "candidates": 600,
         "wall_s": 142.0, "search_best": 0.624, "best": 0.608,
         "sources": {"a": 0.343, "b": 0.504}, "best_source": "b", "gain": 0.104},
        {"experiment": "tinylm_ps_dfs", "method": "PS+DFS, W over layers (CMA-ES)",
         "candidates": 240, "wall_s": 298.0, "search_best": 0.598, "best": 0.577,
         "sources": {"a": 0.343, "b": 0.504, "ps": 0.563}, "best_source": "ps", "gain": 0.014,
         "carried": True, "measured": "2026-12-05 03:12 UTC"},
    ]
    text = tinylm_merges.markdown({"started": "2026-12-05 04:00 UTC", "cpu": "cpu",
                                   "loadavg_1min": {"start": 0.5, "end": 1.0}, "rows": rows})
    assert "| tinylm_ps_dfs | PS+DFS, W over layers (CMA-ES) † | 240 | 298 |" in text
    assert "| tinylm_ps_cmaes | PS (CMA-ES) | 600 | 142 | 0.624 | **0.608** | 0.343 | 0.504 " \
        "| - | +0.104 (b) |" in text
    assert "- † carried over from an earlier table, not re-run by this invocation: measured " \
        "2026-12-05 03:12 UTC." in text
    again = tinylm_merges.table_rows(text)
    # every row comes back marked as carried over (the reader did not run it), measured when
    # the table was written, or for a row the table carried itself, when its note says
    assert again == {"tinylm_ps_cmaes": {**rows[0], "carried": True,
                                         "measured": "2026-12-05 04:00 UTC"},
                     "tinylm_ps_dfs": rows[1]}


@pytest.mark.slow
def test_tinylm_merges_tabulates_the_runs_summaries(learning_zoo, tmp_path):
    # the session's mini zoo (tests/conftest.py) where the script looks: its models score
    # above zero, so the rows compare real numbers
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-lm").symlink_to(learning_zoo, target_is_directory=True)
    out = tmp_path / "runs"
    args = [sys.executable, str(SCRIPT), "--only", "tinylm_dfs", "--budget", "12", "--json",
            "--out", str(out)]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    (row,) = result["rows"]
    summary = json.loads((out / "tinylm_dfs" / "summary.json").read_text())
    final = {k: v["mean_acc"] for k, v in summary["final"].items()}
    assert row["best"] == final["best"] and row["candidates"] == summary["n_trials"] == 12
    assert row["sources"] == {k: v for k, v in final.items() if k != "best"}
    assert row["best"] > 0 and len(set(row["sources"].values())) > 1
    assert row["gain"] == pytest.approx(final["best"] - max(row["sources"].values()))
    assert "| tinylm_dfs | DFS, W over layers (CMA-ES) | 12 |" in proc.stderr

    stamp = (out / "tinylm_dfs" / "summary.json").stat().st_mtime_ns
    again = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert json.loads(again.stdout)["rows"] == result["rows"]
    assert (out / "tinylm_dfs" / "summary.json").stat().st_mtime_ns == stamp  # reused
