"""`evomerge run` / `resume` on the from-scratch configs (experiments/digits_*_scratch.yaml): every
seed in its own process and directory, one summary.json with the per-seed numbers and their mean.

The single-seed runner's own behaviour (compact record, replay) is specified in
tests/test_search_m2n2.py; here the seeds, the summary and the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.reproductions.scratch import mean_std, run_scratch

runner = CliRunner()
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
PER_SEED = {"seed", "test_acc", "train_acc", "evaluations", "replayed", "wall_s", "peak_rss_mb"}


def shipped(name: str, tmp_path: Path, **changes) -> tuple[Path, dict]:
    """The shipped experiment with ``changes``, written to tmp_path (the file a user would edit)."""
    config = {**yaml.safe_load((EXPERIMENTS / name).read_text()), **changes}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, config


def test_shipped_scratch_configs_list_three_seeds_and_the_same_budget():
    m2n2, cmaes = (yaml.safe_load((EXPERIMENTS / f"digits_{s}_scratch.yaml").read_text())
                   for s in ("m2n2", "cmaes"))
    assert m2n2["seeds"] == cmaes["seeds"] == [42, 43, 44]
    assert m2n2["budget"] == cmaes["budget"]
    assert cmaes["strategy"]["diagonal"] is True
    assert "separable" in (EXPERIMENTS / "digits_cmaes_scratch.yaml").read_text().lower()


def test_run_writes_each_seed_and_their_mean_and_refuses_to_overwrite(tmp_path):
    path, config = shipped("digits_m2n2_scratch.yaml", tmp_path, seeds=[42, 43])
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["run", str(path), "--budget", "60", "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["strategy"], summary["budget"], summary["seeds"]) == ("m2n2", 60, [42, 43])
    assert summary["setting"] == "digits_reference" and "note" not in summary
    rows = summary["per_seed"]
    assert [set(r) for r in rows] == [PER_SEED, PER_SEED]
    for row in rows:
        assert (row["evaluations"], row["replayed"]) == (60, 0)
        assert row["wall_s"] > 0 and row["peak_rss_mb"] > 100  # a process that imported torch
        # the seed's process ran this seed and budget: the same as running it here
        alone = run_scratch({**config, "seeds": [row["seed"]], "budget": 60},
                            run_dir=tmp_path / f"alone_{row['seed']}")
        assert (row["test_acc"], row["train_acc"]) == (alone["test_acc"], alone["train_acc"])
        assert (run_dir / f"seed_{row['seed']}" / "study.log").is_file()
    a, b = rows[0]["test_acc"], rows[1]["test_acc"]
    assert summary["test_acc_mean"] == pytest.approx((a + b) / 2, abs=1e-12)
    # sample std of two values: |a - b| / sqrt(2)
    assert summary["test_acc_std"] == pytest.approx(abs(a - b) / math.sqrt(2), abs=1e-12)
    assert yaml.safe_load((run_dir / "experiment.yaml").read_text())["budget"] == 60
    for seed in (42, 43):
        assert f"{seed}" in result.output
    again = runner.invoke(app, ["run", str(path), "--budget", "60", "--run-dir", str(run_dir)])
    assert again.exit_code == 2 and "evomerge resume" in again.output


def test_resume_skips_the_finished_seed_and_replays_the_partial_one(tmp_path):
    path, config = shipped("digits_cmaes_scratch.yaml", tmp_path, seeds=[1, 2],
                           record_every=10)
    run_dir = tmp_path / "run"
    first = runner.invoke(app, ["run", str(path), "--budget", "40", "--run-dir", str(run_dir)])
    assert first.exit_code == 0, first.output
    whole = json.loads((run_dir / "summary.json").read_text())["per_seed"]
    # seed 2 stopped after one generation of 20 (as if killed), the run's summary not written
    (run_dir / "summary.json").unlink()
    for f in (run_dir / "seed_2").iterdir():
        f.unlink()
    run_scratch({**config, "seeds": [2], "budget": 20}, run_dir=run_dir / "seed_2")

    result = runner.invoke(app, ["resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["per_seed"][0] == whole[0]  # finished: not run again (same wall time)
    resumed = summary["per_seed"][1]
    assert (resumed["replayed"], resumed["evaluations"]) == (20, 40)
    assert (resumed["test_acc"], resumed["train_acc"]) == (whole[1]["test_acc"],
                                                           whole[1]["train_acc"])
    assert "separable" in summary["note"] and "CMA_diagonal" in summary["note"]


def test_seed_option_runs_one_seed_whose_std_is_undefined(tmp_path):
    path, _ = shipped("digits_cmaes_scratch.yaml", tmp_path)
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["run", str(path), "--budget", "20", "--seed", "7",
                                 "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["seeds"] == [7] and summary["test_acc_std"] is None
    assert summary["test_acc_mean"] == summary["per_seed"][0]["test_acc"]


@pytest.mark.parametrize("changes, field", [
    ({"bugdet": 5}, "bugdet"),
    ({"seeds": []}, "seeds"),
    ({"seeds": [1, "2"]}, "seeds"),
    ({"seeds": [3, 3]}, "seeds"),
    ({"seeds": 42}, "seeds"),
    ({"seed": 42}, "not both"),
    ({"budget": 0}, "budget"),
])
def test_a_bad_config_fails_with_one_error_naming_the_field_and_creates_nothing(
        tmp_path, changes, field):
    path, _ = shipped("digits_m2n2_scratch.yaml", tmp_path, **changes)
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["run", str(path), "--run-dir", str(run_dir)])
    assert result.exit_code == 2
    assert result.output.count("error:") == 1 and field in result.output
    assert not run_dir.exists()


def test_mean_std_against_statistics_by_hand():
    mean, std = mean_std([0.8, 0.9, 0.7])
    assert mean == pytest.approx(0.8)
    assert std == pytest.approx(math.sqrt((0.0 + 0.01 + 0.01) / 2))  # n - 1 = 2
    assert mean_std([0.5]) == (0.5, None)
