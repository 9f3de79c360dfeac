"""What a run reports (issue 16): plain progress lines for logs, the final table's labels and its
stated rule for "best", the best marked on the plots, and the plots as study artifacts."""

from __future__ import annotations

import io
import json
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from optuna.artifacts import get_all_artifact_meta
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from evomerge import report
from evomerge.progress import PROGRESS_ENV, live_display, progress_interval
from evomerge.report import LogLines, best_rule, plot_run, print_summary, upload_plots


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lines_of(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line]


# ---- progress lines ----------------------------------------------------------------------------


def test_log_lines_come_once_per_interval_and_always_at_the_end(capsys):
    clock = Clock()
    log = LogLines("trials", 10, interval=30, clock=clock)
    for t, done in [(0, 0), (10, 1), (29, 2), (31, 3), (40, 4), (61, 4), (70, 10)]:
        clock.now = t
        log.update(done, "acc 0.5000")
    out = lines_of(capsys)
    assert [line.split("] ")[1].split(",")[0] for line in out] == [
        "trials 0/10", "trials 3/10", "trials 4/10", "trials 10/10"]
    assert out[1].endswith("trials 3/10, best acc 0.5000, 10.3 s/trial, elapsed 00:00:31, "
                           "ETA 00:01:12")
    assert "ETA" not in out[-1] and "7.0 s/trial" in out[-1]


def test_interval_zero_gives_a_line_per_change_and_no_repeats(capsys):
    clock = Clock()
    log = LogLines("trials", 3, interval=0, clock=clock)
    for done in (0, 0, 1, 1, 2, 3, 3):
        clock.now += 1
        log.update(done, "-")
    assert [line.split("] ")[1].split(",")[0] for line in lines_of(capsys)] == [
        "trials 0/3", "trials 1/3", "trials 2/3", "trials 3/3"]


def test_the_last_step_is_shown_again_when_its_best_changed(capsys):
    """The driver counts the last generation's trials as they finish and learns their best when
    the generation is complete: the final line must not keep the best from before it."""
    clock = Clock()
    log = LogLines("trials", 36, interval=30, clock=clock)
    log.update(0, "-")
    clock.now = 20
    log.update(36, "mean_acc 0.5542 full, 0.4878 est")
    log.update(36, "mean_acc 0.5625 full, 0.4878 est")
    log.update(36, "mean_acc 0.5625 full, 0.4878 est")
    out = lines_of(capsys)
    assert [line.split(", best ")[1].split(",")[0] if ", best " in line else "-"
            for line in out] == ["-", "mean_acc 0.5542 full", "mean_acc 0.5625 full"]


def test_the_rate_counts_only_steps_done_now(capsys):
    """A resumed run starts at its replayed trials: they took no time in this process."""
    clock = Clock()
    log = LogLines("trials", 100, interval=0, clock=clock)
    log.update(90)
    clock.now = 20
    log.update(92)
    assert "10.0 s/trial" in lines_of(capsys)[-1]


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    assert progress_interval() == 30
    monkeypatch.setenv(PROGRESS_ENV, "2.5")
    assert LogLines("x", 1).interval == 2.5
    monkeypatch.setenv(PROGRESS_ENV, "soon")
    with pytest.raises(ValueError, match="EVOMERGE_PROGRESS_S='soon'"):
        progress_interval()


def test_bar_and_track_write_plain_lines_when_stdout_is_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, "0")
    assert not live_display()  # pytest captures stdout
    with report.progress_bar(2) as bar:
        bar.update(0, "-")
        bar.update(1, "acc 0.1")
        bar.update(2, "acc 0.2")
    assert list(report.track(["a", "b"], "calibration")) == ["a", "b"]
    assert list(report.track(["a"], "quiet", enabled=False)) == ["a"]
    with report.progress_bar(2, enabled=False) as bar:
        bar.update(2, "acc 0.2")
    heads = [line.split("] ")[1].split(",")[0] for line in lines_of(capsys)]
    assert heads == ["trials 0/2", "trials 1/2", "trials 2/2", "calibration 0/2",
                     "calibration 1/2", "calibration 2/2"]


# ---- the final table ---------------------------------------------------------------------------


def objectives(*specs: tuple[str, str]) -> list:
    return [SimpleNamespace(name=n, direction=d) for n, d in specs]


