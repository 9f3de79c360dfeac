"""Export a merged state dict as a loadable Hugging Face directory, atomically.

The directory is written under a temporary name beside its destination (safetensors shards, the
base model's config with the written dtype, the tokenizer and other sidecar files of
:data:`_SIDECAR_PATTERNS`, optionally the recipe) and published by one rename, so a reader sees
either no model or a whole one. A full disk raises :class:`DiskFullError` and leaves nothing
behind; temporary directories of exports whose process died are cleaned on the next export.
Reading and checking checkpoints is :mod:`evomerge.merge.checkpoints`.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from evomerge.merge.checkpoints import (CONFIG, SAFE_INDEX, SAFE_WEIGHTS, SAFETENSORS_DTYPES,
                                        CheckpointError, PathLike, config_problems, dtype_code,
                                        inspect_model, read_config)

__all__ = ["DiskFullError", "export_dtype", "export_model", "parse_size"]

logger = logging.getLogger(__name__)

RECIPE = "recipe.yaml"

# Files a model needs besides its weights and config.json: tokenizer, chat template, generation
# defaults, processor settings, and remote code named by config.json's ``auto_map``. An allowlist,
# not "everything but weights", so a base model's README/model card never passes itself off as
# the merge's.
_SIDECAR_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",  # sentencepiece: tokenizer.model, spiece.model, sentencepiece.bpe.model
    "*.tiktoken",
    "chat_template.*",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "*.py",
)
_SIDECAR_DIRS = ("additional_chat_templates",)
_OWNER_FILE = ".evomerge-export-owner"
# Temp dirs of exports running in this process (threads), which stale-cleanup must not delete.
_ACTIVE_TMP: set[Path] = set()


class DiskFullError(CheckpointError, OSError):
    """An export ran out of disk space (or quota); the message is one line saying what was being
    written, that nothing was written, and to free space and run again. Also an ``OSError``
    whose ``errno`` is ``ENOSPC``/``EDQUOT``, for callers that handle those."""

    def __init__(self, message: str, code: int = errno.ENOSPC) -> None:
        OSError.__init__(self, code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[type, tuple[str, int]]:
        return (type(self), (self.message, self.errno))


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or ``"500MB"``, ``"2GB"``, ``"1.5GiB"`` (KB/MB/GB are powers of
    ten and KiB/MiB/GiB powers of two, as in Hugging Face's ``max_shard_size``)."""
    if isinstance(size, bool):
        raise ValueError(f"max_shard_size: expected bytes or a string like '5GB', got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        m = _SIZE_RE.match(size) if isinstance(size, str) else None
        if m is None:
            raise ValueError(
                f"max_shard_size: cannot parse {size!r}; use an int of bytes or e.g. '500MB', '5GB'"
            )
        value = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "B").upper()])
    if value <= 0:
        raise ValueError(f"max_shard_size: must be positive, got {size!r}")
    return value


def export_dtype(
    *choices: torch.dtype | str | None, sources: Sequence[PathLike] = ()
) -> torch.dtype | None:
    """The dtype an export should write: the first of ``choices`` that is set (callers pass the
    recipe's ``out_dtype``, then its ``dtype``), else the one floating-point dtype of the
    ``sources``' weights (read from headers only: bf16 in, bf16 out), else None (write the
    tensors as they are).

    Exports need this because the tensors handed to :func:`export_model` are not always in the
    dtype the user merged in: a search materialises its best candidate from the fitness model,
    which usually computes in float32.
    """
    for choice in choices:
        if isinstance(choice, torch.dtype):
            return choice
        if choice:
            try:
                dtype = getattr(torch, str(choice).removeprefix("torch."))
            except AttributeError:
                dtype = None
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {choice!r}; use e.g. bfloat16, float16, float32")
            return dtype
    found: set[torch.dtype] = set()
    for path in sources:
        for meta in inspect_model(path).tensors.values():
            dt = SAFETENSORS_DTYPES.get(meta.dtype)
            if dt is not None and dt.is_floating_point:
                found.add(dt)
    return found.pop() if len(found) == 1 else None


def _validate_state_dict(state_dict: Mapping[str, torch.Tensor]) -> None:
    if not state_dict:
        raise CheckpointError("export_model: the state dict is empty; nothing to write")
    for name, t in state_dict.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(
                f"export_model: entry {name!r} is {type(t).__name__}; expected str -> torch.Tensor"
            )
        if t.is_meta or t.is_sparse:
            raise CheckpointError(
                f"export_model: tensor {name!r} is {'meta' if t.is_meta else 'sparse'}; "
                "materialise it as a dense tensor before exporting"
            )


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.shape == b.shape
        and a.stride() == b.stride()
        and a.storage_offset() == b.storage_offset()
        and a.dtype == b.dtype
    )


