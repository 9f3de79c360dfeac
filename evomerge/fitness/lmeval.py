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
      limit: 50                     # first N items per task (smoke runs)
      batch_size: 32
      objectives:                   # default: one per task key, its accuracy metric
        - {name: mean_acc, tasks: all}
        - {name: add, tasks: [add], direction: maximize}
      metrics: {add: exact_match}   # optional: per-item metric per key (default acc/exact_match)

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
- With an in-memory model, HFLM ignores ``device``/``dtype``: the model's own placement is used.
- Scoring splits: it has none; the ``search``/``heldout`` split is a choice of tasks.
- Progress bars (tqdm) for building requests cannot be switched off per call.

Tokenization (what an equivalent evaluator must do to get identical per-item scores):
generation encodes the prompt with the tokenizer's defaults (its BOS), left-pads, decodes only the
new tokens with ``skip_special_tokens=True``, cuts at the first stop string; multiple choice
encodes ``prompt + choice`` and ``prompt`` and scores the tokens of the first past the length of
the second (trailing spaces of the prompt move to the choice first), summing their log-probs;
``acc`` is 1 when the first argmax is the gold index. :mod:`evomerge.fitness.lm` does the same,
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

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge.fitness.base import EvalResult, Fitness, Objective, register

__all__ = [
    "DEFAULT_INCLUDE_PATH",
    "LmEvalFitness",
    "parse_objectives",
    "parse_task_keys",
    "resolve_data_files",
    "scores_from_samples",
]

#: The repository's catalog of lm-eval task YAMLs (a source checkout's ``fitness/lmeval/``).
DEFAULT_INCLUDE_PATH = Path(__file__).resolve().parents[2] / "fitness" / "lmeval"

SPLITS = ("search", "heldout")
_OBJECTIVE_KEYS = ("name", "tasks", "direction")
_DIRECTIONS = ("maximize", "minimize")
#: Per-item metrics taken as "the task's accuracy", in order of preference.
ACCURACY_METRICS = ("acc", "exact_match")
_YAML_SUFFIXES = (".yaml", ".yml")

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Option parsing (pure)
# --------------------------------------------------------------------------------------------


def parse_task_keys(
    tasks: Sequence[str] | None, split_tasks: Mapping[str, Mapping[str, str]] | None
) -> dict[str, dict[str, str]] | list[str]:
    """Validate the task options.

    Returns the ``tasks`` list as it is (each entry may expand to several leaf tasks), or, for
    ``split_tasks``, ``{split: {key: task}}`` with the same keys, in the same order, for both
    splits (a key is an objective's task and an ``item_scores`` name).
    """
    if (tasks is None) == (split_tasks is None):
        raise ValueError(
            "give exactly one of tasks (the same lm-eval tasks for both splits) or split_tasks "
            "({search: {key: task}, heldout: {key: task}})"
        )
    if tasks is not None:
        if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence) or not tasks:
            raise ValueError(f"tasks: expected a non-empty list of task names, got {tasks!r}")
        for i, name in enumerate(tasks):
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"tasks[{i}]: expected a task name or YAML path, got {name!r}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks: repeated entry in {list(tasks)}")
        return list(tasks)
    if not isinstance(split_tasks, Mapping) or set(split_tasks) != set(SPLITS):
        got = list(split_tasks) if isinstance(split_tasks, Mapping) else split_tasks
        raise ValueError(f"split_tasks: expected a mapping with keys search and heldout, got {got!r}")
    parsed: dict[str, dict[str, str]] = {}
    for split in SPLITS:
        mapping = split_tasks[split]
        if not isinstance(mapping, Mapping) or not mapping:
            raise ValueError(
                f"split_tasks.{split}: expected a non-empty mapping key -> lm-eval task, "
                f"got {mapping!r}"
            )
        for key, task in mapping.items():
            if not isinstance(key, str) or not isinstance(task, str) or not task.strip():
                raise ValueError(
                    f"split_tasks.{split}.{key}: expected a task name or YAML path, got {task!r}"
                )
        parsed[split] = dict(mapping)
    if list(parsed["search"]) != list(parsed["heldout"]):
        raise ValueError(
            "split_tasks: search and heldout must name the same keys in the same order, got "
            f"{list(parsed['search'])} and {list(parsed['heldout'])}"
        )
    return parsed


