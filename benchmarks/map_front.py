#!/usr/bin/env python
"""MAP vs NSGA-II on the digits experts, and Nested MAP on five digit-pair experts.

**Two tasks** (configurations ``map``, ``map-bayes``, ``nsga2``, ``nsga2-source``): accuracy on
digits 0-4 and on digits 5-9 of task-arithmetic merges of the two digits experts (the zoo's
``expert_0_4`` and ``expert_5_9``).

**Five tasks** (configurations ``nested``, ``map5``): five experts fine-tuned
here from the zoo's base, each on one pair of digits (``expert_0_1`` .. ``expert_8_9``, the zoo's
expert recipe: 200 Adam steps, lr 1e-3, batch 64, on its two classes only), merged by task
arithmetic with one weight per expert in [0, 1.5]; five objectives, the accuracy on each pair.
Besides the hypervolume the table gives the best preference-weighted score (equal preferences:
the mean of the five accuracies) among the first k evaluations, and for Nested MAP the score of
the model its tree chose, the real evaluations the tree spent, and the task evaluations (one per
evaluation and task of the pair, as the paper counts them).

Every strategy is driven exactly as the run driver does (ask a generation, evaluate, tell it; a
last generation cut by the budget is evaluated only in part and never told), with the real
digits fitness and merge engine, and the front after the first ``k`` evaluations is scored by
pymoo's hypervolume indicator against the fixed reference point (all accuracies 0), so a front
at (1, .., 1) would score 1.

Configurations (``--configs``):

* ``map``: ``experiments/digits_map.yaml`` (one weight per expert in [0, 1.5]; 16 design points,
  then rounds of 16 front points).
* ``map-bayes``: the same plus Bayesian MAP (1 round of 16 points before the front).
* ``nsga2``: ``experiments/digits_nsga2.yaml`` as shipped (per-layer weights, popsize 16).
* ``nsga2-source``: NSGA-II, popsize 16, on MAP's space (one weight per expert).
* ``nested``: Nested MAP as published (``experiments/digits_map.yaml`` on the five pair
  experts with ``nested: true``, popsize 16).
* ``map5``: flat MAP on the same five-task space (default design, rounds of 16 front points).

For the MAP configurations the table also gives the surrogate's error after the last ``k``:
leave-one-out MAE / R^2 of the last fit (on the points it was fitted to) and the MAE at the
front points, each predicted before it was evaluated (mean over objectives and seeds).

Usage::

    python benchmarks/map_front.py                        # two-task table on stderr
    python benchmarks/map_front.py --configs nested,map5 --ks 48,96,160
    python benchmarks/map_front.py --write-results        # rewrites RESULTS.md's sections
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
NESTED_START, NESTED_END = "<!-- map-nested:start -->", "<!-- map-nested:end -->"
TWO_TASKS = ("map", "map-bayes", "nsga2", "nsga2-source")
FIVE_TASKS = ("nested", "map5")
CONFIGS = TWO_TASKS + FIVE_TASKS
PAIRS = tuple((2 * i, 2 * i + 1) for i in range(5))  # the five experts' digit pairs


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def hypervolume(values: np.ndarray) -> float:
    """Hypervolume of maximised accuracies against the reference point (0, 0)."""
    from pymoo.indicators.hv import HV

    F = -np.asarray(values, dtype=float)  # pymoo minimises
    return float(HV(ref_point=np.zeros(F.shape[1]))(F)) if len(F) else 0.0


def build_pair_experts(base: Path, out_dir: Path) -> dict[str, Path]:
    """Fine-tune the digits base into one expert per digit pair (``expert_0_1`` ..), with the
    zoo's expert recipe on the training split; deterministic (one seeded stream per expert)."""
    import torch

    from evomerge.models.digits import DigitsMLP, digits_splits
    from evomerge.zoo.digits import DIGITS_HP

    x_np, y_np = digits_splits()["train"]
    x, y = torch.from_numpy(np.array(x_np)), torch.from_numpy(np.array(y_np))
    paths = {}
    for i, classes in enumerate(PAIRS):
        name = f"expert_{classes[0]}_{classes[1]}"
        paths[name] = out_dir / name
        if (paths[name] / "model.safetensors").exists():
            continue
        model = DigitsMLP.from_pretrained(base)
        mask = torch.isin(y, torch.tensor(classes))
        xs, ys = x[mask], y[mask]
        gen = torch.Generator().manual_seed(101 + i)
        opt = torch.optim.Adam(model.parameters(), lr=DIGITS_HP.expert_lr)
        model.train()
        for _ in range(DIGITS_HP.expert_steps):
            pick = torch.randint(len(ys), (DIGITS_HP.batch_size,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(xs[pick]), ys[pick])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        model.save_pretrained(paths[name], overwrite=True)
    return paths


def experiment_data(config: str, zoo: dict[str, Path], seed: int) -> dict[str, Any]:
    """The shipped experiment YAML of a configuration, with the zoo's model paths and a seed
    (five-task configurations: the pair experts and one objective per pair)."""
    name = "digits_nsga2" if config == "nsga2" else "digits_map"
    data = yaml.safe_load((REPO / "experiments" / f"{name}.yaml").read_text())
    sources = ([f"expert_{a}_{b}" for a, b in PAIRS] if config in FIVE_TASKS
               else list(data["models"]["sources"]))
    data["models"] = {"base": str(zoo["base"]), "sources": {k: str(zoo[k]) for k in sources}}
    data["seed"] = seed
    if config == "map-bayes":
        data["strategy"]["bayesian"] = {"rounds": 1, "per_round": 16}
    if config == "nsga2-source":
        data["strategy"] = {"name": "nsga2", "popsize": 16}
    if config in FIVE_TASKS:
        data["fitness"]["objectives"] = [{"name": f"acc_{a}_{b}", "classes": [a, b]}
                                         for a, b in PAIRS]
        data["strategy"] = {"name": "map", "popsize": 16, "front_points": 16}
    if config == "nested":
        data["strategy"]["nested"] = True
    return data


def run_one(config: str, zoo: dict[str, Path], seed: int, ks: list[int],
            run_dir: Path) -> dict[str, Any]:
    """Drive one strategy for max(ks) evaluations; HV and the best preference-weighted score
    (mean accuracy) at each k, surrogate error for MAP, the tree's choice for Nested MAP."""
    from evomerge.execution.evaluator import evaluator_for
    from evomerge.execution.plan import Plan
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
            "best_mean": {k: float(V[:k].mean(axis=1).max()) for k in ks},
            "surrogate": reports or None,
            "nested": _nested_choice(strategy.surrogate_report()["nested"])
            if hasattr(strategy, "surrogate_report") else None,
            "seconds": time.perf_counter() - started}


