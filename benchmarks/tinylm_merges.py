#!/usr/bin/env python
"""PS, M2N2, DFS and PS+DFS on the tiny-LM zoo: each method's best against every source, held out.

Runs the shipped experiments as a user would (``run_experiment(Experiment.from_yaml(...))``,
what ``evomerge run`` does), each into ``--out/<name>`` (reused when its ``summary.json``
already holds the experiment's budget, so a table can be rebuilt without re-running), and
tabulates from their ``summary.json``:

* ``experiments/tinylm_ps_cmaes.yaml``: PS (DARE-TIES per block group, CMA-ES, IRT anchors);
* ``experiments/tinylm_m2n2.yaml``: M2N2 over the experts;
* ``experiments/tinylm_dfs.yaml``: DFS, a layer path through the experts' blocks with Sakana's
  hop-scale matrix W indexed by layers (``scales: layers``);
* ``experiments/tinylm_dfs_pairs.yaml``: the same with one hop scale per pair of experts
  (``scales: model_pairs``, evomerge's earlier form);
* ``experiments/tinylm_dfs_factored.yaml``: the same with the factored layer W (``scales:
  factored``: ``P[model, model] * q[layer]``, ours);
* ``experiments/tinylm_ps_dfs.yaml``, ``tinylm_ps_dfs_pairs.yaml``: PS+DFS, a layer path through
  the PS merge's and the experts' blocks (the PS merge is the shipped
  ``experiments/recipes/tinylm_ps.yaml``), with either form of W.

Metric: held-out mean exact match over the four tasks (1,200 items), the number every
``summary.json`` reports under ``final``. Needs the zoo: ``evomerge zoo build tiny-lm``.

``--only`` with ``--write-results`` keeps the other experiments' rows: each is re-read from its
run's complete ``summary.json`` under ``--out`` when there is one, else carried over from the
section being rewritten (marked so), never re-run.

Usage::

    python benchmarks/tinylm_merges.py                     # run what is missing, print the table
    python benchmarks/tinylm_merges.py --write-results     # and rewrite RESULTS.md's section
    python benchmarks/tinylm_merges.py --only tinylm_dfs --budget 24   # one, smaller
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_name, loadavg, run_main

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- tinylm_merges:start -->", "<!-- tinylm_merges:end -->"
EXPERIMENTS = {"tinylm_ps_cmaes": "PS (CMA-ES)", "tinylm_m2n2": "M2N2",
               "tinylm_dfs": "DFS, W over layers (CMA-ES)",
               "tinylm_dfs_pairs": "DFS, W over model pairs (CMA-ES)",
               "tinylm_dfs_factored": "DFS, W factored (CMA-ES)",
               "tinylm_ps_dfs": "PS+DFS, W over layers (CMA-ES)",
               "tinylm_ps_dfs_pairs": "PS+DFS, W over model pairs (CMA-ES)"}


def complete_summary(name: str, out: Path, budget: int | None) -> dict[str, Any] | None:
    """The experiment's ``summary.json`` under ``out`` when it holds the experiment's budget."""
    from evomerge.experiment import Experiment

    experiment = Experiment.from_yaml(REPO / "experiments" / f"{name}.yaml",
                                      run_dir=str(out / name), budget=budget)
    summary_file = out / name / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        if summary.get("budget") == experiment.budget:
            return summary
    return None


def run_or_reuse(name: str, out: Path, budget: int | None) -> dict[str, Any]:
    """The experiment's summary: read back when complete, otherwise run (or resume) it."""
    from evomerge.execution.driver import run_experiment
    from evomerge.experiment import Experiment

    summary = complete_summary(name, out, budget)
    if summary is not None:
        return summary
    run_dir = out / name
    experiment = Experiment.from_yaml(REPO / "experiments" / f"{name}.yaml",
                                      run_dir=str(run_dir), budget=budget)
    resume = (run_dir / "experiment.yaml").is_file()
    return run_experiment(experiment, resume=resume, progress=sys.stderr.isatty())


def table_rows(section: str) -> dict[str, dict[str, Any]]:
    """The rows of a table :func:`markdown` wrote, by experiment, as :func:`row` gives them (to
    the table's rounding), each marked ``carried`` with the time it was ``measured`` (the
    section's own, or for a row it carried itself, the time its note gives); the section's
    header names the source columns."""
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    if not lines:
        return {}
    written = re.search(r"; (\d{4}-\d\d-\d\d \d\d:\d\d UTC);", section)
    earlier = re.search(r"† carried over .*measured ([^.]+)\.", section)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    names = header[6:-1]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        gain, best_source = cells[-1].rstrip(")").split(" (")
        rows[cells[0]] = {
            "experiment": cells[0], "method": cells[1].rstrip(" †"),
            "candidates": int(cells[2]), "wall_s": float(cells[3]),
            "search_best": float(cells[4]), "best": float(cells[5].strip("*")),
            "sources": {n: float(v) for n, v in zip(names, cells[6:-1]) if v != "-"},
            "best_source": best_source, "gain": float(gain), "carried": True,
            "measured": (earlier.group(1) if earlier and cells[1].endswith("†")
                         else written.group(1) if written else "?")}
    return rows


