"""Smoke test of benchmarks/merge_scale.py at a tiny custom size (2M parameters).

It runs end to end (family generation, the per-method engine child, ``evomerge merge``,
``mergekit-yaml`` when installed, the float64 numerics, the fits) and prints exactly one JSON
object; the checks are on structure, positivity and ranges, never on timings.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "merge_scale.py"
METHODS = ("task_arithmetic", "ties", "dare_ties")
HAVE_MERGEKIT = importlib.util.find_spec("mergekit") is not None


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    if os.environ.get("EVOMERGE_CI") == "1":  # the oracle must be there in CI, not skipped
        assert HAVE_MERGEKIT, "mergekit is not installed: pip install -e '.[test]'"
    workdir = tmp_path_factory.mktemp("merge_scale")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "2M,3M", "--methods", ",".join(METHODS),
         "--repeats", "1", "--workdir", str(workdir), "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)  # exactly one JSON document on stdout, nothing else


@pytest.mark.slow
def test_sizes_and_methods_have_positive_numbers(result):
    assert list(result["sizes"]) == ["2M", "3M"]
    assert result["mergekit_runs"] is HAVE_MERGEKIT
    for token, size in result["sizes"].items():
        assert 1e6 < size["params"] < 5e6, token
        assert size["model_bytes"] == 2 * size["params"]  # bf16
        assert set(size["methods"]) == set(METHODS)
        for name, m in size["methods"].items():
            assert m["models_read"] == 4 and m["inputs_bytes"] == 4 * size["model_bytes"]
            search = m["search"]
            assert "error" not in search, search.get("error")
            for key in ("first_build_s", "steady_build_s", "peak_rss", "peak_private",
                        "memcpy_s", "load_s"):
                assert _positive(search[key]), f"{token} {name} search.{key} = {search[key]!r}"
            assert search["peak_rss"] >= search["peak_private"] > 0
            assert search["output_bytes"] == size["model_bytes"] and search["finite"]
            for key in ("GBps", "memcpy_GBps", "ratio_to_memcpy"):
                assert _positive(m[key]), f"{token} {name}.{key}"
            merge = m["merge"]
            assert "error" not in merge, merge.get("error")
            assert _positive(merge["wall_s"]) and _positive(merge["peak_rss"])
            assert _positive(merge["peak_private"])
            if HAVE_MERGEKIT:
                mk = m["mergekit"]
                assert "error" not in mk, mk.get("error")
                assert _positive(mk["wall_s"]) and _positive(mk["peak_rss"])
                assert m["speedup_vs_mergekit"] == pytest.approx(
                    mk["wall_s"] / search["steady_build_s"])


@pytest.mark.slow
def test_numerics_fractions_are_in_range(result):
    num = result["numerics"]
    assert num["family"] == "2M"
    assert set(num["dtypes"]) == {"bfloat16", "float16", "float32"}
    rows = num["rows"]
    assert {r["method"] for r in rows} == set(METHODS)
    assert len(rows) == len(METHODS) * 3 * len(num["tensors"])
    for r in rows:
        for key in ("evomerge_frac", "mergekit_frac"):
            v = r.get(key)
            if v is not None:
                assert 0.0 <= v <= 1.0, (r["method"], r["dtype"], r["tensor"], key, v)
        if r["method"] != "dare_ties" or "keep_mask" in r.get("masks", ""):
            assert r["evomerge_frac"] is not None, r
        if HAVE_MERGEKIT:
            assert r["mergekit_frac"] is not None, r
        if r["method"] == "ties":
            assert r["k"] == max(1, int(0.5 * r["n"]))
            if HAVE_MERGEKIT:
                assert len(r["mergekit_kept"]) == 3
                assert all(c == r["k"] for c in r["mergekit_kept"])  # mergekit keeps exactly k
            if r["evomerge_kept"] is not None:
                assert len(r["evomerge_kept"]) == 3
                assert all(c == r["k"] for c in r["evomerge_kept"])  # exactly k, as mergekit


@pytest.mark.slow
def test_fits_extrapolation_and_targets(result):
    for method in METHODS:
        fit = result["fits"][method]["search_peak_rss"]
        assert fit is not None and fit["points"] == 2
    ext = result["extrapolation"]
    assert {r["model"] for r in ext} == {"7B", "8B"}
    for r in ext:
        assert r["params"] > 6e9 and r["inputs_bytes"] == 4 * r["model_bytes"]
        assert r["gpu_memory"] is None or r["gpu_memory"] >= r["inputs_bytes"] + r["output_bytes"]
    names = {t["target"] for t in result["targets"]}
    assert any("peak RSS" in n for n in names) and any("numerics" in n for n in names)
    for t in result["targets"]:
        assert t["met"] in (True, False, None)


@pytest.mark.slow
def test_markdown_is_rerendered_from_json(result, tmp_path):
    saved = tmp_path / "result.json"
    saved.write_text(json.dumps(result))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--from-json", str(saved)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = proc.stdout
    assert md.startswith("<!-- merge_scale:start -->")
    assert md.rstrip().endswith("<!-- merge_scale:end -->")
    assert "### Targets" in md and "### Numerics" in md and "### Extrapolation" in md
