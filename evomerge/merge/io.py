"""Checkpoint I/O for local Hugging Face model directories.

Four jobs, each kept apart so callers can use the cheap ones without paying for the dear ones:

* **find** the weight files of a directory (:func:`weight_files`);
* **inspect** a checkpoint from its headers only (:func:`inspect_model`) and check that several of
  them can be merged at all (:func:`check_compatible`) before a single tensor is read;
* **load** a state dict safely (:func:`load_state_dict`): safetensors, or a ``.bin`` checkpoint
  through ``torch.load(weights_only=True)`` -- never an unrestricted pickle;
* **export** a merged state dict as a loadable HF directory, atomically (:func:`export_model`).

Everything here is local: nothing talks to the Hugging Face hub.

Dtypes are spelled the safetensors way throughout (``"F32"``, ``"BF16"``, ``"F16"``, ``"I64"`` ...),
because that is what a header says and what users see in model cards; :attr:`TensorMeta.torch_dtype`
converts back.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import math
import os
import pickle
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

__all__ = [
    "CheckpointError",
    "InputModelsError",
    "IncompatibleModelsError",
    "DiskFullError",
    "TensorMeta",
    "ModelInfo",
    "weight_files",
    "inspect_model",
    "load_state_dict",
    "check_compatible",
    "nonfinite_tensors",
    "nonfinite_problems",
    "check_finite",
    "export_model",
    "export_dtype",
    "parse_size",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PT_WEIGHTS = "pytorch_model.bin"
PT_INDEX = "pytorch_model.bin.index.json"
CONFIG = "config.json"
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

# safetensors refuses headers above 100 MB; a larger length field means a corrupt or hostile file.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
# How many tensor names one problem line lists before it summarises the rest.
_MAX_LISTED = 20
# How many non-finite tensors one problem line names (with their counts) before a total.
_NONFINITE_LISTED = 3
# Elements per isfinite() pass when counting the non-finite values of a flagged tensor: the bool
# temporary stays at 16 MB whatever the tensor's size.
_FINITE_CHUNK = 1 << 24
_OWNER_FILE = ".evomerge-export-owner"
# Temp dirs of exports running in this process (threads), which stale-cleanup must not delete.
_ACTIVE_TMP: set[Path] = set()

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name)
    for code, name in {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U8": "uint8",
        "U16": "uint16",
        "U32": "uint32",
        "U64": "uint64",
        "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "C64": "complex64",
    }.items()
    if hasattr(torch, name)
}
_TORCH_TO_CODE: dict[torch.dtype, str] = {dt: code for code, dt in _SAFETENSORS_DTYPES.items()}


# --------------------------------------------------------------------------------------------
# Errors and plain values
# --------------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or unsafe to load; the message names the path."""


class InputModelsError(CheckpointError):
    """Input models that cannot be merged as they are; ``problems`` holds every reason, one
    string each, each naming the model (missing config, unreadable or non-finite weights,
    incompatibilities).

    All problems are gathered before raising so a user fixes their model list in one go instead of
    discovering the mismatches one run at a time.
    """

    what = "problem(s) with the input models"

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: list[str] = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"{len(self.problems)} {self.what}; fix or drop the models named below:\n{lines}"
        )

    def __reduce__(self) -> tuple[type, tuple[list[str]]]:
        # Exceptions cross process boundaries (Ray, multiprocessing); keep `problems` intact.
        return (type(self), (self.problems,))