def previous_section() -> str:
    """This script's section of RESULTS.md as it stands ("" when there is none)."""
    path = Path(__file__).resolve().parent / "RESULTS.md"
    text = path.read_text() if path.is_file() else ""
    return text.split(START, 1)[1].split(END, 1)[0] if START in text and END in text else ""


def row(name: str, summary: dict[str, Any]) -> dict[str, Any]:
    final = {k: v["mean_acc"] for k, v in summary["final"].items()}
    sources = {k: v for k, v in final.items() if k != "best"}
    best_source = max(sources, key=sources.get)
    return {"experiment": name, "method": EXPERIMENTS.get(name, name),
            "candidates": summary["n_trials"], "wall_s": summary["wall_s"],
            "best": final["best"], "sources": sources, "best_source": best_source,
            "gain": final["best"] - sources[best_source],
            # on every search item: a reduced run's winner is re-scored in full at its end
            "search_best": summary.get("fitness_reduction", {}).get(
                "best_search_full", summary["best"]["objectives"])["mean_acc"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_start = loadavg()
    out = args.out.absolute()
    rows = {}
    for name in args.only or list(EXPERIMENTS):
        summary = run_or_reuse(name, out, args.budget)
        r = rows[name] = row(name, summary)
        print(f"{name}: best {r['best']:.3f} vs {r['best_source']} {r['sources'][r['best_source']]:.3f}"
              f" ({r['candidates']} candidates, {r['wall_s']:.0f} s)", file=sys.stderr)
    if args.only and args.write_results:  # the rewritten section keeps the other rows
        previous = table_rows(previous_section())
        for name in EXPERIMENTS:
            if name in rows:
                continue
            summary = complete_summary(name, out, args.budget)
            if summary is not None:
                rows[name] = row(name, summary)
            elif name in previous:
                rows[name] = previous[name]
    ordered = [rows[n] for n in EXPERIMENTS if n in rows]
    return {"started": started, "cpu": cpu_name(),
            "loadavg_1min": {"start": load_start, "end": loadavg()}, "rows": ordered}


def markdown(result: dict[str, Any]) -> str:
    names = list(dict.fromkeys(k for r in result["rows"] for k in r["sources"]))
    load = result["loadavg_1min"]
    fmt = lambda v: "?" if v is None else f"{v:.1f}"
    carried = sorted({r["measured"] for r in result["rows"] if r.get("carried")})
    lines = [START, "## tinylm_merges: PS, M2N2, DFS and PS+DFS against the sources", "",
             (f"- `python benchmarks/tinylm_merges.py`; {result['cpu']}; {result['started']}; "
              f"1-min load average {fmt(load['start'])} at start, {fmt(load['end'])} at end "
              "(runs reused from earlier invocations keep their own wall time)"),
             ("- Held-out mean exact match over add, reverse, sort and translate (1,200 items), "
              "from each run's `summary.json` (`final`). `search`: the winner on all 1,200 search "
              "items (PS searches on 60 IRT anchors after a warmup generation in full and races "
              "promising candidates to every item; M2N2 searches on 60 anchors and re-scores its "
              "8 best estimates in full at the end; DFS and PS+DFS search on all search items). "
              "`ps` is the "
              "shipped PS merge (the PS winner) that PS+DFS routes through; the last column is "
              "the gain over the strongest model in the run's table (for PS+DFS: its own "
              "starting point). DFS rows: `W over layers` is Sakana's hop-scale matrix indexed by "
              "layers plus an embedding row for the first block's input (`scales: layers`), "
              "`W over model pairs` one scale per pair of layer sources (`scales: model_pairs`, "
              "ours), `W factored` the layer W as P[model, model] q[layer] (`scales: factored`, "
              "ours); see `evomerge/spaces/dfs.py`."),
             *([("- † carried over from an earlier table, not re-run by this invocation: "
                 f"measured {' and '.join(carried)}.")] if carried else []),
             "", "| experiment | method | candidates | wall s | search | best held-out | "
             + " | ".join(names) + " | best - best source |",
             "|---|---|---|---|---|---|" + "---|" * len(names) + "---|"]
    for r in result["rows"]:
        cells = [f"{r['sources'][n]:.3f}" if n in r["sources"] else "-" for n in names]
        method = r["method"] + (" †" if r.get("carried") else "")
        lines.append(f"| {r['experiment']} | {method} | {r['candidates']} | "
                     f"{r['wall_s']:.0f} | {r['search_best']:.3f} | **{r['best']:.3f}** | "
                     + " | ".join(cells) + f" | {r['gain']:+.3f} ({r['best_source']}) |")
    return "\n".join(lines + [END])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench",
                   help="where the runs go (default: runs/bench/<experiment>)")
    p.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), default=None)
    p.add_argument("--budget", type=int, default=None, help="override every experiment's budget")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--write-results", action="store_true",
                   help="rewrite the tinylm_merges section of benchmarks/RESULTS.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, parse_args, run, markdown, START, END)


if __name__ == "__main__":
    sys.exit(main())