def parse_objectives(
    objectives: Sequence[Mapping[str, Any]] | None, keys: Sequence[str]
) -> list[tuple[Objective, tuple[str, ...]]]:
    """``[(Objective, task keys)]``; default one maximised objective per key, named by it."""
    if objectives is None:
        return [(Objective(key), (key,)) for key in keys]
    if isinstance(objectives, (str, bytes, Mapping)) or not isinstance(objectives, Sequence):
        raise ValueError(  # noqa: TRY004 - config errors are ValueErrors for the CLI
            f"objectives: expected a list of {{name, tasks, direction}} mappings, "
            f"got {type(objectives).__name__}"
        )
    if not objectives:
        raise ValueError("objectives: empty; give at least one {name, tasks} objective")
    parsed: list[tuple[Objective, tuple[str, ...]]] = []
    seen: set[str] = set()
    for i, spec in enumerate(objectives):
        where = f"objectives[{i}]"
        if not isinstance(spec, Mapping):
            raise ValueError(  # noqa: TRY004 - config errors are ValueErrors for the CLI
                f"{where}: expected a mapping with name and tasks, got {spec!r}"
            )
        unknown = [k for k in spec if k not in _OBJECTIVE_KEYS]
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(_OBJECTIVE_KEYS)}"
            )
        name = spec.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}.name: expected a non-empty string, got {name!r}")
        if name in seen:
            raise ValueError(f"{where}.name: duplicate objective name {name!r}")
        seen.add(name)
        chosen = spec.get("tasks", "all")
        if chosen == "all":
            chosen = list(keys)
        if isinstance(chosen, (str, bytes)) or not isinstance(chosen, Sequence) or not chosen:
            raise ValueError(f"{where}.tasks: expected 'all' or a list of task keys, got {chosen!r}")
        missing = [t for t in chosen if t not in keys]
        if missing:
            raise ValueError(
                f"{where}.tasks: unknown task(s) {', '.join(map(repr, missing))}; "
                f"known: {', '.join(keys)}"
            )
        direction = spec.get("direction", "maximize")
        if direction not in _DIRECTIONS:
            raise ValueError(
                f"{where}.direction: expected one of {', '.join(_DIRECTIONS)}, got {direction!r}"
            )
        parsed.append((Objective(name, direction), tuple(dict.fromkeys(chosen))))
    return parsed


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
    specs: Sequence[tuple[Objective, tuple[str, ...]]], item_scores: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """Each objective = the mean over its tasks of the task's mean item score (macro average)."""
    return {
        obj.name: float(np.mean([np.mean(item_scores[key]) for key in keys]))
        for obj, keys in specs
    }


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


# --------------------------------------------------------------------------------------------
# The fitness
# --------------------------------------------------------------------------------------------