def _resolve_shared(
    state_dict: Mapping[str, torch.Tensor], base_names: set[str] | None
) -> tuple[list[str], set[str]]:
    """Which names to write, and which of them to clone, for tensors that share storage.

    safetensors refuses tensors that share memory (tied weights such as ``lm_head.weight`` and
    ``model.embed_tokens.weight``). The choice here never loses information:

    * an alias is dropped only when it is the same view as a kept tensor **and** the base
      checkpoint (``base_dir``) omits that name too, i.e. the architecture re-ties it on load;
      the name the base checkpoint stores is the one kept;
    * every other sharer is cloned and written under its own name (costs disk, always loads).
    """
    groups: dict[tuple[str, int], list[str]] = {}
    for name, t in state_dict.items():
        storage = t.untyped_storage()
        if storage.nbytes():
            groups.setdefault((str(t.device), storage.data_ptr()), []).append(name)
    dropped: set[str] = set()
    clones: set[str] = set()
    for names in groups.values():
        if len(names) < 2:
            continue
        if base_names is not None:
            kept_by_base = [n for n in names if n in base_names]
            keeper = kept_by_base[0] if kept_by_base else names[0]
            for n in names:
                if n not in base_names and n != keeper and _same_view(
                    state_dict[n], state_dict[keeper]
                ):
                    dropped.add(n)
                    logger.info(
                        "not writing %r: it shares storage with %r and the base checkpoint "
                        "stores only the latter (tied weights are re-tied on load)", n, keeper
                    )
        remaining = [n for n in names if n not in dropped]
        clones.update(remaining[1:])
    return [n for n in state_dict if n not in dropped], clones


def _header_overhead(name: str, t: torch.Tensor, code: str) -> int:
    """An upper bound on the bytes one tensor adds to a safetensors header."""
    entry = {name: {"dtype": code, "shape": list(t.shape), "data_offsets": [10**15, 10**15]}}
    return len(json.dumps(entry))


def _written_bytes(name: str, t: torch.Tensor, out_dtype: torch.dtype | None) -> int:
    """Bytes one tensor adds to a shard (data and an upper bound on its header entry)."""
    dt = out_dtype if out_dtype is not None and t.is_floating_point() else t.dtype
    return t.numel() * dt.itemsize + _header_overhead(name, t, dtype_code(dt))


def _plan_shards(
    names: list[str], state_dict: Mapping[str, torch.Tensor], out_dtype: torch.dtype | None,
    limit: int,
) -> list[list[str]]:
    """Greedy, order-preserving split so each *file* (header included) stays within ``limit``;
    a tensor larger than the limit gets a shard of its own, as Hugging Face does."""
    base = 8 + len(json.dumps({"__metadata__": {"format": "pt"}})) + 8  # length, metadata, padding
    shards: list[list[str]] = []
    current: list[str] = []
    used = base
    for name in names:
        cost = _written_bytes(name, state_dict[name], out_dtype)
        if current and used + cost > limit:
            shards.append(current)
            current, used = [], base
        current.append(name)
        used += cost
    if current:
        shards.append(current)
    return shards


def _shard_name(i: int, n: int) -> str:
    return SAFE_WEIGHTS if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _fsync_path(path: Path) -> None:
    """Flush a file or directory to disk so a rename never publishes unwritten data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where Linux says it (``/proc/self/status``:
    setting and restoring it would race with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publishable(tmp: Path) -> None:
    """Give every file and directory under ``tmp`` (``tmp`` included) ordinary permissions:
    0644 / 0755 minus the umask. ``mkdtemp`` makes 0700, safetensors writes 0600 and copied
    sidecars keep their source's mode; a published model is meant to be read by others."""
    mask = _umask()
    for root, dirs, files in os.walk(tmp):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
    os.chmod(tmp, 0o777 & ~mask)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _prepare(
    t: torch.Tensor, out_dtype: torch.dtype | None, clone: bool
) -> torch.Tensor:
    t = t.detach().to("cpu")
    if out_dtype is not None and t.is_floating_point():
        t = t.to(out_dtype)
    if clone:
        t = t.clone()
    return t.contiguous()


