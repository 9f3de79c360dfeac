#!/usr/bin/env python
"""MAP vs NSGA-II on the digits experts: hypervolume of the real front after k evaluations.

Two objectives, accuracy on digits 0-4 and on digits 5-9, of task-arithmetic merges of the two
digits experts (the zoo's ``expert_0_4`` and ``expert_5_9``). Every strategy is driven exactly as
the run driver does (ask a generation, evaluate, tell it; a last generation cut by the budget is
evaluated only in part and never told), with the real digits fitness and merge engine, and the
front after the first ``k`` evaluations is scored by pymoo's hypervolume indicator against the
fixed reference point (accuracy 0, accuracy 0), so a front at (1, 1) would score 1.

Configurations (``--configs``):

* ``map``: ``experiments/digits_map.yaml`` (one weight per expert in [0, 1.5]; 16 design points,
  then rounds of 16 front points).
* ``map-bayes``: the same plus Bayesian MAP (1 round of 16 points before the front).
* ``nsga2``: ``experiments/digits_nsga2.yaml`` as shipped (per-layer weights, popsize 16).
* ``nsga2-source``: NSGA-II, popsize 16, on MAP's space (one weight per expert).

For the MAP configurations the table also gives the surrogate's error after the last ``k``:
leave-one-out MAE / R^2 of the last fit (on the points it was fitted to) and the MAE at the
front points, each predicted before it was evaluated (mean over objectives and seeds).

Usage::

    python benchmarks/map_front.py                        # table on stderr
    python benchmarks/map_front.py --quick --json         # 2 seeds, k up to 32
    python benchmarks/map_front.py --write-results        # rewrites the `map` section of RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_name, loadavg, stdout_to_stderr, write_section

REPO = Path(__file__).resolve().parents[1]
RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"
START, END = "<!-- map:start -->", "<!-- map:end -->"
CONFIGS = ("map", "map-bayes", "nsga2", "nsga2-source")


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def hypervolume(values: np.ndarray) -> float:
    """Hypervolume of maximised accuracies against the reference point (0, 0)."""
    from pymoo.indicators.hv import HV

    F = -np.asarray(values, dtype=float)  # pymoo minimises
    return float(HV(ref_point=np.zeros(F.shape[1]))(F)) if len(F) else 0.0


def experiment_data(config: str, zoo: dict[str, Path], seed: int) -> dict[str, Any]:
    """The shipped experiment YAML of a configuration, with the zoo's model paths and a seed."""
    name = "digits_nsga2" if config == "nsga2" else "digits_map"
    data = yaml.safe_load((REPO / "experiments" / f"{name}.yaml").read_text())
    data["models"] = {"base": str(zoo["base"]),
                      "sources": {k: str(zoo[k]) for k in data["models"]["sources"]}}
    data["seed"] = seed
    if config == "map-bayes":
        data["strategy"]["bayesian"] = {"rounds": 1, "per_round": 16}
    if config == "nsga2-source":
        data["strategy"] = {"name": "nsga2", "popsize": 16}
    return data


def run_one(config: str, zoo: dict[str, Path], seed: int, ks: list[int],
            run_dir: Path) -> dict[str, Any]:
    """Drive one strategy for max(ks) evaluations; HV at each k, surrogate error for MAP."""
    from evomerge.execution.driver import Plan
    from evomerge.execution.worker import evaluator_for
    from evomerge.experiment import Experiment

    experiment = Experiment.from_dict({**experiment_data(config, zoo, seed),
                                       "run_dir": str(run_dir)})
    plan = Plan(experiment)
    evaluator = evaluator_for(plan.experiment)
    strategy = plan.new_strategy()
    budget, values, reports = max(ks), [], {}
    started = time.perf_counter()
    while len(values) < budget:
        cands = strategy.ask()
        told = []
        for cand in cands[:budget - len(values)]:
            result, _ = evaluator.evaluate(plan.space.decode(cand.x))
            told.append(result.values(plan.objectives))
            values.append(told[-1])
            if len(values) in ks and hasattr(strategy, "surrogate_report"):
                reports[len(values)] = "pending"
        if len(told) == len(cands):
            strategy.tell(cands, told)
        for k in [k for k, r in reports.items() if r == "pending"]:
            reports[k] = _surrogate_error(strategy.surrogate_report())
    V = np.array(values)
    return {"config": config, "seed": seed, "dim": plan.space.dim,
            "hv": {k: hypervolume(V[:k]) for k in ks},
            "surrogate": reports or None, "seconds": time.perf_counter() - started}


def _surrogate_error(report: dict[str, Any]) -> dict[str, float | None]:
    """Mean over objectives of the LOO MAE / R^2 and of the front-point MAE."""
    def mean(xs: list) -> float | None:
        xs = [x for x in xs if x is not None]
        return float(np.mean(xs)) if xs else None

    loo = [s["loo"] for s in report["surrogates"]]
    return {"n_fit": report.get("n_fit"), "loo_mae": mean([e["mae"] for e in loo]),
            "loo_r2": mean([e["r2"] for e in loo]),
            "front_mae": mean([e["mae"] for e in report["front"]]) if report["front"] else None,
            "n_front": report["front"][0]["n"] if report["front"] else 0}


