#!/usr/bin/env python
"""M2N2 on the reference digits setting: held-out accuracy, wall time and peak memory per seed.

Three runs per seed, each in a fresh spawned process (so its peak RSS is its own), all through
:func:`evomerge.reproductions.scratch.run_one` (every evaluation recorded in a journal study in a
temporary directory; ``evomerge run experiments/digits_m2n2_scratch.yaml`` runs one config the
same way and keeps its run directory):

* ``m2n2_scratch``: ``experiments/digits_m2n2_scratch.yaml`` (50,000 evaluations);
* ``cmaes_scratch``: ``experiments/digits_cmaes_scratch.yaml``, separable CMA-ES, same budget;
* ``m2n2_experts``: M2N2 from the reference's two experts (digits 0-4 / 5-9, Adam lr 3e-3, 10
  full-batch steps), no mutation, 10,000 evaluations: the weight-space crossover on the dense
  genomes, the operator ``crossover: weights`` applies to checkpoints through members
  (``benchmarks/m2n2_modes.py`` runs both on this setting: the same records step for step).

Metric: test accuracy (last 20 % of ``load_digits``) of the member with the best training
accuracy. Targets (the reference code, measured on this machine): mean >= 0.85 from scratch,
>= 0.69 from the experts, ~5 min per seed. Seeds: the configs' ``seeds`` (42, 43, 44: the
reference's 42 and two more) unless ``--seeds`` is given.

Usage::

    python benchmarks/m2n2_digits.py                      # full: 3 seeds x 3 runs (~30+ min)
    python benchmarks/m2n2_digits.py --quick --json       # 2,000 / 1,000 evaluations
    python benchmarks/m2n2_digits.py --config experiments/digits_m2n2_scratch.yaml --seeds 42 \
        --budget 5000                                     # one config, one seed, 5k evaluations
    python benchmarks/m2n2_digits.py --write-results      # rewrite the m2n2 section of RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_name, loadavg, run_main

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- m2n2:start -->", "<!-- m2n2:end -->"
TARGETS = {"m2n2_scratch": 0.85, "m2n2_experts": 0.69}
QUICK = {"scratch": 2000, "experts": 1000}


def configs(quick: bool) -> dict[str, dict[str, Any]]:
    """The three runs' configs (the experiment YAMLs; the experts run derived from M2N2's)."""
    load = lambda name: yaml.safe_load((REPO / "experiments" / name).read_text())
    m2n2, cmaes = load("digits_m2n2_scratch.yaml"), load("digits_cmaes_scratch.yaml")
    experts = {**m2n2, "name": "digits_m2n2_experts_ref", "budget": 10_000,
               "strategy": {**m2n2["strategy"], "init": "experts", "mutation_std": 0.0}}
    out = {"m2n2_scratch": m2n2, "cmaes_scratch": cmaes, "m2n2_experts": experts}
    if quick:
        for key, config in out.items():
            config["budget"] = QUICK["experts" if key == "m2n2_experts" else "scratch"]
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from evomerge.reproductions.scratch import check_config, run_one

    chosen = configs(args.quick)
    if args.config:
        config = yaml.safe_load(Path(args.config).read_text())
        chosen = {config["name"]: config}
    if args.budget:
        for config in chosen.values():
            config["budget"] = args.budget
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_start = loadavg()
    runs: dict[str, list[dict[str, Any]]] = {}
    for key, config in chosen.items():
        seeds = args.seeds or check_config(config)["seeds"]
        for seed in seeds:
            summary = run_one(config, seed)
            runs.setdefault(key, []).append(summary)
            print(f"{key} seed {seed}: test {summary['test_acc']:.4f} train "
                  f"{summary['train_acc']:.4f}, {summary['wall_s']:.1f} s, "
                  f"{summary['peak_rss_mb']:.0f} MB", file=sys.stderr)
    table = {}
    for key, rows in runs.items():
        accs = [r["test_acc"] for r in rows]
        table[key] = {"budget": rows[0]["evaluations"], "seeds": [r["seed"] for r in rows],
                      "test_acc_mean": statistics.mean(accs),
                      "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                      "test_acc": accs, "wall_s": [r["wall_s"] for r in rows],
                      "peak_rss_mb": [r["peak_rss_mb"] for r in rows],
                      "target": TARGETS.get(key)}
    return {"quick": args.quick, "started": started, "cpu": cpu_name(),
            "loadavg_1min": {"start": load_start, "end": loadavg()}, "runs": table}


def _load(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}"


def markdown(result: dict[str, Any]) -> str:
    lines = [START, "## m2n2: natural niches on the reference digits setting", "",
             (f"- `python benchmarks/m2n2_digits.py{' --quick' if result['quick'] else ''}`; "
             f"{result['cpu']}; {result['started']}; 1-min load average "
             f"{_load(result['loadavg_1min']['start'])} at start, "
              f"{_load(result['loadavg_1min']['end'])} at end"),
             ("- Metric: test accuracy (last 20 % of load_digits, unshuffled) of the member with "
             "the best training accuracy. Reference code measured here: 0.867 / 0.842 from "
             "scratch (seeds 42/43), 0.689 from the experts (10k), ~5 min and 0.85 GB per seed."),
             "", ("| run | evaluations | seeds | test acc mean ± std | per seed | target | "
             "wall s per seed | peak RSS MB |"), "|---|---|---|---|---|---|---|---|"]
    for key, r in result["runs"].items():
        target = "-" if r["target"] is None else (
            f">= {r['target']} ({'met' if r['test_acc_mean'] >= r['target'] else 'not met'})")
        lines.append(f"| {key} | {r['budget']} | {', '.join(map(str, r['seeds']))} | "
                     f"{r['test_acc_mean']:.3f} ± {r['test_acc_std']:.3f} | "
                     f"{', '.join(f'{a:.3f}' for a in r['test_acc'])} | {target} | "
                     f"{', '.join(f'{w:.0f}' for w in r['wall_s'])} | "
                     f"{', '.join(f'{m:.0f}' for m in r['peak_rss_mb'])} |")
    if result["quick"]:
        lines += ["", "Quick budgets (not the paper's): the targets apply to the full run."]
    return "\n".join(lines + [END])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"small budgets: {QUICK['scratch']} evaluations from scratch, "
                        f"{QUICK['experts']} from the experts")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds of every run [default: each config's seeds]")
    p.add_argument("--config", type=Path, default=None,
                   help="run only this from-scratch config (an experiments/ YAML)")
    p.add_argument("--budget", type=int, default=None,
                   help="evaluations per run, overriding the configs' (and --quick's)")
    p.add_argument("--write-results", action="store_true",
                   help="rewrite the m2n2 section of benchmarks/RESULTS.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, parse_args, run, markdown, START, END)


if __name__ == "__main__":
    sys.exit(main())