def _write_shards(
    tmp: Path, state_dict: Mapping[str, torch.Tensor], shards: list[list[str]],
    clones: set[str], out_dtype: torch.dtype | None, progress: bool,
) -> None:
    """Write the shards (and the index when there are several), one shard in memory at a time."""
    weight_map: dict[str, str] = {}
    total = 0
    with _progress(progress, sum(map(len, shards))) as advance:
        for i, names in enumerate(shards):
            fname = _shard_name(i, len(shards))
            tensors: dict[str, torch.Tensor] = {}
            for name in names:
                tensors[name] = _prepare(state_dict[name], out_dtype, name in clones)
                total += tensors[name].numel() * tensors[name].element_size()
                weight_map[name] = fname
                advance()
            safetensors.torch.save_file(tensors, tmp / fname, metadata={"format": "pt"})
            _fsync_path(tmp / fname)
            del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_text(tmp / SAFE_INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n")


class _progress:
    """A rich progress bar over tensors when asked for, a no-op otherwise."""

    def __init__(self, enabled: bool, total: int) -> None:
        self._bar: Any = None
        if enabled:
            from rich.progress import Progress

            self._bar = Progress(transient=False)
            self._total = total

    def __enter__(self) -> Any:
        if self._bar is None:
            return lambda: None
        self._bar.__enter__()
        task = self._bar.add_task("Writing tensors", total=self._total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def _written_float_dtype(
    state_dict: Mapping[str, torch.Tensor], names: list[str], out_dtype: torch.dtype | None
) -> torch.dtype | None:
    if out_dtype is not None:
        return out_dtype
    found = {state_dict[n].dtype for n in names if state_dict[n].is_floating_point()}
    return found.pop() if len(found) == 1 else None


def _write_config(tmp: Path, base_dir: Path, dtype: torch.dtype | None,
                  updates: Mapping[str, Any]) -> None:
    """Copy config.json, making its dtype say what the shards hold.

    Transformers 5 loads with ``dtype="auto"`` by default, so a config that still says
    ``bfloat16`` over float32 shards would silently cast the merged weights on load. Both the
    current key (``dtype``) and the legacy one (``torch_dtype``) are updated where present.
    """
    config = read_config(base_dir)
    if not config:
        return
    config.update(updates)
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
        for k in keys:
            config[k] = name
    _write_text(tmp / CONFIG, json.dumps(config, indent=2) + "\n")


def _copy_sidecars(tmp: Path, base_dir: Path) -> None:
    """Copy tokenizer, chat template, generation config and remote-code files from the base."""
    seen: set[Path] = set()
    for pattern in _SIDECAR_PATTERNS:
        for src in sorted(base_dir.glob(pattern)):
            if src in seen or not src.is_file() or src.name in (CONFIG, RECIPE):
                continue
            if src.suffix in (".safetensors", ".bin") or src.name.endswith(".index.json"):
                continue
            seen.add(src)
            shutil.copyfile(src, tmp / src.name)
            _fsync_path(tmp / src.name)
    for dirname in _SIDECAR_DIRS:
        if (base_dir / dirname).is_dir():
            shutil.copytree(base_dir / dirname, tmp / dirname)
            for f in (tmp / dirname).rglob("*"):
                if f.is_file():
                    _fsync_path(f)


def _temp_dirs(out_dir: Path, kind: str) -> Iterator[Path]:
    pattern = f".{glob.escape(out_dir.name)}.{kind}-*"
    return (p for p in out_dir.parent.glob(pattern) if p.is_dir())


def _owner_is_dead(tmp: Path) -> bool:
    """Whether the export that created ``tmp`` is gone (so its directory is safe to delete).

    Unknown owners (no owner file) count as dead; a live process on this host, or any process on
    another host (shared filesystems), is left alone.
    """
    try:
        owner = json.loads((tmp / _OWNER_FILE).read_text())
        host, pid = owner["host"], int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return True
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return pid == os.getpid() and tmp not in _ACTIVE_TMP


def _clean_stale(out_dir: Path) -> None:
    """Remove leftovers of exports to ``out_dir`` that were killed before they finished."""
    for tmp in _temp_dirs(out_dir, "tmp"):
        if _owner_is_dead(tmp):
            logger.info("removing stale export directory %s", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
    for old in _temp_dirs(out_dir, "old"):
        if out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            logger.warning(
                "%s: an earlier overwrite of %s was interrupted; the previous version is kept "
                "there, rename it back if you need it", old / "prev", out_dir
            )


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` to ``out_dir``; an existing ``out_dir`` is set aside first and
    only deleted once the new one is in place."""
    old: Path | None = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rename(out_dir, old / "prev")  # within one filesystem: atomic
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old / "prev", out_dir)
            old.rmdir()
        raise
    _fsync_path(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_model(
    state_dict: Mapping[str, torch.Tensor],
    out_dir: PathLike,
    *,
    base_dir: PathLike | None = None,
    recipe_yaml: str | None = None,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = False,
    config_updates: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``state_dict`` as a Hugging Face model directory at ``out_dir``, atomically.

    From ``base_dir`` (if given) come ``config.json`` (its dtype set to the dtype written),
    ``generation_config.json``, tokenizer and chat-template files, and remote-code ``*.py``.
    Weights are written as safetensors: ``model.safetensors``, or
    ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json`` when the files
    would exceed ``max_shard_size`` (file size, header included). ``dtype`` casts floating-point
    tensors. ``recipe_yaml`` is saved as ``recipe.yaml``. Tied weights: see :func:`_resolve_shared`.
    ``config_updates`` overrides fields of the base's config (a layer stack's
    ``num_hidden_layers``).

    Atomicity: everything is written and fsynced in a hidden sibling ``.{name}.tmp-*`` directory
    and renamed into place at the end, so ``out_dir`` is either absent, the old version, or the
    complete new one. Before the rename every file gets mode 0644 and every directory 0755, minus
    the process umask (as if created by ``open``/``mkdir``), not the 0600/0700 of temp files.
    Any exception removes the temporary directory; a killed process leaves only that hidden
    directory, which the next export to the same ``out_dir`` deletes.

    Raises CheckpointError if ``out_dir`` exists and ``overwrite`` is False (nothing is written).
    Returns ``out_dir``.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise CheckpointError(
            f"{out_dir}: already exists; pass overwrite=True to replace it, or pick another path"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a directory; refusing to replace it")
    base = Path(base_dir) if base_dir is not None else None
    if base is not None and not base.is_dir():
        raise CheckpointError(f"{base}: base_dir is not a directory; pass the base model's folder")
    if base is not None and config_problems(base):
        raise CheckpointError(config_problems(base)[0])
    limit = parse_size(max_shard_size)
    _validate_state_dict(state_dict)

    base_names: set[str] | None = None
    if base is not None:
        try:
            base_names = set(inspect_model(base).tensors)
        except CheckpointError:
            base_names = None  # a config-only base: nothing to learn about tied names
    names, clones = _resolve_shared(state_dict, base_names)
    shards = _plan_shards(names, state_dict, dtype, limit)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out_dir)
    need = _export_bytes(state_dict, shards, dtype, base)
    _check_free_space(out_dir, need)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    _ACTIVE_TMP.add(tmp)
    try:
        owner = {"host": socket.gethostname(), "pid": os.getpid()}
        _write_text(tmp / _OWNER_FILE, json.dumps(owner))
        _write_shards(tmp, state_dict, shards, clones, dtype, progress)
        if base is not None:
            _write_config(tmp, base, _written_float_dtype(state_dict, names, dtype),
                          config_updates or {})
            _copy_sidecars(tmp, base)
        if recipe_yaml is not None:
            _write_text(tmp / RECIPE, recipe_yaml.rstrip("\n") + "\n")
        (tmp / _OWNER_FILE).unlink()
        _publishable(tmp)
        _fsync_path(tmp)
        _publish(tmp, out_dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        code = _disk_full(exc)
        if code is not None:
            raise DiskFullError(_disk_full_message(out_dir, need, code), code) from None
        raise
    finally:
        _ACTIVE_TMP.discard(tmp)
    return out_dir


def _export_bytes(state_dict: Mapping[str, torch.Tensor], shards: list[list[str]],
                  out_dtype: torch.dtype | None, base: Path | None) -> int:
    """About what an export writes: the shards (headers included) and the base's sidecars."""
    total = sum(_written_bytes(n, state_dict[n], out_dtype) for names in shards for n in names)
    if base is not None:
        for pattern in (CONFIG, *_SIDECAR_PATTERNS):
            for f in base.glob(pattern):
                if f.is_file() and f.suffix not in (".safetensors", ".bin"):
                    total += f.stat().st_size
    return total


def _free_bytes(directory: Path) -> int | None:
    """Bytes this process may still write under ``directory`` (root may use the reserved
    blocks); None when the filesystem does not say (it reports no size at all)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    if st.f_blocks == 0:
        return None
    blocks = st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail
    return blocks * st.f_frsize


def _check_free_space(out_dir: Path, need: int) -> None:
    """Refuse before writing when the filesystem already says the export cannot fit."""
    free = _free_bytes(out_dir.parent)
    if free is not None and need > free:
        raise DiskFullError(_disk_full_message(out_dir, need, errno.ENOSPC, free))


def _disk_full(exc: BaseException) -> int | None:
    """``ENOSPC``/``EDQUOT`` when ``exc`` is a write that ran out of space or quota: an OSError,
    or safetensors' own error, whose text carries the OS error number."""
    codes = {errno.ENOSPC} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in codes else None
    if isinstance(exc, safetensors.SafetensorError):
        for code in codes:
            if f"(os error {code})" in str(exc):
                return code
    return None


def _disk_full_message(out_dir: Path, need: int, code: int, free: int | None = None) -> str:
    free = _free_bytes(out_dir.parent) if free is None else free
    what = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
    room = f", {_human(free)} free" if free is not None else ""
    kept = " (the existing one is unchanged)" if out_dir.exists() else ""
    return (f"{what} writing {out_dir}: the model needs about {_human(need)} in "
            f"{out_dir.parent}{room}; nothing was written{kept}; free space and run again")


def _human(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"

