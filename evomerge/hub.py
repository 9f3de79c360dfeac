"""Models by Hugging Face Hub id: ``org/name`` or ``org/name@revision`` -> a local snapshot.

Everything downstream of an experiment or a merge config reads local directories; this module
turns a Hub id into one, through ``huggingface_hub``'s own cache (``HF_HUB_CACHE``, default
``~/.cache/huggingface/hub``):

1. the cache first (``snapshot_download(local_files_only=True)``: no network call);
2. then, unless ``HF_HUB_OFFLINE`` is set, the Hub, fetching only what a merge reads
   (:data:`ALLOW_PATTERNS`: safetensors weights and their index, config.json,
   generation_config.json, tokenizer files, chat template; never pickles or GGUF files).

A reference is a Hub id only when it has the form ``org/name[@revision]`` (a valid repository
id with exactly one slash: ``gpt2`` or ``a/b/c`` are paths) and is not a local path: a string
naming an existing local directory is always that directory, and so is anything starting with
``/``, ``.`` or ``~`` (write ``./org/name`` to force a relative path) or whose first component
is an existing local directory (``models/base`` with a ``models/`` here is a path, present or
not).

The resolved directory is ``<cache>/models--org--name/snapshots/<commit>``;
:func:`cached_model` reads repo id and commit back from such a path, for provenance.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ALLOW_PATTERNS",
    "CachedModel",
    "HubError",
    "HubRef",
    "Resolved",
    "cached_model",
    "is_hub_id",
    "missing",
    "offline",
    "parse",
    "problem",
    "resolve",
]

#: The files of a repository that a merge reads (top-level files only: see ``IGNORE_PATTERNS``).
ALLOW_PATTERNS: tuple[str, ...] = (
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
    "*.tiktoken", "spiece.model", "sentencepiece*.model", "chat_template.*",
)  # fmt: skip
#: Files in sub-folders (other formats, ``original/`` checkpoints, ONNX exports) are not read.
IGNORE_PATTERNS: tuple[str, ...] = ("*/*",)


class HubError(ValueError):
    """A Hub id that cannot be resolved; the message names the id (callers add the field)."""


@dataclass(frozen=True)
class HubRef:
    """A parsed Hub id: ``repo_id`` (``org/name``) and the revision asked (None: the default
    branch)."""

    repo_id: str
    revision: str | None = None


@dataclass(frozen=True)
class CachedModel:
    """A snapshot directory of the Hugging Face cache: which repository, at which commit."""

    repo_id: str
    commit: str


@dataclass(frozen=True)
class Resolved:
    """A Hub id resolved to a snapshot: ``path`` (absolute), ``repo_id``, ``revision`` as asked
    (the default branch's name when none was), ``commit`` (the snapshot's 40-hex sha)."""

    path: str
    repo_id: str
    revision: str
    commit: str

    @property
    def pinned(self) -> str:
        """``org/name@<commit>``: the same model whatever the branch says later."""
        return f"{self.repo_id}@{self.commit}"

    def provenance(self) -> dict[str, str]:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit,
                "path": self.path}


# ---- what is a Hub id -------------------------------------------------------------------------


def parse(ref: str) -> HubRef | None:
    """``org/name[@revision]`` as a :class:`HubRef`; None when ``ref`` is a local path (see the
    module docstring for the rule) or not a valid repository id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(ref, str) or not ref or ref.startswith(("/", ".", "~")) or "\\" in ref:
        return None
    if Path(ref).is_dir():
        return None
    repo_id, at, revision = ref.partition("@")
    if repo_id.count("/") != 1 or (at and not revision):
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    if Path(repo_id.split("/")[0]).is_dir():  # a path under an existing local directory
        return None
    return HubRef(repo_id, revision or None)


def is_hub_id(ref: str) -> bool:
    """Whether ``ref`` names a Hub model rather than a local directory."""
    return parse(ref) is not None


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub read it at import, or as the environment says now."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or env in {"1", "ON", "YES", "TRUE"}


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


# ---- resolving ---------------------------------------------------------------------------------


def _download(hub_ref: HubRef, *, local: bool) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(hub_ref.repo_id, revision=hub_ref.revision,
                             allow_patterns=list(ALLOW_PATTERNS),
                             ignore_patterns=list(IGNORE_PATTERNS), local_files_only=local)


def _has_weights(path: str | Path) -> bool:
    return any(Path(path).glob("*.safetensors"))


