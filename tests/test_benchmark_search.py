"""Smoke test of benchmarks/search_overhead.py: it runs, prints one JSON object with every key.

No timing thresholds (timings on a shared 2-core machine are noise): the checks are on structure,
on the numbers being positive and finite, and on the evomerge loop having really gone through the
store (every trial COMPLETE with its 50 params and the objective's value).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "search_overhead.py"
STORAGES = ("memory", "sqlite", "journal")
PER_STORAGE = ("n", "evomerge_ms_per_trial", "bare_optuna_ms_per_trial", "ratio_vs_bare_optuna")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    md = tmp_path_factory.mktemp("bench") / "RESULTS.md"
    md.write_text("# Benchmark results\n\n<!-- other:start -->\nkeep me\n<!-- other:end -->\n")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", "--out-md", str(md)],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(proc.stdout)  # exactly one JSON document on stdout, nothing else
    data["_md"] = md.read_text()
    return data


@pytest.mark.slow
def test_json_has_every_key_with_positive_finite_numbers(result):
    assert result["dim"] == 50
    assert _positive(result["bare_cma_ms_per_trial"])
    assert set(result["storages"]) == set(STORAGES)
    for kind, entry in result["storages"].items():
        for key in PER_STORAGE:
            assert key in entry, f"{kind}: missing {key}"
            assert _positive(entry[key]), f"{kind}.{key} = {entry[key]!r}"
        assert isinstance(entry["n"], int)
        assert entry["ratio_vs_bare_optuna"] == pytest.approx(
            entry["evomerge_ms_per_trial"] / entry["bare_optuna_ms_per_trial"])


@pytest.mark.slow
def test_evomerge_trials_went_through_the_store(result):
    for kind, entry in result["storages"].items():
        check = entry["checks"]
        assert check["ok"], (kind, check)
        assert check["trials"] == check["complete"] == entry["n"]
        calls = entry["calls_per_trial"]
        # every candidate's 50 coordinates are stored as Optuna params (the checks read them
        # back): bare Optuna writes them one by one at ask, evomerge with the trial it enqueues
        assert calls["bare_optuna"]["api.set_trial_param"] == pytest.approx(50), kind
        assert calls["evomerge"].get("api.set_trial_param", 0) == 0, kind
        for path in ("bare_optuna", "evomerge"):
            assert calls[path]["api.create_new_trial"] == pytest.approx(1), (kind, path)


@pytest.mark.slow
def test_markdown_section_is_written_between_markers(result):
    md = result["_md"]
    assert "keep me" in md and md.count("<!-- search_overhead:start -->") == 1
    section = md.split("<!-- search_overhead:start -->")[1].split("<!-- search_overhead:end -->")[0]
    assert "## Search overhead (benchmarks/search_overhead.py)" in section
    for kind in STORAGES:
        assert f"| {kind} |" in section
