"""Scaffolding every zoo builder shares: the manifest cache, atomic JSON, pinned torch threads,
portable CPU kernels (a build reproducible across machines), quiet Hugging Face logging and the
training progress display (a rich bar on a terminal, plain periodic lines in a log).

Each zoo writes its models first and its ``zoo.json`` manifest last (atomically), so a directory
holds a usable zoo exactly when its manifest is there and agrees with the requested build.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self, TextIO

import torch

# Zoos train on a pinned thread count (torch_threads(BUILD_THREADS)): float reductions split
# differently across threads, so the weights would otherwise depend on the machine's core count.
from evomerge.execution.devices import torch_threads  # noqa: F401 - the zoos' builders use it
from evomerge.progress import hms, live_display, progress_interval

MANIFEST = "zoo.json"


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON to ``path`` via a temporary file and ``os.replace``, so a
    reader (or a killed writer) never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the manifest is not a secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def manifest_matches(out_dir: Path, expected: dict, required_files: Iterable[str]) -> bool:
    """Whether ``out_dir/zoo.json`` agrees with every key of ``expected`` and each model directory
    named in ``expected["models"]`` holds all of ``required_files``.

    A missing or unreadable manifest means "not built" (an interrupted build never wrote one).
    """
    try:
        found = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(found, dict) or any(found.get(k) != v for k, v in expected.items()):
        return False
    files = tuple(required_files)
    return all(
        (out_dir / d / name).is_file() for d in expected["models"].values() for name in files
    )


@contextmanager
def quiet_hf() -> Iterator[None]:
    """Silence transformers' own tqdm bars (one per save / load) and restore the setting after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


#: The environment a portable build trains under. Float training amplifies the last bit of
#: every kernel into different weights, and torch picks its kernels by CPU: ATen's vectorised
#: kernels by instruction set (AVX512 / AVX2 / default) and MKL's GEMMs by vendor and model
#: (an Intel Xeon and an AMD EPYC run different sgemm code even at equal ``cpu_capability``).
#: ``ATEN_CPU_CAPABILITY=default`` and ``MKL_CBWR=COMPATIBLE,STRICT`` (MKL's conditional
#: numerical reproducibility: one SSE2 code path on every x86-64 CPU, results independent of
#: array alignment) select code that runs alike everywhere; one OpenMP/MKL thread fixes the
#: reduction order. Both are read once per process, before the first kernel runs, so a
#: portable build trains in a child process started with them (:func:`run_portable`).
PORTABLE_ENV: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE,STRICT",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def portable_kernels_active() -> bool:
    """Whether this process already runs on the portable kernels of :data:`PORTABLE_ENV`
    (it was started with that environment, and torch took ATen's default capability)."""
    return (all(os.environ.get(k) == v for k, v in PORTABLE_ENV.items())
            and torch.backends.cpu.get_cpu_capability() == "DEFAULT")


def run_portable(module: str, function: str, kwargs: Mapping[str, Any]) -> None:
    """Call ``module.function(**kwargs)`` (JSON-able arguments) in a child Python started with
    :data:`PORTABLE_ENV`; its output goes where this process's goes. Raises RuntimeError naming
    the exit status when the child fails (its traceback is printed above)."""
    root = str(Path(__file__).resolve().parents[2])  # the directory that holds evomerge/
    env = {**os.environ, **PORTABLE_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    code = ("import importlib, json, sys; "
            f"getattr(importlib.import_module({module!r}), {function!r})"
            "(**json.loads(sys.argv[1]))")
    sys.stdout.flush()
    sys.stderr.flush()
    done = subprocess.run([sys.executable, "-c", code, json.dumps(dict(kwargs))], env=env,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{module}.{function} failed in its portable-kernel child process "
                           f"(exit status {done.returncode}); its error is printed above")


def kernel_facts() -> dict[str, str]:
    """What a build ran on, for its manifest: CPU, ATen capability, library versions."""
    import platform

    facts = {"cpu": _cpu_model() or platform.processor() or platform.machine(),
             "cpu_capability": torch.backends.cpu.get_cpu_capability(),
             "torch": torch.__version__}
    for lib in ("transformers", "tokenizers"):
        try:
            facts[lib] = __import__(lib).__version__
        except ImportError:
            pass
    return facts


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


class PlainProgress:
    """The progress display where no terminal shows a live bar (stdout is a log file or a
    pipe): for each job a line when it starts, then at most one per ``interval`` seconds, and
    one when it finishes, each flushed at once, e.g.
    ``[02:14:07] expert_add 120/500, loss 1.302, 0.4 s/step, elapsed 00:00:52, ETA 00:02:45``.
    Same calls as rich's ``Progress``: ``add_task(label, total=..., loss=...)``,
    ``update(job, advance=..., loss=...)``.
    """

    def __init__(self, stream: TextIO | None = None, interval: float | None = None) -> None:
        self.stream = stream
        self.interval = progress_interval() if interval is None else interval
        self._jobs: list[dict[str, Any]] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        now = time.monotonic()
        self._jobs.append({"label": description, "total": total, "done": 0, "fields": fields,
                           "started": now, "printed": now})
        self._print(self._jobs[-1])
        return len(self._jobs) - 1

    def update(self, job: int, *, advance: float = 0, **fields: Any) -> None:
        entry = self._jobs[job]
        entry["done"] += advance
        entry["fields"].update(fields)
        finished = entry["total"] is not None and entry["done"] >= entry["total"]
        if finished or time.monotonic() - entry["printed"] >= self.interval:
            self._print(entry)

    def _print(self, entry: dict[str, Any]) -> None:
        now = entry["printed"] = time.monotonic()
        done, total, elapsed = entry["done"], entry["total"], now - entry["started"]
        parts = [f"[{time.strftime('%H:%M:%S')}] {entry['label']} {done:g}"
                 + (f"/{total:g}" if total is not None else "")]
        loss = entry["fields"].get("loss")
        if isinstance(loss, float) and math.isfinite(loss):
            parts.append(f"loss {loss:.3f}")
        if done > 0:
            parts.append(f"{elapsed / done:.2f} s/step")
        parts.append(f"elapsed {hms(elapsed)}")
        if done > 0 and total is not None and done < total:
            parts.append(f"ETA {hms(elapsed / done * (total - done))}")
        print(", ".join(parts), file=self.stream or sys.stdout, flush=True)


def progress_bar(enabled: bool):
    """The training progress display, one row per job with its running loss
    (``progress.add_task(label, total=steps, loss=nan)``): a rich bar on stderr when stdout is
    a terminal, else :class:`PlainProgress` lines on stdout (a build logged to a file or a pipe,
    as under nohup or SLURM, is not silent); ``enabled=False`` shows nothing."""
    from rich.console import Console

    if enabled and not live_display():
        return PlainProgress(sys.stdout)
    console = Console(stderr=True)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        TextColumn("{task.description:<16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
    )
