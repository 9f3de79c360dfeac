"""lm-evaluation-harness adapter: score the in-memory merged model with lm-eval tasks.

The merge engine writes every candidate into one model object; this fitness wraps that object
once in lm-eval's ``HFLM`` (``pretrained=model, tokenizer=tok``) and reuses the wrapper for every
candidate, so nothing is reloaded and the harness's datasets are read once per fitness object.
Experiment configuration (fitness options)::

    fitness:
      name: lm-eval
      split_tasks:                 # objective/task key -> lm-eval task, per split
        search:  {add: tinylm_add_search,  sort_mc: tinylm_sort_mc_search}
        heldout: {add: tinylm_add_heldout, sort_mc: tinylm_sort_mc_heldout}
      # or, the same tasks for both splits (names, tags, groups or paths to task YAMLs):
      # tasks: [tinylm_add_search, my_tasks/other.yaml]
      include_path: fitness/lmeval  # default: the repository's fitness/lmeval/
      objectives:                   # default: one per task key, its accuracy metric
        - {name: mean_acc, tasks: all}
        - {name: add, tasks: [add], direction: maximize}
      metrics: {add: exact_match}   # optional: per-item metric per key (default acc/exact_match)
      dtype: auto                   # new_model()'s dtype: auto = the base config's (bf16 stays bf16)
      # lm-eval options: these are the defaults of every task entry (TASK_OPTIONS)
      num_fewshot: 0                # null: the task YAML's own (else 0), as simple_evaluate
      apply_chat_template: false    # the tokenizer's (default) chat template around each prompt
      fewshot_as_multiturn: null    # few-shot examples as chat turns; null: = apply_chat_template
      gen_kwargs: {max_gen_toks: 64, temperature: 0}   # generate_until tasks: updates their YAML's
      batch_size: 32
      limit: 50                     # first N items per task (or a fraction < 1, as lm-eval)

A task entry (an item of ``tasks`` or a value of ``split_tasks``) may be a mapping that
carries its own options over those defaults (``gen_kwargs`` merge key by key)::

      split_tasks:
        search:
          gsm: {task: gsm8k_search, num_fewshot: 5, gen_kwargs: {max_gen_toks: 256}}
          arc: {task: arc_search, batch_size: 8, limit: 200}
        heldout: ...

They are applied with lm-eval's own mechanisms, as ``simple_evaluate`` applies its arguments:
``num_fewshot`` and ``gen_kwargs`` through ``Task.set_config`` (a YAML that fixes
``num_fewshot: 0`` keeps it: an entry asking for shots there is an error, a default is
skipped; ``gen_kwargs`` given by an entry to a loglikelihood task is an error, a default is
skipped); ``apply_chat_template`` / ``fewshot_as_multiturn`` are ``evaluator.evaluate``
arguments and ``batch_size`` is the HFLM's, so tasks are evaluated in one call per distinct
setting. Every option is validated before anything is computed, in one error listing every
problem (unknown keys and generation options, types, ranges, a chat template the tokenizer
lacks, more shots than documents, ``max_gen_toks`` not below the model's context length).

Few-shot examples: lm-eval draws them from one seeded generator, document after document, so
the examples of an item depend on which items are built with it (``limit``, ``samples``), and
a task's generator is never reseeded between ``evaluate`` calls. Here each document's examples
are pinned once, at construction: those a full ``simple_evaluate(num_fewshot=k, limit=N)`` run
gives it (``fewshot_random_seed`` 1234); every later evaluation, of all items or of any subset
(IRT anchors), hands each document the same examples. Where a task has no ``fewshot_split``
(and no training/validation split) lm-eval draws from the evaluated documents without
excluding the document itself; a warning says so.

``limit`` and ``items``: ``num_items``, ``item_ids`` and ``item_scores`` cover the first
``limit`` documents of each task; ``items`` indices (and an IRT reduction's anchors) index that
range, so a reduction fitted under one ``limit`` is refused under another (its task sizes
differ).

``item_scores[key]`` is the per-item score from the harness's logged samples (``log_samples``),
ordered by document id, i.e. by the items' order in the task's data file; an objective is the mean
over its tasks of the mean item score (macro average). ``evaluate(..., items={key: indices})``
scores only those items and returns their scores in the order given (IRT anchor evaluation).

Data files: the local tasks in ``fitness/lmeval/`` read JSON lines with ``dataset_path: json`` and
``dataset_kwargs.data_files`` paths written *relative to the task's YAML file*. lm-eval itself
hands ``data_files`` to ``datasets.load_dataset`` unchanged, which resolves them against the
current directory (and ``data_dir`` too is cwd-relative); a YAML cannot say "next to this file"
except through ``!function`` code. So this adapter reads each leaf task's YAML with lm-eval's own
loader (``include:`` templates merged), rewrites relative ``data_files`` to absolute paths under
the YAML's directory, checks they exist, and passes the config to ``TaskManager.load`` as a dict:
it works from any current directory. Tasks given as groups or Python classes are loaded by
lm-eval as they are (their data files are not rewritten).

Offline: the constructor sets ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1`` (and the
already-imported ``datasets``/``huggingface_hub`` flags, which are read at import time), so a
task whose data is neither local nor cached fails at once instead of reaching for the hub. The
``datasets`` cache of the JSON files goes under ``HF_HOME``.

What lm-eval 0.4.13 cannot do here (and what this adapter does about it):

- ``evaluate(samples=...)`` pairs doc ids with the requested indices by position while it
  iterates the documents in file order, so unsorted indices get wrong doc ids; and an empty
  index list means "all documents". The adapter passes sorted unique indices, reorders the
  scores itself, and rejects empty lists.
- Its builtin task index takes ~5 s to build; it is only built when a task name is not found
  under ``include_path``.
- With an in-memory model, HFLM ignores ``device``/``dtype``: the model's own placement is used,
  so :meth:`LmEvalFitness.new_model` allocates the model in ``dtype`` on ``device`` (bf16
  log-likelihoods are bf16 logits' log-softmax, as lm-eval computes them for a bf16 model).
- A chat template is chosen only as the tokenizer's default: HFLM 0.4.13 does not apply a
  template named by ``apply_chat_template``, so the option is a boolean here.
- Scoring splits: it has none; the ``search``/``heldout`` split is a choice of tasks.
- Progress bars (tqdm) for building requests cannot be switched off per call.

Tokenization (what an equivalent evaluator must do to get identical per-item scores):
generation encodes the prompt with the tokenizer's defaults (its BOS), left-pads, decodes only the
new tokens with ``skip_special_tokens=True``, cuts at the first stop string; multiple choice
encodes ``prompt + choice`` and ``prompt`` and scores the tokens of the first past the length of
the second (trailing spaces of the prompt move to the choice first), summing their log-probs;
``acc`` is 1 when the first argmax is the gold index. :mod:`evomerge.models.causal_lm` does the same,
and the tests check the per-item scores are equal. Caveats found while checking:

- When BPE merges across the prompt/continuation boundary (``encode(prompt)`` not a prefix of
  ``encode(prompt + choice)``), the harness scores only the tokens beyond ``len(encode(prompt))``
  after the *prompt's* tokens: the merged part of the choice is silently not scored. The zoo's
  tokenizer never merges there (tested on every shipped item); other tokenizers may.
- Log-likelihoods differ by float noise (~1e-6 nats: the harness right-pads without a mask, ours
  left-pads with position ids), so an item whose best two choices are that close could flip.
- A prompt longer than ``max_position_embeddings - max_gen_toks`` is left-truncated by the
  harness; the ``lm`` fitness refuses it instead.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge.fitness.base import (
    EvalResult,
    Fitness,
    Objective,
    parse_objective_specs,
    resolve_dtype,
)

__all__ = [
    "DEFAULT_INCLUDE_PATH",
    "TASK_OPTIONS",
    "LmEvalFitness",
    "TaskOptions",
    "option_problems",
    "parse_gen_kwargs",
    "parse_objectives",
    "parse_task_keys",
    "resolve_data_files",
    "scores_from_samples",
]

#: The repository's catalog of lm-eval task YAMLs (a source checkout's ``fitness/lmeval/``).
DEFAULT_INCLUDE_PATH = Path(__file__).resolve().parents[2] / "fitness" / "lmeval"

SPLITS = ("search", "heldout")
#: Per-item metrics taken as "the task's accuracy", in order of preference.
ACCURACY_METRICS = ("acc", "exact_match")
_YAML_SUFFIXES = (".yaml", ".yml")
#: Options a task entry may carry; the fitness's options of the same names are their defaults.
TASK_OPTIONS = ("num_fewshot", "apply_chat_template", "fewshot_as_multiturn", "gen_kwargs",
                "batch_size", "limit")
#: lm-eval's names for "new tokens to generate", by priority (``models.utils.normalize_gen_kwargs``).
_MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
_LMEVAL_GEN_KEYS = ("until", *_MAX_TOKEN_KEYS)
#: Config fields HFLM reads the model's context length from (``HFLM.max_length``).
_CONTEXT_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx")

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Option parsing (pure)
# --------------------------------------------------------------------------------------------


Entry = tuple[str, dict[str, Any]]  # (task spec, the entry's own options)


def _entry(entry: Any, where: str, problems: list[str]) -> Entry | None:
    """One task entry: a name / YAML path, or ``{task: name, <TASK_OPTIONS>...}``."""
    if isinstance(entry, str):
        if entry.strip():
            return entry, {}
    elif isinstance(entry, Mapping):
        spec = entry.get("task")
        unknown = [k for k in entry if k != "task" and k not in TASK_OPTIONS]
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: "
                            f"task, {', '.join(TASK_OPTIONS)}")
        if not isinstance(spec, str) or not spec.strip():
            problems.append(f"{where}.task: expected a task name or YAML path, got {spec!r}")
            return None
        return spec, {k: v for k, v in entry.items() if k in TASK_OPTIONS}
    problems.append(f"{where}: expected a task name, YAML path or {{task: name, options}}, "
                    f"got {entry!r}")
    return None


def parse_task_keys(
    tasks: Sequence[Any] | None, split_tasks: Mapping[str, Mapping[str, Any]] | None
) -> tuple[list[Entry] | dict[str, dict[str, Entry]], list[str]]:
    """Validate the task options; returns ``(parsed, problems)``.

    An entry is a task name / tag / group / YAML path, or a mapping ``{task: <that>, <option>:
    ...}`` with any of :data:`TASK_OPTIONS` (checked by :func:`option_problems`, not here).
    ``parsed`` is the ``tasks`` list as ``[(spec, options)]`` (each entry may expand to several
    leaf tasks), or, for ``split_tasks``, ``{split: {key: (spec, options)}}`` with the same keys,
    in the same order, for both splits (a key is an objective's task and an ``item_scores``
    name). ``problems`` lists every error found (empty: valid).
    """
    problems: list[str] = []
    if (tasks is None) == (split_tasks is None):
        return [], [("give exactly one of tasks (the same lm-eval tasks for both splits) or "
                     "split_tasks ({search: {key: task}, heldout: {key: task}})")]
    if tasks is not None:
        if isinstance(tasks, (str, bytes, Mapping)) or not isinstance(tasks, Sequence) or not tasks:
            return [], [f"tasks: expected a non-empty list of task names, got {tasks!r}"]
        entries = [_entry(e, f"tasks[{i}]", problems) for i, e in enumerate(tasks)]
        parsed = [e for e in entries if e is not None]
        names = [spec for spec, _ in parsed]
        if len(set(names)) != len(names):
            problems.append(f"tasks: repeated entry in {names}")
        return parsed, problems
    if not isinstance(split_tasks, Mapping) or set(split_tasks) != set(SPLITS):
        got = list(split_tasks) if isinstance(split_tasks, Mapping) else split_tasks
        return {}, [f"split_tasks: expected a mapping with keys search and heldout, got {got!r}"]
    by_split: dict[str, dict[str, Entry]] = {}
    for split in SPLITS:
        mapping = split_tasks[split]
        if not isinstance(mapping, Mapping) or not mapping:
            problems.append(f"split_tasks.{split}: expected a non-empty mapping key -> lm-eval "
                            f"task, got {mapping!r}")
            continue
        by_split[split] = {}
        for key, task in mapping.items():
            where = f"split_tasks.{split}.{key}"
            if not isinstance(key, str):
                problems.append(f"{where}: the key must be a string")
                continue
            parsed_entry = _entry(task, where, problems)
            if parsed_entry is not None:
                by_split[split][key] = parsed_entry
    if not problems and list(by_split["search"]) != list(by_split["heldout"]):
        problems.append("split_tasks: search and heldout must name the same keys in the same "
                        f"order, got {list(by_split['search'])} and {list(by_split['heldout'])}")
    return by_split, problems


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_gen_kwargs(value: Any, where: str) -> tuple[dict[str, Any], list[str]]:
    """``gen_kwargs`` as a dict (a mapping, or lm-eval's CLI string ``"k=v,k=v"``) and its
    problems. Keys: lm-eval's (``until``, ``max_gen_toks`` and its aliases) and any attribute of
    transformers' ``GenerationConfig`` (``do_sample``, ``temperature``, ``top_p``, ...)."""
    if value is None:
        return {}, []
    if isinstance(value, str):
        from lm_eval.utils import simple_parse_args_string

        try:
            value = simple_parse_args_string(value)
        except ValueError as exc:
            return {}, [f"{where}: cannot parse {value!r} as k=v,k=v ({exc})"]
    if not isinstance(value, Mapping):
        return {}, [f"{where}: expected a mapping of generation options, got {value!r}"]
    from transformers import GenerationConfig

    known = GenerationConfig()
    problems: list[str] = []
    for key, v in value.items():
        at = f"{where}.{key}"
        if not isinstance(key, str) or (key not in _LMEVAL_GEN_KEYS and not hasattr(known, key)):
            problems.append(f"{at}: unknown generation option (lm-eval's until, "
                            f"{', '.join(_MAX_TOKEN_KEYS)}, or a transformers GenerationConfig "
                            "field such as do_sample, temperature, top_p, top_k)")
        elif key == "until" and not (isinstance(v, str) or (
                isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v))):
            problems.append(f"{at}: expected a stop string or a list of them, got {v!r}")
        elif key in _MAX_TOKEN_KEYS and not (_is_int(v) and v >= 1):
            problems.append(f"{at}: expected a positive integer, got {v!r}")
        elif key == "do_sample" and not isinstance(v, bool):
            problems.append(f"{at}: expected true or false, got {v!r}")
        elif key == "temperature" and not (_is_number(v) and v >= 0):
            problems.append(f"{at}: expected a number >= 0, got {v!r}")
        elif key == "top_p" and not (_is_number(v) and 0 < v <= 1):
            problems.append(f"{at}: expected a number in (0, 1], got {v!r}")
        elif key == "top_k" and not (_is_int(v) and v >= 0):
            problems.append(f"{at}: expected an integer >= 0, got {v!r}")
    return dict(value), problems


