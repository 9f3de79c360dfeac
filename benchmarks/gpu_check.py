#!/usr/bin/env python
"""GPU check: a bf16 PS search on a real-sized Llama, sources resident and then streamed.

What it does (issue 13 item 8): builds (or reuses, ``--workdir``) a synthetic Llama-shaped bf16
family of ``--size`` parameters (base + 3 sources, the same generator as ``merge_scale.py``) with
a small trained tokenizer and a text file of ``--items`` lines, then runs the same experiment
twice in this process, as a user would write it:

* ``space: dare_ties_layerwise`` (Sakana's PS space), ``strategy: random``, ``--budget``
  candidates, ``fitness: {name: perplexity}`` on the text, ``executor.device: --device``
  (default ``auto``), ``models.dtype: auto`` (bf16 stays bf16), the best exported;
* ``resident``: ``engine.device_budget: auto`` (the inputs live on the device when they fit);
* ``streamed``: ``engine.device_budget: 1MB``: the inputs stay in host memory and stream to the
  device one layer group at a time.

For each it prints the mean build s and eval s per candidate, the build's bandwidth (bytes of the
inputs read + the output written, per build s) against a plain ``dst.copy_(src)`` on the same
device, the peak device memory (``torch.cuda.max_memory_allocated``; on the CPU the process's
peak RSS so far), the device and dtype the run recorded, and the exported model's dtype.

Usage::

    python benchmarks/gpu_check.py                          # on a CUDA machine: 1B, auto
    python benchmarks/gpu_check.py --size 0.25B --budget 4 --items 16   # this CPU machine
    python benchmarks/gpu_check.py --size 2M --budget 2 --items 4 --json   # smoke test

With ``--json`` stdout carries exactly one JSON object; ``--write-results`` rewrites only this
benchmark's section of ``benchmarks/RESULTS.md``, labelled with the device it ran on: never
report a GPU figure this script did not measure on a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import cpu_name, loadavg, run_main  # noqa: E402
from merge_scale import (N_SOURCES, _train_tokenizer, ensure_family, read_status,  # noqa: E402
                         shape_for, size_tag)

START, END = "<!-- gpu_check:start -->", "<!-- gpu_check:end -->"
GB = 1e9
WORDS = ("the river runs past old stone walls and quiet fields where small birds sing at dawn "
         "while merchants count coins near the harbour and children chase kites over green "
         "hills under a pale autumn sky").split()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare(args: argparse.Namespace) -> tuple[Path, list[Path], Path, Any]:
    """The family (base dir with a tokenizer linked beside its shards) and the text file."""
    shape = shape_for(args.size)
    root = args.workdir / size_tag(args.size, shape)
    base, sources, fresh = ensure_family(root, shape, seed=args.seed)
    log(f"family {args.size} ({shape.params / 1e6:.0f}M parameters) "
        f"{'written' if fresh else 'reused'} at {root}")
    work = args.workdir / f"gpu-check-{size_tag(args.size, shape)}"
    shutil.rmtree(work, ignore_errors=True)
    tok_base = work / "base"
    tok_base.mkdir(parents=True)
    for f in base.iterdir():
        (tok_base / f.name).symlink_to(f)
    rng = random.Random(args.seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, args.words)))
             for _ in range(2 * args.items)]
    _train_tokenizer(tok_base, lines + [" ".join(WORDS)] * 4, vocab=min(shape.vocab, 512))
    (work / "search.txt").write_text("\n".join(lines[:args.items]) + "\n")
    (work / "heldout.txt").write_text("\n".join(lines[args.items:]) + "\n")
    return tok_base, sources, work, shape


def experiment(args: argparse.Namespace, base: Path, sources: list[Path], work: Path,
               mode: str) -> dict[str, Any]:
    return {
        "name": f"gpu_check_{mode}",
        "models": {"base": str(base), "sources": {f"source{k}": str(s)
                                                  for k, s in enumerate(sources, 1)}},
        "space": "dare_ties_layerwise",
        "fitness": {"name": "perplexity", "data": str(work / "search.txt"),
                    "heldout": str(work / "heldout.txt"), "batch_size": args.batch_size},
        "strategy": {"name": "random", "popsize": min(4, args.budget)},
        "budget": args.budget, "seed": args.seed,
        "executor": {"kind": "local", "device": args.device},
        "engine": {"device_budget": "auto" if mode == "resident" else "1MB"},
        "run_dir": str(work / f"run-{mode}"),
    }


def memcpy_gbps(device: Any, nbytes: int) -> float:
    """GB/s of ``dst.copy_(src)`` on ``device`` (read + write bytes per second, best of 5)."""
    import torch

    n = max(1, min(nbytes, 2 * 10**9) // 2)
    src = torch.empty(n, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * 2 * n / best / GB


def reset_peak_rss() -> None:
    """Start this process's VmHWM afresh (Linux: ``5`` to ``/proc/self/clear_refs``), so each
    mode's CPU peak is its own, not the maximum of both."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        log("    (cannot reset the peak RSS here: the streamed row's peak includes the first run)")


