#!/usr/bin/env python
"""Merge at real scale: time, peak memory and numerics of evomerge vs mergekit on bf16 Llamas.

What it measures (issue 12, "Real scale merge engine"), on synthetic Llama-shaped bf16 families
(vocab 32000, untied head; ~0.1B, 0.25B, 0.5B, 1B parameters; base + 3 sources, source = base +
0.01 std randn), written tensor by tensor as ~200 MB safetensors shards with an index and a
``config.json`` (``--workdir``, reused across runs when the files already exist):

1. Per size and method, each in a fresh process:

   * ``search``: a search-style engine run: ``Merger`` over the recipe's models (base + 3), one
     allocated target, a first build, then ``--repeats`` steady builds (median). Peak RSS
     (``VmHWM``) and peak private memory (``RssAnon`` of /proc/self/status, sampled every 10 ms
     by a thread), and a plain ``dst.copy_(src)`` of the same bytes for the bandwidth ratio;
     GB/s = (bytes of the inputs read + bytes written) / steady build s.
   * ``merge``: ``evomerge merge CONFIG --out DIR`` (wall s, peak RSS, peak private), the CLI run
     in a child that records its own ``VmHWM`` and samples its ``RssAnon``.
   * ``mergekit``: ``mergekit-yaml CONFIG OUT --lazy-unpickle`` the same way.

2. Numerics vs a float64 reference (in-process, real tensors of the smallest family, preferably
   0.1B: layer 0's q_proj and down_proj and the first 1024 embedding rows, cast to bf16, fp16,
   fp32): the fraction of elements of evomerge's and of mergekit's result that differ from the
   float64 formula rounded once to the dtype; TIES/breadcrumbs keep exactly k elements chosen by a
   stable ascending sort of |delta| computed in float64, and the kept counts are reported. DARE and
   DELLA use evomerge's masks (``evomerge.merge.methods.keep_mask``) and mergekit is fed the same
   masks through a patched ``torch.bernoulli``.

3. Least-squares lines of every figure against parameter count, and an extrapolation to 7B
   (Llama-2-7B shapes) and 8B (Llama-3-8B shapes) with base + 3 sources: CPU RAM (peak RSS) and
   GPU memory with the inputs resident (inputs + output + measured scratch).

4. ``--search``: a dare_ties per-layer search (``search_spaces/dare_ties_layerwise.yaml``) over a
   family (``--search-size``, default 1B) with a tiny local multiple-choice suite and a small
   trained tokenizer, run as ``evomerge run``: peak RSS (process tree) and s per candidate.

Usage::

    python benchmarks/merge_scale.py --sizes 0.1B                 # table on stderr
    python benchmarks/merge_scale.py --sizes 2M --json            # tiny custom size (smoke test)
    python benchmarks/merge_scale.py --json --write-results --search   # full, rewrites RESULTS.md
    python benchmarks/merge_scale.py --from-json out.json --write-results   # re-render only

``--sizes`` takes the presets 0.1B, 0.25B, 0.5B, 1B or any parameter count (``2M``, ``30M``),
mapped to a Llama config of about that many parameters. Progress goes to stderr; with ``--json``
stdout carries exactly one JSON object; ``--write-results`` rewrites only this benchmark's section
of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # _results.py sits beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_name, loadavg, run_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
START, END = "<!-- merge_scale:start -->", "<!-- merge_scale:end -->"

DEFAULT_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                   "breadcrumbs_ties", "della", "della_linear")
ALL_METHODS = DEFAULT_METHODS + ("slerp", "model_stock")
RANDOM_METHODS = {"dare_linear", "dare_ties", "della", "della_linear"}
DEFAULT_SIZES = "0.1B,0.25B,0.5B,1B"
N_SOURCES = 3
DENSITY, EPSILON, GAMMA = 0.5, 0.1, 0.01
DELTA_SCALE = 0.01  # source = base + DELTA_SCALE * std * randn
SHARD_BYTES = 200 * 10**6
GB = 10**9
NUMERICS_DTYPES = ("bfloat16", "float16", "float32")
# Targets (issue 12)
RSS_FACTOR, RSS_SLACK = 1.15, 0.5 * GB
PRIVATE_SLACK = 0.75 * GB
BANDWIDTH_TARGET = 0.5
RELATIVE_METHODS, RELATIVE_TARGET = ("ties", "dare_ties", "della", "breadcrumbs"), 4.0
SPEEDUP_TARGET, SPEEDUP_SIZES = 5.0, ("0.5B", "1B")
FIRST_TARGET = 1.5


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# =============================================================================================
# Shapes
# =============================================================================================


@dataclass(frozen=True)
class Shape:
    """A Llama shape (untied head)."""

    vocab: int
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Checkpoint names and shapes, in LlamaForCausalLM's state-dict order."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [(p + "self_attn.q_proj.weight", (h, h)),
                    (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)),
                    (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "mlp.gate_proj.weight", (self.inter, h)),
                    (p + "mlp.up_proj.weight", (self.inter, h)),
                    (p + "mlp.down_proj.weight", (h, self.inter)),
                    (p + "input_layernorm.weight", (h,)),
                    (p + "post_attention_layernorm.weight", (h,))]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    @property
    def params(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden,
                           intermediate_size=self.inter, num_hidden_layers=self.layers,
                           num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                           tie_word_embeddings=False, dtype="bfloat16",
                           architectures=["LlamaForCausalLM"])


PRESETS = {
    "0.1B": Shape(32000, 768, 2048, 7, 12, 12),     # ~99M
    "0.25B": Shape(32000, 1024, 2816, 14, 16, 16),  # ~245M
    "0.5B": Shape(32000, 1536, 4096, 14, 12, 12),   # ~495M
    "1B": Shape(32000, 2048, 5632, 17, 16, 16),     # ~1.0B
}
EXTRAPOLATE = {
    "7B": Shape(32000, 4096, 11008, 32, 32, 32),    # Llama-2-7B
    "8B": Shape(128256, 4096, 14336, 32, 32, 8),    # Llama-3-8B
}
_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMB])\s*$", re.IGNORECASE)


def parse_count(token: str) -> int:
    m = _COUNT.match(token)
    if not m:
        raise ValueError(f"size {token!r}: expected a preset ({', '.join(PRESETS)}) or a "
                         "parameter count like 2M, 30M, 0.3B")
    return int(float(m.group(1)) * {"K": 1e3, "M": 1e6, "B": 1e9}[m.group(2).upper()])


def shape_for(token: str) -> Shape:
    """A preset, or the widest Llama of about ``token`` parameters with at least 4 layers."""
    token = token.strip()
    if token in PRESETS:
        return PRESETS[token]
    n = parse_count(token)
    for h in (4096, 3072, 2048, 1536, 1024, 768, 512, 256, 128, 64):
        vocab = 32000 if h >= 512 else 1024
        inter = max(16, round(8 * h / 3 / 16) * 16)
        heads = max(1, h // 64)
        one = Shape(vocab, h, inter, 1, heads, heads)
        outside = 2 * vocab * h + h
        per_layer = one.params - outside
        layers = round((n - outside) / per_layer)
        if layers >= 4 or h == 64:
            return Shape(vocab, h, inter, max(1, layers), heads, heads)
    raise AssertionError("unreachable")


def size_tag(token: str, shape: Shape) -> str:
    return token.strip().replace(".", "p") + "-" + hashlib.sha1(
        json.dumps(asdict(shape)).encode()).hexdigest()[:8]


# =============================================================================================
# Synthetic families, written tensor by tensor
# =============================================================================================


def _tensor_seed(seed: int, name: str, k: int) -> int:
    digest = hashlib.blake2b(f"{seed}\0{name}\0{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _shard_plan(shape: Shape) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors grouped into ~SHARD_BYTES shards (bf16), in order; a big tensor gets its own."""
    shards: list[list] = [[]]
    size = 0
    for name, s in shape.tensors():
        nbytes = 2 * math.prod(s)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, s))
        size += nbytes
    return shards


def _family_marker(shape: Shape, seed: int) -> dict[str, Any]:
    return {"shape": asdict(shape), "seed": seed, "delta_scale": DELTA_SCALE,
            "shard_bytes": SHARD_BYTES, "sources": N_SOURCES, "dtype": "bfloat16", "version": 1}