def option_problems(options: Mapping[str, Any], where: str = "") -> list[str]:
    """Every problem of the :data:`TASK_OPTIONS` in ``options`` (a task entry's, or the
    fitness-level defaults with ``where=""``)."""
    at = (lambda key: f"{where}.{key}") if where else (lambda key: key)
    problems: list[str] = []
    for key, value in options.items():
        if key == "num_fewshot" and value is not None and not (_is_int(value) and value >= 0):
            problems.append(f"{at(key)}: expected an integer >= 0 or null, got {value!r}")
        elif key == "apply_chat_template" and not isinstance(value, bool):
            problems.append(
                f"{at(key)}: expected true or false, got {value!r} (lm-eval 0.4's HFLM applies "
                "the tokenizer's default chat template; it does not select one by name)")
        elif key == "fewshot_as_multiturn" and value is not None and not isinstance(value, bool):
            problems.append(f"{at(key)}: expected true, false or null, got {value!r}")
        elif key == "gen_kwargs":
            problems += parse_gen_kwargs(value, at(key))[1]
        elif key == "batch_size" and not (_is_int(value) and value >= 1):
            problems.append(f"{at(key)}: expected a positive integer, got {value!r}")
        elif key == "limit" and value is not None and not (
                (_is_int(value) and value >= 1) or (isinstance(value, float) and 0 < value < 1)):
            problems.append(f"{at(key)}: expected a positive integer (the first N items), a "
                            f"fraction in (0, 1), or null, got {value!r}")
    return problems