def base_scores(zoo: dict[str, Path]) -> list[float]:
    """The five-task objectives of the base model alone (every expert weight 0)."""
    from evomerge.execution.evaluator import evaluator_for
    from evomerge.execution.plan import Plan
    from evomerge.experiment import Experiment

    with tempfile.TemporaryDirectory() as tmp:
        plan = Plan(Experiment.from_dict({**experiment_data("map5", zoo, 0), "run_dir": tmp}))
        result, _ = evaluator_for(plan.experiment).evaluate(plan.space.decode(
            np.zeros(plan.space.dim)))
        return [float(v) for v in result.values(plan.objectives)]


def _nested_choice(report: dict[str, Any] | None) -> dict[str, float] | None:
    """The score of the model a finished Nested MAP tree chose (the preference-weighted mean of
    its real task scores), and the evaluations and task evaluations the tree spent; None for
    flat MAP and for a tree the budget cut short."""
    if report is None or "result" not in report:
        return None
    return {"score": report["result"]["score"], "evaluations": report["evaluations"],
            "task_evaluations": report["task_evaluations"]}


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


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    return (float(np.mean(xs)), float(np.std(xs))) if xs else (None, None)


def summarise(runs: list[dict[str, Any]], ks: list[int]) -> list[dict[str, Any]]:
    """Per configuration and k: HV and best mean accuracy (mean and std over seeds), the
    surrogate's mean error, and Nested MAP's choice (score, evaluations, task evaluations)."""
    rows = []
    for config in dict.fromkeys(r["config"] for r in runs):
        mine = [r for r in runs if r["config"] == config]
        for k in ks:
            hv = np.array([r["hv"][k] for r in mine])
            best = np.array([r["best_mean"][k] for r in mine])
            errs = [r["surrogate"][k] for r in mine if r["surrogate"] and k in r["surrogate"]]
            row = {"config": config, "k": k, "hv_mean": float(hv.mean()),
                   "hv_std": float(hv.std()), "best_mean": float(best.mean()),
                   "best_std": float(best.std()), "seeds": len(hv)}
            for key in ("loo_mae", "loo_r2", "front_mae"):
                got = [e[key] for e in errs if e[key] is not None]
                row[key] = float(np.mean(got)) if got else None
            chosen = [r["nested"] for r in mine if r["nested"]
                      and r["nested"]["evaluations"] <= k]
            for key in ("score", "evaluations", "task_evaluations"):
                row[f"chosen_{key}"], row[f"chosen_{key}_std"] = _mean_std(
                    [c[key] for c in chosen] if len(chosen) == len(mine) else [])
            rows.append(row)
    return rows


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def text_table(rows: list[dict[str, Any]]) -> str:
    header = (f"{'config':<13} {'k':>3} {'HV mean':>8} {'HV std':>7} {'best':>6} "
              f"{'LOO MAE':>8} {'LOO R2':>7} {'front MAE':>9} {'chosen':>7} {'evals':>5} "
              f"{'task ev':>7}")
    lines = [header]
    for r in rows:
        lines.append(f"{r['config']:<13} {r['k']:>3} {r['hv_mean']:>8.4f} {r['hv_std']:>7.4f} "
                     f"{r['best_mean']:>6.4f} {_f(r['loo_mae'], '8.4f'):>8} "
                     f"{_f(r['loo_r2'], '7.3f'):>7} {_f(r['front_mae'], '9.4f'):>9} "
                     f"{_f(r['chosen_score'], '7.4f'):>7} "
                     f"{_f(r['chosen_evaluations'], '5.0f'):>5} "
                     f"{_f(r['chosen_task_evaluations'], '7.0f'):>7}")
    return "\n".join(lines)