def family_paths(root: Path) -> tuple[Path, list[Path]]:
    return root / "base", [root / f"source{k}" for k in range(1, N_SOURCES + 1)]


def ensure_family(root: Path, shape: Shape, seed: int = 0) -> tuple[Path, list[Path], bool]:
    """The family's base and source dirs; (re)written unless complete with this exact config.

    Written tensor by tensor: each base tensor is drawn (0.02 randn; RMSNorm weights 1 + 0.02
    randn), each source adds DELTA_SCALE * 0.02 randn (its own seed), all cast to bf16, and
    each model's current shard (~200 MB) is saved as soon as it is full: the generator holds
    at most one shard per model, never a whole model.
    """
    import torch
    from safetensors.torch import save_file

    base, sources = family_paths(root)
    marker = root / "family.json"
    want = _family_marker(shape, seed)
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return base, sources, False
    shutil.rmtree(root, ignore_errors=True)
    dirs = [base, *sources]
    for d in dirs:
        d.mkdir(parents=True)
        shape.config().to_json_file(str(d / "config.json"))
    plan = _shard_plan(shape)
    n = len(plan)
    weight_map: dict[str, str] = {}
    total = 0
    started = time.perf_counter()
    for i, shard in enumerate(plan):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        parts: list[dict[str, Any]] = [{} for _ in dirs]
        for name, s in shard:
            gen = torch.Generator().manual_seed(_tensor_seed(seed, name, 0))
            b = torch.randn(s, generator=gen).mul_(0.02)
            if len(s) == 1:
                b.add_(1.0)
            parts[0][name] = b.to(torch.bfloat16)
            for k in range(1, len(dirs)):
                gen = torch.Generator().manual_seed(_tensor_seed(seed, name, k))
                d = torch.randn(s, generator=gen).mul_(DELTA_SCALE * 0.02)
                parts[k][name] = d.add_(b).to(torch.bfloat16)
            del b
            weight_map[name] = fname
            total += 2 * math.prod(s)
        for d, part in zip(dirs, parts):
            save_file(part, str(d / fname), metadata={"format": "pt"})
        del parts
        log(f"  shard {i + 1}/{n} written ({time.perf_counter() - started:.0f} s)")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    for d in dirs:
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    marker.write_text(json.dumps(want))
    return base, sources, True


def warm_page_cache(dirs: list[Path]) -> float:
    """Read every file once so that every timed run starts from the same (warm) page cache."""
    started = time.perf_counter()
    for d in dirs:
        for f in sorted(d.iterdir()):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    return time.perf_counter() - started


# =============================================================================================
# Recipes
# =============================================================================================


def recipe_dict(method: str, base: Path, sources: list[Path], dtype: str = "bfloat16"
                ) -> dict[str, Any]:
    """One method's config in mergekit's format (absolute paths; ``dtype`` as given).

    linear: base + 3 sources as 4 inputs at weight 0.5 (normalised); GTA methods: base + 3
    sources, weight 1.0, density 0.5 (DELLA epsilon 0.1); slerp: base + source1 at t 0.5;
    model_stock: base + 3.
    """
    b, srcs = str(base), [str(s) for s in sources]
    if method == "linear":
        return {"merge_method": "linear",
                "models": [{"model": m, "parameters": {"weight": 0.5}} for m in [b, *srcs]],
                "dtype": dtype}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": b,
                "models": [{"model": b}, {"model": srcs[0]}], "parameters": {"t": 0.5},
                "dtype": dtype}
    if method == "model_stock":
        return {"merge_method": "model_stock", "base_model": b,
                "models": [{"model": s} for s in srcs], "dtype": dtype}
    params: dict[str, Any] = {"weight": 1.0, "density": DENSITY}
    if method.startswith("della"):
        params["epsilon"] = EPSILON
    return {"merge_method": method, "base_model": b,
            "models": [{"model": s, "parameters": dict(params)} for s in srcs], "dtype": dtype}


def models_read(method: str) -> int:
    return 2 if method == "slerp" else 1 + N_SOURCES


# =============================================================================================
# Memory: /proc/<pid>/status, sampled
# =============================================================================================


