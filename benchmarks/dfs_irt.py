#!/usr/bin/env python
"""Can a DFS run search on IRT anchors? The local calibration design against the uniform one,
with the PS space's IRT error on the same zoo for reference.

A run's reduction (``fitness.reduced``) is fitted on the sources plus a design of candidates
from the run's own space (:func:`evomerge.fitness.reduced.calibration_design`). For DFS a
uniform design is mostly broken layer paths; the local design perturbs the start path (flips 1
to 4 inclusion switches, jitters the hop scales by 0.1 of their range). This script scores, on
every search item of ``experiments/tinylm_dfs.yaml`` (zoo ``models/tiny-lm``):

* the sources; per seed, a local and a uniform design of ``--design`` paths;
* held-out paths a search would score: CMA-ES-like draws ``clip(start + sigma * range * N(0, I))``
  at the shipped ``sigma0`` (0.15) and at twice it, none of them in any design;

and for reference ``experiments/tinylm_ps_cmaes.yaml`` (its own uniform design, which a PS run
calibrates on; held-out: CMA-ES-like draws from the centre at its ``sigma0``, 0.2). For every
(space, design, held-out set, estimator, anchors per task) it fits on the sources + design
(:func:`evomerge.fitness.reduced.validate`) and reports, as mean ± std over the seeds, the MAE
over (path, task) of the estimated minus the full accuracy in points, and the Spearman rank
correlation of the estimated vs full macro-mean accuracy over the held-out paths. Every response
row is cached as JSON under ``--out`` (a rerun re-fits without re-scoring).

Verdict (:func:`verdict`): DFS IRT validates when, for gp-IRT at ``--decide-anchors`` per task
on the sigma0 held-out paths, the local design's mean MAE is at most 1.5x the PS space's and its
mean Spearman is at least 0.8.

Usage::

    python benchmarks/dfs_irt.py --threads 1                  # 11 min on 2 shared cores
    python benchmarks/dfs_irt.py --threads 1 --write-results  # and rewrite RESULTS.md's section
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_name, loadavg, run_main

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- dfs_irt:start -->", "<!-- dfs_irt:end -->"
ESTIMATORS = ("anchor", "p-irt", "gp-irt", "mp-irt", "gmp-irt")
#: what a verdict needs: local-design MAE within this factor of PS's, Spearman at least this
MAE_FACTOR, MIN_SPEARMAN = 1.5, 0.8
#: a candidate "works" when its full macro-mean accuracy is at least this (broken paths: ~0)
WORKING = 0.1


def heldout_points(center: np.ndarray, lower: np.ndarray, upper: np.ndarray, n: int,
                   sigma: float, seed: int) -> np.ndarray:
    """``n`` CMA-ES-like draws: ``clip(center + sigma * (upper - lower) * N(0, I))``."""
    rng = np.random.default_rng(seed)
    step = sigma * (np.asarray(upper) - np.asarray(lower))
    return np.clip(center + rng.normal(size=(n, len(center))) * step, lower, upper)


def experiment_data(name: str, zoo: Path | None, max_items: int | None,
                    run_dir: Path) -> dict[str, Any]:
    """A shipped experiment without its ``reduced`` block, its models absolute (or from
    ``zoo``), its fitness limited to ``max_items`` items per task when given."""
    data = yaml.safe_load((REPO / "experiments" / f"{name}.yaml").read_text())
    data = copy.deepcopy(data)
    models = data["models"]
    rebase = ((lambda p: str(zoo / Path(p).name)) if zoo is not None
              else (lambda p: str(REPO / p)))
    models["base"] = rebase(models["base"])
    models["sources"] = {k: rebase(v) for k, v in models["sources"].items()}
    data["fitness"].pop("reduced", None)
    if max_items is not None:
        data["fitness"]["max_items"] = max_items
    data["run_dir"] = str(run_dir)
    return data


def summarise(values: list[float | None]) -> dict[str, float | None]:
    """Mean and (population) std over seeds, None where a seed had no value."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)}


def macro(responses: dict[str, np.ndarray]) -> np.ndarray:
    """Macro-mean accuracy over tasks, one per response row."""
    return np.mean([y.mean(axis=1) for y in responses.values()], axis=0)


