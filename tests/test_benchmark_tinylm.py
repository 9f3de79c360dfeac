"""Smoke test of benchmarks/tinylm_merges.py on the tiny zoo: it runs the shipped DFS experiment
as a user would (model paths relative to the working directory), prints one JSON object whose
rows are the runs' own summary.json numbers, and reuses a finished run instead of re-running it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "tinylm_merges.py"


@pytest.mark.slow
def test_tinylm_merges_tabulates_the_runs_summaries(tmp_path):
    from evomerge.zoo.tinylm import build_tinylm_zoo

    build_tinylm_zoo(tmp_path / "models" / "tiny-lm", seed=0, size="tiny", progress=False)
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
    assert row["gain"] == pytest.approx(final["best"] - max(row["sources"].values()))
    assert "| tinylm_dfs | DFS (CMA-ES) | 12 |" in proc.stderr

    stamp = (out / "tinylm_dfs" / "summary.json").stat().st_mtime_ns
    again = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert json.loads(again.stdout)["rows"] == result["rows"]
    assert (out / "tinylm_dfs" / "summary.json").stat().st_mtime_ns == stamp  # reused
