"""What a run leaves behind: progress, provenance, summary.json, best recipe and model, plots.

Every file is written atomically (temporary file + rename) so a run killed while reporting never
leaves a truncated summary; a resumed run rewrites them all.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from optuna.trial import FrozenTrial, TrialState

from evomerge.recipe import parse_recipe
from evomerge.progress import hms, live_display, progress_interval
from evomerge.store import INTERRUPTED, META, OWNER, RESULT, Store, items_scored, scored_in_full

if TYPE_CHECKING:  # the driver's values, reported here; this module loads without torch
    from evomerge.execution.evaluator import Evaluator
    from evomerge.execution.plan import Plan
    from evomerge.experiment import Experiment
    from evomerge.fitness.base import Objective
    from evomerge.search import Strategy

SUMMARY = "summary.json"
BEST_RECIPE = "best_recipe.yaml"
BEST_MODEL = "best_model"


def write_atomic(path: Path, text: str) -> None:
    """``text`` to ``path`` via a temporary file and a rename, with the mode a plain ``open``
    would give (0644 minus the umask; mkstemp's temporary files are 0600)."""
    from evomerge.merge.export import _umask

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_provenance(run_dir: Path, experiment: Experiment, *, resumed: bool) -> None:
    """The resolved experiment (what ``resume`` reads), the versions that ran it and the Hub
    models it read (repository, revision asked, commit)."""
    import evomerge

    write_atomic(run_dir / "experiment.yaml", experiment.to_yaml())
    versions = {}
    for pkg in ("torch", "transformers", "huggingface_hub", "safetensors", "optuna", "cma", "pymoo",
                "numpy", "scikit-learn"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    path = run_dir / "provenance.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    history = previous.get("starts", [])
    history.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed": resumed,
                    "argv": sys.argv})
    # Hub models: field -> {repo_id, revision asked, commit, path}. A resumed run reads
    # snapshot paths only; the revision its first start asked for is kept from the last file.
    hub_models = experiment.models.hub_models()
    for field, entry in hub_models.items():
        before = previous.get("hub_models", {}).get(field, {})
        if entry["revision"] is None and before.get("commit") == entry["commit"]:
            entry["revision"] = before.get("revision")
    write_atomic(path, json.dumps({
        "evomerge": evomerge.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "seed": experiment.seed, "packages": versions,
        "hub_models": hub_models, "starts": history}, indent=2))


class LogLines:
    """Progress as plain lines on stdout, for logs: one at the start, then at most one per
    ``interval`` seconds (a step that changed nothing is repeated only when ``interval`` > 0,
    as a heartbeat), and the last step always, again when its best changed (the driver learns
    the last generation's best after its last trial was counted), e.g.
    ``[02:14:07] trials 40/600, best acc 0.5120, 12.3 s/trial, elapsed 00:08:13, ETA 01:55:10``.
    The rate counts only the steps done since this object was made (a resumed run's replayed
    trials took no time now)."""

    def __init__(self, label: str, total: int, *, unit: str = "trial",
                 interval: float | None = None, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.interval = progress_interval() if interval is None else interval
        self.clock = clock
        self.started = clock()
        self.first: int | None = None  # steps done at the first update
        self.shown: int | None = None  # steps done at the last line
        self.shown_best: str | None = None  # and its best
        self.last = -float("inf")

    def update(self, done: int, best: str | None = None) -> None:
        now = self.clock()
        if self.first is None:
            self.first = done
        due = now - self.last >= self.interval and (done != self.shown or self.interval > 0)
        if due or (done >= self.total and (done, best) != (self.shown, self.shown_best)):
            print(self.line(done, best, now), file=sys.stdout, flush=True)
            self.shown, self.shown_best, self.last = done, best, now

    def line(self, done: int, best: str | None, now: float) -> str:
        parts = [f"[{time.strftime('%H:%M:%S')}] {self.label} {done}/{self.total}"]
        if best and best != "-":
            parts.append(best if best.endswith("objectives") else f"best {best}")
        new = done - (self.first or 0)
        if new > 0:
            per = (now - self.started) / new
            parts.append(f"{per:.1f} s/{self.unit}")
        parts.append(f"elapsed {hms(now - self.started)}")
        if new > 0 and done < self.total:
            parts.append(f"ETA {hms(per * (self.total - done))}")
        return ", ".join(parts)


class _Bar:
    def __init__(self, progress: Any = None, task: Any = None, lines: LogLines | None = None
                 ) -> None:
        self.progress, self.task, self.lines = progress, task, lines

    def update(self, done: int, best: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done, best=best)
        elif self.lines is not None:
            self.lines.update(done, best)


@contextmanager
def progress_bar(budget: int, *, enabled: bool = True) -> Iterator[_Bar]:
    """trials done/budget, best so far, elapsed and ETA: a live bar on a terminal, plain
    periodic lines (:class:`LogLines`) when stdout is a file or a pipe."""
    if not enabled:
        yield _Bar()
        return
    if not live_display():
        yield _Bar(lines=LogLines("trials", budget))
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("trials"), BarColumn(), MofNCompleteColumn(),
               TextColumn("best {task.fields[best]}"), TimeElapsedColumn(), TextColumn("ETA"),
               TimeRemainingColumn())
    with Progress(*columns) as progress:
        task = progress.add_task("search", total=budget, best="-")
        yield _Bar(progress, task)