def summarise(runs: list[dict[str, Any]], ks: list[int]) -> list[dict[str, Any]]:
    """Per configuration and k: HV mean and std over seeds, and the surrogate's mean error."""
    rows = []
    for config in dict.fromkeys(r["config"] for r in runs):
        mine = [r for r in runs if r["config"] == config]
        for k in ks:
            hv = np.array([r["hv"][k] for r in mine])
            errs = [r["surrogate"][k] for r in mine if r["surrogate"] and k in r["surrogate"]]
            row = {"config": config, "k": k, "hv_mean": float(hv.mean()),
                   "hv_std": float(hv.std()), "seeds": len(hv)}
            for key in ("loo_mae", "loo_r2", "front_mae"):
                got = [e[key] for e in errs if e[key] is not None]
                row[key] = float(np.mean(got)) if got else None
            rows.append(row)
    return rows


def text_table(rows: list[dict[str, Any]]) -> str:
    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    header = (f"{'config':<13} {'k':>3} {'HV mean':>8} {'HV std':>7} {'LOO MAE':>8} "
              f"{'LOO R2':>7} {'front MAE':>9}")
    lines = [header]
    for r in rows:
        lines.append(f"{r['config']:<13} {r['k']:>3} {r['hv_mean']:>8.4f} {r['hv_std']:>7.4f} "
                     f"{f(r['loo_mae'], '8.4f'):>8} {f(r['loo_r2'], '7.3f'):>7} "
                     f"{f(r['front_mae'], '9.4f'):>9}")
    return "\n".join(lines)


def markdown_section(result: dict[str, Any]) -> str:
    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    intro = ("Hypervolume of the real front (acc_0_4, acc_5_9) after the first k evaluations, "
             "reference point (0, 0), mean ± std over "
             f"{result['seeds']} seeds (0..{result['seeds'] - 1}). MAP: "
             "`experiments/digits_map.yaml` (one weight per expert, 16 design points, then "
             "rounds of 16 front points); map-bayes adds one Bayesian round of 16 points; "
             "nsga2: `experiments/digits_nsga2.yaml` (per-layer weights, popsize 16); "
             "nsga2-source: NSGA-II on MAP's per-expert space. Surrogate error (MAP "
             "only, mean over objectives and seeds): leave-one-out MAE / R² of the last fit, "
             "and MAE at the front points, each predicted before it was evaluated.")
    lines = [START, "## MAP vs NSGA-II on the digits experts (`benchmarks/map_front.py`)", "",
             intro, "", "| config | k | HV | LOO MAE | LOO R² | front MAE |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['config']} | {r['k']} | {r['hv_mean']:.4f} ± {r['hv_std']:.4f} | "
                     f"{f(r['loo_mae'], '.4f')} | {f(r['loo_r2'], '.3f')} | "
                     f"{f(r['front_mae'], '.4f')} |")
    load = "?" if result["load"] is None else f"{result['load']:.1f}"
    footer = (f"{result['seconds']:.0f} s on {result['cpu']} (load {load}). "
              f"Command: `{result['command']}`")
    lines += ["", footer, END]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    p.add_argument("--ks", default="16,32,64", help="evaluation counts (default 16,32,64)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="subset of " + ",".join(CONFIGS))
    p.add_argument("--zoo", type=Path, default=None,
                   help="digits zoo directory (default: built in a temp dir, ~2 s)")
    p.add_argument("--quick", action="store_true", help="2 seeds, k = 16,32")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--write-results", action="store_true", help="rewrite RESULTS.md's map section")
    args = p.parse_args(argv)
    args.ks = sorted({int(k) for k in args.ks.split(",")})
    args.configs = [c for c in args.configs.split(",") if c]
    bad = [c for c in args.configs if c not in CONFIGS]
    if bad:
        p.error(f"--configs: unknown {', '.join(bad)}; known: {', '.join(CONFIGS)}")
    if args.quick:
        args.seeds, args.ks = 2, [16, 32]
    if args.seeds < 1 or min(args.ks) < 1:
        p.error("--seeds and every k must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    from evomerge.zoo.digits import build_digits_zoo

    args = parse_args(argv)
    command = "python benchmarks/map_front.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    with stdout_to_stderr(args.json), tempfile.TemporaryDirectory() as tmp:
        started, load = time.perf_counter(), loadavg()
        zoo_dir = args.zoo or Path(tmp) / "zoo"
        zoo = {k: Path(v).absolute() for k, v in
               build_digits_zoo(zoo_dir, seed=0, progress=False).items()}
        runs = []
        for config in args.configs:
            for seed in range(args.seeds):
                run = run_one(config, zoo, seed, args.ks, Path(tmp) / f"{config}-{seed}")
                log(f"{config} seed {seed}: HV " + ", ".join(
                    f"k={k} {v:.4f}" for k, v in run["hv"].items()) + f" ({run['seconds']:.1f} s)")
                runs.append(run)
        result = {"rows": summarise(runs, args.ks), "runs": runs, "seeds": args.seeds,
                  "ks": args.ks, "seconds": time.perf_counter() - started, "cpu": cpu_name(),
                  "load": load, "command": command.strip()}
        log("\n" + text_table(result["rows"]))
        if args.write_results:
            write_section(RESULTS_MD, markdown_section(result), START, END)
            log(f"wrote {RESULTS_MD}")
    if args.json:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