def test_best_rule_says_how_the_best_was_picked():
    assert best_rule(objectives(("acc", "maximize"))) == (
        "the trial with the largest acc; ties go to the earliest slot (generation, then "
        "candidate)")
    assert best_rule(objectives(("loss", "minimize"))).startswith("the trial with the smallest loss")
    two = objectives(("a", "maximize"), ("b", "minimize"))
    assert best_rule(two).startswith(
        "the Pareto-optimal trial with the largest mean of the objectives, each signed so that "
        "larger is better (minimized ones negated); ties")
    assert best_rule(two, 8).startswith(  # the re-scored top k come from every trial
        "the trial with the largest mean of the objectives, each signed so that larger is "
        "better (minimized ones negated), by its full re-score on all search items, among the 8 "
        "best by their IRT estimates; ties")


def summary(reduced: bool) -> dict:
    scores = {"add": 0.5, "sort": 0.25}
    data = {
        "experiment": "x", "n_trials": 8, "n_failed": 0, "wall_s": 1.0,
        "objectives": [{"name": "add", "direction": "maximize"},
                       {"name": "sort", "direction": "maximize"}],
        "best": {"trial": 3, "objectives": {"add": 0.9, "sort": 0.8},
                 "rule": best_rule(objectives(("add", "maximize"), ("sort", "maximize")),
                                   4 if reduced else 0)},
        "sources": {"s1": scores},
        "final": {"best": {"add": 0.7, "sort": 0.6}, "s1": scores},
        "outputs": {"run_dir": "/r", "best_recipe": "/r/best_recipe.yaml",
                    "best_model": "/r/best_model"},
    }
    if reduced:
        data["fitness_reduction"] = {
            "estimator": "gp-irt", "items_per_candidate": 20, "full_items": 60,
            "best_search_full": {"add": 0.85, "sort": 0.75}, "scored_in_full": 3,
            "sources_search_full": {"s1": {"add": 0.45, "sort": 0.2}}}
    return data


def printed(data: dict, width: int = 80) -> str:
    out = io.StringIO()
    print_summary(data, Console(file=out, width=width))
    return out.getvalue()


def test_reduced_table_labels_the_estimate_and_adds_the_full_rescore():
    text = printed(summary(reduced=True))
    header = next(line for line in text.splitlines() if "model" in line)
    assert [c.strip() for c in header.strip("┃ ").split("┃")] == [
        "model", "add search (IRT estimate)", "add search (full)", "add (held-out)",
        "sort search (IRT estimate)", "sort search (full)", "sort (held-out)"]
    best = next(line for line in text.splitlines() if "best (trial 3)" in line)
    assert [c.strip() for c in best.strip("│ ").split("│")][1:] == [
        "0.9000", "0.8500", "0.7000", "0.8000", "0.7500", "0.6000"]
    source = next(line for line in text.splitlines() if "s1" in line)
    assert "0.4500" in source and "0.5000" in source
    caption = " ".join(text.split())
    assert "by its full re-score on all search items, among the 4 best by their IRT" in caption
    assert "search (IRT estimate): the gp-irt estimate from 20 anchor items of 60;" in caption
    assert ("The search saw full scores for 3 of its 8 candidates (warmup and racing) and "
            "anchor estimates for the rest.") in caption
    data = summary(reduced=True)
    data["fitness_reduction"]["scored_on_half"] = 2  # racing in two stages
    assert ("The search saw full scores for 3 of its 8 candidates (warmup and racing), "
            "estimates from the anchors and half the other items for 2 and anchor estimates "
            "for the rest.") in " ".join(printed(data).split())
    data["fitness_reduction"]["scored_in_full"] = 0  # no warmup, no racing: the old schedule
    assert "The search saw estimates for all its 8 candidates." in " ".join(printed(data).split())
    assert "Best recipe: /r/best_recipe.yaml" in text and "Best model:  /r/best_model/" in text


def test_a_table_in_a_log_is_printed_at_its_natural_width():
    """A file does not wrap: 7 columns of numbers are not squeezed into 80 characters."""
    lines = printed(summary(reduced=True), width=80).splitlines()
    assert max(len(line) for line in lines) > 80
    assert "0.8500" in next(line for line in lines if "best (trial 3)" in line)