def track(items: Sequence[Any], description: str, *, enabled: bool = True,
          unit: str = "model") -> Iterator[Any]:
    """``items``, one by one, with progress: rich's transient bar on a terminal, plain periodic
    lines (:class:`LogLines`) in a log, nothing when not ``enabled``."""
    if not enabled:
        yield from items
        return
    if live_display():
        from rich.progress import track as rich_track

        yield from rich_track(items, description=description, transient=True)
        return
    lines = LogLines(description, len(items), unit=unit)
    lines.update(0)
    for k, item in enumerate(items):
        yield item
        lines.update(k + 1)


# ---- the summary -----------------------------------------------------------------------------


def _finished(store: Store) -> list[FrozenTrial]:
    return [t for t in store.trials() if t.state.is_finished()
            and t.user_attrs.get(RESULT, {}).get("error") != INTERRUPTED]


def _score(trial: FrozenTrial | Sequence[float], objectives: list) -> float:
    """Mean of the objectives, signed so that larger is better (picks one Pareto point)."""
    values = trial.values if isinstance(trial, FrozenTrial) else trial
    return float(np.mean([v if o.direction == "maximize" else -v
                          for v, o in zip(values, objectives)]))


def _earliest(trial: FrozenTrial) -> tuple[int, int]:
    """Tie-break key preferring the earliest slot (larger is earlier)."""
    return -trial.user_attrs[META]["generation"], -trial.user_attrs[META]["index"]


def _rescore(complete: list[FrozenTrial], objectives: list[Objective], evaluator: Evaluator,
             k: int, objs: Callable[[Any], dict[str, float]], *, progress: bool = False
             ) -> tuple[FrozenTrial, list[dict[str, Any]]]:
    """The winner's-curse guard of a reduced fitness: the best trial by full score, among
    those the search scored in full (an IRT warmup, raced candidates) and the ``k`` best by
    their estimates, which are scored on the full search items now.

    A search that keeps the maximum of hundreds of noisy estimates picks one the noise
    flattered; on the tiny-LM zoo re-ranking the top 8 on all search items raised the
    held-out score of the PS winner from 0.655 to 0.669 (M2N2: 0.651 to 0.658), measured.
    """
    full = [t for t in complete if scored_in_full(t, reduced=True)]
    estimates = [t for t in complete if not scored_in_full(t, reduced=True)]
    top = sorted(estimates, key=lambda t: (_score(t, objectives), *_earliest(t)),
                 reverse=True)[:k]
    rows = []
    scored = [((_score(t, objectives), *_earliest(t)), t) for t in full]
    for trial in track(top, "re-scoring the best estimates on all search items",
                       enabled=progress and bool(top), unit="trial"):
        model = evaluator.build(parse_recipe(trial.user_attrs[META]["recipe"]))
        values = objs(evaluator.inner.evaluate(model, "search"))
        rows.append({"trial": trial.number, "estimate": dict(zip(values, trial.values)),
                     "full": values})
        scored.append(((_score(list(values.values()), objectives), *_earliest(trial)), trial))
    return max(scored, key=lambda pair: pair[0])[1], rows


def item_evaluations(trials: list[FrozenTrial], reduction: dict[str, Any] | None,
                     rescored: int) -> dict[str, int]:
    """Item evaluations the run spent to find its best: ``calibration`` (the sources and design
    merges an IRT reduction scored in full before the search), ``search`` (every finished
    trial's scored items: anchors, or all of them), ``rescore`` (the final re-scoring of
    estimates), and their ``total``. The report's own scores (sources, held-out) are not
    counted."""
    full = reduction["full_items"] if reduction else 0
    spent = {"calibration": calibration_items(reduction),
             "search": sum(items_scored(t) for t in trials), "rescore": rescored * full}
    return {**spent, "total": sum(spent.values())}