class IncompatibleModelsError(InputModelsError):
    """Models cannot be merged together (architecture, tensor names, shapes, dtypes)."""

    what = "compatibility problem(s)"


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


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of one stored tensor; ``dtype`` is a safetensors code such as ``"BF16"``."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype for ``dtype``; raises KeyError for codes this torch does not know."""
        return _SAFETENSORS_DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelInfo:
    """What a checkpoint is, read from its config and weight headers without loading tensors."""

    path: Path
    config: dict[str, Any] = field(hash=False)
    architecture: str | None
    tensors: dict[str, TensorMeta] = field(hash=False)


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code (``"F32"``) for a torch dtype, so every dtype here is spelled alike."""
    try:
        return _TORCH_TO_CODE[dtype]
    except KeyError:
        return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------
# Finding and inspecting checkpoints
# --------------------------------------------------------------------------------------------


def weight_files(path: PathLike) -> list[Path]:
    """The weight files of the checkpoint at ``path``, safetensors preferred over pickles.

    Lookup order (the first that exists wins): ``model.safetensors``; the shards named by
    ``model.safetensors.index.json``; any ``*.safetensors``; ``pytorch_model.bin``; the shards of
    ``pytorch_model.bin.index.json``. ``path`` may also be a single ``.safetensors``/``.bin`` file.
    Other ``*.bin`` files are never picked up because they are often non-weight pickles
    (``training_args.bin``).
    """
    return _locate(Path(path))[0]


def _locate(root: Path) -> tuple[list[Path], Path | None]:
    """Weight files plus the shard index they came from (None when not from an index)."""
    if not root.exists():
        raise CheckpointError(f"{root}: no such file or directory; pass a local model directory")
    if root.is_file():
        if root.suffix in (".safetensors", ".bin"):
            return [root], None
        raise CheckpointError(f"{root}: not a model directory or a .safetensors/.bin weight file")
    if (root / SAFE_WEIGHTS).is_file():
        return [root / SAFE_WEIGHTS], None
    if (root / SAFE_INDEX).is_file():
        return _index_shards(root / SAFE_INDEX), root / SAFE_INDEX
    loose = sorted(p for p in root.glob("*.safetensors") if p.is_file())
    if loose:
        return loose, None
    if (root / PT_WEIGHTS).is_file():
        return [root / PT_WEIGHTS], None
    if (root / PT_INDEX).is_file():
        return _index_shards(root / PT_INDEX), root / PT_INDEX
    raise CheckpointError(
        f"{root}: no weights found (looked for {SAFE_WEIGHTS}, {SAFE_INDEX}, *.safetensors, "
        f"{PT_WEIGHTS}, {PT_INDEX}); is this the model directory?"
    )


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{file}: cannot read JSON ({exc}); fix or regenerate the file"
        ) from exc


def _read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index, validated so shard names cannot escape the directory."""
    data = _read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: missing or empty 'weight_map'; regenerate the index")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(
                f"{index}: tensor {name!r} points at {shard!r}, which is not a plain file name in "
                "the model directory; refusing an index that reaches outside it"
            )
    return weight_map


def _index_shards(index: Path) -> list[Path]:
    shards = [index.parent / s for s in dict.fromkeys(_read_index(index).values())]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise CheckpointError(
            f"{index}: shard file(s) {', '.join(missing)} listed in the index do not exist; "
            "the download or copy is incomplete"
        )
    return shards


def _is_safetensors(file: Path) -> bool:
    return file.suffix == ".safetensors"


def read_safetensors_header(file: PathLike) -> dict[str, TensorMeta]:
    """Tensor shapes and dtypes from a safetensors header, reading only the header bytes.

    Parsed by hand (8-byte little-endian length, then JSON) rather than via ``safe_open`` so that
    inspecting many large checkpoints provably touches no tensor data, and so that a truncated
    or inconsistent file is reported with the tensor it breaks on.
    """
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{file}: too short to be a safetensors file; re-download it")
            n = int.from_bytes(prefix, "little")
            if n > min(_MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"{file}: header length {n} exceeds the file size or the 100 MB limit; "
                    "the file is truncated or not safetensors"
                )
            header = json.loads(f.read(n))
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read ({exc})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: header is not valid JSON; the file is corrupt") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: header is not a JSON object; the file is corrupt")
    data_len = size - 8 - n
    return {
        name: _header_entry(file, name, entry, data_len)
        for name, entry in header.items()
        if name != "__metadata__"
    }


def _header_entry(file: Path, name: str, entry: Any, data_len: int) -> TensorMeta:
    try:
        dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        ok = (
            isinstance(dtype, str)
            and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(start, int)
            and isinstance(end, int)
            and 0 <= start <= end <= data_len
        )
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise CheckpointError(
            f"{file}: header entry for tensor {name!r} is malformed or points past the end of the "
            "file; the file is truncated or corrupt"
        )
    meta = TensorMeta(tuple(shape), dtype)
    if dtype in _SAFETENSORS_DTYPES and end - start != meta.numel * meta.torch_dtype.itemsize:
        raise CheckpointError(
            f"{file}: tensor {name!r} has {end - start} bytes but shape {meta.shape} of {dtype} "
            "needs a different size; the file is corrupt"
        )
    return meta


