"""benchmarks/scale_out.py: its pure formulas against hand-worked values, the busy fitness against
the digits fitness it wraps, and a smoke run of the whole script at tiny sizes.

No timing thresholds (timings on a shared 2-core machine are noise): the smoke run checks the JSON
structure, that every number is positive and finite, and that the ratios are the ratios of the
throughputs the same run measured.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "scale_out.py"


@pytest.fixture(scope="module")
def so():
    """The script as a module (importing it registers the ``digits_busy`` fitness)."""
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("scale_out_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


# ---- formulas ---------------------------------------------------------------------------------


def test_steady_state_counts_intervals_between_first_and_last_finish(so):
    # 5 trials finishing at 10, 11, 12, 13.5, 14 s: 4 intervals over 4 s -> 1 trial/s.
    # Evaluation time: the median (a worker's first build is slow), 0.3 s here, not the mean.
    entry = so.steady_state([12.0, 10.0, 11.0, 14.0, 13.5], [3.0, 0.2, 0.3, 0.4, 0.25])
    assert entry["n"] == 5
    assert entry["span_s"] == pytest.approx(4.0)
    assert entry["trials_per_s"] == pytest.approx(1.0)
    assert entry["ms_per_trial"] == pytest.approx(1000.0)
    assert entry["eval_ms"] == pytest.approx(300.0)


def test_steady_state_refuses_too_few_trials(so):
    with pytest.raises(ValueError, match="at least 2"):
        so.steady_state([1.0], [0.1])
    with pytest.raises(ValueError, match="same time"):
        so.steady_state([1.0, 1.0], [0.1, 0.1])


def test_dispatch_overhead_is_per_worker_wall_minus_evaluation(so):
    # In-process, 25 ms per trial of which 1 ms evaluating: 24 ms overhead.
    assert so.dispatch_overhead_ms(25.0, 1.0, 0) == pytest.approx(24.0)
    # Two workers at 80 ms per trial overall: each spends 160 ms per trial, 150 evaluating.
    assert so.dispatch_overhead_ms(80.0, 150.0, 2) == pytest.approx(10.0)


def test_lognormal_mu_gives_the_requested_mean(so):
    mu = so.lognormal_mu(2.0, 0.25)
    assert math.exp(mu + 0.25 ** 2 / 2) == pytest.approx(2.0)
    draws = np.random.default_rng(0).lognormal(mu, 0.25, 200_000)
    assert draws.mean() == pytest.approx(2.0, rel=5e-3)
    with pytest.raises(ValueError, match="mean > 0"):
        so.lognormal_mu(0.0, 0.25)


def test_split_threads_spreads_workers_evenly(so):
    assert so.split_threads(256, 4) == [64, 64, 64, 64]
    assert so.split_threads(10, 4) == [3, 3, 2, 2]
    assert so.split_threads(3, 4) == [1, 1, 1]
    with pytest.raises(ValueError, match="n_workers >= 1"):
        so.split_threads(0, 4)


def test_generation_overheads_hand_worked(so):
    # Generation 0: enqueued at 0.0-0.1, finished by 2.5, slowest evaluation 2.0 s
    # -> dispatch 0.5 s. Generation 1 enqueued from 2.7: turnaround 0.2 s; it finished by 4.0
    # with a slowest evaluation of 1.2 s -> dispatch 0.1 s.
    enq = {0: [0.0, 0.1], 1: [2.7, 2.75]}
    fin = {0: [2.1, 2.5], 1: [3.9, 4.0]}
    evals = {0: [2.0, 1.9], 1: [1.2, 1.1]}
    dispatch, turnaround = so.generation_overheads(enq, fin, evals)
    assert dispatch == pytest.approx([0.5, 0.1])
    assert turnaround == pytest.approx([0.2])


def test_capacity_formulas(so):
    assert so.gpus_kept_busy(20.0, 30.0) == pytest.approx(600.0)
    assert so.generation_efficiency(30.0, 1.5) == pytest.approx(30.0 / 31.5)


# ---- the busy fitness ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from run_helpers import build_zoo

    return build_zoo(tmp_path_factory.getbasetemp() / "digits-zoo")


def test_busy_fitness_scores_exactly_as_the_digits_fitness(so, zoo):
    import torch

    from evomerge.fitness.base import make_fitness
    from evomerge.fitness.digits import DigitsFitness
    from evomerge.merge.checkpoints import load_state_dict

    plain = DigitsFitness(zoo["expert_0_4"])
    busy = make_fitness(so.BUSY, base_model=str(zoo["expert_0_4"]), repeat=3)
    model = plain.new_model()
    model.load_state_dict({k: torch.as_tensor(v) for k, v in
                           load_state_dict(zoo["expert_0_4"]).items()})
    want, got = plain.evaluate(model), busy.evaluate(model)
    assert got.objectives == want.objectives
    np.testing.assert_array_equal(got.item_scores["digits"], want.item_scores["digits"])
    assert torch.get_num_threads() == 1


def test_busy_fitness_refuses_a_bad_repeat(so, zoo):
    from evomerge.fitness.base import make_fitness

    with pytest.raises(ValueError, match="repeat: expected an int >= 1"):
        make_fitness(so.BUSY, base_model=str(zoo["base"]), repeat=0)


# ---- smoke run ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    md = tmp_path_factory.mktemp("bench") / "RESULTS.md"
    md.write_text("# Benchmark results\n\n<!-- other:start -->\nkeep me\n<!-- other:end -->\n")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", "--out-md", str(md),
         "--busy-ms", "20", "--sim-workers", "4", "--sim-eval-s", "0.05"],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(proc.stdout)  # exactly one JSON document on stdout
    data["_md"] = md.read_text()
    return data


@pytest.mark.slow
def test_headline_keys_are_positive_and_are_the_measured_ratios(result):
    for key in ("ray_speedup_2_vs_1", "processes_speedup_2_vs_1"):
        assert _positive(result[key]), (key, result[key])
    assert set(result["dispatch_overhead_ms"]) == {"inprocess", "processes", "ray"}
    for path, value in result["dispatch_overhead_ms"].items():
        assert _positive(value), (path, value)
    runs = result["throughput"]["busy"]["runs"]
    for path in ("processes", "ray"):
        assert result[f"{path}_speedup_2_vs_1"] == pytest.approx(
            runs[f"{path}_2"]["trials_per_s"] / runs[f"{path}_1"]["trials_per_s"])
    digits = result["throughput"]["digits"]["runs"]
    assert result["dispatch_overhead_ms"]["processes"] == pytest.approx(
        digits["processes_1"]["ms_per_trial"] - digits["processes_1"]["eval_ms"])


@pytest.mark.slow
def test_every_run_went_through_its_budget(result):
    for workload, entry in result["throughput"].items():
        assert set(entry["runs"]) == {"inprocess", "processes_1", "processes_2", "ray_1", "ray_2"}
        for label, run in entry["runs"].items():
            assert run["n"] == entry["budget"], (workload, label)
            for key in ("trials_per_s", "ms_per_trial", "eval_ms", "span_s", "wall_s"):
                assert _positive(run[key]), (workload, label, key, run[key])
    # The busy fitness really does its extra work: its evaluations cost more than digits'.
    busy, digits = result["throughput"]["busy"]["runs"], result["throughput"]["digits"]["runs"]
    assert busy["inprocess"]["eval_ms"] > digits["inprocess"]["eval_ms"]


@pytest.mark.slow
def test_ceiling_ray_and_simulation_sections(result):
    pg = bool(os.environ.get("EVOMERGE_TEST_POSTGRES_URL"))
    for kind in ("journal", "postgresql"):
        ceiling, sim = result["store_ceiling"][kind], result["simulated"][kind]
        if kind == "postgresql" and not pg:
            assert "not_measured" in ceiling and "not_measured" in sim
            continue
        assert _positive(ceiling["trials_per_s"]) and ceiling["workers"] == 4
        (row,) = sim["rows"]
        assert row["workers"] == 4 and row["trials"] == 4 * row["generations"]
        for key in ("driver_cpu_ms_per_trial", "driver_enqueue_ms_per_trial", "efficiency"):
            assert _positive(row[key]), (kind, key, row[key])
        assert 0 < row["efficiency"] <= 1
        assert 0 <= row["queue_wait_ms"]["median"] <= row["queue_wait_ms"]["max"]
        assert _positive(result["capacity"][kind]["gpus_at_30s"])
    for n in ("1", "2"):
        assert _positive(result["ray_dispatch"]["actors"][n]["calls_per_s"])


@pytest.mark.slow
def test_markdown_section_is_written_between_its_markers(result):
    md = result["_md"]
    assert "<!-- other:start -->\nkeep me\n<!-- other:end -->" in md
    assert md.count("<!-- scale_out:start -->") == 1 and md.count("<!-- scale_out:end -->") == 1
    assert "| busy | ray | 2 |" in md and "| journal | 4 |" in md