def calibration_items(reduction: dict[str, Any] | None) -> int:
    """Item evaluations an IRT reduction's calibration spent before the search (its sources
    and design merges, each on every search item); 0 without one."""
    return reduction["calibration_models"] * reduction["full_items"] if reduction else 0


def write_strategy_report(strategy: Strategy, run_dir: Path) -> None:
    """Surrogate strategies (MAP) report their surrogates' error: RUN_DIR/surrogate.json."""
    report = getattr(strategy, "surrogate_report", None)
    if callable(report):
        write_atomic(run_dir / "surrogate.json", json.dumps(report(), indent=2))


def finish_run(plan: Plan, store: Store, evaluator: Evaluator, *, wall_s: float,
               reduction: dict[str, Any] | None = None, progress: bool = False
               ) -> dict[str, Any]:
    """Score best and sources on both splits, export the best, plot, write summary.json, and
    put the plots in the study's artifact store (RUN_DIR/artifacts, for optuna-dashboard).

    With an IRT-reduced fitness (``reduction``: its calibration facts), trial values and the
    sources' ``search`` scores are estimates from anchor items; ``final`` (held-out) scores are
    always full evaluations, and so are ``fitness_reduction.best_search_full`` and
    ``sources_search_full``. ``progress``: a line per phase (and the re-scoring's progress).
    """
    from evomerge.merge.export import export_dtype, export_model

    experiment, objectives = plan.experiment, plan.objectives
    run_dir = experiment.run_path
    trials = _finished(store)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pareto = store.best_trials()
    if not pareto:
        raise RuntimeError(f"no candidate of {experiment.name} completed; see the failed trials "
                           f"with `evomerge dashboard {run_dir}`")
    names = [o.name for o in objectives]

    def objs(result: Any) -> dict[str, float]:
        return {n: float(result.objectives[n]) for n in names}

    # ties go to the earliest slot, so a resumed run (whose re-run slots get higher trial
    # numbers) reports the same best as an uninterrupted one
    best = max(pareto, key=lambda t: (_score(t, objectives), *_earliest(t)))
    rescored: list[dict[str, Any]] = []
    if reduction is not None and (reduction["rescore"] > 0 or any(
            scored_in_full(t, reduced=True) for t in complete)):
        best, rescored = _rescore(complete, objectives, evaluator, reduction["rescore"], objs,
                                  progress=progress)
    recipe = parse_recipe(best.user_attrs[META]["recipe"])
    write_atomic(run_dir / BEST_RECIPE, recipe.to_yaml())
    _say(progress, f"final scores: the best (trial {best.number}) and the sources on the "
                   "search and held-out items")

    sources = {name: objs(evaluator.evaluate_source(path, "search"))
               for name, path in experiment.models.sources.items()}
    final = {name: objs(evaluator.evaluate_source(path, "heldout"))
             for name, path in experiment.models.sources.items()}
    # the base, when it is not a source, is the reference every merge should beat
    base = experiment.models.base
    base_scores = None
    if base and base not in experiment.models.sources.values():
        try:
            base_scores = {split: objs(evaluator.evaluate_source(base, split))
                           for split in ("search", "heldout")}
        except Exception as exc:  # noqa: BLE001 - a reference only: never lose the summary to it
            base_scores = {"error": f"{type(exc).__name__}: {exc}"}
    # merges the space routes through (PS+DFS: the PS merge) are judged next to the sources
    for name, merge in getattr(plan.space, "merged", {}).items():
        final[name] = objs(evaluator.evaluate(merge, "heldout")[0])
    heldout, _ = evaluator.evaluate(recipe, "heldout")
    final = {"best": objs(heldout), **final}
    if experiment.export:
        _say(progress, f"exporting the best model to {run_dir / BEST_MODEL}")
        state, config_updates = evaluator.materialise(recipe)
        config_dir = experiment.models.base or next(iter(experiment.models.sources.values()))
        # the fitness model the best is materialised from computes in its own dtype (float32):
        # write the recipe's out_dtype, else its dtype, else the sources' (bf16 in, bf16 out)
        inputs = ([base] if base else []) + list(experiment.models.sources.values())
        dtype = export_dtype(getattr(recipe, "out_dtype", None), recipe.dtype, sources=inputs)
        export_model(state, run_dir / BEST_MODEL, base_dir=config_dir, dtype=dtype,
                     recipe_yaml=recipe.to_yaml(), overwrite=True, config_updates=config_updates)
    summary = {
        "experiment": experiment.name,
        "strategy": experiment.strategy.name,
        "n_trials": len(trials),
        "n_failed": sum(t.state == TrialState.FAIL for t in trials),
        "wall_s": round(wall_s, 3),
        "budget": experiment.budget,
        **({"budget_items": experiment.budget_items} if experiment.budget_items else {}),
        "objectives": [{"name": o.name, "direction": o.direction} for o in objectives],
        "best": {"trial": best.number, "objectives": dict(zip(names, best.values)),
                 "rule": best_rule(objectives, len(rescored), reduction),
                 "recipe": recipe.to_dict()},
        "pareto": [{"trial": t.number, "objectives": dict(zip(names, t.values))}
                   for t in sorted(pareto, key=lambda t: t.number)],
        "sources": sources,
        "final": final,
        **({"base": base_scores} if base_scores else {}),
        "timing": _timings(complete),
        "item_evaluations": item_evaluations(trials, reduction, len(rescored)),
        "devices": {"driver": getattr(evaluator, "placement", None),
                    "workers": _workers(trials)},
        "storage": store.url,
        "outputs": {"run_dir": str(run_dir), "best_recipe": str(run_dir / BEST_RECIPE),
                    "best_model": str(run_dir / BEST_MODEL) if experiment.export else None},
    }
    if reduction is not None:
        # the search saw estimates from anchor items; the best's full search score shows how
        # far the search's pick of anchors flattered it (the re-scoring measured it already)
        full = next((r["full"] for r in rescored if r["trial"] == best.number), None)
        if full is None and scored_in_full(best, reduced=True):
            full = dict(zip(names, best.values))
        elif full is None:
            full = objs(evaluator.inner.evaluate(evaluator.build(recipe), "search"))
        # the sources' full scores, next to their estimates (as calibration scored them)
        from evomerge.fitness.reduced import source_recipe

        sources_full = {
            name: objs(evaluator.inner.evaluate(evaluator.build(source_recipe(path)), "search"))
            for name, path in experiment.models.sources.items()}
        estimate = best.user_attrs.get(RESULT, {}).get("estimate")
        summary["fitness_reduction"] = {
            **reduction, "best_search_full": full,
            "best_search_estimate": estimate if estimate is not None or scored_in_full(
                best, reduced=True) else dict(zip(names, best.values)),
            "scored_in_full": sum(scored_in_full(t, reduced=True) for t in complete),
            "scored_on_half": sum(t.user_attrs.get(RESULT, {}).get("fidelity") == "half"
                                  for t in complete),
            "sources_search_full": sources_full, "rescored": rescored}
    write_atomic(run_dir / SUMMARY, json.dumps(summary, indent=2))
    plots = plot_run(run_dir, complete, pareto, objectives, sources, best=best,
                     estimated=reduction is not None)
    upload_plots(store, run_dir, plots)
    return summary


