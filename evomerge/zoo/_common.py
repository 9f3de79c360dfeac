"""Scaffolding every zoo builder shares: the manifest cache, atomic JSON, pinned torch threads,
quiet Hugging Face logging and the training progress bar.

Each zoo writes its models first and its ``zoo.json`` manifest last (atomically), so a directory
holds a usable zoo exactly when its manifest is there and agrees with the requested build.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

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
def torch_threads(n: int) -> Iterator[None]:
    """Run the body with ``n`` torch intra-op threads, then restore the caller's setting.

    Zoos train on a pinned thread count: float reductions split differently across threads, so
    the weights would otherwise depend on the machine's core count.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


def progress_bar(enabled: bool):
    """A rich progress display on stderr with one row per training job and its running loss
    (``progress.add_task(label, total=steps, loss=nan)``); ``enabled=False`` shows nothing."""
    from rich.console import Console
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
        console=Console(stderr=True),
        disable=not enabled,
    )
