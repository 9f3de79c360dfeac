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
from typing import Any

import numpy as np
from optuna.trial import FrozenTrial, TrialState

from evomerge.merge.layerstack import parse_recipe
from evomerge.store import INTERRUPTED, META, OWNER, RESULT, Store

SUMMARY = "summary.json"
BEST_RECIPE = "best_recipe.yaml"
BEST_MODEL = "best_model"


def write_atomic(path: Path, text: str) -> None:
    """``text`` to ``path`` via a temporary file and a rename, with the mode a plain ``open``
    would give (0644 minus the umask; mkstemp's temporary files are 0600)."""
    from evomerge.merge.io import _umask

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_provenance(run_dir: Path, experiment: Any, *, resumed: bool) -> None:
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


class _Bar:
    def __init__(self, progress: Any, task: Any) -> None:
        self.progress, self.task = progress, task

    def update(self, done: int, best: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done, best=best)


@contextmanager
def progress_bar(budget: int, *, enabled: bool = True) -> Iterator[_Bar]:
    """trials done/budget, best so far, elapsed and ETA."""
    if not enabled:
        yield _Bar(None, None)
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    columns = (TextColumn("trials"), BarColumn(), MofNCompleteColumn(),
               TextColumn("best {task.fields[best]}"), TimeElapsedColumn(), TextColumn("ETA"),
               TimeRemainingColumn())
    with Progress(*columns) as progress:
        task = progress.add_task("search", total=budget, best="-")
        yield _Bar(progress, task)


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


def _rescore(complete: list[FrozenTrial], objectives: list, evaluator: Any, k: int,
             objs: Callable[[Any], dict[str, float]]
             ) -> tuple[FrozenTrial, list[dict[str, Any]]]:
    """The winner's-curse guard of a reduced fitness: the ``k`` best trials by their estimates
    are scored on the full search items and the best of those full scores wins.

    A search that keeps the maximum of hundreds of noisy estimates picks one the noise
    flattered; on the tiny-LM zoo re-ranking the top 8 on all search items raised the
    held-out score of the PS winner from 0.655 to 0.669 (M2N2: 0.651 to 0.658), measured.
    """
    top = sorted(complete, key=lambda t: (_score(t, objectives), *_earliest(t)),
                 reverse=True)[:k]
    rows, scored = [], []
    for trial in top:
        model = evaluator.build(parse_recipe(trial.user_attrs[META]["recipe"]))
        full = objs(evaluator.inner.evaluate(model, "search"))
        rows.append({"trial": trial.number, "estimate": dict(zip(full, trial.values)),
                     "full": full})
        scored.append(((_score(list(full.values()), objectives), *_earliest(trial)), trial))
    return max(scored, key=lambda pair: pair[0])[1], rows


def write_strategy_report(strategy: Any, run_dir: Path) -> None:
    """Surrogate strategies (MAP) report their surrogates' error: RUN_DIR/surrogate.json."""
    report = getattr(strategy, "surrogate_report", None)
    if callable(report):
        write_atomic(run_dir / "surrogate.json", json.dumps(report(), indent=2))


def finish_run(plan: Any, store: Store, evaluator: Any, *, wall_s: float,
               reduction: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score best and sources on both splits, export the best, plot, write summary.json.

    With an IRT-reduced fitness (``reduction``: its calibration facts), trial values and the
    sources' ``search`` scores are estimates from anchor items; ``final`` (held-out) scores are
    always full evaluations.
    """
    from evomerge.merge.io import export_dtype, export_model

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
    if reduction is not None and reduction.get("rescore", 0) > 0:
        best, rescored = _rescore(complete, objectives, evaluator, reduction["rescore"], objs)
    recipe = parse_recipe(best.user_attrs[META]["recipe"])
    write_atomic(run_dir / BEST_RECIPE, recipe.to_yaml())

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
        "objectives": [{"name": o.name, "direction": o.direction} for o in objectives],
        "best": {"trial": best.number, "objectives": dict(zip(names, best.values)),
                 "recipe": recipe.to_dict()},
        "pareto": [{"trial": t.number, "objectives": dict(zip(names, t.values))}
                   for t in sorted(pareto, key=lambda t: t.number)],
        "sources": sources,
        "final": final,
        **({"base": base_scores} if base_scores else {}),
        "timing": _timings(complete),
        "devices": {"driver": getattr(evaluator, "placement", None),
                    "workers": _workers(trials)},
        "storage": store.url,
    }
    if reduction is not None:
        # the search saw estimates from anchor items; the best's full search score shows how
        # far the search's pick of anchors flattered it (the re-scoring measured it already)
        full = next((r["full"] for r in rescored if r["trial"] == best.number), None)
        if full is None:
            full = objs(evaluator.inner.evaluate(evaluator.build(recipe), "search"))
        summary["fitness_reduction"] = {**reduction, "best_search_full": full,
                                        "rescored": rescored}
    write_atomic(run_dir / SUMMARY, json.dumps(summary, indent=2))
    plot_run(run_dir, complete, pareto, objectives, sources)
    return summary


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
             objectives: list, sources: dict[str, dict[str, float]]) -> list[Path]:
    """convergence.png (every objective per trial, best so far); pareto.png for 2+ objectives."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        ax.set_xlabel("evaluation")
        ax.set_ylabel(obj.name)
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
        ax.set_xlabel(objectives[0].name)
        ax.set_ylabel(objectives[1].name)
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
    """The final table: best vs every source, per objective, on search and held-out items."""
    from rich.table import Table

    names = [o["name"] for o in summary["objectives"]]
    table = Table(title=f"{summary['experiment']}: {summary['n_trials']} trials "
                        f"({summary['n_failed']} failed) in {summary['wall_s']:.1f} s",
                  title_justify="left")
    table.add_column("model")
    for n in names:
        table.add_column(f"{n} (search)", justify="right")
        table.add_column(f"{n} (held-out)", justify="right")
    rows = {"best": (summary["best"]["objectives"], summary["final"]["best"])}
    rows |= {m: (summary["sources"].get(m), held) for m, held in summary["final"].items()
             if m != "best"}  # sources, then merges a DFS space routes through
    if "search" in summary.get("base", {}):
        rows["base (not a source)"] = (summary["base"]["search"], summary["base"]["heldout"])
    for model, (search, heldout) in rows.items():
        cells = []
        for n in names:
            cells += [f"{search[n]:.4f}" if search else "-", f"{heldout[n]:.4f}"]
        label = f"[bold]best (trial {summary['best']['trial']})[/bold]" if model == "best" else model
        table.add_row(label, *cells)
    console.print(table)