@dataclass(frozen=True)
class TaskOptions:
    """One task entry's lm-eval options: its own over the fitness-level defaults.

    ``gen_kwargs`` merge key by key (the entry's win), and update the task YAML's
    ``generation_kwargs`` as lm-eval's ``--gen_kwargs`` does. ``explicit`` names the options
    the entry itself set (an explicit option that cannot apply is an error; a default that
    cannot apply is skipped, as lm-eval skips it).
    """

    num_fewshot: int | None = None
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool | None = None
    gen_kwargs: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 32
    limit: float | None = None
    explicit: frozenset[str] = frozenset()

    @classmethod
    def merge(cls, defaults: Mapping[str, Any], own: Mapping[str, Any]) -> TaskOptions:
        """Validated (see :func:`option_problems`) ``defaults`` and ``own`` options combined."""
        gen = {**parse_gen_kwargs(defaults.get("gen_kwargs"), "")[0],
               **parse_gen_kwargs(own.get("gen_kwargs"), "")[0]}
        return cls(**{**defaults, **own, "gen_kwargs": gen, "explicit": frozenset(own)})

    @property
    def multiturn(self) -> bool:
        """lm-eval's CLI rule: few-shot examples as chat turns by default with a chat template."""
        if self.fewshot_as_multiturn is None:
            return self.apply_chat_template
        return self.fewshot_as_multiturn

    def count(self, n_docs: int) -> int:
        """Items scored of a task of ``n_docs`` documents: lm-eval's ``limit`` (the first N, or
        a fraction rounded up)."""
        if self.limit is None:
            return n_docs
        if isinstance(self.limit, float):
            return min(n_docs, math.ceil(n_docs * self.limit))
        return min(n_docs, self.limit)