def run_mode(args: argparse.Namespace, base: Path, sources: list[Path], work: Path, shape: Any,
             mode: str) -> dict[str, Any]:
    import torch

    from evomerge.execution.devices import resolve_device
    from evomerge.execution.driver import run_experiment
    from evomerge.experiment import Experiment
    from evomerge.merge.checkpoints import inspect_model

    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()
    log(f"[{mode}] {args.budget} candidates on {device} ...")
    started = time.perf_counter()
    summary = run_experiment(Experiment.from_dict(experiment(args, base, sources, work, mode)),
                             progress=False)
    wall = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else read_status()["VmHWM"])
    inputs = (1 + N_SOURCES) * 2 * shape.params
    output = 2 * shape.params
    build_s = summary["timing"].get("mean_build_s")
    gbps = (inputs + output) / build_s / GB if build_s else None
    copy = memcpy_gbps(device, inputs + output)
    exported = {m.dtype for m in
                inspect_model(work / f"run-{mode}" / "best_model").tensors.values()}
    out = {"mode": mode, "device": str(device), "wall_s": round(wall, 2),
           "n_trials": summary["n_trials"], "n_failed": summary["n_failed"],
           "mean_build_s": build_s, "mean_eval_s": summary["timing"].get("mean_eval_s"),
           "build_gbps": gbps, "memcpy_gbps": copy,
           "vs_memcpy": gbps / copy if gbps else None,
           "peak_device_bytes" if device.type == "cuda" else "peak_rss_bytes": peak,
           "recorded": summary["devices"], "exported_dtypes": sorted(exported),
           "best": summary["best"]["objectives"], "heldout": summary["final"]["best"]}
    log(f"    build {build_s:.2f} s ({gbps:.1f} GB/s = {out['vs_memcpy']:.2f}x memcpy "
        f"{copy:.1f} GB/s), eval {out['mean_eval_s']:.2f} s per candidate; peak "
        f"{peak / GB:.2f} GB; recorded {summary['devices']['workers']}; exported "
        f"{', '.join(sorted(exported))}")
    gc.collect()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    base, sources, work, shape = prepare(args)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    result: dict[str, Any] = {
        "size": args.size, "params": shape.params, "budget": args.budget, "items": args.items,
        "space": "dare_ties_layerwise", "fitness": "perplexity",
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "load": loadavg(),
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "runs": [run_mode(args, base, sources, work, shape, mode)
                 for mode in ("resident", "streamed")],
    }
    # the same seeded candidates either way: streaming must change where bytes live, not results
    resident, streamed = result["runs"]
    result["same_results"] = (resident["best"] == streamed["best"]
                              and resident["heldout"] == streamed["heldout"])
    return result


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    where = m["gpu"] or f"CPU only ({m['cpu']}, torch threads: {m['threads']})"
    lines = [START, "## gpu_check: a bf16 PS search, sources resident vs streamed", "",
             f"`python benchmarks/gpu_check.py --size {result['size']} --budget "
             f"{result['budget']} --items {result['items']}` on **{where}** "
             f"(torch {m['torch']}, load {m['load']:.2f}): a {result['params'] / 1e6:.0f}M-parameter "
             f"bf16 Llama family (base + 3 sources), `dare_ties_layerwise`, random search, "
             f"`perplexity` fitness on {result['items']} lines, `executor.device: auto`.", "",
             "| inputs | device | candidates (failed) | build s | eval s | build GB/s | memcpy "
             "GB/s | vs memcpy | peak memory | recorded dtype | exported |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        peak = r.get("peak_device_bytes", r.get("peak_rss_bytes"))
        kind = "device" if "peak_device_bytes" in r else "RSS"
        dtypes = {w["dtype"] for w in r["recorded"]["workers"].values()}
        lines.append(
            f"| {r['mode']} | {r['device']} | {r['n_trials']} ({r['n_failed']}) | "
            f"{r['mean_build_s']:.2f} | {r['mean_eval_s']:.2f} | {r['build_gbps']:.2f} | "
            f"{r['memcpy_gbps']:.1f} | {r['vs_memcpy']:.2f}x | {peak / GB:.2f} GB {kind} | "
            f"{', '.join(sorted(dtypes))} | {', '.join(r['exported_dtypes'])} |")
    lines += ["", f"Resident and streamed runs found the same best with the same scores: "
              f"{'yes' if result['same_results'] else '**no**'}."]
    if not m["gpu"]:
        lines += ["", "No GPU was available to this project: the GPU run of this script is "
                  "**unrun**; these rows are the same code on the CPU (streaming then copies "
                  "from the memory map into private memory)."]
    lines.append(END)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1B", help="0.1B, 0.25B, 0.5B, 1B or a count like 2M")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--budget", type=int, default=16, help="candidates per run")
    p.add_argument("--items", type=int, default=256, help="lines of text (search; as many "
                   "held out)")
    p.add_argument("--words", type=int, default=48, help="longest line, in words")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/evomerge-gpu-check"))
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--write-results", action="store_true",
                   help="rewrite this benchmark's section of benchmarks/RESULTS.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, parse_args, run, markdown, START, END)


if __name__ == "__main__":
    raise SystemExit(main())