def stack(*parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {t: np.concatenate([p[t] for p in parts]) for t in parts[0]}


def score_space(name: str, args: argparse.Namespace, heldout_sigmas: dict[str, float],
                designs: tuple[str, ...]) -> dict[str, Any]:
    """Response rows of one experiment's sources, designs (per seed) and held-out sets."""
    from evomerge.execution.devices import torch_threads
    from evomerge.execution.evaluator import evaluator_for
    from evomerge.execution.plan import Plan
    from evomerge.experiment import Experiment
    from evomerge.fitness.reduced import (
        cached_responses,
        calibration_design,
        source_recipe,
        uniform_design,
    )

    out = args.out.absolute() / name
    experiment = Experiment.from_dict(experiment_data(name, args.zoo, args.max_items, out))
    plan = Plan(experiment)
    space = plan.space
    fingerprint = {"fitness": experiment.fitness.name, "options": experiment.fitness.options,
                   "models": experiment.models.model_dump(mode="json")}
    evaluator = None
    counts = {"candidates": 0, "scored": 0}

    def score(recipes: list) -> list:
        nonlocal evaluator
        if evaluator is None:
            evaluator = evaluator_for(plan.experiment, reduced=False)
        counts["scored"] += len(recipes)
        started = time.perf_counter()
        rows = []
        for i, recipe in enumerate(recipes):
            rows.append(evaluator.score_items([recipe])[0])
            if (i + 1) % 10 == 0:
                print(f"  {name}: {i + 1}/{len(recipes)} scored "
                      f"({(time.perf_counter() - started) / (i + 1):.2f} s each)",
                      file=sys.stderr)
        return rows

    def responses(recipes: list) -> dict[str, np.ndarray]:
        counts["candidates"] += len(recipes)
        return cached_responses(score, recipes, out / "cache", fingerprint)[0]

    start = getattr(space, "start_point", None)
    center = start if start is not None else (space.lower + space.upper) / 2
    switches = len(getattr(space, "slots", ()))
    with torch_threads(args.threads):
        result = {"dim": space.dim, "switches": switches,
                  "sources": responses([source_recipe(p)
                                        for p in experiment.models.sources.values()])}
        for kind in designs:
            result[kind] = []
            for seed in range(args.seeds):
                # local: exactly the design a reduced DFS run calibrates on
                points = (calibration_design(space, args.design, seed)[0] if kind == "local"
                          else uniform_design(space.lower, space.upper, args.design, seed))
                result[kind].append(responses([space.decode(x) for x in points]))
        result["heldout"] = {}
        for label, sigma in heldout_sigmas.items():
            points = heldout_points(center, space.lower, space.upper, args.heldout, sigma,
                                    seed=1000 + round(1000 * sigma))
            result["heldout"][label] = responses([space.decode(x) for x in points])
    result["counts"] = counts
    return result


def working_spearman(reduction: Any, test: dict[str, np.ndarray],
                     estimator: str) -> float | None:
    """Spearman of estimated vs full macro-mean accuracy over the held-out candidates that
    work (full macro-mean >= WORKING): the ranking a search needs once broken paths are
    told apart (None with fewer than 3 such candidates or a constant side)."""
    from scipy.stats import spearmanr

    from evomerge.fitness.reduced import estimate_task

    truth = macro(test)
    keep = np.flatnonzero(truth >= WORKING)
    if len(keep) < 3:
        return None
    est = [np.mean([estimate_task(reduction, estimator, t, y[j]) for t, y in test.items()])
           for j in keep]
    rho = float(spearmanr(est, truth[keep]).statistic)
    return None if np.isnan(rho) else rho


def evaluate(scored: dict[str, Any], design: str, heldout: str,
             args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (estimator, anchors): MAE and Spearman over all held-out candidates, and
    Spearman over the working ones, mean ± std over the seeds."""
    from evomerge.fitness.irt import Reduction
    from evomerge.fitness.reduced import validate

    sources, test = scored["sources"], scored["heldout"][heldout]
    endpoints = len(macro(sources))
    per_seed = []
    for seed, train in enumerate(scored[design]):
        rows = validate(stack(sources, train, test), num_endpoints=endpoints,
                        num_train=args.design, anchors=args.anchors, estimators=ESTIMATORS,
                        dim=args.dim, seed=seed)
        fitted = {k: Reduction.build(stack(sources, train), num_endpoints=endpoints,
                                     anchors=k, dim=args.dim, seed=seed)
                  for k in args.anchors}  # the fits validate made (same inputs, same seed)
        for r in rows:
            r["spearman_working"] = working_spearman(fitted[r["anchors"]], test,
                                                     r["estimator"])
        per_seed.append(rows)
    return [{"estimator": first["estimator"], "anchors": first["anchors"],
             "reduction": first["reduction"],
             **{k: summarise([s[i][k] for s in per_seed])
                for k in ("mae_points", "spearman", "spearman_working")}}
            for i, first in enumerate(per_seed[0])]


def spread(responses: dict[str, np.ndarray]) -> dict[str, float]:
    """How varied a set of models is: its macro-mean accuracy's mean, std, min, max."""
    m = macro(responses)
    return {"mean": float(m.mean()), "std": float(m.std()), "min": float(m.min()),
            "max": float(m.max())}


def verdict(dfs_rows: list[dict[str, Any]], ps_rows: list[dict[str, Any]],
            anchors: int) -> dict[str, Any]:
    """Does the local design make IRT usable for DFS? gp-IRT at ``anchors`` per task: DFS MAE
    <= MAE_FACTOR x PS MAE and DFS Spearman >= MIN_SPEARMAN (means over seeds)."""
    def pick(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return next(r for r in rows if r["estimator"] == "gp-irt" and r["anchors"] == anchors)

    dfs, ps = pick(dfs_rows), pick(ps_rows)
    mae, ps_mae = dfs["mae_points"]["mean"], ps["mae_points"]["mean"]
    rho = dfs["spearman"]["mean"]
    ok = mae <= MAE_FACTOR * ps_mae and rho is not None and rho >= MIN_SPEARMAN
    return {"validates": bool(ok), "anchors": anchors, "dfs_mae": mae, "ps_mae": ps_mae,
            "dfs_spearman": rho}


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_start, clock = loadavg(), time.perf_counter()
    dfs = score_space("tinylm_dfs", args, {"sigma0": args.sigma, "2 sigma0": 2 * args.sigma},
                      ("local", "uniform"))
    ps = score_space("tinylm_ps_cmaes", args, {"sigma0": args.ps_sigma}, ("uniform",))
    tables = {
        ("DFS", "local", "sigma0"): evaluate(dfs, "local", "sigma0", args),
        ("DFS", "local", "2 sigma0"): evaluate(dfs, "local", "2 sigma0", args),
        ("DFS", "uniform", "sigma0"): evaluate(dfs, "uniform", "sigma0", args),
        ("PS", "uniform", "sigma0"): evaluate(ps, "uniform", "sigma0", args),
    }
    models = {
        "DFS local design": spread(stack(*dfs["local"])),
        "DFS uniform design": spread(stack(*dfs["uniform"])),
        "DFS held-out sigma0": spread(dfs["heldout"]["sigma0"]),
        "DFS held-out 2 sigma0": spread(dfs["heldout"]["2 sigma0"]),
        "DFS sources": spread(dfs["sources"]),
        "PS uniform design": spread(stack(*ps["uniform"])),
        "PS held-out sigma0": spread(ps["heldout"]["sigma0"]),
    }
    items = {t: int(y.shape[1]) for t, y in dfs["sources"].items()}
    return {"started": started, "cpu": cpu_name(), "wall_s": time.perf_counter() - clock,
            "candidates": dfs["counts"]["candidates"] + ps["counts"]["candidates"],
            "scored": dfs["counts"]["scored"] + ps["counts"]["scored"],
            "loadavg_1min": {"start": load_start, "end": loadavg()},
            "settings": {"seeds": args.seeds, "design": args.design, "heldout": args.heldout,
                         "sigma": args.sigma, "ps_sigma": args.ps_sigma, "dim": args.dim,
                         "anchors": args.anchors, "items": items, "dfs_dim": dfs["dim"],
                         "ps_dim": ps["dim"], "zoo": str(args.zoo or "models/tiny-lm")},
            "models": models,
            "tables": [{"space": s, "design": d, "heldout": h, "rows": rows}
                       for (s, d, h), rows in tables.items()],
            "verdict": verdict(tables[("DFS", "local", "sigma0")],
                               tables[("PS", "uniform", "sigma0")], args.decide_anchors)}


def _pm(stat: dict[str, float | None], digits: int) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    s, v = result["settings"], result["verdict"]
    load = result["loadavg_1min"]

    def fmt(x: float | None) -> str:
        return "?" if x is None else f"{x:.1f}"

    items = ", ".join(f"{t} {n}" for t, n in s["items"].items())
    lines = [START, "## dfs_irt: IRT reduction for DFS runs (local calibration design)", "",
             (f"- `python benchmarks/dfs_irt.py --threads 1 --seeds {s['seeds']} --design "
              f"{s['design']} --heldout {s['heldout']}`; {result['cpu']}; "
              f"{result['started']}; {result['wall_s']:.0f} s, {result['scored']} of "
              f"{result['candidates']} candidates scored by this invocation (the others read "
              "from the responses cached under `--out`); 1-min load average "
              f"{fmt(load['start'])} at start, {fmt(load['end'])} at end."),
             (f"- Zoo `{s['zoo']}`, search items {items}. DFS: `experiments/tinylm_dfs.yaml` "
              f"(dim {s['dfs_dim']}); PS reference: `experiments/tinylm_ps_cmaes.yaml` (dim "
              f"{s['ps_dim']}). Fit on the sources + {s['design']} design candidates (IRT dim "
              f"{s['dim']}), scored on {s['heldout']} held-out candidates drawn CMA-ES-like, "
              f"`clip(start + sigma * range * N(0, I))`: DFS from the start path with sigma0 = "
              f"{s['sigma']} (the experiment's) or twice it, PS from the centre with sigma0 = "
              f"{s['ps_sigma']}. Local design: 1-4 inclusion switches flipped around the start, "
              "hop scales jittered by 0.1 of their range. Mean ± std over "
              f"{s['seeds']} seeds (design draw and k-means). MAE in accuracy points over "
              "(candidate, task); Spearman of the macro-mean accuracy over held-out candidates."),
             "", "| models | macro-mean accuracy: mean | std | min | max |", "|---|---:|---:|---:|---:|"]
    for name, m in result["models"].items():
        lines.append(f"| {name} | {m['mean']:.3f} | {m['std']:.3f} | {m['min']:.3f} | "
                     f"{m['max']:.3f} |")
    lines += ["", ("| space | design | held-out | estimator | anchors/task | MAE (points) | "
                   f"Spearman | Spearman, working (>= {WORKING}) | reduction |"),
              "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for table in result["tables"]:
        for r in table["rows"]:
            lines.append(f"| {table['space']} | {table['design']} | {table['heldout']} | "
                         f"{r['estimator']} | {r['anchors']} | {_pm(r['mae_points'], 2)} | "
                         f"{_pm(r['spearman'], 3)} | {_pm(r['spearman_working'], 3)} | "
                         f"{r['reduction']:.1f}x |")
    word = "validates" if v["validates"] else "does not validate"
    rho = "n/a" if v["dfs_spearman"] is None else f"{v['dfs_spearman']:.3f}"
    lines += ["", (f"Verdict: DFS IRT with the local design **{word}** (gp-IRT, {v['anchors']} "
                   f"anchors/task, sigma0 held-out: MAE {v['dfs_mae']:.2f} points against PS "
                   f"{v['ps_mae']:.2f}, bound {MAE_FACTOR}x; Spearman {rho}, bound "
                   f"{MIN_SPEARMAN})."), END]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "dfs_irt",
                   help="where the scored responses are cached")
    p.add_argument("--zoo", type=Path, default=None,
                   help="a tiny-LM zoo directory instead of models/tiny-lm")
    p.add_argument("--max-items", type=int, default=None,
                   help="score only the first N items per task (smoke runs)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--design", type=int, default=40, help="design candidates per seed")
    p.add_argument("--heldout", type=int, default=30, help="held-out candidates per set")
    p.add_argument("--sigma", type=float, default=0.15, help="DFS held-out sigma0")
    p.add_argument("--ps-sigma", type=float, default=0.2, help="PS held-out sigma0")
    p.add_argument("--anchors", type=int, nargs="+", default=[15, 20])
    p.add_argument("--decide-anchors", type=int, default=15)
    p.add_argument("--dim", type=int, default=2, help="IRT dimension")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--write-results", action="store_true",
                   help="rewrite the dfs_irt section of benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    problems = [f"--{k.replace('_', '-')}: expected >= {low}, got {getattr(args, k)}"
                for k, low in (("seeds", 1), ("design", 1), ("heldout", 3), ("dim", 1),
                               ("threads", 1)) if getattr(args, k) < low]
    if args.decide_anchors not in args.anchors:
        problems.append(f"--decide-anchors {args.decide_anchors} is not one of --anchors "
                        f"{args.anchors}")
    if problems:
        p.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, parse_args, run, markdown, START, END)


if __name__ == "__main__":
    sys.exit(main())
