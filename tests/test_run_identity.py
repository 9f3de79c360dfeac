"""One run per study, resume that follows the directory it is given (issue 16).

- A run has an identity (a random id in ``RUN_DIR/run.json`` and in the study's user attribute
  ``evomerge:run``): a second run that names the same study in a shared store gets one clear
  error naming the run that owns it, and a claim overwritten by a racing driver stops that driver
  at its next enqueue, so two runs never mix in one study.
- ``evomerge resume COPY`` resumes the copy (its own SQLite store), never the original the
  recorded absolute ``run_dir`` points to; a file store recorded inside the old directory
  follows the directory too.
- Resume prints what it replayed; a no-op resume keeps the run's ``wall_s``.
- A store write that fails for lack of space says so in one line (``database or disk is full``),
  not with Optuna's "invalid data in the commit"; nothing is lost and resume finishes the run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import uuid
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from run_helpers import build_zoo, cli, experiment_data, run_cli, run_in_process, write_experiment
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.execution.driver import run_experiment
from evomerge.experiment import Experiment
from evomerge.store import PARAMS, RUN, RunOwnedError, Slot, Store, StoreFullError, no_space_cause

NAME = "digits_cmaes"  # experiments/digits_cmaes.yaml: popsize 8


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.getbasetemp() / "digits-zoo")


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def n_trials(url: str, study: str = NAME) -> int:
    storage = (optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(url.removeprefix("journal://")))
        if url.startswith("journal:") else url)
    return len(optuna.load_study(study_name=study, storage=storage).trials)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def set_budget(run_dir: Path, budget: int) -> None:
    """A finished run made unfinished: the recorded experiment asks for more (the seeded
    strategy asks the same first generations again, so the stored ones replay)."""
    path = run_dir / "experiment.yaml"
    data = yaml.safe_load(path.read_text())
    data["budget"] = budget
    path.write_text(yaml.safe_dump(data, sort_keys=False))


# ---- a run directory is where it is now --------------------------------------------------------


def test_a_copied_run_resumes_into_the_copy_and_leaves_the_original_untouched(zoo, tmp_path):
    original = tmp_path / "original"
    run_in_process(experiment_data("cmaes", zoo, original, budget=8))
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    set_budget(original, 16)
    set_budget(copy, 16)
    before = digest(original)
    result = invoke("resume", copy)
    assert result.exit_code == 0, result.output
    assert digest(original) == before  # not one byte of the original changed
    assert n_trials(f"sqlite:///{copy / 'study.db'}") == 16
    assert n_trials(f"sqlite:///{original / 'study.db'}") == 8
    assert yaml.safe_load((copy / "experiment.yaml").read_text())["run_dir"] == str(copy)
    assert json.loads((copy / "summary.json").read_text())["n_trials"] == 16
    # the copy is the same run (one id), so it resumes; the original can still resume too
    assert json.loads((copy / "run.json").read_text()) == json.loads(
        (original / "run.json").read_text())


@pytest.mark.slow
def test_a_moved_run_resumes_where_it_is_now(zoo, tmp_path):
    old = tmp_path / "old"
    run_in_process(experiment_data("cmaes", zoo, old, budget=8))
    set_budget(old, 16)
    new = tmp_path / "elsewhere" / "new"
    new.parent.mkdir()
    old.rename(new)
    out = run_cli(cli("resume", new), timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not old.exists()
    assert n_trials(f"sqlite:///{new / 'study.db'}") == 16


def test_a_file_store_recorded_inside_the_old_run_directory_follows_it(tmp_path, zoo):
    old, new = Path("/nonexistent/old-run"), tmp_path / "new-run"
    new.mkdir()
    data = experiment_data("cmaes", zoo, old, budget=8)
    for storage, expected in [
            (f"sqlite:///{old / 'study.db'}", f"sqlite:///{new / 'study.db'}"),
            (f"journal://{old / 'logs' / 'study.log'}", f"journal://{new / 'logs' / 'study.log'}"),
            ("journal:///shared/study.log", "journal:///shared/study.log"),  # outside: stays
            ("postgresql://u@host/db", "postgresql://u@host/db")]:
        write_experiment(new / "experiment.yaml", {**data, "storage": storage})
        (new / "provenance.json").write_text("{}")
        loaded = Experiment.from_yaml(new / "experiment.yaml")
        assert loaded.run_path == new and loaded.storage == expected
        assert Experiment.from_run_dir(new).storage == expected
    # `evomerge run RUN_DIR/experiment.yaml [--run-dir D]`: None overrides nothing, D wins
    assert Experiment.from_yaml(new / "experiment.yaml", run_dir=None, budget=None).run_path == new
    assert Experiment.from_yaml(new / "experiment.yaml", run_dir=str(tmp_path / "d")).run_path \
        == tmp_path / "d"
    # an experiment file that is not a run directory's record keeps its run_dir
    plain = write_experiment(tmp_path / "exp.yaml", data)
    assert Experiment.from_yaml(plain).run_path == old


# ---- one run per study -------------------------------------------------------------------------


def test_a_second_run_on_a_shared_journal_study_gets_one_clear_error(zoo, tmp_path):
    url = f"journal://{tmp_path / 'shared' / 'study.log'}"
    (tmp_path / "shared").mkdir()
    first, second = tmp_path / "first", tmp_path / "second"
    run_in_process({**experiment_data("cmaes", zoo, first, budget=8), "storage": url})
    path = write_experiment(tmp_path / "second.yaml",
                            {**experiment_data("cmaes", zoo, second, budget=8), "storage": url})
    result = invoke("run", path)
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "belongs to another run" in message
    assert f"run directory {first}" in message
    assert f"evomerge resume {first}" in message
    assert "another `name:`" in message and "`storage:`" in message
    assert "already holds" not in message
    assert n_trials(url) == 8  # nothing of the second run reached the study
    assert not (second / "run.json").exists()
    # the owner still resumes its own run
    assert invoke("resume", first).exit_code == 0


def test_running_again_into_the_same_run_directory_says_resume_it(zoo, tmp_path):
    data = experiment_data("cmaes", zoo, tmp_path / "run", budget=8)
    run_in_process(data)
    run_id = json.loads((tmp_path / "run" / "run.json").read_text())["run_id"]
    result = invoke("run", write_experiment(tmp_path / "exp.yaml", data))
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert f"already holds run {run_id}" in message
    assert f"evomerge resume {tmp_path / 'run'}" in message
    assert json.loads((tmp_path / "run" / "run.json").read_text())["run_id"] == run_id


def store(url: str) -> Store:
    return Store(url, "s", ["maximize"], [0.0, 0.0], [1.0, 1.0], param_names=["a", "b"])


def test_two_drivers_claiming_one_study_at_once_never_both_enqueue(tmp_path):
    url = f"journal://{tmp_path / 'study.log'}"
    one, two = store(url), store(url)
    assert one.created and not two.created
    one.claim_run("run-1", tmp_path / "one", resume=False)
    with pytest.raises(RunOwnedError, match="belongs to another run .*run-1"):
        two.claim_run("run-2", tmp_path / "two", resume=False)
    with pytest.raises(RunOwnedError):
        two.claim_run("run-2", tmp_path / "two", resume=True)  # not its run to resume either
    one.enqueue(np.array([0.1, 0.2]), Slot(0, 0))
    # a racing driver whose write landed last owns the study: the other stops at its next enqueue
    one.study.set_user_attr(RUN, {"id": "run-3", "run_dir": str(tmp_path / "three")})
    with pytest.raises(RunOwnedError, match="run-3"):
        one.enqueue(np.array([0.3, 0.4]), Slot(0, 1))
    assert len(one.trials()) == 1


def test_a_study_without_identity_is_adopted_by_resume_and_refused_to_a_new_run(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    old = Store(url, "s", ["maximize"], [0.0], [1.0])  # as a run made before run ids
    old.enqueue(np.array([0.5]), Slot(0, 0))
    with pytest.raises(RunOwnedError, match="already holds 1 trials"):
        Store(url, "s", ["maximize"], [0.0], [1.0]).claim_run("new", tmp_path, resume=False)
    again = Store(url, "s", ["maximize"], [0.0], [1.0])
    again.claim_run("adopted", tmp_path, resume=True)
    assert again.user_attrs()[RUN]["id"] == "adopted"
    assert again.user_attrs()[PARAMS] == ["x0"]


# ---- what resume says, what it keeps -----------------------------------------------------------


@pytest.mark.slow
def test_resume_says_what_it_replayed_and_a_no_op_resume_keeps_wall_s(zoo, tmp_path):
    run_dir = tmp_path / "run"
    path = write_experiment(tmp_path / "exp.yaml",
                            experiment_data("cmaes", zoo, run_dir, budget=16))
    first = run_cli(cli("run", path), timeout=300)
    assert first.returncode == 0, first.stderr
    wall_s = json.loads((run_dir / "summary.json").read_text())["wall_s"]
    out = run_cli(cli("resume", run_dir), timeout=300)
    assert out.returncode == 0, out.stderr
    assert ("resume: replayed 16 trials from the store, 0 marked failed as interrupted "
            "(evaluated again), 0 of 16 slots left") in out.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["wall_s"] == wall_s  # the run's own time, not the resume's few seconds
    assert summary["resume"]["replayed"] == 16 and summary["resume"]["left"] == 0
    assert summary["resume"]["wall_s"] > 0
    # a resume with work to do: 8 replayed, 8 left
    set_budget(run_dir, 24)
    (run_dir / "summary.json").unlink()  # as a run killed before it finished
    out = run_cli(cli("resume", run_dir), timeout=300)
    assert out.returncode == 0, out.stderr
    assert "replayed 16 trials from the store, 0 marked failed as interrupted (evaluated " \
           "again), 8 of 24 slots left" in out.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["n_trials"] == 24 and summary["wall_s"] == summary["resume"]["wall_s"]


def test_resume_counts_the_trials_it_marks_interrupted(zoo, tmp_path, capsys):
    data = experiment_data("cmaes", zoo, tmp_path / "run", budget=8)
    run_in_process(data)
    # a dead worker's trial: generation 1's first slot claimed and never finished
    st = Store(f"sqlite:///{tmp_path / 'run' / 'study.db'}", NAME, ["maximize"],
               [0.0] * 6, [1.5] * 6)
    st.enqueue(np.full(6, 0.5), Slot(1, 0))
    assert st.pop("ghost:1") is not None
    set_budget(tmp_path / "run", 16)
    (tmp_path / "run" / "summary.json").unlink()
    run_experiment(Experiment.from_run_dir(tmp_path / "run"), resume=True, progress=True)
    err = capsys.readouterr().err
    assert "replayed 8 trials from the store, 1 marked failed as interrupted (evaluated " \
           "again), 8 of 16 slots left" in err


# ---- a full disk -------------------------------------------------------------------------------


def test_a_full_disk_is_named_as_the_cause_not_invalid_data(tmp_path, monkeypatch):
    """Simulated at the storage layer: SQLite's error as Optuna wraps it."""
    import sqlalchemy.exc

    st = store(f"sqlite:///{tmp_path / 's.db'}")
    st.claim_run("r", tmp_path / "run", resume=False)
    st.enqueue(np.array([0.1, 0.2]), Slot(0, 0))

    def full(*args, **kwargs):
        cause = sqlalchemy.exc.OperationalError(
            "INSERT", {}, Exception("database or disk is full"))
        try:
            raise cause
        except sqlalchemy.exc.OperationalError as exc:
            raise optuna.exceptions.StorageInternalError(
                "An exception is raised during the commit. This typically happens due to "
                "invalid data in the commit, e.g. exceeding max length. ") from exc

    monkeypatch.setattr(st.storage, "create_new_trial", full)
    with pytest.raises(StoreFullError) as info:
        st.enqueue(np.array([0.3, 0.4]), Slot(0, 1))
    message = str(info.value)
    assert "database or disk is full" in message and "invalid data" not in message
    assert "Nothing was corrupted" in message
    assert f"evomerge resume {tmp_path / 'run'}" in message
    assert len(message.splitlines()) == 1
    assert no_space_cause(OSError(28, "No space left on device", "/x/study.log")) is not None
    assert no_space_cause(ValueError("invalid data")) is None


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          check=False, capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_run_on_a_full_tmpfs_stops_with_one_clear_line_and_resumes_once_there_is_space(
        zoo, tmp_path):
    disk = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    if not _mount_tmpfs(disk, "200k"):
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated test covers the message")
    try:
        run_dir = disk / "run"
        path = write_experiment(tmp_path / "exp.yaml",
                                experiment_data("cmaes", zoo, run_dir, budget=160))
        out = run_cli(cli("run", path), timeout=300)
        assert out.returncode == 1, out.stdout + out.stderr
        error = " ".join(out.stderr[out.stderr.index("error:"):].split())
        assert error.startswith("error: the store cannot be written: database or disk is full")
        assert "invalid data" not in out.stderr and "Traceback" not in out.stderr
        assert f"evomerge resume {run_dir}" in error
        with sqlite3.connect(run_dir / "study.db") as db:
            assert db.execute("pragma integrity_check").fetchone() == ("ok",)
            kept = db.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
        assert kept > 0
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        out = run_cli(cli("resume", run_dir), timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"replayed {kept} trials" in out.stderr
        assert json.loads((run_dir / "summary.json").read_text())["n_trials"] == 160
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False, capture_output=True)