def _torch_load(file: Path, **kwargs: Any) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``: tensors only; refusals become CheckpointError."""
    logger.warning(
        "%s: pickle checkpoint; loading with torch.load(weights_only=True), which refuses "
        "anything but tensors. Convert it to safetensors to skip this path.",
        file,
    )
    try:
        try:
            obj = torch.load(file, weights_only=True, **kwargs)
        except RuntimeError as exc:
            if not kwargs.get("mmap") or "zip" not in str(exc).lower():
                raise
            # Legacy (pre-zip) torch.save files cannot be memory-mapped; load them plainly.
            kwargs = {k: v for k, v in kwargs.items() if k != "mmap"}
            obj = torch.load(file, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{file}: refused to unpickle: it holds objects other than tensors, which could run "
            f"code on load ({str(exc).splitlines()[0]}). Use a safetensors copy of this model."
        ) from exc
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"{file}: cannot load as a torch checkpoint ({exc})") from exc
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(
            f"{file}: expected a flat mapping of tensor names to tensors, got "
            f"{type(obj).__name__}; save the model's state_dict() instead"
        )
    return dict(obj)


def _file_tensors(file: Path) -> dict[str, TensorMeta]:
    if _is_safetensors(file):
        return read_safetensors_header(file)
    state = _torch_load(file, mmap=True, map_location="meta")
    return {k: TensorMeta(tuple(v.shape), dtype_code(v.dtype)) for k, v in state.items()}


def _merge_unique(into: dict[str, Any], part: Mapping[str, Any], file: Path) -> None:
    """Add one shard's entries; a name seen in two shards makes the checkpoint ambiguous."""
    dup = into.keys() & part.keys()
    if dup:
        raise CheckpointError(
            f"{file}: tensor(s) {_names(sorted(dup))} also appear in another shard; "
            "the checkpoint is ambiguous, regenerate it"
        )
    into.update(part)


def _check_index_matches(index: Path | None, names: set[str]) -> None:
    """An index must describe its shards exactly; otherwise loaders would disagree on the model."""
    if index is None:
        return
    listed = set(_read_index(index))
    if listed != names:
        raise CheckpointError(
            f"{index}: weight_map does not match the shards (listed but absent: "
            f"{_names(sorted(listed - names)) or 'none'}; present but unlisted: "
            f"{_names(sorted(names - listed)) or 'none'}); regenerate the index"
        )


def _read_config(root: Path) -> dict[str, Any]:
    cfg_file = root / CONFIG
    if not root.is_dir() or not cfg_file.is_file():
        return {}
    config = _read_json(cfg_file)
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object, got {type(config).__name__}")
    return config


def _architecture(config: Mapping[str, Any]) -> str | None:
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    model_type = config.get("model_type")
    return model_type if isinstance(model_type, str) else None


