#!/usr/bin/env python
"""Merge-build benchmark: evomerge's in-place ``Merger.build`` against memcpy and mergekit.

What it measures, per merge method, on a synthetic Llama-shaped checkpoint set (a base and three
fine-tunes, fp32, written as HF directories so evomerge and mergekit read the very same files):

* ``build_s``: median wall time of ``--repeats`` in-place builds into one pre-allocated state dict
  (the per-candidate cost in a search), after one first build (``first_build_s``) that starts
  from an empty engine (the default engine keeps no source-sized cache, only small sorted
  samples of |delta|; the first build should cost what every build costs).
* ``GBps``: effective bandwidth = (bytes of every model tensor the method reads + one model
  written) / build_s, and ``ratio_to_memcpy`` against a plain preallocated ``dst.copy_(src)`` over
  the same tensors measured in the same run ((bytes read + bytes written) / time).
* ``mergekit_s``: one ``mergekit.merge.run_merge`` of the same config (disk in, disk out: what
  mergekit costs per candidate in a search), and ``speedup_vs_mergekit = mergekit_s / build_s``.

Correctness checks ride along (untimed): every timed build starts from a NaN-filled target and
is compared with a fresh ``Merger.build`` (``max_abs_diff_vs_fresh_build``); for the
deterministic methods the result is compared with mergekit's output (``mergekit_max_abs_diff``).

Usage::

    python benchmarks/merge_build.py                    # full (~99M params), table on stderr
    python benchmarks/merge_build.py --quick --json     # ~5M params, one JSON object on stdout
    python benchmarks/merge_build.py --json --write-results   # rewrite benchmarks/RESULTS.md

Progress goes to stderr; with ``--json`` stdout carries exactly one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # _results.py sits beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_name, loadavg, stdout_to_stderr  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
START, END = "<!-- merge_build:start -->", "<!-- merge_build:end -->"

ALL_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "della",
               "della_linear", "breadcrumbs", "breadcrumbs_ties", "slerp", "model_stock")
# Methods whose result does not depend on a random mask: their output is compared with mergekit's.
DETERMINISTIC = {"linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "slerp",
                 "model_stock"}
BANDWIDTH_TARGET = {"linear": 0.5, "task_arithmetic": 0.5}  # x memcpy, from the issue
# mergekit seconds per candidate measured on this machine for the issue (~97.5M-param model).
ISSUE_MERGEKIT_S = {"task_arithmetic": 1.50, "ties": 29.5, "dare_ties": 6.4}
N_SOURCES = 3


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- synthetic checkpoints ------------------------------------------------------------------


def model_config(quick: bool):
    from transformers import LlamaConfig

    if quick:
        kw = dict(vocab_size=4000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4)
    else:
        kw = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=7,
                  num_attention_heads=12, num_key_value_heads=12)
    config = LlamaConfig(tie_word_embeddings=False, **kw)
    config.architectures = ["LlamaForCausalLM"]
    return config


def tensor_shapes(config) -> dict[str, torch.Size]:
    """Names and shapes of the checkpoint tensors, from a meta-device model (no memory)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: t.shape for name, t in model.state_dict().items()}


def write_checkpoints(root: Path, config, shapes: dict[str, torch.Size], seed: int = 0
                      ) -> tuple[Path, list[Path]]:
    """base = 0.02 randn; source k = base + 0.002 randn (seed k); fp32 safetensors HF dirs."""
    from safetensors.torch import save_file

    def save(name: str, tensors: dict[str, torch.Tensor]) -> Path:
        path = root / name
        path.mkdir(parents=True)
        config.save_pretrained(path)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path

    gen = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=gen).mul_(0.02) for n, s in shapes.items()}
    base_dir = save("base", base)
    sources = []
    for k in range(1, N_SOURCES + 1):
        gen = torch.Generator().manual_seed(seed + 1000 * k)
        src = {n: t + torch.randn(t.shape, generator=gen).mul_(0.002) for n, t in base.items()}
        sources.append(save(f"source{k}", src))
        del src
    del base
    gc.collect()
    return base_dir, sources


# ---- recipes ------------------------------------------------------------------------------