def best_rule(objectives: list, rescore: int = 0, reduction: dict[str, Any] | None = None
              ) -> str:
    """How finish_run picks "the best" (see ``_score``, ``_earliest``, ``_rescore``), in words:
    summary.json's ``best.rule`` and the final table's caption."""
    if len(objectives) == 1:
        obj = objectives[0]
        rule = (f"the trial with the {'largest' if obj.direction == 'maximize' else 'smallest'} "
                f"{obj.name}")
    else:
        rule = ("the trial with the largest mean of the objectives, each signed so that larger "
                "is better (minimized ones negated)")
    racing = reduction is not None and (reduction.get("warmup") or reduction.get("race"))
    if racing:
        rule += (" on all search items, among the trials the search scored in full (warmup "
                 "and raced candidates)")
        if rescore > 0:
            rule += f" and the {rescore} best IRT estimates, re-scored in full"
    elif rescore > 0:
        rule += (f", by its full re-score on all search items, among the {rescore} best by "
                 "their IRT estimates")
    elif len(objectives) > 1:
        rule = rule.replace("the trial", "the Pareto-optimal trial", 1)
    return rule + "; ties go to the earliest slot (generation, then candidate)"


def _say(progress: bool, line: str) -> None:
    if progress:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stdout, flush=True)


ARTIFACTS = "artifacts"