def _footer(result: dict[str, Any]) -> str:
    load = "?" if result["load"] is None else f"{result['load']:.1f}"
    return (f"{result['seconds']:.0f} s on {result['cpu']} (load {load}). "
            f"Command: `{result['command']}`")


def markdown_section(result: dict[str, Any]) -> str:
    """The two-task section: HV and surrogate error of MAP and NSGA-II."""
    rows = [r for r in result["rows"] if r["config"] in TWO_TASKS]
    intro = ("Hypervolume of the real front (acc_0_4, acc_5_9) after the first k evaluations, "
             "reference point (0, 0), mean ± std over "
             f"{result['seeds']} seeds (0..{result['seeds'] - 1}). MAP: "
             "`experiments/digits_map.yaml` (one weight per expert, 16 design points, then "
             "rounds of 16 front points); map-bayes adds one Bayesian round of 16 points (the "
             "reference's 4 bins per angle); "
             "nsga2: `experiments/digits_nsga2.yaml` (per-layer weights, popsize 16); "
             "nsga2-source: NSGA-II on MAP's per-expert space. Surrogate error (MAP "
             "only, mean over objectives and seeds): leave-one-out MAE / R² of the last fit, "
             "and MAE at the front points, each predicted before it was evaluated.")
    lines = [START, "## MAP vs NSGA-II on the digits experts (`benchmarks/map_front.py`)", "",
             intro, "", "| config | k | HV | LOO MAE | LOO R² | front MAE |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['k']} | {r['hv_mean']:.4f} ± {r['hv_std']:.4f} | "
                     f"{_f(r['loo_mae'], '.4f')} | {_f(r['loo_r2'], '.3f')} | "
                     f"{_f(r['front_mae'], '.4f')} |")
    lines += ["", _footer(result), END]
    return "\n".join(lines)