def parse_objectives(
    objectives: Sequence[Mapping[str, Any]] | None, keys: Sequence[str]
) -> list[tuple[Objective, tuple[str, ...]]]:
    """``[(Objective, task keys)]``; default one maximised objective per key, named by it."""
    if objectives is None:
        return [(Objective(key), (key,)) for key in keys]

    def tasks(chosen: Any, where: str) -> tuple[str, ...]:
        if chosen == "all":
            chosen = list(keys)
        if isinstance(chosen, (str, bytes)) or not isinstance(chosen, Sequence) or not chosen:
            raise ValueError(f"{where}: expected 'all' or a list of task keys, got {chosen!r}")
        missing = [t for t in chosen if t not in keys]
        if missing:
            raise ValueError(
                f"{where}: unknown task(s) {', '.join(map(repr, missing))}; "
                f"known: {', '.join(keys)}"
            )
        return tuple(dict.fromkeys(chosen))

    return parse_objective_specs(objectives, "tasks", tasks)


def resolve_data_files(data_files: Any, base_dir: Path, where: str) -> Any:
    """``data_files`` (a path, a list, or ``{split: path | list}``) with relative local paths made
    absolute under ``base_dir``; URLs and ``hf://`` paths are kept. A plain path that does not
    exist raises, naming ``where`` (the YAML) and the path.
    """
    if isinstance(data_files, Mapping):
        return {split: resolve_data_files(v, base_dir, where) for split, v in data_files.items()}
    if isinstance(data_files, (list, tuple)):
        return [resolve_data_files(v, base_dir, where) for v in data_files]
    if not isinstance(data_files, (str, os.PathLike)):
        raise ValueError(  # noqa: TRY004 - config errors are ValueErrors for the CLI
            f"{where}: data_files entry {data_files!r} is not a path"
        )
    text = os.fspath(data_files)
    if "://" in text:
        return text
    path = Path(text).expanduser()
    path = path if path.is_absolute() else (base_dir / path).resolve()
    if not any(ch in text for ch in "*?[") and not path.exists():
        raise FileNotFoundError(
            f"{where}: data file {text!r} not found (looked at {path}; relative paths are "
            "resolved against the task YAML's directory)"
        )
    return str(path)


def scores_from_samples(
    samples: Sequence[Mapping[str, Any]], metric: str | None = None
) -> tuple[dict[int, float], str]:
    """Per-document scores ``{doc_id: score}`` from lm-eval's logged samples of one task.

    Uses the task's first filter (lm-eval logs every document once per filter) and ``metric``,
    or by default the first of :data:`ACCURACY_METRICS` the task reports, else its first metric.
    Returns the scores and the metric used.
    """
    if not samples:
        return {}, metric or ""
    first_filter = samples[0]["filter"]
    chosen = [s for s in samples if s["filter"] == first_filter]
    reported = list(chosen[0]["metrics"])
    if metric is None:
        metric = next((m for m in ACCURACY_METRICS if m in reported), reported[0])
    elif metric not in reported:
        raise ValueError(f"metric {metric!r} is not reported by the task; it reports {reported}")
    return {int(s["doc_id"]): float(s[metric]) for s in chosen}, metric


def objective_values(
    specs: Sequence[tuple[Objective, tuple[str, ...]]], task_scores: Mapping[str, float]
) -> dict[str, float]:
    """Each objective = the mean over its tasks of the task's score (macro average)."""
    return {obj.name: float(np.mean([task_scores[key] for key in keys])) for obj, keys in specs}


# --------------------------------------------------------------------------------------------
# lm-eval plumbing
# --------------------------------------------------------------------------------------------


def force_offline() -> None:
    """Make the harness (``datasets``, ``huggingface_hub``) work offline in this process.

    The environment variables are read when those libraries are imported, so the flags of
    already-imported modules are set too.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    ds_config = sys.modules.get("datasets.config")
    if ds_config is not None:
        ds_config.HF_HUB_OFFLINE = True
        ds_config.HF_DATASETS_OFFLINE = True


def _is_yaml_path(spec: str) -> bool:
    return spec.endswith(_YAML_SUFFIXES)


def _localised_config(yaml_path: Path) -> dict[str, Any]:
    """A leaf task's full config (``include:`` merged) with its ``data_files`` made absolute."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(yaml_path, resolve_func=True)
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, Mapping) and kwargs.get("data_files") is not None:
        cfg["dataset_kwargs"] = {
            **kwargs,
            "data_files": resolve_data_files(kwargs["data_files"], yaml_path.parent, str(yaml_path)),
        }
    return cfg


