"""Trials a person can read (issue 16): parameters named by the search space, objectives by the
fitness, and each trial's recipe as an optuna-dashboard note.

The names come from the bound space (``BoundSpace.names``, ``BoundDfsSpace.names``), the one
place that maps ``x[i] <-> names[i]``; the study records them (user attribute ``evomerge:params``)
so a run made before parameters were named (``x0 .. xN``) keeps those names and still resumes.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from optuna_dashboard import get_note
from run_helpers import build_zoo, experiment_data, run_in_process

from evomerge.spaces import DfsSpace
from evomerge.execution import driver
from evomerge.execution.driver import _note, run_experiment
from evomerge.execution.plan import Plan
from evomerge.experiment import Experiment
from evomerge.store import PARAMS, RUN, Slot, Store, legacy_names, x_of

NAME = "digits_cmaes"
NAMES = tuple(f"weight[{s}][layers.{i}]" for s in ("expert_0_4", "expert_5_9") for i in range(3))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.getbasetemp() / "digits-zoo")


@pytest.fixture(scope="module")
def run(zoo, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("names") / "run"
    run_in_process(experiment_data("cmaes", zoo, run_dir, budget=16))
    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{run_dir / 'study.db'}")
    return run_dir, study


def test_trials_carry_the_space_parameter_names_and_the_objective_names(run, zoo, tmp_path):
    _, study = run
    plan = Plan(Experiment.from_dict(experiment_data("cmaes", zoo, tmp_path, budget=16)))
    assert plan.space.names == NAMES
    assert study.metric_names == ["acc"]
    assert study.user_attrs[PARAMS] == list(NAMES)
    assert len(study.trials) == 16
    for trial in study.trials:
        assert tuple(trial.params) == NAMES
        x = x_of(trial, NAMES)
        weights = [m["parameters"]["weight"]
                   for m in trial.user_attrs["evomerge"]["recipe"]["models"]]
        assert np.allclose(np.concatenate(weights), x)  # names[i] is x[i], source-major


def test_every_trial_shows_its_recipe_as_a_readable_dashboard_note(run):
    _, study = run
    for trial in study.trials:
        note = get_note(optuna.trial.Trial(study, trial._trial_id))
        meta = trial.user_attrs["evomerge"]
        assert note.startswith(f"### Recipe: generation {meta['generation']}, "
                               f"candidate {meta['index']}\n")
        block = note.split("```yaml\n")[1].split("```")[0]
        recipe = yaml.safe_load(block)
        assert recipe["merge_method"] == "task_arithmetic" and recipe["base_model"] == "base"
        assert [m["model"] for m in recipe["models"]] == ["expert_0_4", "expert_5_9"]
        weights = np.concatenate([m["parameters"]["weight"] for m in recipe["models"]])
        assert np.allclose(weights, x_of(trial, NAMES), atol=5e-5)  # 4 decimals
        assert max(map(len, note.splitlines())) < 100  # lines a trial page shows whole
        assert "- `expert_0_4`: `" in note  # which model each short name is


def test_the_note_is_where_optuna_dashboard_reads_it(run):
    """The dashboard's own reader (what its trial page calls) finds the note."""
    from optuna_dashboard._note import get_note_from_system_attrs

    _, study = run
    attrs = study._storage.get_study_system_attrs(study._study_id)
    trial = study.trials[0]
    note = get_note_from_system_attrs(attrs, trial._trial_id)
    assert note["version"] == 1 and "merge_method: task_arithmetic" in note["body"]


def test_dfs_names_slot_inclusion_and_hop_scales_and_its_note_names_the_slices(tmp_path):
    space = DfsSpace(kind="dfs").bind({"expert_add": "/m/expert_add", "expert_sort": "/m/sort"},
                                      2, "llama")
    assert space.names[:2] == ("in[r0.expert_add.0]", "in[r0.expert_add.1]")
    assert "in[r1.expert_sort.1]" in space.names
    # W over layers (the default): the embedding row first, then each (source, block) row
    assert space.names[8:10] == ("W[embed->expert_add.0]", "W[embed->expert_add.1]")
    assert space.names[-1] == "W[expert_sort.1->expert_sort.1]"
    assert len(space.names) == 8 + 5 * 4
    pairs = DfsSpace(kind="dfs", scales="model_pairs").bind(
        {"expert_add": "/m/expert_add", "expert_sort": "/m/sort"}, 2, "llama")
    assert pairs.names[-4:] == ("W[expert_add->expert_add]", "W[expert_add->expert_sort]",
                                "W[expert_sort->expert_add]", "W[expert_sort->expert_sort]")
    st = Store(f"sqlite:///{tmp_path / 's.db'}", "dfs", ["maximize"], space.lower, space.upper,
               param_names=space.names)
    x = space.start_point
    recipe = space.decode(x)
    st.enqueue(x, Slot(0, 0), recipe.to_dict(), note=_note(space, recipe, Slot(0, 0)))
    claim = st.pop()
    st.finish(claim, [1.0])
    trial = st.trials()[0]
    assert tuple(trial.params) == space.names
    assert np.allclose(x_of(trial, space.names), x)
    note = get_note(optuna.trial.Trial(st.study, trial._trial_id))
    assert "merge_method: passthrough" in note and "model: expert_add" in note
    assert "layer_range: [0, 2]" in note and "`expert_sort`: `/m/sort`" in note


