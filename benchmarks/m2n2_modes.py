#!/usr/bin/env python
"""M2N2 on experts: crossover of the sources' weights vs of a space's coefficients (issue 15).

Three comparisons, each at one budget and seed per pair of runs:

* ``tinylm``: the four tiny-LM experts through ``evomerge run``: ``crossover: weights``
  (``experiments/tinylm_m2n2_weights.yaml``: members of the experts' flattened weights) against
  ``crossover: coefficients`` (``experiments/tinylm_m2n2.yaml``'s task-arithmetic space, per
  expert per layer group, with the same fitness: every search item, no IRT ``reduced:`` block,
  which the weights space refuses). Metric: held-out mean exact match of the run's best
  (``summary.json`` ``final.best``), and the run's wall time (calibration-free).
* ``digits``: the digits zoo's two experts the same way (``experiments/digits_m2n2_weights.yaml``
  against ``experiments/digits_m2n2_experts.yaml``), held-out accuracy on all ten digits.
* ``reference``: the reference code's own two-expert setting (MLP 64-256-10, its experts and
  split; the reference scored 0.689 at 10k evaluations): the ``m2n2`` strategy in weights mode
  (members over the two flat genomes, the Gram oracle, ask/tell) against
  :func:`evomerge.search.m2n2.scratch_search` crossing the dense genomes, same seed. Both make
  the same children from the same draws, so their records agree step for step until float
  rounding flips a decision; reported: steps with equal records, test accuracy of the member with
  the best training accuracy, and the segments of the final archive.

Budgets are modest (a tiny-LM candidate costs ~1.2 s on 2 shared cores); the table says them.

Usage::

    python benchmarks/m2n2_modes.py --tinylm-seeds 2   # tinylm 150 x 2 x 2, digits 200 x 2 x 3,
                                                       # reference 10k x 2 x 3 (~20 min)
    python benchmarks/m2n2_modes.py --quick --json     # small budgets, one seed
    python benchmarks/m2n2_modes.py --write-results    # rewrite the m2n2_modes section
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_name, loadavg, run_main

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- m2n2_modes:start -->", "<!-- m2n2_modes:end -->"
REFERENCE_EXPERTS = 0.689  # the reference code from its two experts, 10k evaluations (notes)
DEFAULTS = {"tinylm": 150, "digits": 200, "reference": 10_000}
QUICK = {"tinylm": 12, "digits": 30, "reference": 300}


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "experiments" / name).read_text())


def tinylm_configs(zoo: Path) -> dict[str, dict[str, Any]]:
    """``weights`` and ``coefficients`` experiments over the tiny-LM zoo at ``zoo``: the same
    fitness (the weights file's: every search item) and strategy settings."""
    weights = _load("tinylm_m2n2_weights.yaml")
    coefficients = _load("tinylm_m2n2.yaml")
    coefficients["fitness"] = weights["fitness"]
    coefficients["strategy"] = {**weights["strategy"], "crossover": "coefficients"}
    coefficients["executor"] = weights["executor"]
    out = {"weights": weights, "coefficients": coefficients}
    for config in out.values():
        config["models"] = {"base": str(zoo / "base"), "sources": {
            k: str(zoo / Path(v).name) for k, v in config["models"]["sources"].items()}}
    return out


def digits_configs(zoo: Path) -> dict[str, dict[str, Any]]:
    weights = _load("digits_m2n2_weights.yaml")
    coefficients = _load("digits_m2n2_experts.yaml")
    coefficients["strategy"] = {**weights["strategy"], "crossover": "coefficients"}
    out = {"weights": weights, "coefficients": coefficients}
    for config in out.values():
        config["models"] = {"base": str(zoo / "base"), "sources": {
            k: str(zoo / Path(v).name) for k, v in config["models"]["sources"].items()}}
        config["executor"] = {"kind": "local", "threads": 1}
    return out


def run_pair(configs: dict[str, dict[str, Any]], budget: int, seed: int, objective: str,
             scratch: Path) -> dict[str, dict[str, Any]]:
    """Each mode's run: held-out score of its best, the best source's, wall time."""
    from evomerge.execution.driver import run_experiment
    from evomerge.experiment import Experiment

    out = {}
    for mode, config in configs.items():
        data = {**config, "budget": budget, "seed": seed, "export": False,
                "run_dir": str(scratch / f"{config['name']}_{mode}_{seed}")}
        summary = run_experiment(Experiment.from_dict(data), progress=False)
        final = {k: v[objective] for k, v in summary["final"].items()}
        sources = {k: v for k, v in final.items() if k != "best"}
        out[mode] = {"heldout": final["best"], "best_source": max(sources.values()),
                     "search": summary["best"]["objectives"][objective],
                     "wall_s": summary["wall_s"], "failed": summary["n_failed"]}
        recipe = summary["best"]["recipe"]
        if recipe.get("merge_method") == "segments":  # how far from a convex combination
            sums = np.sum(recipe["coefficients"], axis=1)
            out[mode].update(segments=len(sums), coef_sum=[float(sums.min()), float(sums.max())])
        print(f"{config['name']} {mode} seed {seed}: held-out {final['best']:.4f} "
              f"(best source {max(sources.values()):.4f}), {summary['wall_s']:.0f} s",
              file=sys.stderr)
    return out


def reference_pair(budget: int, seed: int) -> dict[str, Any]:
    """Weights-mode M2N2 (members, ask/tell) against the dense two-expert run, same seed."""
    import torch

    from evomerge.merge.segments import PrefixGram, dense
    from evomerge.recipe.segments import layout_of
    from evomerge.search import make_strategy
    from evomerge.search.m2n2 import (
        FlatDigitsMLP,
        reference_digits,
        scratch_search,
        train_reference_experts,
    )

    (x_train, y_train), (x_test, y_test) = reference_digits()
    train, test = FlatDigitsMLP(x_train, y_train), FlatDigitsMLP(x_test, y_test)
    experts = train_reference_experts()
    flat = np.stack(experts)
    records: list[list[float]] = []

    started = time.perf_counter()
    niches = scratch_search(train, train.dim, budget, seed=seed, archive=20, mutation_std=0.0,
                            init=experts,
                            on_batch=lambda recs, _: records.extend(r.as_list() for r in recs))
    dense_s = time.perf_counter() - started
    dense_acc = test.accuracy(niches.genomes[niches.best()])

    started = time.perf_counter()
    layout = layout_of({"genome": train.dim})
    oracle = PrefixGram([{"genome": torch.from_numpy(e)} for e in experts], layout)
    strategy = make_strategy("m2n2", lower=[-1, -1, -1, 0, 0],
                             upper=[1, budget, budget, train.dim, 1], directions=["maximize"],
                             seed=seed, archive=20, crossover="weights", geometry=oracle)
    mine: list[list[float]] = []
    while len(mine) < budget:
        cands = strategy.ask()
        scores = [train(dense(c.meta["member"], flat))[0] for c in cands]
        for c in cands:
            r = c.meta.get("record")
            mine.append(r.as_list() if r is not None else [len(mine), -1, -1, 0, 0.0])
        strategy.tell(cands, [[float(s.mean())] for s in scores], item_scores=scores)
    weights_s = time.perf_counter() - started
    archive = strategy.niches
    best = archive.genomes[archive.best()]
    same = next((i for i, (a, b) in enumerate(zip(records, mine)) if a != b), budget)
    return {"dense": {"test_acc": dense_acc, "wall_s": dense_s},
            "weights": {"test_acc": test.accuracy(dense(best, flat)), "wall_s": weights_s,
                        "segments_max": max(len(g.coefs) for g in archive.genomes)},
            "equal_records": same}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from evomerge.zoo.digits import build_digits_zoo

    budgets = dict(QUICK if args.quick else DEFAULTS)
    for key in budgets:
        if getattr(args, f"{key}_budget"):
            budgets[key] = getattr(args, f"{key}_budget")
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_start = loadavg()
    result: dict[str, Any] = {"quick": args.quick, "started": started, "cpu": cpu_name(),
                              "budgets": budgets, "seeds": seeds}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        if "tinylm" in args.parts:
            zoo = Path(args.tinylm_zoo)
            if not (zoo / "base").is_dir():
                raise SystemExit(f"{zoo}: no tiny-LM zoo; run `evomerge zoo build tiny-lm`")
            result["tinylm"] = {s: run_pair(tinylm_configs(zoo.absolute()), budgets["tinylm"],
                                            s, "mean_acc", scratch)
                                for s in seeds[:args.tinylm_seeds]}
        if "digits" in args.parts:
            zoo = Path(build_digits_zoo(scratch / "digits", seed=0, progress=False)["base"]).parent
            result["digits"] = {s: run_pair(digits_configs(zoo), budgets["digits"], s, "acc",
                                            scratch) for s in seeds}
        if "reference" in args.parts:
            result["reference"] = {}
            for s in [42 + s for s in seeds]:
                result["reference"][s] = reference_pair(budgets["reference"], s)
                r = result["reference"][s]
                print(f"reference seed {s}: weights {r['weights']['test_acc']:.4f}, dense "
                      f"{r['dense']['test_acc']:.4f}, {r['equal_records']} equal records",
                      file=sys.stderr)
    result["loadavg_1min"] = {"start": load_start, "end": loadavg()}
    return result


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def _load_text(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}"


def markdown(result: dict[str, Any]) -> str:
    b = result["budgets"]
    lines = [START, "## m2n2_modes: M2N2 crossover of weights vs of coefficients", "",
             (f"- `python benchmarks/m2n2_modes.py{' --quick' if result['quick'] else ''}`; "
              f"{result['cpu']}; {result['started']}; 1-min load average "
              f"{_load_text(result['loadavg_1min']['start'])} at start, "
              f"{_load_text(result['loadavg_1min']['end'])} at end (2 cores shared)."),
             ("- `weights`: `space: {kind: weights}`, members of the experts' flattened weights, "
              "split points over all parameters, slerp angle of the whole weight vectors. "
              "`coefficients`: the experiment's task-arithmetic space (a weight per expert per "
              "layer group), crossed as vectors. Same fitness (every search item), archive 20, "
              "popsize 1, init = each expert alone, no mutation. Held-out score of each run's "
              "best (`summary.json` `final.best`); wall time of the whole run.")]
    for part, title, metric in (("tinylm", f"tiny-LM experts, {b['tinylm']} evaluations",
                                 "held-out mean exact match"),
                                ("digits", f"digits zoo experts, {b['digits']} evaluations",
                                 "held-out accuracy, all digits")):
        if part not in result:
            continue
        runs = result[part]
        lines += ["", f"**{title}** ({metric}; seeds {', '.join(map(str, runs))})", "",
                  "| mode | held-out mean ± std | per seed | best source | wall s per seed |",
                  "|---|---|---|---|---|"]
        for mode in ("weights", "coefficients"):
            rows = [runs[s][mode] for s in runs]
            lines.append(f"| {mode} | {_mean_std([r['heldout'] for r in rows])} | "
                         f"{', '.join(format(r['heldout'], '.3f') for r in rows)} | "
                         f"{rows[0]['best_source']:.3f} | "
                         f"{', '.join(format(r['wall_s'], '.0f') for r in rows)} |")
        sums = [runs[s]["weights"]["coef_sum"] for s in runs]
        segments = ", ".join(str(runs[s]["weights"]["segments"]) for s in runs)
        lines += ["", (f"Weights mode, best members: {segments} segments, coefficients summing "
                       f"to {min(a for a, _ in sums):.3f} - {max(b for _, b in sums):.3f} per "
                       "segment. Over experts fine-tuned from one base, a member is (sum_k c_k) "
                       "base + sum_k c_k tau_k on each segment, and slerp of nearly parallel "
                       "weight vectors keeps sum_k c_k near 1: its task-vector weights share "
                       "~1, where the coefficient space reaches base + sum_k w_k tau_k with each "
                       "w_k up to 1.5.")]
    if "reference" in result:
        runs = result["reference"]
        lines += ["", (f"**Reference two-expert digits setting**, {b['reference']} evaluations "
                       f"(seeds {', '.join(map(str, runs))}; the reference code: "
                       f"{REFERENCE_EXPERTS} at 10k): test accuracy of the member with the best "
                       "training accuracy"), "",
                  ("| run | test acc mean ± std | per seed | steps with equal records | "
                   "segments (largest member) | wall s per seed |"), "|---|---|---|---|---|---|"]
        for mode, label in (("weights", "m2n2 strategy, crossover: weights"),
                            ("dense", "scratch_search on dense genomes")):
            rows = [runs[s][mode] for s in runs]
            equal = ", ".join(str(runs[s]["equal_records"]) for s in runs)
            segments = ", ".join(str(r["segments_max"]) for r in rows) if mode == "weights" \
                else "-"
            lines.append(f"| {label} | {_mean_std([r['test_acc'] for r in rows])} | "
                         f"{', '.join(format(r['test_acc'], '.3f') for r in rows)} | "
                         f"{equal if mode == 'weights' else '-'} | {segments} | "
                         f"{', '.join(format(r['wall_s'], '.0f') for r in rows)} |")
    if result["quick"]:
        lines += ["", "Quick budgets: a smoke test, not a comparison."]
    return "\n".join(lines + [END])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"small budgets {QUICK}, one seed")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--parts", nargs="+", default=["tinylm", "digits", "reference"],
                   choices=["tinylm", "digits", "reference"])
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds [default 0 1 2; reference runs use 42 + seed]")
    p.add_argument("--tinylm-seeds", type=int, default=1,
                   help="how many of the seeds the tiny-LM pair runs (1: ~7 min)")
    p.add_argument("--tinylm-zoo", default=str(REPO / "models" / "tiny-lm"))
    for key, budget in DEFAULTS.items():
        p.add_argument(f"--{key}-budget", type=int, default=None,
                       help=f"evaluations per {key} run [default {budget}]")
    p.add_argument("--write-results", action="store_true",
                   help="rewrite the m2n2_modes section of benchmarks/RESULTS.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, parse_args, run, markdown, START, END)


if __name__ == "__main__":
    sys.exit(main())