def read_status(pid: int | str = "self") -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile, RssShmem of a process, in bytes ({} once it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc/<pid>/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{p}/task/{task}/children") as fh:
                    kids = [int(c) for c in fh.read().split()]
                    found += kids
                    todo += kids
    return found


class Sampler:
    """A thread sampling a process's ``RssAnon`` (and ``VmRSS``; with ``tree``, summed over the
    process and its descendants) every ``interval`` s; ``phase()`` returns the maxima since the
    previous call and starts a new phase, ``peak`` holds the maxima over the whole run."""

    def __init__(self, pid: int | str = "self", interval: float = 0.01, tree: bool = False
                 ) -> None:
        self.pid, self.interval, self.tree = pid, interval, tree
        self.peak = {"anon": 0, "rss": 0, "tree_rss": 0, "tree_anon": 0}
        self._phase = dict(self.peak)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> dict[str, int]:
        st = read_status(self.pid)
        if not st:
            return {}
        now = {"anon": st.get("RssAnon", 0), "rss": st.get("VmRSS", 0)}
        if self.tree and isinstance(self.pid, int):
            kids = [read_status(p) for p in descendants(self.pid)]
            now["tree_rss"] = now["rss"] + sum(k.get("VmRSS", 0) for k in kids)
            now["tree_anon"] = now["anon"] + sum(k.get("RssAnon", 0) for k in kids)
        with self._lock:
            for key, v in now.items():
                self.peak[key] = max(self.peak[key], v)
                self._phase[key] = max(self._phase[key], v)
        return st

    def phase(self) -> dict[str, int]:
        self.sample()
        with self._lock:
            out, self._phase = dict(self._phase), {k: 0 for k in self._phase}
        return out

    def stop(self) -> dict[str, int]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.sample()
        return dict(self.peak)


# =============================================================================================
# Children: the search-style engine run, and the CLI wrapper
# =============================================================================================


def child_engine(opts: dict[str, Any]) -> dict[str, Any]:
    """One method at one size, as a search uses the engine: load, allocate, build, build."""
    sampler = Sampler("self", 0.01).start()
    import torch

    from evomerge.merge.engine import Merger
    from evomerge.recipe import MergeRecipe

    device = opts.get("device", "cpu")
    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(fn: Any) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    if opts.get("threads"):
        torch.set_num_threads(opts["threads"])
    recipe = MergeRecipe.from_dict(opts["recipe"])
    kwargs = {"device": device, **({"cache": opts["cache"]} if opts.get("cache") else {})}
    sampler.phase()
    t0 = time.perf_counter()
    merger = Merger(recipe.model_paths(), **kwargs)
    load_s = time.perf_counter() - t0
    load_phase = sampler.phase()
    target = merger.allocate()
    for t in target.values():  # a search's model is materialised before its first build
        t.zero_()
    sync()
    alloc_phase = sampler.phase()
    anon_after_alloc = read_status().get("RssAnon", 0)
    if cuda:
        gpu_after_alloc = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    first_s = timed(lambda: merger.build(recipe, into=target))
    first_phase = sampler.phase()
    steady = [timed(lambda: merger.build(recipe, into=target)) for _ in range(opts["repeats"])]
    steady_phase = sampler.phase()
    end = read_status()
    gpu_peak = torch.cuda.max_memory_allocated() if cuda else None
    gpu_scratch = gpu_peak - gpu_after_alloc if cuda else None
    out_bytes = sum(t.numel() * t.element_size() for t in target.values())
    finite = all(bool(torch.isfinite(t).all()) for t in list(target.values())[:4])

    # memcpy of the same bytes: the base's resident tensors into the target, else (an engine
    # that keeps no resident copy) the built target into a second allocation
    try:
        src = dict(merger.state(recipe.model_paths()[0]))
        memcpy_src = "resident base"
    except Exception:  # noqa: BLE001 - any API difference: fall back
        src = {n: t for n, t in target.items()}
        target = merger.allocate()
        memcpy_src = "built target (no resident inputs)"

    def copy() -> None:
        for name, t in src.items():
            target[name].copy_(t)

    copy()
    memcpy_times = [timed(copy) for _ in range(max(3, opts["repeats"]))]
    sampler.stop()
    phases = (load_phase, alloc_phase, first_phase, steady_phase)
    return {
        "load_s": load_s, "first_build_s": first_s, "steady_build_s": statistics.median(steady),
        "steady_times_s": steady, "output_bytes": out_bytes, "finite": finite,
        "peak_rss": end.get("VmHWM"),
        "peak_private": max(max(ph["anon"] for ph in phases), end.get("RssAnon", 0)),
        "end_private": end.get("RssAnon"), "end_rss": end.get("VmRSS"),
        "end_file_rss": end.get("RssFile"),
        "private_after_alloc": anon_after_alloc,
        "peak_private_phases": {"load": load_phase["anon"], "allocate": alloc_phase["anon"],
                                "first_build": first_phase["anon"],
                                "steady_builds": steady_phase["anon"]},
        "scratch_bytes": max(first_phase["anon"], steady_phase["anon"]) - anon_after_alloc,
        "memcpy_s": statistics.median(memcpy_times), "memcpy_bytes": 2 * out_bytes,
        "memcpy_source": memcpy_src, "gpu_peak_bytes": gpu_peak,
        "gpu_scratch_bytes": gpu_scratch,
        "merger_kwargs": {k: v for k, v in kwargs.items()},
        "torch_threads": torch.get_num_threads(),
    }


def child_wrap(result_file: Path, argv: list[str]) -> int:
    """Run a console script (``evomerge``, ``mergekit-yaml``) in this process, recording this
    process's own VmHWM and sampled RssAnon into ``result_file`` as JSON."""
    from importlib.metadata import entry_points

    sampler = Sampler("self", 0.01).start()
    name, args = argv[0], argv[1:]
    eps = entry_points(group="console_scripts", name=name)
    if not eps:
        raise SystemExit(f"no console script {name!r} installed")
    fn = next(iter(eps)).load()
    sys.argv = [name, *args]
    t0 = time.perf_counter()
    rc: Any = 0
    try:
        ret = fn()
        rc = ret if isinstance(ret, int) else 0
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    wall = time.perf_counter() - t0
    end = read_status()
    peak = sampler.stop()
    result_file.write_text(json.dumps({
        "rc": rc, "inner_wall_s": wall, "peak_rss": end.get("VmHWM"),
        "peak_private": max(peak["anon"], end.get("RssAnon", 0))}))
    return int(rc or 0)


def child_main(argv: list[str]) -> int:
    mode = argv[1]
    if mode == "engine":
        opts = json.loads(argv[2])
        print(json.dumps(child_engine(opts)), flush=True)
        return 0
    if mode == "wrap":
        return child_wrap(Path(argv[2]), argv[4:] if argv[3] == "--" else argv[3:])
    raise SystemExit(f"unknown child mode {mode!r}")


# =============================================================================================
# The parent: running children
# =============================================================================================


#: torch threads of every child (``--threads``; None: torch's default)
THREADS: int | None = None


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    if THREADS:
        env.update(OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    env.pop("FORCE_COLOR", None)
    return env


def run_engine_child(recipe: dict[str, Any], repeats: int, cache: str | None, device: str,
                     timeout: float) -> dict[str, Any]:
    opts = {"recipe": recipe, "repeats": repeats, "device": device, "threads": THREADS}
    if cache is not None:
        opts["cache"] = cache
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--child", "engine", json.dumps(opts)],
                          cwd=ROOT, env=_child_env(), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}"}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = time.perf_counter() - t0
    return out


def run_cli(argv: list[str], timeout: float, poll_tree: bool = False) -> dict[str, Any]:
    """``argv`` (a console script and its arguments) in a wrapped child: wall s (whole process,
    start-up included), its own peak RSS and peak private memory; with ``poll_tree`` also the
    peak summed RSS of its process tree (polled every 50 ms)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        result_file = Path(fh.name)
    cmd = [sys.executable, str(SCRIPT), "--child", "wrap", str(result_file), "--", *argv]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_child_env(), stdout=err,
                                stderr=subprocess.STDOUT, text=True)
        sampler = Sampler(proc.pid, 0.05, tree=True).start() if poll_tree else None
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "timeout"
        wall = time.perf_counter() - t0
        tree = sampler.stop() if sampler else None
        err.seek(0)
        output = err.read()
    try:
        data = json.loads(result_file.read_text())
    except (OSError, ValueError):
        data = {}
    finally:
        result_file.unlink(missing_ok=True)
    if rc != 0 or data.get("rc", 1) != 0:
        return {"error": f"{shlex.join(argv[:2])}: exit {rc}: {output.strip()[-1500:]}",
                "wall_s": wall}
    out = {"wall_s": wall, "peak_rss": data.get("peak_rss"),
           "peak_private": data.get("peak_private"), "inner_wall_s": data.get("inner_wall_s")}
    if tree:
        out["tree_peak_rss"] = tree["tree_rss"]
        out["tree_peak_private"] = tree["tree_anon"]
    return out


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def mergekit_available() -> bool:
    from importlib.metadata import entry_points

    return bool(entry_points(group="console_scripts", name="mergekit-yaml"))


def measure_size(token: str, shape: Shape, args: argparse.Namespace, methods: list[str],
                 use_mergekit: bool) -> dict[str, Any]:
    """Every method at one size: the engine child, evomerge merge, mergekit-yaml."""
    root = args.workdir / size_tag(token, shape)
    t0 = time.perf_counter()
    base, sources, written = ensure_family(root, shape, seed=args.seed)
    gen_s = time.perf_counter() - t0
    params = shape.params
    model_bytes = 2 * params
    log(f"[{token}] family {root}: {params:,} params, {model_bytes / GB:.2f} GB per model "
        f"({'written in %.0f s' % gen_s if written else 'reused'})")
    warm_s = warm_page_cache([base, *sources])
    entry: dict[str, Any] = {
        "shape": asdict(shape), "params": params, "model_bytes": model_bytes,
        "shards": len(_shard_plan(shape)), "dir": str(root), "generated": written,
        "generate_s": gen_s if written else None, "warm_read_s": warm_s, "methods": {}}
    out_root = args.workdir / "out" / size_tag(token, shape)
    timeout = args.timeout
    for method in methods:
        raw = recipe_dict(method, base, sources)
        n_read = models_read(method)
        inputs, output = n_read * model_bytes, model_bytes
        m: dict[str, Any] = {"models_read": n_read, "inputs_bytes": inputs,
                             "output_bytes": output, "loadavg_1min": loadavg()}
        config = write_yaml(out_root / f"{method}.yaml", raw)
        log(f"[{token}] {method}: search-style engine run ...")
        search = run_engine_child(raw, args.repeats, args.cache, args.device, timeout)
        m["search"] = search
        if "error" not in search:
            gbps = (inputs + output) / search["steady_build_s"] / GB
            memcpy_gbps = search["memcpy_bytes"] / search["memcpy_s"] / GB
            m.update(GBps=gbps, memcpy_GBps=memcpy_gbps, ratio_to_memcpy=gbps / memcpy_gbps)
            log(f"    steady {search['steady_build_s']:.3f} s (first {search['first_build_s']:.3f}"
                f" s, load {search['load_s']:.1f} s), {gbps:.2f} GB/s = "
                f"{gbps / memcpy_gbps:.2f}x memcpy; peak RSS {search['peak_rss'] / GB:.2f} GB, "
                f"private {search['peak_private'] / GB:.2f} GB, scratch "
                f"{search['scratch_bytes'] / GB:.2f} GB")
        else:
            log(f"    FAILED: {search['error'][-400:]}")
        out_dir = out_root / f"{method}-evomerge"
        shutil.rmtree(out_dir, ignore_errors=True)
        merge = run_cli(["evomerge", "merge", str(config), "--out", str(out_dir), "--overwrite",
                         "--device", args.device], timeout)
        shutil.rmtree(out_dir, ignore_errors=True)
        m["merge"] = merge
        log("    evomerge merge: " + (f"{merge['wall_s']:.1f} s, peak RSS "
                                      f"{merge['peak_rss'] / GB:.2f} GB, private "
                                      f"{merge['peak_private'] / GB:.2f} GB"
                                      if "error" not in merge
                                      else "FAILED " + merge["error"][-400:]))
        m["mergekit"] = None
        if use_mergekit:
            out_dir = out_root / f"{method}-mergekit"
            shutil.rmtree(out_dir, ignore_errors=True)
            mk_args = ["mergekit-yaml", str(config), str(out_dir), "--lazy-unpickle",
                       "--no-write-model-card", "--no-copy-tokenizer", "--quiet",
                       "--random-seed", str(args.seed)]
            if args.device.startswith("cuda"):
                mk_args += ["--cuda"]
            mk = run_cli(mk_args, timeout)
            shutil.rmtree(out_dir, ignore_errors=True)
            m["mergekit"] = mk
            if "error" not in mk and "error" not in search:
                m["speedup_vs_mergekit"] = mk["wall_s"] / search["steady_build_s"]
            log("    mergekit-yaml: " + (f"{mk['wall_s']:.1f} s, peak RSS "
                                         f"{mk['peak_rss'] / GB:.2f} GB, private "
                                         f"{mk['peak_private'] / GB:.2f} GB"
                                         if "error" not in mk else "FAILED " + mk["error"][-400:]))
        entry["methods"][method] = m
    shutil.rmtree(out_root, ignore_errors=True)
    return entry


# =============================================================================================
# Numerics vs float64
# =============================================================================================


def numerics_tensors(base: Path, sources: list[Path], shape: Shape) -> dict[str, list[Any]]:
    """Layer 0's q_proj and down_proj and the first 1024 embedding rows of every model."""
    from safetensors import safe_open

    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    wanted = {"model.layers.0.self_attn.q_proj.weight": None,
              "model.layers.0.mlp.down_proj.weight": None,
              "model.embed_tokens.weight": min(shape.vocab, 1024)}
    out: dict[str, list[Any]] = {}
    for name, rows in wanted.items():
        out[name] = []
        for d in [base, *sources]:
            with safe_open(str(d / index[name]), framework="pt") as fh:
                out[name].append(fh.get_slice(name)[:rows] if rows else fh.get_tensor(name))
    return out


def _stable_rank_mask(delta64: Any, keep: slice) -> Any:
    """1.0 on the elements whose stable ascending rank of |delta| (float64) is in ``keep``."""
    import torch

    flat = delta64.abs().flatten()
    order = torch.sort(flat, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.float64)
    mask[order[keep]] = 1.0
    return mask.view_as(delta64)


def reference_mask(kind: str, delta64: Any) -> Any:
    n = delta64.numel()
    if kind == "magnitude":
        k = max(1, int(DENSITY * n))
        return _stable_rank_mask(delta64, slice(n - k, n))
    target = int(DENSITY * n)
    n_bot = max(0, n - target - int(GAMMA * n))
    return _stable_rank_mask(delta64, slice(n_bot, n_bot + target))


SPEC = {  # method: (sparsification, consensus, normalize, rescale)
    "task_arithmetic": (None, False, False, False),
    "ties": ("magnitude", True, True, False),
    "dare_ties": ("random", True, False, True),
    "dare_linear": ("random", False, False, True),
    "breadcrumbs": ("magnitude_outliers", False, False, False),
    "breadcrumbs_ties": ("magnitude_outliers", True, False, False),
    "della": ("della_magprune", True, True, True),
    "della_linear": ("della_magprune", False, False, True),
}


def reference(method: str, tensors: list[Any], masks: list[Any] | None) -> Any:
    """The method's formula in float64 (mergekit semantics), masks given for the sparsified
    GTA methods; the caller rounds it once to the dtype."""
    import torch

    x = [t.double() for t in tensors]
    if method == "linear":
        return sum(0.5 * t for t in x) / (0.5 * len(x))
    base, srcs = x[0], x[1:]
    if method == "slerp":
        a, b = base.flatten(), srcs[0].flatten()
        na, nb = a.norm(), b.norm()
        dot = float(((a / (na if na > 1e-8 else 1)) * (b / (nb if nb > 1e-8 else 1))).sum())
        dot = min(1.0, max(-1.0, dot))
        if abs(dot) > 0.9995:
            ca, cb = 0.5, 0.5
        else:
            th = math.acos(dot)
            ca, cb = math.sin(0.5 * th) / math.sin(th), math.sin(0.5 * th) / math.sin(th)
        return ca * base + cb * srcs[0]
    if method == "model_stock":
        offs = [(s - base).flatten() for s in srcs]
        cos = []
        for i, oa in enumerate(offs):
            for ob in offs[i + 1:]:
                cos.append(float((oa * ob).sum() / max(float(oa.norm() * ob.norm()), 1e-6)))
        c = max(-1.0, min(1.0, sum(cos) / len(cos)))
        n = len(srcs)
        denom = 1 + (n - 1) * c
        t = 0.0 if abs(denom) < 1e-6 else n * c / denom
        return t * (sum(srcs) / n) + (1 - t) * base
    sparsify, consensus, normalize, rescale = SPEC[method]
    weights = [1.0] * len(srcs)
    us = []
    for k, s in enumerate(srcs):
        delta = s - base
        if sparsify is not None:
            mask = masks[k].double() if masks is not None else reference_mask(sparsify, delta)
            kept = delta * mask
            if rescale:
                before, after = float(delta.abs().sum()), float(kept.abs().sum())
                if before >= 1e-7 and after >= 1e-7:
                    kept = kept * (before / after)
            delta = kept
        us.append(weights[k] * delta)
    w = torch.tensor(weights, dtype=torch.float64).view(-1, *([1] * base.dim()))
    stack = torch.stack(us)
    if consensus:
        elected = torch.where(stack.sum(0) >= 0, 1.0, -1.0).to(torch.float64)
        m = (stack.sign() == elected).to(torch.float64)
        mixed = (stack * m).sum(0)
        divisor = (w * m).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = stack.sum(0)
        divisor = w.sum(0).expand_as(mixed).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return base + mixed


def _frac_differ(result: Any, ref: Any) -> float:
    import torch

    a, b = result.double(), ref.double()
    return float((~(a == b)).to(torch.float64).mean())


class _MaskFeed:
    """Patches ``torch.bernoulli`` while mergekit runs so its DARE/DELLA draws return the given
    masks, in call order (mergekit draws one mask per source, in order)."""

    def __init__(self, masks: list[Any]) -> None:
        self.masks = list(masks)
        self.used = 0

    def __enter__(self) -> _MaskFeed:
        import torch

        self._orig = torch.bernoulli

        def fake(probs: Any, *a: Any, **k: Any) -> Any:
            mask = self.masks[self.used]
            self.used += 1
            return mask.reshape(probs.shape).to(probs.dtype)

        torch.bernoulli = fake
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        torch.bernoulli = self._orig


class _MaskSpy:
    """Records the masks mergekit's sparsifiers apply (``rescaled_masked_tensor``'s argument)."""

    def __enter__(self) -> _MaskSpy:
        import mergekit.sparsify as sp

        self.masks: list[Any] = []
        self._sp, self._orig = sp, sp.rescaled_masked_tensor

        def spy(tensor: Any, mask: Any, *a: Any, **k: Any) -> Any:
            self.masks.append(mask.detach().clone())
            return self._orig(tensor, mask, *a, **k)

        sp.rescaled_masked_tensor = spy
        return self

    def __exit__(self, *exc: Any) -> None:
        self._sp.rescaled_masked_tensor = self._orig


def mergekit_tensor(method: str, tensors: list[Any], dtype: Any) -> Any:
    """mergekit's own kernel for one tensor (``mergekit.merge_methods.api.merge_tensors``)."""
    from mergekit.merge_methods.api import merge_tensors

    if method == "linear":
        return merge_tensors(tensors, "linear", parameters={"weight": 0.5}, dtype=dtype,
                             out_dtype=dtype)
    if method == "slerp":
        return merge_tensors(tensors[:2], "slerp", parameters={"t": 0.5}, base_index=0,
                             dtype=dtype, out_dtype=dtype)
    if method == "model_stock":
        return merge_tensors(tensors, "model_stock", base_index=0, dtype=dtype, out_dtype=dtype)
    params: dict[str, Any] = {"weight": 1.0, "density": DENSITY}
    if method.startswith("della"):
        params["epsilon"] = EPSILON
    return merge_tensors(tensors, method, parameters=params, base_index=0, dtype=dtype,
                         out_dtype=dtype)


def evomerge_keep_masks(method: str, name: str, tensors: list[Any], seed: int = 0
                        ) -> tuple[list[Any], str]:
    """evomerge's keep-masks of one tensor, one per source (``methods.keep_mask``)."""
    import torch

    from evomerge.merge import methods as em

    inputs = em.TensorInputs(name=name, base=tensors[0], sources=list(tensors[1:]), seed=seed)
    spec = em.Sparsify(method=SPEC[method][0], density=DENSITY, gamma=GAMMA, epsilon=EPSILON)
    masks = [em.keep_mask(inputs, k, spec).to(torch.float64) for k in range(len(tensors) - 1)]
    return masks, "evomerge keep_mask"


def evomerge_magnitude_kept(method: str, name: str, tensors: list[Any]) -> list[int]:
    """Kept counts per source of evomerge's TIES/breadcrumbs selection."""
    masks, _ = evomerge_keep_masks(method, name, tensors)
    return [int((m != 0).sum()) for m in masks]


def run_numerics(token: str, shape: Shape, base: Path, sources: list[Path], methods: list[str],
                 workdir: Path, seed: int) -> dict[str, Any]:
    """Every selected method on a few real tensors in bf16/fp16/fp32, against float64."""
    import torch

    from evomerge.merge.engine import Merger
    from evomerge.recipe import MergeRecipe

    try:
        import mergekit.merge_methods.api  # noqa: F401
        have_mk = True
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        have_mk = False
    raw = numerics_tensors(base, sources, shape)
    rows: list[dict[str, Any]] = []
    root = workdir / "numerics"
    for dtype_name in NUMERICS_DTYPES:
        dtype = getattr(torch, dtype_name)
        tensors = {n: [t.to(dtype) for t in ts] for n, ts in raw.items()}
        # evomerge through its public engine: the tensors written as four tiny checkpoints
        shutil.rmtree(root, ignore_errors=True)
        dirs = [root / "base", *[root / f"source{k}" for k in range(1, N_SOURCES + 1)]]
        from safetensors.torch import save_file

        for i, d in enumerate(dirs):
            d.mkdir(parents=True)
            shutil.copy(base / "config.json", d / "config.json")
            save_file({n: ts[i].contiguous() for n, ts in tensors.items()},
                      str(d / "model.safetensors"), metadata={"format": "pt"})
        merger = Merger([str(d) for d in dirs], device="cpu")
        for method in methods:
            recipe = MergeRecipe.from_dict(recipe_dict(method, dirs[0], dirs[1:], dtype_name))
            try:
                built = merger.build(recipe)
            except Exception as exc:  # noqa: BLE001
                built = None
                log(f"  numerics {method} {dtype_name}: evomerge build failed: {exc}")
            for name, ts in tensors.items():
                row: dict[str, Any] = {"method": method, "dtype": dtype_name, "tensor": name,
                                       "n": ts[0].numel(), "evomerge_frac": None,
                                       "mergekit_frac": None}
                masks = None
                if method in RANDOM_METHODS:
                    masks, row["masks"] = evomerge_keep_masks(method, name, ts, seed)
                ref_masks = masks
                ref = reference(method, ts, ref_masks).to(dtype)
                if built is not None:
                    row["evomerge_frac"] = _frac_differ(built[name], ref)
                if have_mk:
                    try:
                        with _MaskSpy() as spy:
                            if method in RANDOM_METHODS:
                                with _MaskFeed(ref_masks):
                                    mk = mergekit_tensor(method, ts, dtype)
                            else:
                                mk = mergekit_tensor(method, ts, dtype)
                        row["mergekit_frac"] = _frac_differ(mk, ref)
                        if SPEC.get(method, (None,))[0] in ("magnitude", "magnitude_outliers"):
                            row["mergekit_kept"] = [int((m != 0).sum()) for m in spy.masks]
                    except Exception as exc:  # noqa: BLE001
                        row["mergekit_error"] = f"{type(exc).__name__}: {exc}"
                if SPEC.get(method, (None,))[0] in ("magnitude", "magnitude_outliers"):
                    n = ts[0].numel()
                    row["k"] = (max(1, int(DENSITY * n)) if SPEC[method][0] == "magnitude"
                                else int(DENSITY * n))
                    row["evomerge_kept"] = evomerge_magnitude_kept(method, name, ts)
                rows.append(row)
        del merger
    shutil.rmtree(root, ignore_errors=True)
    return {"family": token, "tensors": {n: list(ts[0].shape) for n, ts in raw.items()},
            "dtypes": list(NUMERICS_DTYPES), "mergekit": have_mk, "rows": rows}


# =============================================================================================
# Fits, extrapolation, targets
# =============================================================================================

FIGURES = {  # name: (tool, key path)
    "search_peak_rss": ("search", "peak_rss"),
    "search_private": ("search", "peak_private"),
    "search_scratch": ("search", "scratch_bytes"),
    "search_gpu_scratch": ("search", "gpu_scratch_bytes"),
    "steady_build_s": ("search", "steady_build_s"),
    "first_build_s": ("search", "first_build_s"),
    "merge_peak_rss": ("merge", "peak_rss"),
    "merge_private": ("merge", "peak_private"),
    "merge_wall_s": ("merge", "wall_s"),
    "mergekit_peak_rss": ("mergekit", "peak_rss"),
    "mergekit_private": ("mergekit", "peak_private"),
    "mergekit_wall_s": ("mergekit", "wall_s"),
}


def _figure(m: dict[str, Any], tool: str, key: str) -> float | None:
    part = m.get(tool)
    if not isinstance(part, dict) or "error" in part:
        return None
    v = part.get(key)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def linear_fit(xs: list[float], ys: list[float]) -> dict[str, Any] | None:
    """Least-squares y = a + b x (None under two distinct x)."""
    if len(set(xs)) < 2:
        return None
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    return {"intercept": a, "slope_per_param": b, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0,
            "points": n}


def fits(sizes: dict[str, Any]) -> dict[str, dict[str, Any]]:
    methods = list(dict.fromkeys(m for e in sizes.values() for m in e["methods"]))
    out: dict[str, dict[str, Any]] = {}
    for method in methods:
        out[method] = {}
        for fig, (tool, key) in FIGURES.items():
            pts = [(e["params"], _figure(e["methods"][method], tool, key))
                   for e in sizes.values() if method in e["methods"]]
            pts = [(x, y) for x, y in pts if y is not None]
            out[method][fig] = linear_fit([x for x, _ in pts], [y for _, y in pts])
    return out


def extrapolate(fitted: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for label, shape in EXTRAPOLATE.items():
        p = shape.params
        model_bytes = 2 * p
        for method, figs in fitted.items():
            at = {f: (fit["intercept"] + fit["slope_per_param"] * p if fit else None)
                  for f, fit in figs.items()}
            inputs, output = models_read(method) * model_bytes, model_bytes
            # measured on the GPU when the run had one, else the CPU build's scratch
            scratch = (at["search_gpu_scratch"] if at.get("search_gpu_scratch") is not None
                       else at.get("search_scratch"))
            rows.append({
                "model": label, "method": method, "params": p, "model_bytes": model_bytes,
                "inputs_bytes": inputs, "output_bytes": output,
                "cpu_ram_search": at["search_peak_rss"], "cpu_ram_merge": at["merge_peak_rss"],
                "cpu_ram_mergekit": at["mergekit_peak_rss"],
                "private_search": at["search_private"], "private_merge": at["merge_private"],
                "gpu_memory": inputs + output + max(0.0, scratch) if scratch is not None else None,
                "scratch_bytes": scratch, "steady_build_s_cpu": at["steady_build_s"],
                "first_build_s_cpu": at["first_build_s"], "merge_wall_s": at["merge_wall_s"],
                "mergekit_wall_s": at["mergekit_wall_s"],
            })
    return rows


def _target(rows: list, name: str, scope: str, value: float | None, limit: float | None,
            op: str = "<=") -> None:
    met = None
    if value is not None and limit is not None:
        met = value <= limit if op == "<=" else value >= limit
    rows.append({"target": name, "scope": scope, "value": value, "limit": limit, "op": op,
                 "met": met})


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for token, e in result["sizes"].items():
        ms = e["methods"]
        ta = _figure(ms.get("task_arithmetic", {}), "search", "steady_build_s")
        for method, m in ms.items():
            scope = f"{token} {method}"
            rss_limit = RSS_FACTOR * (m["inputs_bytes"] + m["output_bytes"]) + RSS_SLACK
            priv_limit = m["output_bytes"] + PRIVATE_SLACK
            _target(rows, "merge peak RSS <= 1.15 x (inputs + output) + 0.5 GB", scope,
                    _figure(m, "merge", "peak_rss"), rss_limit)
            _target(rows, "search build peak RSS <= 1.15 x (inputs + output) + 0.5 GB", scope,
                    _figure(m, "search", "peak_rss"), rss_limit)
            _target(rows, "merge private <= output + 0.75 GB", scope,
                    _figure(m, "merge", "peak_private"), priv_limit)
            _target(rows, "search build private <= output + 0.75 GB", scope,
                    _figure(m, "search", "peak_private"), priv_limit)
            steady = _figure(m, "search", "steady_build_s")
            first = _figure(m, "search", "first_build_s")
            _target(rows, "first build <= 1.5 x steady", scope, first,
                    FIRST_TARGET * steady if steady else None)
            if method == "task_arithmetic":
                _target(rows, "task_arithmetic >= 0.5 x memcpy bandwidth", scope,
                        m.get("ratio_to_memcpy"), BANDWIDTH_TARGET, ">=")
            if method in RELATIVE_METHODS:
                _target(rows, "steady build <= 4 x task_arithmetic's", scope, steady,
                        RELATIVE_TARGET * ta if ta else None)
            if token in SPEEDUP_SIZES:
                _target(rows, ">= 5x faster than mergekit per candidate", scope,
                        m.get("speedup_vs_mergekit"), SPEEDUP_TARGET, ">=")
    num = result.get("numerics") or {}
    for r in num.get("rows", []):
        scope = f"{num['family']} {r['method']} {r['dtype']} {r['tensor']}"
        ev, mk = r.get("evomerge_frac"), r.get("mergekit_frac")
        _target(rows, "numerics: fraction off fp64 <= mergekit's", scope, ev, mk)
        if "k" in r:
            kept = r.get("evomerge_kept")
            bad = [c for c in kept or [] if c != r["k"]]
            _target(rows, "kept counts = k (evomerge)", scope,
                    None if kept is None else float(bad[0] if bad else r["k"]), float(r["k"]),
                    "==")
            rows[-1]["met"] = None if kept is None else not bad
            mkept = r.get("mergekit_kept")
            if mkept is not None:
                bad = [c for c in mkept if c != r["k"]]
                _target(rows, "kept counts = k (mergekit)", scope,
                        float(bad[0] if bad else r["k"]), float(r["k"]), "==")
                rows[-1]["met"] = bool(mkept) and not bad
    return rows


# =============================================================================================
# The search on a family (evomerge run)
# =============================================================================================

_SUITE_WORDS = ("red green blue yellow black white cat dog bird fish one two three four five six "
                "seven eight nine ten up down left right big small hot cold day night").split()


def _train_tokenizer(out_dir: Path, texts: list[str], vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")
    fast.save_pretrained(str(out_dir))


def prepare_search(token: str, shape: Shape, args: argparse.Namespace) -> tuple[Path, Path]:
    """The experiment YAML and its run dir: a base dir (the family's base shards linked, plus a
    small trained tokenizer), a 2-choice suite of ``--search-items`` items, random search over
    dare_ties_layerwise with ``--search-budget`` candidates."""
    import random

    root = args.workdir / size_tag(token, shape)
    base, sources, _ = ensure_family(root, shape, seed=args.seed)
    sdir = args.workdir / f"search-{size_tag(token, shape)}"
    shutil.rmtree(sdir, ignore_errors=True)
    sbase = sdir / "base"
    sbase.mkdir(parents=True)
    for f in base.iterdir():
        (sbase / f.name).symlink_to(f)
    rng = random.Random(args.seed)
    data = sdir / "data"
    data.mkdir()
    texts = []
    for split in ("search", "heldout"):
        with open(data / f"pick_{split}.jsonl", "w") as fh:
            for i in range(args.search_items):
                a, b = rng.sample(_SUITE_WORDS, 2)
                prompt = f"{rng.choice(_SUITE_WORDS)} {rng.choice(_SUITE_WORDS)} is"
                fh.write(json.dumps({"id": f"{split}-{i}", "prompt": prompt,
                                     "choices": [a, b], "gold": 0}) + "\n")
                texts.append(f"{prompt} {a} {b}")
    texts += [" ".join(_SUITE_WORDS)] * 4
    _train_tokenizer(sbase, texts, vocab=min(shape.vocab, 512))
    write_yaml(sdir / "suite.yaml", {
        "description": "merge_scale search smoke: pick a word (2-way multiple choice)",
        "tasks": [{"name": "pick", "kind": "multiple_choice", "search": "data/pick_search.jsonl",
                   "heldout": "data/pick_heldout.jsonl"}],
        "objectives": [{"name": "acc", "tasks": ["pick"]}]})
    experiment = write_yaml(sdir / "experiment.yaml", {
        "name": "merge_scale_search",
        "models": {"base": str(sbase),
                   "sources": {f"source{k}": str(s) for k, s in enumerate(sources, 1)}},
        "space": "dare_ties_layerwise",
        "fitness": {"name": "lm", "suite": str(sdir / "suite.yaml"), "dtype": "bfloat16",
                    "batch_size": 2 * args.search_items, "device": args.device},
        "strategy": {"name": "random", "popsize": min(4, args.search_budget)},
        "budget": args.search_budget, "seed": args.seed, "export": False,
        "executor": {"kind": "local"}})
    return experiment, sdir / "run"


def run_search(token: str, shape: Shape, args: argparse.Namespace) -> dict[str, Any]:
    experiment, run_dir = prepare_search(token, shape, args)
    log(f"[search {token}] evomerge run {experiment} ({args.search_budget} candidates) ...")
    res = run_cli(["evomerge", "run", str(experiment), "--run-dir", str(run_dir)],
                  args.timeout * 4, poll_tree=True)
    out: dict[str, Any] = {"size": token, "params": shape.params, "budget": args.search_budget,
                           "experiment": str(experiment), "space": "dare_ties_layerwise",
                           "fitness": f"lm, 2-way multiple choice, {args.search_items} items",
                           "inputs_bytes": (1 + N_SOURCES) * 2 * shape.params, **res}
    summary_file = run_dir / "summary.json"
    if "error" not in res and summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        n = summary.get("n_trials") or 0
        timing = summary.get("timing", {})
        out.update(n_trials=n, n_failed=summary.get("n_failed"), run_wall_s=summary.get("wall_s"),
                   s_per_candidate=(summary["wall_s"] / n) if n else None,
                   mean_build_s=timing.get("mean_build_s"), mean_eval_s=timing.get("mean_eval_s"),
                   best=summary.get("best", {}).get("objectives"))
        log(f"    {n} candidates in {summary.get('wall_s', 0):.0f} s; build "
            f"{timing.get('mean_build_s', float('nan')):.2f} s + eval "
            f"{timing.get('mean_eval_s', float('nan')):.2f} s per candidate; peak RSS "
            f"{res['peak_rss'] / GB:.2f} GB (tree {res.get('tree_peak_rss', 0) / GB:.2f} GB)")
    else:
        log(f"    FAILED: {res.get('error', 'no summary.json')[-600:]}")
    return out


# =============================================================================================
# run / markdown / main
# =============================================================================================


def machine_info() -> dict[str, Any]:
    import torch

    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("transformers", "mergekit", "safetensors"):
        with contextlib.suppress(PackageNotFoundError):
            info[pkg] = version(pkg)
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        for extra in args.add_json:
            merge_runs(result, json.loads(extra.read_text()))
        return result
    global THREADS
    THREADS = args.threads
    started = time.perf_counter()
    load_start = loadavg()
    tokens = [t.strip() for t in args.sizes.split(",") if t.strip()]
    shapes = {t: shape_for(t) for t in tokens}
    methods = args.methods
    use_mergekit = not args.skip_mergekit and mergekit_available()
    if not args.skip_mergekit and not use_mergekit:
        log("mergekit-yaml is not installed: skipping the mergekit runs")
    args.workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "command": args.command, "machine": machine_info(), "methods": methods,
        "repeats": args.repeats, "cache": args.cache, "device": args.device,
        "threads": args.threads,
        "workdir": str(args.workdir), "mergekit_runs": use_mergekit,
        "recipes": {"linear": "base + 3 sources as 4 inputs, weight 0.5 (normalised)",
                    "gta": f"base + 3 sources, weight 1.0, density {DENSITY}, della epsilon "
                           f"{EPSILON}, breadcrumbs gamma {GAMMA} (default)",
                    "dtype": "bfloat16"},
        "sizes": {}, "numerics": None, "search": None}
    for token, shape in shapes.items():
        if args.no_timing:
            break
        result["sizes"][token] = measure_size(token, shape, args, methods, use_mergekit)
    if not args.no_numerics:
        ntok = "0.1B" if "0.1B" in shapes else min(shapes, key=lambda t: shapes[t].params)
        nshape = shapes[ntok]
        base, sources, _ = ensure_family(args.workdir / size_tag(ntok, nshape), nshape,
                                         seed=args.seed)
        log(f"numerics vs float64 on the {ntok} family ...")
        result["numerics"] = run_numerics(ntok, nshape, base, sources, methods, args.workdir,
                                          args.seed)
    if args.search:
        stok = args.search_size
        result["search"] = run_search(stok, shape_for(stok), args)
    result["fits"] = fits(result["sizes"])
    result["extrapolation"] = extrapolate(result["fits"])
    result["targets"] = targets(result)
    result["loadavg_1min"] = {"start": load_start, "end": loadavg()}
    result["wall_s"] = time.perf_counter() - started
    return _json_safe(result)


def merge_runs(result: dict[str, Any], extra: dict[str, Any]) -> None:
    """Fold another run's measurements into ``result`` (same machine and families assumed; its
    commands are kept) and recompute what is derived from them."""
    for token, size in extra["sizes"].items():
        if token in result["sizes"]:
            result["sizes"][token]["methods"].update(size["methods"])
        else:
            result["sizes"][token] = size
    result["methods"] = list(dict.fromkeys([*result["methods"], *extra["methods"]]))
    if extra.get("numerics") and result.get("numerics"):  # a re-measured method replaces its rows
        redone = {r["method"] for r in extra["numerics"]["rows"]}
        result["numerics"]["rows"] = [r for r in result["numerics"]["rows"]
                                      if r["method"] not in redone] + extra["numerics"]["rows"]
    if extra.get("search"):
        result["search"] = extra["search"]
    result["command"] = f"{result['command']}; {extra['command']}"
    result["fits"] = fits(result["sizes"])
    result["extrapolation"] = extrapolate(result["fits"])
    result["targets"] = targets(result)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _gb(x: float | None, fmt: str = ".2f") -> str:
    return "—" if x is None else format(x / GB, fmt)


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def _bytes(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _n(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _frac(x: float | None) -> str:
    return "—" if x is None else ("0" if x == 0 else f"{x:.2e}")


def markdown(result: dict[str, Any]) -> str:
    mach = result["machine"]
    load = result.get("loadavg_1min", {})
    lines = [
        START, "## Merge at scale: bf16 Llama families (benchmarks/merge_scale.py)", "",
        f"- Machine: {mach['cpu']}, {mach['cores']} cores ({mach['torch_threads']} torch threads), "
        f"{mach['ram_bytes'] / 2**30:.0f} GiB RAM; torch {mach['torch']}, transformers "
        f"{mach.get('transformers', '?')}, mergekit {mach.get('mergekit', 'n/a')}, Python "
        f"{mach['python']}; {mach['date']}; 1-min load average {_n(load.get('start'), '.1f')} "
        f"at start, {_n(load.get('end'), '.1f')} at end; device {result['device']}.",
        f"- Command: `{result['command']}`" + (
            " (several runs, folded with `--from-json FIRST --add-json NEXT ...`: each method's "
            "rows, the numerics and the search come from the last run that measured them; the "
            "machine line is the first run's)" if "; " in result["command"] else ""),
        "- Families: synthetic Llama (vocab 32000, untied head), bf16, base + 3 sources "
        f"(source = base + {DELTA_SCALE} x 0.02 randn), ~200 MB safetensors shards + index, "
        "written tensor by tensor. Recipes: " + "; ".join(
            f"{k}: {v}" for k, v in result["recipes"].items()) + ".",
        "- `search`: fresh process, `Merger` over the recipe's models, one allocated target, "
        f"first build, then median of {result['repeats']} steady builds"
        + (f" (`cache={result['cache']}`)" if result.get("cache") else " (engine defaults)")
        + (f"; every child pinned to {result['threads']} torch threads" if result.get("threads")
           else "")
        + ". `merge`: `evomerge merge CONFIG --out DIR`; `mergekit`: `mergekit-yaml CONFIG OUT "
        "--lazy-unpickle` (whole process wall, start-up included). RSS = the process's VmHWM; "
        "private = peak RssAnon (sampled every 10 ms). GB = 1e9 bytes. GB/s = (inputs read + "
        "output) / steady s; x memcpy against `dst.copy_(src)` of the same tensors in the same "
        "process; speedup = mergekit wall / steady build.",
    ]
    for token, e in result["sizes"].items():
        s = e["shape"]
        lines += ["", f"### {token}: {e['params']:,} params (hidden {s['hidden']}, inter "
                  f"{s['inter']}, {s['layers']} layers, {s['heads']}/{s['kv_heads']} heads), "
                  f"{_bytes(e['model_bytes'])} per model, {e['shards']} shard(s)", "",
                  "| method | steady s | first s | GB/s | x memcpy | search RSS | search private "
                  "| scratch | merge s | merge RSS | merge private | mergekit s | mergekit RSS "
                  "| mergekit private | speedup |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for method, m in e["methods"].items():
            sr, mg, mk = m.get("search") or {}, m.get("merge") or {}, m.get("mergekit") or {}
            sp = m.get("speedup_vs_mergekit")
            err = [f"{k} failed" for k, v in (("search", sr), ("merge", mg), ("mergekit", mk))
                   if "error" in v]
            lines.append(
                f"| {method}{' (' + ', '.join(err) + ')' if err else ''} | "
                f"{_n(sr.get('steady_build_s'), '.3f')} | {_n(sr.get('first_build_s'), '.3f')} | "
                f"{_n(m.get('GBps'), '.2f')} | {_n(m.get('ratio_to_memcpy'), '.2f')} | "
                f"{_gb(sr.get('peak_rss'))} | {_gb(sr.get('peak_private'))} | "
                f"{_gb(sr.get('scratch_bytes'))} | {_n(mg.get('wall_s'), '.1f')} | "
                f"{_gb(mg.get('peak_rss'))} | {_gb(mg.get('peak_private'))} | "
                f"{_n(mk.get('wall_s'), '.1f')} | {_gb(mk.get('peak_rss'))} | "
                f"{_gb(mk.get('peak_private'))} | "
                f"{_n(sp, '.1f')}{'x' if sp else ''} |")
        mem = [m["memcpy_GBps"] for m in e["methods"].values() if m.get("memcpy_GBps")]
        if mem:
            lines += ["", f"memcpy: median {statistics.median(mem):.2f} GB/s over the methods' "
                      "processes."]
    num = result.get("numerics")
    if num:
        lines += ["", f"### Numerics vs float64 ({num['family']} family tensors: "
                  + ", ".join(f"`{n}` {tuple(s)}" for n, s in num["tensors"].items()) + ")", "",
                  "Fraction of elements that differ from the float64 formula rounded once to the "
                  "dtype (TIES/breadcrumbs reference: exactly k elements by a stable ascending "
                  "sort of |delta| in float64; DARE/DELLA: the same masks for all three). Kept "
                  "counts per source (k = what must be kept).", "",
                  "| method | dtype | tensor | evomerge | mergekit | kept evomerge | kept mergekit "
                  "| k | masks |", "|---|---|---|---:|---:|---|---|---:|---|"]
        for r in num["rows"]:
            lines.append(
                f"| {r['method']} | {r['dtype']} | {r['tensor'].replace('model.', '')} | "
                f"{_frac(r.get('evomerge_frac'))} | {_frac(r.get('mergekit_frac'))} | "
                f"{','.join(map(str, r['evomerge_kept'])) if r.get('evomerge_kept') else '—'} | "
                f"{','.join(map(str, r['mergekit_kept'])) if r.get('mergekit_kept') else '—'} | "
                f"{r.get('k', '—')} | {r.get('masks', '—')} |")
    ext = result.get("extrapolation") or []
    if any(r["cpu_ram_search"] is not None for r in ext):
        sizes = ", ".join(f"{t} ({_params(e['params'])})" for t, e in result["sizes"].items())
        lines += ["", f"### Extrapolation (least-squares lines over {sizes}; base + 3 sources, "
                  "bf16)", "",
                  "GPU = inputs + output + measured scratch (the search build's private memory "
                  "above its level after allocating the target), all resident on the device. "
                  "CPU RAM = peak RSS, of which all but the private part is the memory-mapped "
                  "inputs (page cache the kernel can drop and re-read).", "",
                  "| model | method | inputs GB | CPU RAM search | of which private | CPU RAM "
                  "merge | CPU RAM mergekit | GPU memory | steady s (CPU) | mergekit s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in ext:
            lines.append(
                f"| {r['model']} | {r['method']} | {_gb(r['inputs_bytes'], '.1f')} | "
                f"{_gb(r['cpu_ram_search'], '.1f')} | {_gb(r['private_search'], '.1f')} | "
                f"{_gb(r['cpu_ram_merge'], '.1f')} | "
                f"{_gb(r['cpu_ram_mergekit'], '.1f')} | {_gb(r['gpu_memory'], '.1f')} | "
                f"{_n(r['steady_build_s_cpu'], '.1f')} | {_n(r['mergekit_wall_s'], '.0f')} |")
        cols = [f for f in FIGURES if f not in ("search_scratch", "search_gpu_scratch")]
        lines += ["", "Fitted lines, value = a + b x params (memory in GB, b per 1B params; times "
                  "in s, b in s per 1B params; r2 in parentheses):", "",
                  "| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for method, figs in result["fits"].items():
            cells = []
            for fig in cols:
                fit = figs.get(fig)
                unit = 1 if fig.endswith("_s") else GB
                cells.append("—" if not fit else
                             f"{fit['intercept'] / unit:.3g} + "
                             f"{fit['slope_per_param'] * 1e9 / unit:.3g} ({fit['r2']:.2f})")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    elif result["sizes"]:
        lines += ["", "Extrapolation: needs at least two sizes."]
    s = result.get("search")
    if s:
        lines += ["", f"### Search: dare_ties per layer over the {s['size']} family "
                  f"({s['params']:,} params, base + 3 sources)", ""]
        if "error" in s or not s.get("n_trials"):
            lines.append(f"**Failed**: {s.get('error', 'no summary')[-600:]}")
        else:
            lines.append(
                f"`evomerge run` ({s['space']}, random search, {s['fitness']}; inputs "
                f"{s['inputs_bytes'] / GB:.1f} GB): {s['n_trials']} candidates "
                f"({s['n_failed']} failed) in {s['run_wall_s']:.0f} s = "
                f"**{s['s_per_candidate']:.1f} s per candidate** including start-up and the final "
                f"source scoring (build {_n(s.get('mean_build_s'), '.2f')} s + fitness "
                f"{_n(s.get('mean_eval_s'), '.2f')} s per candidate); peak RSS "
                f"**{_gb(s['peak_rss'])} GB** (process tree {_gb(s.get('tree_peak_rss'))} GB), "
                f"private {_gb(s['peak_private'])} GB; on a {mach['ram_bytes'] / 2**30:.0f} GiB "
                f"machine: "
                f"{'runs' if (s['peak_rss'] or 0) < mach['ram_bytes'] else 'does not fit'}.")
    trows = result.get("targets") or []
    if trows:
        lines += ["", "### Targets (issue 12)", "", "| target | met | not met | not measured | "
                  "worst (value vs limit) |", "|---|---:|---:|---:|---|"]
        by: dict[str, list] = {}
        for t in trows:
            by.setdefault(t["target"], []).append(t)
        for name, ts in by.items():
            met = [t for t in ts if t["met"] is True]
            miss = [t for t in ts if t["met"] is False]
            none = [t for t in ts if t["met"] is None]
            worst = ""
            if miss:
                def excess(t: dict) -> float:
                    v, lim = t["value"], t["limit"]
                    if t["op"] == "==":
                        return abs(v - lim)
                    gap = v - lim if t["op"] == "<=" else lim - v
                    return gap / abs(lim or 1)
                w = max(miss, key=excess)
                big = "RSS" in name or "private" in name
                fmt = (lambda x: f"{x / GB:.2f} GB") if big else (lambda x: f"{x:.3g}")
                worst = f"{w['scope']}: {fmt(w['value'])} vs {fmt(w['limit'])}"
            verdict = "**met**" if met and not miss else ("**not met**" if miss else "—")
            lines.append(f"| {name} ({verdict}) | {len(met)} | {len(miss)} | {len(none)} | "
                         f"{worst} |")
    lines.append(END)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--write-results", action="store_true",
                   help="rewrite this benchmark's section of benchmarks/RESULTS.md")
    p.add_argument("--sizes", default=DEFAULT_SIZES,
                   help=f"comma-separated presets ({', '.join(PRESETS)}) or parameter counts "
                        f"(2M, 30M); default {DEFAULT_SIZES}")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated subset of {','.join(ALL_METHODS)} (default: all but "
                        "slerp and model_stock)")
    p.add_argument("--workdir", type=Path,
                   default=Path(tempfile.gettempdir()) / "evomerge-merge-scale",
                   help="where the families are written (reused when complete with the same "
                        "config) and outputs go")
    p.add_argument("--skip-mergekit", action="store_true", help="no mergekit-yaml runs")
    p.add_argument("--cache", choices=("off", "on"), default=None,
                   help="pass cache= to Merger (default: the engine's default)")
    p.add_argument("--repeats", type=int, default=3, help="steady builds per method (median)")
    p.add_argument("--device", default="cpu", help="Merger / evomerge merge device")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in every child (OMP_NUM_THREADS; default: torch's own)")
    p.add_argument("--no-numerics", action="store_true", help="skip the float64 comparison")
    p.add_argument("--no-timing", action="store_true",
                   help="skip the per-size runs (numerics / search only)")
    p.add_argument("--search", action="store_true", help="also run the evomerge search")
    p.add_argument("--search-size", default="1B", help="family of the search (default 1B)")
    p.add_argument("--search-budget", type=int, default=8, help="candidates (default 8)")
    p.add_argument("--search-items", type=int, default=4,
                   help="items per split of the search's suite (default 4)")
    p.add_argument("--timeout", type=float, default=3600, help="per child process, seconds")
    p.add_argument("--from-json", type=Path, default=None,
                   help="skip the run: re-render the markdown (and --json) from a saved --json")
    p.add_argument("--add-json", type=Path, action="append", default=[],
                   help="with --from-json: also take the sizes, methods and numerics rows of "
                        "another saved run (e.g. slow methods measured at fewer sizes); fits, "
                        "extrapolation and targets are recomputed over the union")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in ALL_METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(ALL_METHODS)}")
    try:
        for t in args.sizes.split(","):
            if t.strip():
                shape_for(t)
        shape_for(args.search_size)
    except ValueError as exc:
        p.error(str(exc))
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    args.workdir = args.workdir.absolute()
    args.command = "python benchmarks/merge_scale.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    argv_ = sys.argv if argv is None else ["merge_scale.py", *argv]
    if len(argv_) > 1 and argv_[1] == "--child":
        return child_main(argv_[1:])
    return run_main(argv, parse_args, run, markdown, START, END)


if __name__ == "__main__":
    sys.exit(main())