def test_a_long_note_is_stored_in_pieces_and_read_back_whole(tmp_path):
    st = Store(f"sqlite:///{tmp_path / 's.db'}", "s", ["maximize"], [0.0], [1.0],
               param_names=["w"])
    text = "".join(f"| row {i} | {i / 7:.4f} |\n" for i in range(400))  # > 2 pieces
    tid = st.enqueue(np.array([0.5]), Slot(0, 0), note=text)
    trial = optuna.trial.Trial(st.study, tid)
    assert get_note(trial) == text


def test_a_study_named_by_another_space_is_refused_naming_the_parameter(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    Store(url, "s", ["maximize"], [0.0, 0.0], [1.0, 1.0], param_names=["a", "b"])
    with pytest.raises(ValueError, match="parameter 1 'b', the search space 'c'"):
        Store(url, "s", ["maximize"], [0.0, 0.0], [1.0, 1.0], param_names=["a", "c"])
    with pytest.raises(ValueError, match="2 parameters, the search space 3"):
        Store(url, "s", ["maximize"], [0.0] * 3, [1.0] * 3, param_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="distinct"):
        Store(f"sqlite:///{tmp_path / 't.db'}", "t", ["maximize"], [0.0, 0.0], [1.0, 1.0],
              param_names=["a", "a"])


# ---- runs made before parameters were named ----------------------------------------------------


def make_legacy(run_dir: Path) -> None:
    """What the code before names left: no parameter names, no run identity recorded."""
    with sqlite3.connect(run_dir / "study.db") as db:
        db.execute("delete from study_user_attributes where key in (?, ?)", (PARAMS, RUN))
    (run_dir / "run.json").unlink()


@pytest.mark.slow
def test_a_run_stored_with_x_names_resumes_with_them_on_the_same_trajectory(zoo, tmp_path,
                                                                           monkeypatch):
    reference = run_in_process(experiment_data("cmaes", zoo, tmp_path / "reference", budget=24))
    ref = {(t.user_attrs["evomerge"]["generation"], t.user_attrs["evomerge"]["index"]): t
           for t in optuna.load_study(study_name=NAME, storage=(
               f"sqlite:///{tmp_path / 'reference' / 'study.db'}")).trials}
    run_dir = tmp_path / "old"
    data = experiment_data("cmaes", zoo, run_dir, budget=8)
    with monkeypatch.context() as m:  # the old store: x0 .. x5
        m.setattr(driver, "Store", lambda **kw: Store(**{**kw, "param_names": None}))
        run_in_process(data)
    url = f"sqlite:///{run_dir / 'study.db'}"
    # and a candidate of generation 1 it had enqueued (x-named) when it was killed
    old = Store(url, NAME, ["maximize"], [0.0] * 6, [1.5] * 6)
    x = x_of(ref[(1, 0)], NAMES)
    old.enqueue(x, Slot(1, 0), Plan(Experiment.from_dict(data)).space.decode(x).to_dict())
    make_legacy(run_dir)
    study = optuna.load_study(study_name=NAME, storage=url)
    assert all(tuple(t.params or t.system_attrs["fixed_params"]) == tuple(legacy_names(6))
               for t in study.trials)
    recorded = yaml.safe_load((run_dir / "experiment.yaml").read_text())
    (run_dir / "experiment.yaml").write_text(yaml.safe_dump({**recorded, "budget": 24}))
    (run_dir / "summary.json").unlink()
    summary = run_experiment(Experiment.from_run_dir(run_dir), resume=True, progress=False)
    study = optuna.load_study(study_name=NAME, storage=url)
    assert study.user_attrs[PARAMS] == legacy_names(6)  # a study keeps the names it began with
    assert len(study.trials) == 24 and (run_dir / "run.json").is_file()
    for t in study.trials:
        meta = t.user_attrs["evomerge"]
        assert tuple(t.params) == tuple(legacy_names(6))
        assert np.allclose(x_of(t, 6), x_of(ref[(meta["generation"], meta["index"])], NAMES))
        assert t.values == ref[(meta["generation"], meta["index"])].values
    assert summary["best"]["objectives"] == reference["best"]["objectives"]