def inspect_model(path: PathLike) -> ModelInfo:
    """Config, architecture and tensor metadata of a checkpoint, without loading tensor data.

    safetensors headers are parsed directly; ``.bin`` files are opened with
    ``torch.load(weights_only=True, mmap=True, map_location="meta")`` so no storage is read.
    """
    root = Path(path)
    files, index = _locate(root)
    config = _read_config(root)
    tensors: dict[str, TensorMeta] = {}
    for file in files:
        _merge_unique(tensors, _file_tensors(file), file)
    _check_index_matches(index, set(tensors))
    return ModelInfo(root, config, _architecture(config), tensors)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_state_dict(
    path: PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint (single file or sharded), loaded without arbitrary unpickling.

    safetensors files go through ``safetensors.torch.load_file``. A ``.bin`` checkpoint loads only
    via ``torch.load(weights_only=True)`` and logs a warning saying so; one that holds anything
    but tensors raises :class:`CheckpointError`. ``dtype`` casts floating-point tensors only, so
    integer buffers (position ids, quantisation tables) keep their meaning.
    """
    files, index = _locate(Path(path))
    state: dict[str, torch.Tensor] = {}
    for file in files:
        _merge_unique(state, _load_file(file, device), file)
    _check_index_matches(index, set(state))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state


def _load_file(file: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    if not _is_safetensors(file):
        return _torch_load(file, map_location=device)
    try:
        return safetensors.torch.load_file(file, device=str(device))
    except (OSError, safetensors.SafetensorError) as exc:
        raise CheckpointError(f"{file}: cannot load safetensors file ({exc})") from exc


def nonfinite_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``{name: how many NaN/inf values}`` for every floating-point tensor that holds any.

    One read-only pass over the weights, cheap enough to run at every load: ``torch.aminmax``
    per tensor (a NaN anywhere makes both ends NaN, an infinity shows at one end), a reduction
    that allocates nothing. Measured on two CPU cores (bf16, fp16, fp32 alike): about 50-70 ms
    per GB with the pages in memory, 200-250 ms per GB with the cores shared by other work; a
    Merger made over freshly memory-mapped files pays 350-400 ms per GB there, mostly mapping
    the pages the first build would map anyway (reading a cold checkpoint from disk costs what
    the disk costs, once). ``torch.isfinite(t).all()`` in chunks took 1.6-9 s per GB on the same
    cores. Only a tensor found non-finite is counted, ``_FINITE_CHUNK`` elements at a time, so
    no temporary as large as the tensor is ever made. Integer and bool tensors are skipped.
    """
    bad: dict[str, int] = {}
    for name, t in state.items():
        if not t.is_floating_point() or t.numel() == 0 or _finite(t):
            continue
        bad[name] = sum(int((~torch.isfinite(part)).sum()) for part in _chunks(t))
    return bad


def _chunks(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """Views of ``t`` of at most ``_FINITE_CHUNK`` elements that cover it (never a copy)."""
    if t.dim() > 1 and not t.is_contiguous():
        for sub in t:
            yield from _chunks(sub)
        return
    flat = t.reshape(-1)  # a view: contiguous, or at most one dimension
    for i in range(0, flat.numel(), _FINITE_CHUNK):
        yield flat[i:i + _FINITE_CHUNK]


def _finite(t: torch.Tensor) -> bool:
    try:
        lo, hi = torch.aminmax(t)
    except (RuntimeError, NotImplementedError):  # dtypes without a min/max kernel (float8)
        return all(bool(torch.isfinite(part.float()).all()) for part in _chunks(t))
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def nonfinite_problems(model: PathLike, state: Mapping[str, torch.Tensor],
                       cast: torch.dtype | None = None) -> list[str]:
    """One line naming ``model`` and (a few of) its tensors that hold NaN/inf, with counts; empty
    when every value is finite. ``cast``: the dtype the tensors were cast to on load, named in
    the line (values beyond its range become inf)."""
    bad = nonfinite_tensors(state)
    if not bad:
        return []
    shown = ", ".join(f"{n} ({c} of {state[n].numel()})"
                      for n, c in list(bad.items())[:_NONFINITE_LISTED])
    more = f", and {len(bad) - _NONFINITE_LISTED} more" if len(bad) > _NONFINITE_LISTED else ""
    after = (f" (as cast to {str(cast).removeprefix('torch.')} on load: values beyond its "
             "range become inf)" if cast is not None else "")
    return [f"{model}: {len(bad)} tensor(s) hold NaN/inf values{after}: {shown}{more}; a merge "
            "of them is NaN too: re-export or drop this model"]


def check_finite(paths: Sequence[PathLike]) -> list[str]:
    """:func:`nonfinite_problems` of each checkpoint in ``paths`` that loads (memory-mapped, as
    stored; unreadable ones are skipped: :func:`check_compatible` names them). One pass over
    the weights: for a driver that wants NaN/inf inputs refused before a run starts, or an
    error about some models' headers that should name the others' NaN/inf too."""
    problems: list[str] = []
    distinct: dict[Path, PathLike] = {}
    for p in paths:
        distinct.setdefault(Path(p).expanduser().resolve(), p)
    for path in distinct.values():
        try:
            state = load_state_dict(path)
        except CheckpointError:
            continue
        problems += nonfinite_problems(path, state)
    return problems


# --------------------------------------------------------------------------------------------
# Compatibility
# --------------------------------------------------------------------------------------------


def _names(names: Sequence[str]) -> str:
    """A readable, bounded list of tensor names for one error line."""
    shown = ", ".join(names[:_MAX_LISTED])
    rest = len(names) - _MAX_LISTED
    return f"{shown}, ... and {rest} more" if rest > 0 else shown


def _capped(lines: list[str], what: str, where: Path) -> list[str]:
    if len(lines) <= _MAX_LISTED:
        return lines
    return lines[:_MAX_LISTED] + [f"{where}: ... and {len(lines) - _MAX_LISTED} more {what}"]


def _compare(info: ModelInfo, ref: ModelInfo, check_dtypes: bool = True) -> list[str]:
    """Every way ``info`` differs from the reference model ``ref``, one line per problem."""
    problems: list[str] = []
    p = info.path
    if info.architecture and ref.architecture and info.architecture != ref.architecture:
        problems.append(
            f"{p}: architecture {info.architecture!r} differs from {ref.architecture!r} "
            f"of {ref.path}"
        )
    missing = [n for n in ref.tensors if n not in info.tensors]
    extra = [n for n in info.tensors if n not in ref.tensors]
    if missing:
        problems.append(f"{p}: missing tensor(s) present in {ref.path}: {_names(missing)}")
    if extra:
        problems.append(f"{p}: extra tensor(s) absent from {ref.path}: {_names(extra)}")
    shared = [n for n in ref.tensors if n in info.tensors]
    shapes = [
        f"{p}: tensor {n!r} has shape {info.tensors[n].shape}, "
        f"expected {ref.tensors[n].shape} as in {ref.path}"
        for n in shared
        if info.tensors[n].shape != ref.tensors[n].shape
    ]
    dtypes = [
        f"{p}: tensor {n!r} has dtype {info.tensors[n].dtype}, "
        f"expected {ref.tensors[n].dtype} as in {ref.path}"
        for n in shared
        if check_dtypes and info.tensors[n].dtype != ref.tensors[n].dtype
    ]
    problems += _capped(shapes, "shape mismatches", p)
    return problems + _capped(dtypes, "dtype mismatches", p)


def config_problems(path: PathLike) -> list[str]:
    """Why ``path`` cannot give a merge its ``config.json`` (none when it can): a merged model
    without one does not load, so the model the output's config comes from (the base, or the
    first model) must be a directory holding it."""
    root = Path(path)
    if not root.is_dir():
        return []  # a weight file, or no such path (inspect_model reports that)
    if not (root / CONFIG).is_file():
        return [f"{root}: no {CONFIG}; the merged model's config comes from this model (the base, "
                "or the first model), and a model without one does not load: use the full "
                "Hugging Face model directory"]
    return []


def check_compatible(paths: Sequence[PathLike], *, check_dtypes: bool = True,
                     needs_config: bool = True) -> list[ModelInfo]:
    """Check that the checkpoints can be merged; returns their infos in order.

    Every model is compared with the first (or, if the first cannot be read, the first that can):
    architecture (when both configs name one), tensor names, shapes and dtypes. Unreadable paths
    count as problems too, and so (``needs_config``) does a first path that is a directory
    without ``config.json``: the merge's config comes from it. ``check_dtypes=False`` tolerates
    dtype differences, for callers that cast every model to one dtype on load. Only headers are
    read, and all problems across all models are raised together as one
    :class:`IncompatibleModelsError`.
    """
    if not paths:
        raise CheckpointError("check_compatible: no model paths given; pass at least one directory")
    no_config = config_problems(paths[0]) if needs_config else []
    problems: list[str] = list(no_config)
    infos: list[ModelInfo] = []
    for path in paths:
        try:
            infos.append(inspect_model(path))
        except CheckpointError as exc:
            problems.append(str(exc))
    if infos:
        ref = infos[0]
        for info in infos[1:]:
            problems.extend(_compare(info, ref, check_dtypes))
    if problems:
        raise (InputModelsError if no_config else IncompatibleModelsError)(problems)
    return infos


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

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
            dt = _SAFETENSORS_DTYPES.get(meta.dtype)
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
    config = _read_config(base_dir)
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