def recipe_dict(method: str, base: Path, sources: list[Path]) -> dict[str, Any]:
    """The benchmark's config for one method, in mergekit's format (absolute paths)."""
    b, srcs = str(base), [str(s) for s in sources]
    if method == "linear":
        models = [{"model": s, "parameters": {"weight": 1 / len(srcs)}} for s in srcs]
        return {"merge_method": "linear", "models": models, "dtype": "float32"}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": b,
                "models": [{"model": b}, {"model": srcs[0]}],
                "parameters": {"t": 0.5}, "dtype": "float32"}
    if method == "model_stock":
        return {"merge_method": "model_stock", "base_model": b,
                "models": [{"model": s} for s in srcs], "dtype": "float32"}
    params: dict[str, Any] = {"weight": 1.0, "density": 0.5}
    if method.startswith("della"):
        params["epsilon"] = 0.1
    return {"merge_method": method, "base_model": b,
            "models": [{"model": s, "parameters": dict(params)} for s in srcs],
            "dtype": "float32"}


# ---- timing -------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_times(fn: Callable[[], Any], repeats: int, before: Callable[[], Any] | None = None
                 ) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn`` (``before`` runs untimed ahead of each)."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        times.append(timed(fn))
    return times


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest |a - b| over all tensors (NaN anywhere gives NaN)."""
    return compare(a, b)[0]


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-5,
            atol: float = 1e-7) -> tuple[float, int]:
    """(largest |a - b|, number of elements outside ``isclose(rtol, atol)``); NaN counts as a
    mismatch and makes the maximum NaN."""
    worst, mismatched = 0.0, 0
    with torch.inference_mode():
        for name, t in a.items():
            other = b[name].to(t.dtype)
            d = (t.double() - other.double()).abs().max().item()
            worst = float("nan") if math.isnan(d) or math.isnan(worst) else max(worst, d)
            mismatched += int((~torch.isclose(t, other, rtol=rtol, atol=atol)).sum())
    return worst, mismatched


def memcpy_time(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor], repeats: int) -> float:
    def copy() -> None:
        for name, t in src.items():
            dst[name].copy_(t)

    copy()  # warm-up: faults in the destination pages
    return statistics.median(median_times(copy, repeats))


# ---- mergekit -----------------------------------------------------------------------------


def mergekit_available() -> bool:
    try:
        import mergekit.merge  # noqa: F401
        import mergekit.config  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def mergekit_options():
    from mergekit.options import MergeOptions

    wanted = dict(device="cpu", cuda=False, lazy_unpickle=True, write_model_card=False,
                  copy_tokenizer=False, quiet=True, low_cpu_memory=False)
    fields = getattr(MergeOptions, "model_fields", {})
    return MergeOptions(**{k: v for k, v in wanted.items() if k in fields})


def run_mergekit(config: dict[str, Any], out_dir: Path) -> float:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge

    merge_config = MergeConfiguration.model_validate(config)
    options = mergekit_options()
    return timed(lambda: run_merge(merge_config, str(out_dir), options=options))


def load_output(out_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(out_dir.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


# ---- the benchmark ------------------------------------------------------------------------


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def machine_info() -> dict[str, Any]:
    cpu = cpu_name()
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}
    with contextlib.suppress(Exception):
        import transformers
        info["transformers"] = transformers.__version__
    with contextlib.suppress(Exception):
        from importlib.metadata import version
        info["mergekit"] = version("mergekit")
    return info


def profile_build(merger, recipe, target, method: str, top: int = 15) -> None:
    """Print where one (warm-cache) build spends its time: torch ops, then Python functions."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        merger.build(recipe, into=target)
    log(f"\n=== torch.profiler: {method} (one build, warm cache) ===")
    log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    pr = cProfile.Profile()
    pr.enable()
    merger.build(recipe, into=target)
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    log(f"=== cProfile: {method} ===\n{buf.getvalue()}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from evomerge.merge.engine import Merger
    from evomerge.recipe import MergeRecipe

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(
        ALL_METHODS)
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s): {', '.join(unknown)}; "
                         f"known: {', '.join(ALL_METHODS)}")
    use_mergekit = not args.no_mergekit and mergekit_available()
    if not args.no_mergekit and not use_mergekit:
        log("mergekit is not importable: skipping the mergekit comparison")

    config = model_config(args.quick)
    shapes = tensor_shapes(config)
    params = sum(math.prod(s) for s in shapes.values())
    log(f"model: Llama-shaped, {params:,} params ({params / 1e6:.1f}M), fp32, base + {N_SOURCES} "
        f"sources; torch {torch.__version__}, {torch.get_num_threads()} threads")

    load_before = loadavg()
    if load_before is not None and load_before > (os.cpu_count() or 1):
        log(f"warning: 1-min load average {load_before:.1f} > {os.cpu_count()} cores: other "
            "processes share the CPU, timings will be noisy")
    tmp = Path(tempfile.mkdtemp(prefix="evomerge-bench-"))
    try:
        t0 = time.perf_counter()
        base_dir, source_dirs = write_checkpoints(tmp / "models", config, shapes, seed=args.seed)
        log(f"wrote checkpoints to {tmp} in {time.perf_counter() - t0:.1f} s")

        t0 = time.perf_counter()
        merger = Merger([base_dir, *source_dirs], device="cpu")
        load_s = time.perf_counter() - t0
        model_bytes = state_bytes(merger.state(base_dir))
        log(f"Merger load: {load_s:.2f} s ({model_bytes / 1e6:.0f} MB per model)")

        target = merger.allocate()
        # The memcpy reference is taken at the start and again before every method (this machine
        # may be shared: a drifting load then moves both sides of the ratio); its median is used.
        copy_times = [memcpy_time(merger.state(base_dir), target, max(3, args.repeats))]
        log(f"memcpy reference: {copy_times[0] * 1e3:.1f} ms per model copy = "
            f"{2 * model_bytes / copy_times[0] / 1e9:.2f} GB/s (read + write)")

        results: dict[str, dict[str, Any]] = {}
        for method in methods:
            raw = recipe_dict(method, base_dir, source_dirs)
            recipe = MergeRecipe.from_dict(raw)
            n_read = len(recipe.model_paths())
            bytes_read, bytes_written = n_read * model_bytes, model_bytes

            merger.clear_cache()
            gc.collect()
            copy_times.append(memcpy_time(merger.state(base_dir), target, max(3, args.repeats)))
            first = timed(lambda: merger.build(recipe, into=target))

            def poison() -> None:
                for t in target.values():
                    t.fill_(float("nan"))

            build_times = median_times(lambda: merger.build(recipe, into=target), args.repeats,
                                       before=poison)
            build_s = statistics.median(build_times)
            # ratio_to_memcpy is recomputed against the run's median memcpy at the end; the log
            # line uses the memcpy measured just before this method.
            memcpy_gbps = 2 * model_bytes / copy_times[-1] / 1e9
            fresh = merger.build(recipe)
            diff_fresh = max_abs_diff(target, fresh)
            del fresh
            gbps = (bytes_read + bytes_written) / build_s / 1e9
            entry: dict[str, Any] = {
                "build_s": build_s, "first_build_s": first, "build_times_s": build_times,
                "GBps": gbps,
                "ratio_to_memcpy": gbps / memcpy_gbps, "memcpy_GBps_adjacent": memcpy_gbps,
                "speedup_vs_mergekit": None,
                "mergekit_s": None, "models_read": n_read, "bytes_read": bytes_read,
                "bytes_written": bytes_written, "max_abs_diff_vs_fresh_build": diff_fresh,
                "mergekit_max_abs_diff": None, "mergekit_mismatched": None,
            }
            log(f"{method:>16}: build {build_s:.3f} s (first {first:.3f} s), {gbps:.2f} GB/s = "
                f"{gbps / memcpy_gbps:.2f}x memcpy; |target - fresh build| = {diff_fresh:.3g}")

            if use_mergekit:
                out_dir = tmp / f"mergekit-{method}"
                gc.collect()
                mk_s = run_mergekit(raw, out_dir)
                entry["mergekit_s"] = mk_s
                entry["speedup_vs_mergekit"] = mk_s / build_s
                if method in DETERMINISTIC:
                    diff, bad = compare(target, load_output(out_dir))
                    entry["mergekit_max_abs_diff"], entry["mergekit_mismatched"] = diff, bad
                shutil.rmtree(out_dir, ignore_errors=True)
                extra = (f", |evomerge - mergekit| <= {entry['mergekit_max_abs_diff']:.3g} "
                         f"({entry['mergekit_mismatched']:,} elements not close)"
                         if entry["mergekit_max_abs_diff"] is not None else "")
                log(f"{'':>16}  mergekit {mk_s:.2f} s -> {mk_s / build_s:.1f}x faster{extra}")
            if args.profile:
                profile_build(merger, recipe, target, method)
            results[method] = entry
            gc.collect()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    memcpy_gbps = 2 * model_bytes / statistics.median(copy_times) / 1e9
    for entry in results.values():
        entry["ratio_to_memcpy"] = entry["GBps"] / memcpy_gbps

    return {
        "model": {"params": params, "dtype": "float32", "sources": N_SOURCES,
                  "bytes": model_bytes, "quick": args.quick,
                  "config": {k: getattr(config, k) for k in (
                      "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads")}},
        "memcpy_GBps": memcpy_gbps,
        "memcpy_s": statistics.median(copy_times),
        "memcpy_s_all": copy_times,
        "loadavg_1min": {"start": load_before, "end": loadavg()},
        "load_s": load_s,
        "repeats": args.repeats,
        "mergekit": use_mergekit,
        "machine": machine_info(),
        "methods": results,
    }