def test_plain_table_states_the_rule_and_the_paths():
    data = summary(reduced=False)
    data["outputs"]["best_model"] = None  # export: false
    text = printed(data)
    assert "add (search)" in text and "IRT" not in text
    assert "best: the Pareto-optimal trial with the largest mean of the objectives" in " ".join(
        text.split())
    assert "Best recipe: /r/best_recipe.yaml" in text and "Best model" not in text


# ---- plots and artifacts -----------------------------------------------------------------------


def trial(number: int, values: list[float]) -> FrozenTrial:
    now = datetime.now()
    return FrozenTrial(number=number, state=TrialState.COMPLETE, value=None, values=values,
                       datetime_start=now, datetime_complete=now, params={}, distributions={},
                       user_attrs={}, system_attrs={}, intermediate_values={}, trial_id=number)


def test_the_best_is_marked_on_both_plots(tmp_path, monkeypatch):
    figures = {}
    save = report._save
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.setdefault(path.name, [
        [t.get_text() for t in ax.get_legend().get_texts()] + [ax.get_ylabel()]
        for ax in fig.axes]) and save(fig, path))
    trials = [trial(0, [0.2, 0.9]), trial(1, [0.8, 0.7]), trial(2, [0.5, 0.1])]
    written = plot_run(tmp_path, trials, trials[:2], objectives(("a", "maximize"),
                                                                ("b", "maximize")),
                       {"s1": {"a": 0.3, "b": 0.3}}, best=trials[1], estimated=True)
    assert [p.name for p in written] == ["convergence.png", "pareto.png"]
    for name in ("convergence.png", "pareto.png"):
        for legend in figures[name]:
            assert "best (trial 1)" in legend, (name, legend)
            assert legend[-1].endswith("(IRT estimate)")


def test_plots_become_study_artifacts_once_per_name(tmp_path):
    """In RUN_DIR/artifacts, listed in the study; uploading again (a resumed run) rewrites the
    entry's file instead of adding a second entry."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="s")
    store = SimpleNamespace(study=study)
    plot = tmp_path / "convergence.png"
    plot.write_bytes(b"first")
    where = upload_plots(store, tmp_path, [plot])
    assert where == tmp_path / "artifacts"
    [meta] = get_all_artifact_meta(study)
    assert (meta.filename, meta.mimetype) == ("convergence.png", "image/png")
    assert (where / meta.artifact_id).read_bytes() == b"first"
    plot.write_bytes(b"second")
    other = tmp_path / "pareto.png"
    other.write_bytes(b"front")
    upload_plots(store, tmp_path, [plot, other])
    metas = {m.filename: m.artifact_id for m in get_all_artifact_meta(study)}
    assert metas.keys() == {"convergence.png", "pareto.png"}
    assert metas["convergence.png"] == meta.artifact_id
    assert (where / meta.artifact_id).read_bytes() == b"second"
    assert json.loads(json.dumps(sorted(p.name for p in where.iterdir()))) == sorted(
        metas.values())


def test_an_artifact_failure_warns_and_keeps_the_run(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="s")
    with pytest.warns(RuntimeWarning, match="not added to the study's artifacts"):
        assert upload_plots(SimpleNamespace(study=study), tmp_path,
                            [tmp_path / "missing.png"]) is None


@pytest.mark.slow
def test_a_finished_run_names_its_outputs_and_uploads_its_plots(tmp_path):
    """End to end on the digits zoo: summary.json says the rule and where the outputs are;
    the plots are the study's artifacts."""
    from run_helpers import build_zoo, experiment_data, run_in_process

    zoo = build_zoo(tmp_path / "zoo")
    run = tmp_path / "run"
    result = run_in_process(experiment_data("cmaes", zoo, run, budget=8, export=True))
    assert result["best"]["rule"].startswith("the trial with the largest acc")
    assert result["outputs"] == {"run_dir": str(run), "best_recipe": str(run / "best_recipe.yaml"),
                                 "best_model": str(run / "best_model")}
    study = optuna.load_study(study_name="digits_cmaes", storage=f"sqlite:///{run / 'study.db'}")
    assert [m.filename for m in get_all_artifact_meta(study)] == ["convergence.png"]
    assert Path(run / "artifacts").is_dir()