@register("lm-eval")
class LmEvalFitness(Fitness):
    """Per-item scores of an in-memory causal LM on lm-evaluation-harness tasks.

    ``base_model`` is the base checkpoint directory: its config sizes :meth:`new_model` and its
    tokenizer is the one the harness uses. Tasks are built (data read) once here.
    """

    def __init__(
        self,
        base_model: str | os.PathLike,
        tasks: Sequence[str] | None = None,
        split_tasks: Mapping[str, Mapping[str, str]] | None = None,
        include_path: str | os.PathLike | None = None,
        limit: int | None = None,
        batch_size: int = 32,
        objectives: Sequence[Mapping[str, Any]] | None = None,
        metrics: Mapping[str, str] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.base_model = Path(base_model)
        self.device = torch.device(device)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 1):
            raise ValueError(f"limit: expected a positive integer or null, got {limit!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        self.limit, self.batch_size = limit, batch_size
        parsed = parse_task_keys(tasks, split_tasks)
        include = Path(include_path) if include_path is not None else DEFAULT_INCLUDE_PATH
        if not include.is_dir():
            raise ValueError(f"include_path: {include} is not a directory of lm-eval task YAMLs")
        from transformers import AutoConfig, AutoTokenizer

        try:
            self.config = AutoConfig.from_pretrained(self.base_model, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(self.base_model, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"base_model: cannot read a config and tokenizer from {self.base_model} ({exc}); "
                "pass a local Hugging Face model directory"
            ) from exc
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

        force_offline()
        loader = _TaskLoader(include.resolve())
        # _tasks[split] = {key: Task}
        if isinstance(parsed, list):
            specs = [c for i, s in enumerate(parsed) for c in loader.specs(s, f"tasks[{i}]")]
            shared = loader.load(specs)
            self._tasks = {split: shared for split in SPLITS}
        else:
            self._tasks = {}
            for split in SPLITS:
                built: dict[str, Any] = {}
                for key, spec in parsed[split].items():
                    where = f"split_tasks.{split}.{key}"
                    leaves = loader.load(loader.specs(spec, where))
                    if len(leaves) != 1:
                        raise ValueError(
                            f"{where}: {spec!r} is {len(leaves)} tasks ({', '.join(leaves)}); "
                            "each key must name exactly one task"
                        )
                    built[key] = next(iter(leaves.values()))
                self._tasks[split] = built
        self.keys: list[str] = list(self._tasks["search"])
        self._specs = parse_objectives(objectives, self.keys)
        self.objectives: list[Objective] = [obj for obj, _ in self._specs]
        self.metrics = dict(metrics or {})
        unknown = [k for k in self.metrics if k not in self.keys]
        if unknown:
            raise ValueError(f"metrics: unknown task key(s) {unknown}; known: {self.keys}")
        self._lm = None

    # ---------------------------------------------------------------------------- model

    def new_model(self) -> torch.nn.Module:
        """A model of the base's architecture (weights to be written by the merge engine)."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(self.config).to(self.device).eval()

    def _wrap(self, model: torch.nn.Module):
        """The HFLM around ``model``: created on first use, reused while the object is the same."""
        if self._lm is None or self._lm.model is not model:
            from lm_eval.models.huggingface import HFLM

            self._lm = HFLM(pretrained=model, tokenizer=self.tokenizer,
                            batch_size=self.batch_size)
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
        return {key: self._count(task) for key, task in self._split(split).items()}

    def item_ids(self, split: str = "search") -> dict[str, list[str]]:
        """Each item's ``id`` field (or its document index), in ``item_scores`` order."""
        out: dict[str, list[str]] = {}
        for key, task in self._split(split).items():
            docs = task.eval_docs
            rows = (docs[i] for i in range(self._count(task)))
            out[key] = [str(d["id"]) if isinstance(d, Mapping) and "id" in d else str(i)
                        for i, d in enumerate(rows)]
        return out

    def _count(self, task: Any) -> int:
        n = len(task.eval_docs)
        return n if self.limit is None else min(self.limit, n)

    def _selection(self, split: str, items: Mapping[str, Sequence[int]] | None
                   ) -> dict[str, list[int]] | None:
        """Validated ``items`` as ``{key: indices}`` (requested order), or None for all items."""
        if items is None:
            return None
        counts = self.num_items(split)
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

    # ---------------------------------------------------------------------------- evaluate

    def evaluate(self, model: torch.nn.Module, split: str = "search",
                 items: Mapping[str, Sequence[int]] | None = None) -> EvalResult:
        """Run the harness on ``split``'s tasks (or ``items`` of them) and collect item scores."""
        from lm_eval import evaluator

        tasks = self._split(split)
        chosen = self._selection(split, items)
        lm = self._wrap(model)
        task_dict = {"tasks": {task.task_name: task for task in tasks.values()}}
        samples = None
        if chosen is not None:  # lm-eval needs sorted indices (see module docstring)
            samples = {tasks[k].task_name: sorted(idx) for k, idx in chosen.items()}
        out = evaluator.evaluate(
            lm, task_dict, limit=None if samples is not None else self.limit, samples=samples,
            log_samples=True, bootstrap_iters=0,
        )
        item_scores: dict[str, np.ndarray] = {}
        for key, task in tasks.items():
            by_doc, _ = scores_from_samples(out["samples"][task.task_name], self.metrics.get(key))
            order = chosen[key] if chosen is not None else sorted(by_doc)
            item_scores[key] = np.array([by_doc[i] for i in order], dtype=np.float64)
        return EvalResult(objective_values(self._specs, item_scores), item_scores)
