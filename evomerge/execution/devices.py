"""Which device a worker builds and evaluates on, and what it records about it.

``executor.device`` is ``auto | cpu | cuda | cuda:N``. A worker has a *slot* (local worker k has
slot k; the in-process evaluator, a Ray actor and a SLURM task have slot 0, because Ray and Slurm
already give each of them its own GPUs through ``CUDA_VISIBLE_DEVICES``). ``auto`` and ``cuda``
map slot k to visible GPU k mod G: N workers on G GPUs share them round-robin, one CUDA context
per process. ``cuda:N`` pins every worker to GPU N. The count of visible GPUs is an argument so
that tests cover the choice without a GPU. :func:`torch_threads` sets how many CPU threads the
driver and every worker give torch (``executor.threads``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["DeviceError", "describe", "resolve_device", "torch_threads", "visible_gpus"]


class DeviceError(ValueError):
    """The asked-for device does not exist on this machine; the message says what does."""


def visible_gpus() -> int:
    """CUDA devices this process can use (0 with a CPU-only torch build)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _no_gpu_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None:
        return f"CUDA_VISIBLE_DEVICES={hidden!r} hides every GPU"
    return "torch sees no CUDA device"


def resolve_device(spec: str, slot: int = 0, gpus: int | None = None) -> torch.device:
    """The device of the worker in ``slot`` for an ``executor.device`` value.

    ``gpus``: visible CUDA devices (default: ask torch). ``auto`` falls back to the CPU when
    there is none; ``cuda`` and ``cuda:N`` raise :class:`DeviceError` instead, naming why.
    """
    spec = spec.strip().lower()
    if spec == "cpu":
        return torch.device("cpu")
    count = visible_gpus() if gpus is None else gpus
    if spec == "auto" and count == 0:
        return torch.device("cpu")
    if spec in ("auto", "cuda"):
        if count == 0:
            raise DeviceError(f"device: {spec!r} asked for a GPU, but {_no_gpu_reason()}; use "
                              "device: auto or cpu")
        return torch.device("cuda", slot % count)
    if spec.startswith("cuda:") and spec[5:].isdigit():
        index = int(spec[5:])
        if index >= count:
            seen = f"{count} visible GPU(s)" if count else f"none ({_no_gpu_reason()})"
            raise DeviceError(f"device: {spec!r} does not exist here: {seen}")
        return torch.device("cuda", index)
    raise DeviceError(f"device: expected auto, cpu, cuda or cuda:N, got {spec!r}")


def describe(device: torch.device, dtype: torch.dtype | None) -> dict[str, Any]:
    """What a worker records about where it ran: device, dtype, and for a GPU its name and
    the ``CUDA_VISIBLE_DEVICES`` mapping (so ``cuda:0`` of a SLURM task can be told apart)."""
    out: dict[str, Any] = {"device": str(device),
                           "dtype": str(dtype).removeprefix("torch.") if dtype else None}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            out["cuda_visible_devices"] = visible
    return out


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` (None: unchanged) for the block. On a shared
    machine, torch's default (one thread per core, spinning) made LM evaluation 16x slower."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