def _cached(hub_ref: HubRef) -> str | None:
    """The cached snapshot directory of ``hub_ref`` (weights or not); no network."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return _download(hub_ref, local=True)
    except LocalEntryNotFoundError:  # not cached, or an incomplete snapshot
        return None


def _no_weights(ref: str, where: str = "on the Hub") -> str:
    return (f"{ref} has no safetensors weights {where} (evomerge never loads pickled "
            "*.bin/*.pt checkpoints)")


def _offline_problem(ref: str, snapshot: str | None) -> str:
    repo_id, _, revision = ref.partition("@")
    command = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    fix = f"download it first, e.g. `{command}`, or write ./{ref} for a local path"
    if snapshot is not None:
        return (f"{_no_weights(ref, f'in its cached snapshot {snapshot}')}, and HF_HUB_OFFLINE "
                f"is set ({fix})")
    return (f"{ref} is neither a local directory nor a model in the Hugging Face cache "
            f"({_cache_dir()}), and HF_HUB_OFFLINE is set ({fix})")


def _hub_problem(ref: str, exc: BaseException) -> str:
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub_ref = parse(ref)
    if isinstance(exc, GatedRepoError):
        return (f"{ref} is gated on the Hugging Face Hub: accept its terms and log in "
                "(`hf auth login`)")
    if isinstance(exc, RevisionNotFoundError):
        return f"{ref}: the Hub has no revision {hub_ref.revision!r} of {hub_ref.repo_id}"
    if isinstance(exc, RepositoryNotFoundError):
        return (f"{ref} is neither a local directory nor a model on the Hugging Face Hub (or it "
                "is private: log in with `hf auth login`)")
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return (f"{ref} is neither a local directory nor a cached Hub model, and the Hub could not "
            f"be reached ({type(exc).__name__}: {first_line})")


def problem(ref: str) -> str | None:
    """Why ``ref`` (a Hub id) cannot be resolved, or None if it can: a cached snapshot with
    safetensors weights, else (online) a model on the Hub with safetensors weights at that
    revision. Downloads nothing (online, one metadata request)."""
    hub_ref = parse(ref)
    if hub_ref is None:
        raise ValueError(f"{ref!r} is not a Hub id")
    snapshot = _cached(hub_ref)
    if snapshot is not None and _has_weights(snapshot):
        return None
    if offline():
        return _offline_problem(ref, snapshot)
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(hub_ref.repo_id, revision=hub_ref.revision)
    except Exception as exc:  # noqa: BLE001 - any failure to ask the Hub is reported, by id
        return _hub_problem(ref, exc)
    files = [s.rfilename for s in info.siblings or []]
    if not any(f.endswith(".safetensors") and "/" not in f for f in files):
        return _no_weights(ref)
    return None


def resolve(ref: str) -> Resolved:
    """The snapshot directory of the Hub id ``ref``: from the cache, else downloaded (only
    :data:`ALLOW_PATTERNS`) unless ``HF_HUB_OFFLINE`` is set. :class:`HubError` naming the id
    when it can be neither."""
    from huggingface_hub import constants

    hub_ref = parse(ref)
    if hub_ref is None:
        raise HubError(f"{ref!r} is not a Hub id (org/name or org/name@revision)")
    path = _cached(hub_ref)
    if path is None or not _has_weights(path):
        if offline():
            raise HubError(_offline_problem(ref, path))
        try:  # fetches what the cached snapshot lacks
            path = _download(hub_ref, local=False)
        except Exception as exc:  # reported by id, as problem() does
            raise HubError(_hub_problem(ref, exc)) from exc
        if not _has_weights(path):
            raise HubError(_no_weights(ref))
    path = str(Path(path).absolute())
    return Resolved(path, hub_ref.repo_id, hub_ref.revision or constants.DEFAULT_REVISION,
                    Path(path).name)


def missing(fields: Iterable[tuple[str, str]]) -> list[str]:
    """``"field: why"`` for each ``(field, reference)`` that is neither an existing local
    directory nor a resolvable Hub id: every problem at once, before anything is downloaded."""
    problems = []
    for field, ref in fields:
        if is_hub_id(ref):
            why = problem(ref)
        else:
            why = None if Path(ref).expanduser().is_dir() else f"{ref} is not a directory"
        if why:
            problems.append(f"{field}: {why}")
    return problems


# ---- provenance ----------------------------------------------------------------------------------


def cached_model(path: str | Path) -> CachedModel | None:
    """Repository and commit of a snapshot directory of a Hugging Face cache
    (``.../models--org--name/snapshots/<commit>``); None for any other path."""
    from huggingface_hub.file_download import REGEX_COMMIT_HASH, repo_folder_name

    path = Path(path)
    folder = path.parent.parent.name
    if path.parent.name != "snapshots" or not folder.startswith("models--"):
        return None
    repo_id = folder.removeprefix("models--").replace("--", "/")
    if (REGEX_COMMIT_HASH.fullmatch(path.name) is None
            or repo_folder_name(repo_id=repo_id, repo_type="model") != folder):
        return None
    return CachedModel(repo_id, path.name)