def upload_plots(store: Store, run_dir: Path, paths: Sequence[Path]) -> Path | None:
    """The plots as study artifacts (optuna-dashboard shows them with ``--artifact-dir
    RUN_DIR/artifacts``): files in RUN_DIR/artifacts, their entries in the study (wherever the
    study lives: SQLite, a journal, PostgreSQL). A resumed run rewrites an entry's file rather
    than adding a second entry of the same name. A failure only warns: the run is done."""
    import warnings

    from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact

    where = run_dir / ARTIFACTS
    try:
        where.mkdir(exist_ok=True)
        artifacts = FileSystemArtifactStore(where)
        known = {meta.filename: meta.artifact_id
                 for meta in get_all_artifact_meta(store.study)}
        for path in paths:
            if path.name in known:
                with open(path, "rb") as fh:
                    artifacts.write(known[path.name], fh)
            else:
                upload_artifact(artifact_store=artifacts, file_path=str(path),
                                study_or_trial=store.study)
    except Exception as exc:  # noqa: BLE001 - the dashboard's copy of plots on disk already
        warnings.warn(f"the plots were not added to the study's artifacts ({where}): "
                      f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
        return None
    return where


def _workers(trials: list[FrozenTrial]) -> dict[str, dict[str, Any]]:
    """Where the trials ran: per worker (``host:pid``; ``in-process`` for the driver's own
    evaluations) its device, dtype and GPU as it recorded them, and its number of trials."""
    out: dict[str, dict[str, Any]] = {}
    for trial in trials:
        where = trial.user_attrs.get(RESULT, {}).get("worker")
        if where:
            entry = out.setdefault(trial.system_attrs.get(OWNER, "in-process"),
                                   {**where, "trials": 0})
            entry["trials"] += 1
    return out


def _timings(trials: list[FrozenTrial]) -> dict[str, float]:
    out = {}
    for key in ("build_s", "eval_s"):
        vals = [t.user_attrs[RESULT][key] for t in trials if key in t.user_attrs.get(RESULT, {})]
        if vals:
            out[f"mean_{key}"] = round(float(np.mean(vals)), 6)
    return out


# ---- plots -----------------------------------------------------------------------------------


def plot_run(run_dir: Path, trials: list[FrozenTrial], pareto: list[FrozenTrial],
             objectives: list, sources: dict[str, dict[str, float]], *,
             best: FrozenTrial | None = None, estimated: bool = False) -> list[Path]:
    """convergence.png (every objective per trial, best so far); pareto.png for 2+ objectives.
    ``best``: the run's best, circled on both; ``estimated``: trial values are IRT estimates
    (the axes say so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def label(name: str) -> str:
        return f"{name} (IRT estimate)" if estimated else name

    def mark(ax: Any, x: float, y: float) -> None:
        ax.scatter([x], [y], s=160, facecolors="none", edgecolors="black", linewidths=1.5,
                   zorder=5, label=f"best (trial {best.number})")

    written = []
    trials = sorted(trials, key=lambda t: t.number)
    fig, axes = plt.subplots(1, len(objectives), figsize=(5 * len(objectives), 3.6), squeeze=False)
    for k, (ax, obj) in enumerate(zip(axes[0], objectives)):
        xs = np.arange(1, len(trials) + 1)
        ys = np.array([t.values[k] for t in trials])
        running = (np.maximum if obj.direction == "maximize" else np.minimum).accumulate(ys)
        ax.scatter(xs, ys, s=8, alpha=0.5, label="candidate")
        ax.plot(xs, running, color="C3", label="best so far")
        for j, (name, vals) in enumerate(sources.items()):
            ax.axhline(vals[obj.name], ls="--", lw=0.8, color=f"C{j + 4}", label=name)
        at = [i for i, t in enumerate(trials) if best is not None and t.number == best.number]
        if at:
            mark(ax, xs[at[0]], ys[at[0]])
        ax.set_xlabel("evaluation")
        ax.set_ylabel(label(obj.name))
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, run_dir / "convergence.png"))
    if len(objectives) >= 2:
        fig, ax = plt.subplots(figsize=(5, 4.5))
        ax.scatter([t.values[0] for t in trials], [t.values[1] for t in trials], s=8, alpha=0.4,
                   label="candidates")
        front = sorted(pareto, key=lambda t: t.values[0])
        ax.plot([t.values[0] for t in front], [t.values[1] for t in front], "o-", color="C3",
                label="Pareto front")
        for j, (name, vals) in enumerate(sources.items()):
            ax.scatter([vals[objectives[0].name]], [vals[objectives[1].name]], marker="*", s=120,
                       color=f"C{j + 4}", label=name)
        if best is not None:
            mark(ax, best.values[0], best.values[1])
        ax.set_xlabel(label(objectives[0].name))
        ax.set_ylabel(label(objectives[1].name))
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, run_dir / "pareto.png"))
    plt.close("all")
    return written


def _save(fig: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path


def print_summary(summary: dict[str, Any], console: Any) -> None:
    """The final table: best vs every source, per objective, on search and held-out items;
    its caption says how the best was picked and, for an IRT-reduced fitness, which search
    scores are estimates; then where the best recipe and model are."""
    from rich.markup import escape
    from rich.table import Table

    names = [o["name"] for o in summary["objectives"]]
    reduced = summary.get("fitness_reduction")
    caption = [f"best: {summary['best'].get('rule', 'see summary.json')}."]
    if reduced:
        caption.append(
            f"search (IRT estimate): the {reduced.get('estimator', 'IRT')} estimate from "
            f"{reduced.get('items_per_candidate', '?')} anchor items of "
            f"{reduced.get('full_items', '?')}; search (full): every search item; held-out: "
            "every held-out item.")
        full_n = reduced.get("scored_in_full")
        if full_n is not None:
            scored = summary["n_trials"] - summary["n_failed"]
            half_n = reduced.get("scored_on_half") or 0
            half = (f", estimates from the anchors and half the other items for {half_n}"
                    if half_n else "")
            caption.append(f"The search saw full scores for {full_n} of its {scored} candidates "
                           f"(warmup and racing){half} and anchor estimates for the rest."
                           if full_n else
                           f"The search saw estimates for all its {scored} candidates.")
    spent = (summary.get("item_evaluations") or {}).get("total")
    if spent and (reduced or summary.get("budget_items")):
        cap = summary.get("budget_items")
        caption.append(f"Item evaluations spent: {spent:,}"
                       + (f" (budget_items {cap:,})." if cap else "."))
    table = Table(title=f"{summary['experiment']}: {summary['n_trials']} trials "
                        f"({summary['n_failed']} failed) in {summary['wall_s']:.1f} s",
                  title_justify="left", caption=escape(" ".join(caption)),
                  caption_justify="left")
    table.add_column("model")
    for n in names:
        if reduced:
            table.add_column(f"{n} search (IRT estimate)", justify="right")
            table.add_column(f"{n} search (full)", justify="right")
        else:
            table.add_column(f"{n} (search)", justify="right")
        table.add_column(f"{n} (held-out)", justify="right")
    full = (reduced or {}).get("sources_search_full", {})
    # the best's estimate (None: the warmup scored it in full and nothing estimated it)
    estimate = (reduced or {}).get("best_search_estimate", summary["best"]["objectives"])
    rows = {"best": (estimate if reduced else summary["best"]["objectives"],
                     (reduced or {}).get("best_search_full"), summary["final"]["best"])}
    rows |= {m: (summary["sources"].get(m), full.get(m), held)
             for m, held in summary["final"].items()
             if m != "best"}  # sources, then merges a DFS space routes through
    if "search" in summary.get("base", {}):
        rows["base (not a source)"] = (summary["base"]["search"], None,
                                       summary["base"]["heldout"])

    def cell(scores: dict[str, float] | None, n: str) -> str:
        return f"{scores[n]:.4f}" if scores else "-"

    for model, (search, search_full, heldout) in rows.items():
        cells = []
        for n in names:
            cells += [cell(search, n), *([cell(search_full, n)] if reduced else []),
                      cell(heldout, n)]
        label = (f"[bold]best (trial {summary['best']['trial']})[/bold]" if model == "best"
                 else escape(model))
        table.add_row(label, *cells)
    if console.is_terminal:
        console.print(table)
    else:  # a log: its natural width (a file does not wrap), never squeezed to 80 columns
        from rich.measure import Measurement

        natural = Measurement.get(console, console.options.update_width(10_000), table).maximum
        width = console.width
        console.width = max(width, min(natural, 400))
        try:
            console.print(table)
        finally:
            console.width = width
    outputs = summary.get("outputs") or {}
    if outputs.get("best_recipe"):
        console.print(f"Best recipe: {escape(outputs['best_recipe'])}", soft_wrap=True)
    if outputs.get("best_model"):
        console.print(f"Best model:  {escape(outputs['best_model'])}/", soft_wrap=True)