# ---- reporting ----------------------------------------------------------------------------


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def targets(method: str, entry: dict[str, Any]) -> tuple[str, str]:
    """(bandwidth target, beats-mergekit target) as 'met'/'missed'/'—'."""
    need = BANDWIDTH_TARGET.get(method)
    bw = "—" if need is None else ("met" if entry["ratio_to_memcpy"] >= need else "missed")
    sp = entry.get("speedup_vs_mergekit")
    mk = "not measured" if sp is None else ("met" if sp > 1 else "missed")
    return bw, mk


def markdown_section(result: dict[str, Any], command: str) -> str:
    m, mach = result["model"], result["machine"]
    lines = [
        START,
        "## Merge build (benchmarks/merge_build.py)",
        "",
        f"- Machine: {mach['cpu']}, {mach['cores']} cores ({mach['torch_threads']} torch threads), "
        f"torch {mach['torch']}, transformers {mach.get('transformers', '?')}, "
        f"mergekit {mach.get('mergekit', 'n/a') if result['mergekit'] else 'not run'}, "
        f"Python {mach['python']}; {mach['date']}; 1-min load average "
        f"{_num(result['loadavg_1min']['start'], '.1f')} at start, "
        f"{_num(result['loadavg_1min']['end'], '.1f')} at end"
        + (" (the machine was shared with other work: timings are noisy)"
           if (result["loadavg_1min"]["start"] or 0) > 0.5 * (mach["cores"] or 1) else ""),
        f"- Command: `{command}`",
        f"- Model: synthetic Llama ({', '.join(f'{k}={v}' for k, v in m['config'].items())}, "
        f"untied head) = {m['params']:,} params, {m['dtype']}, {m['bytes'] / 1e6:.0f} MB per "
        f"model; base + {m['sources']} sources (source = base + 0.002 randn).",
        f"- One `Merger` over all 4 models: load {result['load_s']:.2f} s (once per run, not "
        f"per candidate). memcpy reference (preallocated `dst.copy_(src)` over one model's "
        f"tensors, median over the start of the run and before every method): "
        f"{result['memcpy_s'] * 1e3:.1f} ms = **{result['memcpy_GBps']:.2f} GB/s** (read + write).",
        f"- `build_s`: median of {result['repeats']} in-place builds into one pre-allocated model "
        "(default engine: no source-sized cache); `first_build_s`: the first build of a fresh "
        "engine (it also draws the small sorted |delta| samples). GB/s = (models read + one written) x "
        "model bytes / build_s. mergekit s: one `run_merge` of the same config (reads the "
        "checkpoints, writes the merged model: its per-candidate cost); speedup = mergekit s / "
        "build_s.",
        "- Recipes: linear = 3 sources at 1/3 (no base); GTA methods: base + 3 sources, weight 1.0,"
        " density 0.5 (DELLA epsilon 0.1); slerp: base + source1, t = 0.5; model_stock: base + 3.",
        "",
        "| method | models read | build_s | first_build_s | GB/s | x memcpy | mergekit s | speedup "
        "| >= 0.5x memcpy | faster than mergekit "
        "| vs mergekit: elements not close (max abs diff) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    contended = []
    for name, e in result["methods"].items():
        bw, mk = targets(name, e)
        sp = e["speedup_vs_mergekit"]
        diff, bad = e.get("mergekit_max_abs_diff"), e.get("mergekit_mismatched")
        if name not in DETERMINISTIC and e["mergekit_s"] is not None:
            diff_s = "random masks"
        elif diff is None:
            diff_s = "—"
        else:
            diff_s = f"{bad:,} / {m['params']:,} ({diff:.1e})"
        flag = ""
        if e.get("memcpy_GBps_adjacent", math.inf) < 0.5 * result["memcpy_GBps"]:
            flag = " †"
            contended.append(name)
        lines.append(
            f"| {name}{flag} | {e['models_read']} | {e['build_s']:.3f} | "
            f"{e['first_build_s']:.3f} | "
            f"{e['GBps']:.2f} | {e['ratio_to_memcpy']:.2f} | {_num(e['mergekit_s'], '.2f')} | "
            f"{_num(sp, '.1f') + ('x' if sp is not None else '')} | {bw} | {mk} | {diff_s} |")
    met_bw = [n for n, e in result["methods"].items() if targets(n, e)[0] == "met"]
    miss_bw = [n for n, e in result["methods"].items() if targets(n, e)[0] == "missed"]
    miss_mk = [n for n, e in result["methods"].items() if targets(n, e)[1] == "missed"]
    measured_mk = [n for n, e in result["methods"].items() if e["speedup_vs_mergekit"] is not None]
    if contended:
        lines += ["", "† The memcpy measured just before this method ran at under half the run's "
                  "median (other processes were using the CPU then): its timings are pessimistic."]
    lines += [
        "",
        "Targets (from the issue):",
        "",
        "1. linear and task_arithmetic reach >= 0.5x memcpy bandwidth: "
        + (f"met by {', '.join(met_bw)}" if met_bw else "")
        + ("; " if met_bw and miss_bw else "")
        + (f"**missed** by {', '.join(miss_bw)}" if miss_bw else "")
        + ("not measured in this run" if not met_bw and not miss_bw else "") + ".",
        "2. Every method builds a candidate faster than mergekit: "
        + ("not measured in this run (no mergekit)" if not measured_mk else
           (f"**missed** by {', '.join(miss_mk)}" if miss_mk else
            f"met by all {len(measured_mk)} measured methods")) + ".",
        "",
        "For reference, the issue's mergekit seconds per candidate on the ~97.5M model here: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in ISSUE_MERGEKIT_S.items()) + ".",
        "",
        "`vs mergekit` compares evomerge's in-place result with mergekit's output element by "
        "element (`torch.isclose`, rtol 1e-5, atol 1e-7; deterministic methods only: DARE/DELLA "
        "draw different random masks by design). A few mismatches for ties/breadcrumbs are "
        "expected: both keep exactly k elements, but where |delta| ties at the threshold "
        "evomerge ranks by position (a stable sort) and mergekit's argsort arbitrarily, and "
        "evomerge computes float32 checkpoints in float64 where mergekit uses float32 "
        "(evomerge/merge/methods.py says so); any other mismatch is a difference in semantics. Every timed build started "
        "from a NaN-filled target and matched a fresh "
        "`Merger.build` exactly (max abs diff "
        + _num(max((e["max_abs_diff_vs_fresh_build"] for e in result["methods"].values()),
                   default=None), ".1e") + ").",
        END,
    ]
    return "\n".join(lines)


def write_markdown(path: Path, section: str) -> None:
    """Replace this benchmark's section between its markers; keep everything else in the file."""
    from _results import write_section

    write_section(path, section, START, END)


def text_table(result: dict[str, Any]) -> str:
    rows = [f"{'method':>16} {'build_s':>8} {'first_s':>8} {'GB/s':>6} {'xmemcpy':>7} "
            f"{'mergekit_s':>10} {'speedup':>8}"]
    for name, e in result["methods"].items():
        rows.append(f"{name:>16} {e['build_s']:8.3f} {e['first_build_s']:8.3f} {e['GBps']:6.2f} "
                    f"{e['ratio_to_memcpy']:7.2f} {_num(e['mergekit_s'], '10.2f'):>10} "
                    f"{_num(e['speedup_vs_mergekit'], '7.1f'):>7}x")
    return "\n".join(rows)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return _finite(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="~5M-param model instead of ~99M")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset (default: all of {','.join(ALL_METHODS)})")
    p.add_argument("--no-mergekit", action="store_true", help="skip the mergekit comparison")
    p.add_argument("--repeats", type=int, default=3, help="timed builds per method (median)")
    p.add_argument("--out-md", type=Path, default=None,
                   help="(re)write this benchmark's section of this markdown file")
    p.add_argument("--write-results", action="store_true",
                   help=f"same as --out-md {RESULTS_MD.relative_to(ROOT)}")
    p.add_argument("--profile", action="store_true",
                   help="also profile one warm build per method (torch.profiler + cProfile, "
                        "on stderr)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights")
    p.add_argument("--from-json", type=Path, default=None,
                   help="skip the run: re-render the markdown (and --json) from a saved --json "
                        "output")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads(N) first (default: torch's own choice)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.write_results and args.out_md is None:
        args.out_md = RESULTS_MD
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/merge_build.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    with stdout_to_stderr(args.json):
        if args.from_json is not None:
            result = json.loads(args.from_json.read_text())
        else:
            result = run(args)
            result["command"] = command.strip()
        log("\n" + text_table(result))
        if args.out_md is not None:
            write_markdown(args.out_md, markdown_section(result, result.get("command", "?")))
            log(f"wrote {args.out_md}")
    if args.json:
        print(json.dumps(_json_safe(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