def nested_section(result: dict[str, Any]) -> str:
    """The five-task section: Nested MAP (as the reference runs it) vs flat MAP."""
    rows = [r for r in result["rows"] if r["config"] in FIVE_TASKS]

    def pm(r: dict[str, Any], key: str, fmt: str) -> str:
        return "-" if r[key] is None else f"{r[key]:{fmt}} ± {r[key + '_std']:{fmt}}"

    intro = ("Five digit-pair experts (`expert_0_1` .. `expert_8_9`, fine-tuned here from the "
             "zoo's base), one task-arithmetic weight each in [0, 1.5], five objectives (the "
             "accuracy on each pair, search split). After the first k evaluations: the "
             "hypervolume of the real front (reference point 0), the best mean accuracy seen "
             "(the preference-weighted score with equal preferences), and for Nested MAP the "
             "score of the model its tree chose (mean accuracy of its real evaluation), the "
             "evaluations the tree spent and its task evaluations (evaluations x tasks of the "
             "pair, as the paper counts cost; the experts alone count one each); mean ± std over "
             f"{result['seeds']} seeds (0..{result['seeds'] - 1}). nested: Nested MAP as "
             "the reference code runs it (the experts alone, then closest-score pairs one at a "
             "time, 19 design points + 1 pick per pair, 25-generation surrogate NSGA), then "
             "flat MAP on the leftover budget; map5: flat MAP (46 design points, rounds of 16 "
             "front points). The base model alone scores "
             f"{np.mean(result['base_five_tasks']):.4f} mean accuracy (per pair: "
             f"{', '.join(f'{v:.3f}' for v in result['base_five_tasks'])}); each expert "
             "scores about 1 on its pair and 0 on the others.")
    title = "## Nested MAP vs flat MAP on five digit-pair experts (`benchmarks/map_front.py`)"
    header = ("| config | k | HV | best mean acc | tree's choice | tree evaluations | "
              "task evaluations |")
    lines = [NESTED_START, title, "", intro, "", header, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['k']} | {r['hv_mean']:.4f} ± {r['hv_std']:.4f} | "
                     f"{r['best_mean']:.4f} ± {r['best_std']:.4f} | "
                     f"{pm(r, 'chosen_score', '.4f')} | {pm(r, 'chosen_evaluations', '.0f')} | "
                     f"{pm(r, 'chosen_task_evaluations', '.0f')} |")
    lines += ["", _footer(result), NESTED_END]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    p.add_argument("--ks", default="16,32,64", help="evaluation counts (default 16,32,64)")
    p.add_argument("--configs", default=",".join(TWO_TASKS),
                   help=f"subset of {','.join(CONFIGS)} (default: {','.join(TWO_TASKS)})")
    p.add_argument("--zoo", type=Path, default=None,
                   help="digits zoo directory (default: built in a temp dir, ~2 s)")
    p.add_argument("--quick", action="store_true", help="2 seeds, k = 16,32")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--write-results", action="store_true", help="rewrite RESULTS.md's map (two-task) and map-nested (five-task) sections, "
                        "each when one of its configurations ran")
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
        base = None
        if set(args.configs) & set(FIVE_TASKS):
            zoo.update(build_pair_experts(zoo["base"], Path(tmp) / "pairs"))
            base = base_scores(zoo)
            log(f"five tasks: the base alone scores {base} (mean {np.mean(base):.4f})")
        runs = []
        for config in args.configs:
            for seed in range(args.seeds):
                run = run_one(config, zoo, seed, args.ks, Path(tmp) / f"{config}-{seed}")
                log(f"{config} seed {seed}: HV " + ", ".join(
                    f"k={k} {v:.4f}" for k, v in run["hv"].items()) + f" ({run['seconds']:.1f} s)")
                runs.append(run)
        result = {"rows": summarise(runs, args.ks), "runs": runs, "seeds": args.seeds,
                  "ks": args.ks, "seconds": time.perf_counter() - started, "cpu": cpu_name(),
                  "load": load, "command": command.strip(), "base_five_tasks": base}
        log("\n" + text_table(result["rows"]))
        if args.write_results and set(args.configs) & set(TWO_TASKS):
            write_section(RESULTS_MD, markdown_section(result), START, END)
        if args.write_results and set(args.configs) & set(FIVE_TASKS):
            write_section(RESULTS_MD, nested_section(result), NESTED_START, NESTED_END)
        if args.write_results:
            log(f"wrote {RESULTS_MD}")
    if args.json:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