class _TaskLoader:
    """Turns task specs into lm-eval ``Task`` objects, building the builtin index only if needed."""

    def __init__(self, include_path: Path) -> None:
        from lm_eval.tasks import TaskManager

        self._manager_cls = TaskManager
        self.include_path = include_path
        self.manager = TaskManager(include_path=str(include_path), include_defaults=False)
        self._with_defaults = False

    def _entry(self, name: str, where: str):
        entry = self.manager.task_index.get(name)
        if entry is None and not self._with_defaults:
            log.info("task %r not under %s; indexing lm-eval's builtin tasks", name,
                     self.include_path)
            self.manager = self._manager_cls(include_path=str(self.include_path))
            self._with_defaults = True
            entry = self.manager.task_index.get(name)
        if entry is None:
            raise ValueError(
                f"{where}: unknown lm-eval task {name!r} (not under {self.include_path} nor "
                "among lm-eval's builtin tasks; a task YAML path must end in .yaml)"
            )
        return entry

    def specs(self, spec: str, where: str) -> list[dict[str, Any] | str]:
        """The leaf task configs (dicts) of one spec; groups and Python tasks stay names."""
        from lm_eval.tasks._index import Kind

        if _is_yaml_path(spec):
            path = Path(spec).expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(f"{where}: task YAML {spec!r} not found (looked at {path})")
            cfg = _localised_config(path)
            return [cfg] if isinstance(cfg.get("task"), str) and "group" not in cfg else [str(path)]
        entry = self._entry(spec, where)
        if entry.kind == Kind.TAG:
            return [c for name in sorted(entry.tags) for c in self.specs(name, where)]
        if entry.kind == Kind.TASK and entry.yaml_path is not None:
            return [_localised_config(Path(entry.yaml_path))]
        return [spec]

    def load(self, specs: Sequence[dict[str, Any] | str]) -> dict[str, Any]:
        """``{task_name: Task}`` of the leaf tasks, in order (reads each task's data once)."""
        return dict(self.manager.load(list(specs))["tasks"])


class _Indices(list):
    """Sorted document indices for ``evaluate(samples=...)``: a list, as lm-eval wants, with a
    set's membership test (lm-eval's ``doc_iterator`` asks ``i in samples`` for every doc)."""

    def __init__(self, indices: Sequence[int]) -> None:
        super().__init__(sorted(indices))
        self._members = frozenset(self)

    def __contains__(self, item: object) -> bool:
        return item in self._members


class _FewshotRecorder:
    """Stands in for a task's few-shot sampler and records what it draws, call by call."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.picks: list[Sequence[Any]] = []

    def sample(self, *args: Any, **kwargs: Any) -> Sequence[Any]:
        pick = self.inner.sample(*args, **kwargs)
        self.picks.append(pick)
        return pick

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _FewshotReplay:
    """Stands in for a task's few-shot sampler and hands out recorded draws, in order."""

    def __init__(self, inner: Any, picks: Sequence[Sequence[Any]], task_name: str) -> None:
        self.inner, self.task_name = inner, task_name
        self.picks = list(picks)
        self.used = 0

    def sample(self, n: int, *args: Any, **kwargs: Any) -> Sequence[Any]:
        if self.used >= len(self.picks) or len(self.picks[self.used]) != n:
            raise RuntimeError(
                f"{self.task_name}: lm-eval asked for few-shot examples in an unexpected order "
                f"(draw {self.used + 1} of {len(self.picks)}, {n} shots); this lm-eval version "
                "builds contexts differently from 0.4.13"
            )
        self.used += 1
        return self.picks[self.used - 1]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def record_fewshot(task: Any, count: int, seed: int) -> list[Sequence[Any]]:
    """The few-shot examples lm-eval gives each of the first ``count`` documents of ``task``
    when it builds them all in one go with a fresh sampler seeded ``seed``: what
    ``simple_evaluate(num_fewshot=k, limit=count)`` builds (its ``fewshot_random_seed``)."""
    task.set_fewshot_seed(seed=seed)
    recorder = _FewshotRecorder(task.sampler)
    task.sampler = recorder
    try:
        task.build_all_requests(limit=count)
    finally:
        task.sampler = recorder.inner
        task._instances = None  # the built requests are not needed: free them
    if len(recorder.picks) != count:
        raise RuntimeError(
            f"{task.task_name}: lm-eval drew few-shot examples {len(recorder.picks)} times for "
            f"{count} documents; cannot pin each document's examples"
        )
    return recorder.picks


def context_length(config: Any) -> int | None:
    """The model's context length as HFLM reads it from the config, if the config says."""
    for name in _CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if _is_int(value) and value > 0:
            return value
    return None


