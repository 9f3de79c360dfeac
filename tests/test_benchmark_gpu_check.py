"""Smoke test of benchmarks/gpu_check.py at a tiny size on the CPU (its GPU run is for GPU
machines): the same PS search with the inputs resident and streamed, bf16 end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_both_modes_in_bf16(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--size", "2M",
         "--budget", "2", "--items", "4", "--workdir", str(tmp_path), "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert [r["mode"] for r in result["runs"]] == ["resident", "streamed"]
    for run in result["runs"]:
        assert (run["n_trials"], run["n_failed"]) == (2, 0)
        assert run["device"] == "cpu"  # auto on a machine without a GPU
        assert run["exported_dtypes"] == ["BF16"]
        workers = run["recorded"]["workers"]
        assert {(w["device"], w["dtype"]) for w in workers.values()} == {("cpu", "bfloat16")}
        assert run["mean_build_s"] > 0 and run["mean_eval_s"] > 0 and run["memcpy_gbps"] > 0
        assert run["best"]["neg_log_ppl"] < 0
    assert result["same_results"] is True
    assert "**unrun**" in proc.stderr  # no GPU figure is claimed from a CPU run