def _report(problems: Sequence[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"lm-eval fitness: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)


# --------------------------------------------------------------------------------------------
# The fitness
# --------------------------------------------------------------------------------------------


class LmEvalFitness(Fitness):
    """Per-item scores of an in-memory causal LM on lm-evaluation-harness tasks.

    ``base_model`` is the base checkpoint directory: its config sizes :meth:`new_model` and its
    tokenizer is the one the harness uses. Tasks are built (data read) once here, and every
    option is checked here, before any compute: one ``ValueError`` lists every problem.
    ``num_fewshot``, ``apply_chat_template``, ``fewshot_as_multiturn``, ``gen_kwargs``,
    ``batch_size`` and ``limit`` are the defaults of every task entry (see
    :class:`TaskOptions`). ``dtype``: what :meth:`new_model` allocates (``auto``: the base
    config's dtype, see :func:`evomerge.fitness.base.resolve_dtype`); the harness scores the
    model in its own dtype.
    """

    #: lm-eval's ``simple_evaluate`` default ``fewshot_random_seed``.
    fewshot_seed = 1234

    def __init__(
        self,
        base_model: str | os.PathLike,
        tasks: Sequence[Any] | None = None,
        split_tasks: Mapping[str, Mapping[str, Any]] | None = None,
        include_path: str | os.PathLike | None = None,
        limit: float | None = None,
        batch_size: int = 32,
        objectives: Sequence[Mapping[str, Any]] | None = None,
        metrics: Mapping[str, str] | None = None,
        num_fewshot: int | None = None,
        apply_chat_template: bool = False,
        fewshot_as_multiturn: bool | None = None,
        gen_kwargs: Mapping[str, Any] | str | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "auto",
    ) -> None:
        self.base_model = Path(base_model)
        self.device = torch.device(device)
        defaults = {"num_fewshot": num_fewshot, "apply_chat_template": apply_chat_template,
                    "fewshot_as_multiturn": fewshot_as_multiturn, "gen_kwargs": gen_kwargs,
                    "batch_size": batch_size, "limit": limit}
        problems = option_problems(defaults)
        defaults_ok = not problems
        parsed, task_problems = parse_task_keys(tasks, split_tasks)
        problems += task_problems
        entries = (list(enumerate(parsed)) if isinstance(parsed, list) else
                   [((split, key), e) for split, m in parsed.items() for key, e in m.items()])
        merged: dict[Any, TaskOptions] = {}
        for at, (_, own) in entries:
            where = f"tasks[{at}]" if isinstance(at, int) else f"split_tasks.{at[0]}.{at[1]}"
            own_problems = option_problems(own, where)
            problems += own_problems
            if own_problems or not defaults_ok:
                continue
            opts = merged[at] = TaskOptions.merge(defaults, own)
            if opts.fewshot_as_multiturn and not opts.apply_chat_template:
                problems.append(f"{where}: fewshot_as_multiturn is true but apply_chat_template "
                                "is false (lm-eval: few-shot turns need a chat template)")
        include = Path(include_path) if include_path is not None else DEFAULT_INCLUDE_PATH
        if not include.is_dir():
            problems.append(f"include_path: {include} is not a directory of lm-eval task YAMLs")
        self.tokenizer = self._read_base(problems)
        try:
            self.dtype = resolve_dtype(dtype, getattr(self, "config", None))
        except ValueError as exc:
            problems.append(str(exc))
        if self.tokenizer is not None and any(o.apply_chat_template for o in merged.values()):
            problems += self._chat_template_problems()
        if problems:
            raise ValueError(_report(problems))

        force_offline()
        origin = self._load(parsed, merged, _TaskLoader(include.resolve()), problems)
        self.keys: list[str] = list(self._tasks["search"])
        self._specs = parse_objectives(objectives, self.keys)
        self.objectives: list[Objective] = [obj for obj, _ in self._specs]
        self.metrics = dict(metrics or {})
        unknown = [k for k in self.metrics if k not in self.keys]
        if unknown:
            problems.append(f"metrics: unknown task key(s) {unknown}; known: {self.keys}")
        self._prepare(origin, problems)
        if problems:
            raise ValueError(_report(problems))
        self._calls = {split: self._plan(split) for split in SPLITS}
        self._lm = None

    # ---------------------------------------------------------------------------- set-up

    def _load(self, parsed: list[Entry] | dict[str, dict[str, Entry]],
              merged: Mapping[Any, TaskOptions], loader: _TaskLoader,
              problems: list[str]) -> dict[int, str]:
        """Build ``self._tasks[split] = {key: Task}`` and ``self._options[split] = {key:
        TaskOptions}``; returns where each Task was configured, by ``id``."""
        self._tasks, self._options = {}, {}
        origin: dict[int, str] = {}
        if isinstance(parsed, list):  # the same Task objects (and options) for both splits
            shared: dict[str, Any] = {}
            options: dict[str, TaskOptions] = {}
            for i, (spec, _) in enumerate(parsed):
                for name, task in loader.load(loader.specs(spec, f"tasks[{i}]")).items():
                    if name in shared:
                        problems.append(f"tasks[{i}]: task {name!r} is also part of "
                                        f"{origin[id(shared[name])]}; list each task once")
                        continue
                    shared[name], options[name] = task, merged[i]
                    origin[id(task)] = f"tasks[{i}]"
            self._tasks = {split: shared for split in SPLITS}
            self._options = {split: options for split in SPLITS}
            return origin
        for split in SPLITS:
            self._tasks[split], self._options[split] = {}, {}
            for key, (spec, _) in parsed[split].items():
                where = f"split_tasks.{split}.{key}"
                leaves = loader.load(loader.specs(spec, where))
                if len(leaves) != 1:
                    raise ValueError(
                        f"{where}: {spec!r} is {len(leaves)} tasks ({', '.join(leaves)}); "
                        "each key must name exactly one task"
                    )
                task = next(iter(leaves.values()))
                self._tasks[split][key] = task
                self._options[split][key] = merged[(split, key)]
                origin[id(task)] = where
        return origin

    def _prepare(self, origin: Mapping[int, str], problems: list[str]) -> None:
        """Apply each task's options, then pin its few-shot examples (``self._fewshot``)."""
        configured: dict[int, tuple[Any, TaskOptions]] = {}
        for split in SPLITS:
            for key, task in self._tasks[split].items():
                configured.setdefault(id(task), (task, self._options[split][key]))
        for task, opts in configured.values():
            problems += self._configure(task, opts, origin[id(task)])
        #: few-shot examples of each (task, document), pinned: id(Task) -> [examples per doc]
        self._fewshot: dict[int, list[Sequence[Any]]] = {}
        if problems:
            return
        for task, opts in configured.values():
            shots = task.get_config("num_fewshot")
            if shots:
                try:
                    self._fewshot[id(task)] = record_fewshot(
                        task, opts.count(len(task.eval_docs)), self.fewshot_seed)
                except (ValueError, AssertionError) as exc:
                    problems.append(f"{origin[id(task)]}: {task.task_name}: cannot draw {shots} "
                                    f"few-shot examples ({exc or type(exc).__name__})")

    def _read_base(self, problems: list[str]) -> Any:
        """The base's tokenizer (pad = eos when it has none), and its config in ``self.config``
        and dtype in ``self.dtype``; or None after adding the problem to ``problems``."""
        from transformers import AutoConfig, AutoTokenizer

        try:
            self.config = AutoConfig.from_pretrained(self.base_model, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(self.base_model, local_files_only=True)
        except (OSError, ValueError) as exc:
            problems.append(
                f"base_model: cannot read a config and tokenizer from {self.base_model} ({exc}); "
                "pass a local Hugging Face model directory"
            )
            return None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def _chat_template_problems(self) -> list[str]:
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            return [(f"apply_chat_template: the tokenizer of {self.base_model} has no chat "
                     "template (tokenizer_config.json chat_template or chat_template.jinja); use "
                     "a chat model's tokenizer or set apply_chat_template: false")]
        if isinstance(template, Mapping) and "default" not in template:
            return [(f"apply_chat_template: the tokenizer of {self.base_model} has several "
                     f"chat templates ({', '.join(sorted(template))}) and none named 'default', "
                     "which is the one lm-eval applies")]
        return []

    def _configure(self, task: Any, opts: TaskOptions, where: str) -> list[str]:
        """Apply ``opts`` to ``task``'s config as ``simple_evaluate`` does; the problems."""
        problems: list[str] = []
        name = task.task_name
        if opts.gen_kwargs:
            if task.get_config("output_type") == "generate_until":
                task.set_config(key="generation_kwargs", value=dict(opts.gen_kwargs), update=True)
            elif "gen_kwargs" in opts.explicit:
                problems.append(f"{where}.gen_kwargs: {name} is a "
                                f"{task.get_config('output_type')} task; gen_kwargs apply to "
                                "generate_until tasks only")
        pinned = task.get_config("num_fewshot")
        if opts.num_fewshot is not None:
            if pinned == 0 and opts.num_fewshot > 0:  # simple_evaluate never overrides a 0
                if "num_fewshot" in opts.explicit:
                    problems.append(f"{where}.num_fewshot: {name}'s YAML fixes num_fewshot: 0, "
                                    "which lm-eval does not override")
                else:
                    log.info("%s: its YAML fixes num_fewshot: 0; keeping it", name)
            else:
                task.set_config(key="num_fewshot", value=opts.num_fewshot)
        elif pinned is None:
            task.set_config(key="num_fewshot", value=0)
        shots = task.get_config("num_fewshot")
        if shots and getattr(task, "sampler", None) is None:
            problems.append(f"{where}: {name} has no documents to draw {shots} few-shot "
                            "examples from")
        elif shots and task.fewshot_cfg.split is None and not (
                task.has_training_docs() or task.has_validation_docs()):
            log.warning("%s: few-shot examples are drawn from the evaluated documents, and an "
                        "item may be shown its own answer: lm-eval excludes the item only when "
                        "the task YAML sets fewshot_split (to its test split, or better to "
                        "another split)", name)
        if task.get_config("output_type") == "generate_until":
            gen = task.get_config("generation_kwargs") or {}
            new = next((gen[k] for k in _MAX_TOKEN_KEYS if gen.get(k) is not None), None)
            length = context_length(self.config)
            if _is_int(new) and length is not None and new >= length:
                problems.append(f"{where}: {name} generates up to {new} tokens, not less than "
                                f"the model's context length {length}")
        return problems

    def _plan(self, split: str) -> list[list[str]]:
        """The task keys of each ``evaluator.evaluate`` call: the chat template and batch size
        are per call, and a call holds a task name once."""
        calls: list[list[str]] = []
        setting: list[tuple[bool, bool, int]] = []
        for key, opts in self._options[split].items():
            want = (opts.apply_chat_template, opts.multiturn, opts.batch_size)
            name = self._tasks[split][key].task_name
            for i, keys in enumerate(calls):
                if setting[i] == want and all(self._tasks[split][k].task_name != name
                                              for k in keys):
                    keys.append(key)
                    break
            else:
                calls.append([key])
                setting.append(want)
        return calls

    def options(self, split: str = "search") -> dict[str, dict[str, Any]]:
        """Each task key's effective lm-eval options in ``split`` (few-shot count and generation
        options as the task will use them, after its YAML and these options)."""
        out: dict[str, dict[str, Any]] = {}
        for key, task in self._split(split).items():
            opts = self._options[split][key]
            entry = {"task": task.task_name, "num_fewshot": task.get_config("num_fewshot"),
                     "apply_chat_template": opts.apply_chat_template,
                     "fewshot_as_multiturn": opts.multiturn, "batch_size": opts.batch_size,
                     "limit": opts.limit}
            if task.get_config("output_type") == "generate_until":
                entry["gen_kwargs"] = dict(task.get_config("generation_kwargs") or {})
            out[key] = entry
        return out

    def task(self, split: str, key: str) -> Any:
        """The lm-eval ``Task`` of ``key`` in ``split`` (its ``instances`` are the requests of
        the last evaluation)."""
        return self._split(split)[key]

    # ---------------------------------------------------------------------------- model

    def new_model(self) -> torch.nn.Module:
        """A model of the base's architecture in ``self.dtype`` (weights to be written by the
        merge engine)."""
        from evomerge.fitness.lm import new_causal_lm

        return new_causal_lm(self.config, self.dtype, self.device)

    def _wrap(self, model: torch.nn.Module):
        """The HFLM around ``model``: created on first use, reused while the object is the same."""
        if self._lm is None or self._lm.model is not model:
            from lm_eval.models.huggingface import HFLM

            self._lm = HFLM(pretrained=model, tokenizer=self.tokenizer,
                            batch_size=self._options["search"][self.keys[0]].batch_size)
        model.eval()
        return self._lm

    # ---------------------------------------------------------------------------- items

    def _split(self, split: str) -> dict[str, Any]:
        try:
            return self._tasks[split]
        except KeyError:
            raise ValueError(
                f"split: unknown split {split!r}; expected one of {', '.join(SPLITS)}"
            ) from None

    def num_items(self, split: str = "search") -> dict[str, int]:
        """Items per task key in ``split`` (after ``limit``)."""
        return {key: self._count(split, key) for key in self._split(split)}

    def item_ids(self, split: str = "search") -> dict[str, list[str]]:
        """Each item's ``id`` field (or its document index), in ``item_scores`` order."""
        out: dict[str, list[str]] = {}
        for key, task in self._split(split).items():
            docs = task.eval_docs
            rows = (docs[i] for i in range(self._count(split, key)))
            out[key] = [str(d["id"]) if isinstance(d, Mapping) and "id" in d else str(i)
                        for i, d in enumerate(rows)]
        return out

    def _count(self, split: str, key: str) -> int:
        return self._options[split][key].count(len(self._tasks[split][key].eval_docs))

    def _selection(self, split: str, items: Mapping[str, Sequence[int]] | None
                   ) -> dict[str, list[int]]:
        """Validated ``items`` as ``{key: indices}`` (requested order); all items by default."""
        counts = self.num_items(split)
        if items is None:
            return {key: list(range(count)) for key, count in counts.items()}
        unknown = [k for k in items if k not in counts]
        if unknown:
            raise ValueError(f"items: unknown task key(s) {unknown}; known: {list(counts)}")
        chosen: dict[str, list[int]] = {}
        for key, count in counts.items():
            if key not in items:
                chosen[key] = list(range(count))
                continue
            idx = [int(i) for i in np.asarray(items[key]).reshape(-1)]
            if not idx:
                raise ValueError(f"items[{key!r}]: empty; give at least one item index")
            if len(set(idx)) != len(idx):
                raise ValueError(f"items[{key!r}]: repeated item index")
            bad = [i for i in idx if not 0 <= i < count]
            if bad:
                raise ValueError(f"items[{key!r}]: index {bad[0]} out of range 0..{count - 1}")
            chosen[key] = idx
        return chosen

    @contextlib.contextmanager
    def _pinned(self, tasks: Sequence[Any], chosen: Sequence[Sequence[int]]) -> Iterator[None]:
        """While lm-eval builds the requests, each task's sampler hands each chosen document the
        few-shot examples it gets in a full run, whatever subset is scored."""
        replays = []
        try:
            for task, idx in zip(tasks, chosen, strict=True):
                picks = self._fewshot.get(id(task))
                if picks is not None:
                    replay = _FewshotReplay(task.sampler, [picks[i] for i in sorted(idx)],
                                            task.task_name)
                    replays.append((task, replay))
                    task.sampler = replay
            yield
        finally:
            for task, replay in replays:
                task.sampler = replay.inner
        for task, replay in replays:
            if replay.used != len(replay.picks):
                raise RuntimeError(f"{task.task_name}: lm-eval drew few-shot examples "
                                   f"{replay.used} times for {len(replay.picks)} documents")

    # ---------------------------------------------------------------------------- evaluate

    def objectives_from_task_scores(self, task_scores: Mapping[str, float]) -> dict[str, float]:
        """Objective values from per-task accuracies (exact or estimated): macro means."""
        return objective_values(self._specs, task_scores)

    def evaluate(self, model: torch.nn.Module, split: str = "search",
                 items: Mapping[str, Sequence[int]] | None = None) -> EvalResult:
        """Run the harness on ``split``'s tasks (or ``items`` of them) and collect item scores.

        One ``evaluator.evaluate`` call per chat-template / batch-size setting; documents are
        passed as ``samples`` (sorted: see the module docstring), so ``limit`` and ``items``
        both select from the first ``limit`` documents.
        """
        from lm_eval import evaluator

        tasks = self._split(split)
        chosen = self._selection(split, items)
        lm = self._wrap(model)
        item_scores: dict[str, np.ndarray] = {}
        for keys in self._calls[split]:
            opts = self._options[split][keys[0]]
            lm.batch_size_per_gpu = opts.batch_size  # what HFLM's batch_size reads
            run = [tasks[k] for k in keys]
            with self._pinned(run, [chosen[k] for k in keys]):
                out = evaluator.evaluate(
                    lm, {"tasks": {task.task_name: task for task in run}},
                    samples={tasks[k].task_name: _Indices(chosen[k]) for k in keys},
                    log_samples=True, bootstrap_iters=0,
                    apply_chat_template=opts.apply_chat_template,
                    fewshot_as_multiturn=opts.multiturn,
                )
            for key, task in zip(keys, run, strict=True):
                by_doc, _ = scores_from_samples(out["samples"][task.task_name],
                                                self.metrics.get(key))
                item_scores[key] = np.array([by_doc[i] for i in chosen[key]], dtype=np.float64)
        item_scores = {key: item_scores[key] for key in tasks}
        task_scores = {key: float(np.mean(scores)) for key, scores in item_scores.items()}
        return EvalResult(self.objectives_from_task_scores(task_scores), item_scores)
