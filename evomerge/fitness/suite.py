"""Fitness suites: a YAML list of language-model tasks (data files, kind) and the objectives over them.

A suite (schema in ``fitness/README.md``) names, per task, a ``search`` and a ``heldout`` JSON-lines
file (paths relative to the suite file) and how the task is scored (``generate``: greedy generation,
exact match; ``multiple_choice``: argmax of the choices' log-likelihoods). Objectives combine tasks:
each is the *macro* mean of its tasks' accuracies. This module only reads and validates (no torch):
every problem is reported, naming the file and field, before a model is touched.

The catalog: ``fitness/<name>.yaml`` at the top of a source checkout, found by bare name
(``load_suite("tinylm")``); a path (relative to the current directory) always works.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from evomerge.config_io import format_errors, read_yaml
from evomerge.fitness.base import Objective

__all__ = [
    "CATALOG_DIR",
    "ChoiceItem",
    "GenerateItem",
    "ObjectiveSpec",
    "Suite",
    "SuiteError",
    "TaskSpec",
    "catalog",
    "combine_objectives",
    "load_items",
    "load_suite",
    "resolve_objectives",
]

#: The catalog of reusable suites (a source checkout's top-level ``fitness/``).
CATALOG_DIR = Path(__file__).resolve().parents[2] / "fitness"

SPLITS: tuple[str, ...] = ("search", "heldout")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: Fields that only one kind of task reads; setting them on the other kind is a mistake.
_GENERATE_ONLY = ("max_new_tokens", "stop")
_CHOICE_ONLY = ("target_delimiter",)


class SuiteError(ValueError):
    """A suite or data file that cannot be used; the message names the file and the field."""


class TaskSpec(BaseModel):
    """One task of a suite: its data files and how its items are scored."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    kind: Literal["generate", "multiple_choice"]
    search: str
    heldout: str
    #: generate: greedy decoding stops after this many new tokens (or at eos / a stop string).
    max_new_tokens: int = 32
    #: generate: the prediction is the text before the first of these strings.
    stop: tuple[str, ...] = ("\n",)
    #: multiple_choice: put between the prompt and each choice (lm-eval's ``target_delimiter``).
    target_delimiter: str = " "

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value) or value == "all":
            raise ValueError(f"{value!r} is not a task name (letters, digits, _.-; not 'all')")
        return value

    @field_validator("max_new_tokens")
    @classmethod
    def _max_new_tokens(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be >= 1, got {value}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not s for s in value):
            raise ValueError("stop strings must be non-empty")
        return value

    @model_validator(mode="after")
    def _kind_fields(self) -> TaskSpec:
        other = _CHOICE_ONLY if self.kind == "generate" else _GENERATE_ONLY
        wrong = [f for f in other if f in self.model_fields_set]
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: not used by kind: {self.kind}")
        return self


class ObjectiveSpec(BaseModel):
    """One objective: the macro mean of the accuracies of ``tasks`` (``all``: every task)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    tasks: Literal["all"] | tuple[str, ...] = "all"
    direction: Literal["maximize", "minimize"] = "maximize"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty string")
        return value

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, value: Any) -> Any:
        if value != "all":
            if not value:
                raise ValueError("empty; give 'all' or at least one task name")
            if len(set(value)) != len(value):
                raise ValueError(f"tasks repeat: {list(value)}")
        return value


class SuiteConfig(BaseModel):
    """The YAML content of a suite file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    description: str = ""
    tasks: tuple[TaskSpec, ...]
    objectives: tuple[ObjectiveSpec, ...] | None = None

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, value: tuple[TaskSpec, ...]) -> tuple[TaskSpec, ...]:
        if not value:
            raise ValueError("empty; a suite needs at least one task")
        names = [t.name for t in value]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate task name(s) {', '.join(dup)}")
        return value


@dataclass(frozen=True)
class Suite:
    """A validated suite; ``path`` is the suite file (data paths are relative to its folder)."""

    path: Path
    description: str
    tasks: tuple[TaskSpec, ...]
    objectives: tuple[ObjectiveSpec, ...] | None

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def select(self, names: Sequence[str] | None) -> "Suite":
        """The suite restricted to the tasks ``names`` (None: all). Suite objectives that need
        a dropped task are dropped too; if none is left, the default (one per task) applies."""
        if names is None:
            return self
        if isinstance(names, str) or not names:
            raise SuiteError(f"tasks: expected a non-empty list of task names of {self.path}, "
                             f"got {names!r}")
        unknown = [n for n in names if n not in self.task_names]
        if unknown:
            raise SuiteError(f"tasks: {', '.join(map(repr, unknown))} not in {self.path}; "
                             f"its tasks: {', '.join(self.task_names)}")
        keep = set(names)
        kept = tuple(o for o in self.objectives or ()
                     if o.tasks == "all" or set(o.tasks) <= keep)
        return Suite(self.path, self.description, tuple(t for t in self.tasks if t.name in keep),
                     kept or None)

    def data_file(self, task: TaskSpec, split: str) -> Path:
        """The absolute path of ``task``'s ``split`` file; SuiteError naming the field if absent."""
        index = self.tasks.index(task)
        rel = getattr(task, split)
        path = (self.path.parent / rel).resolve()
        if not path.is_file():
            raise SuiteError(f"{self.path}: tasks[{index}].{split}: no such file {rel!r} "
                             f"(resolved to {path})")
        return path


@dataclass(frozen=True)
class GenerateItem:
    id: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class ChoiceItem:
    id: str
    prompt: str
    choices: tuple[str, ...]
    gold: int


def catalog() -> list[str]:
    """Names of the suites in the catalog (empty outside a source checkout)."""
    return sorted(p.stem for p in CATALOG_DIR.glob("*.yaml")) if CATALOG_DIR.is_dir() else []


def load_suite(name_or_path: str | Path) -> Suite:
    """A suite by path (relative to the current directory) or by catalog name (``"tinylm"``)."""
    ref = str(name_or_path)
    path = Path(ref).expanduser()
    if not path.is_file():
        bare = "/" not in ref and "\\" not in ref
        stem = ref.removesuffix(".yaml").removesuffix(".yml")
        candidate = CATALOG_DIR / f"{stem}.yaml"
        if not (bare and candidate.is_file()):
            names = catalog()
            known = (f"catalog: {', '.join(names)}" if names else
                     f"no catalog at {CATALOG_DIR} (catalog names need a source checkout)")
            raise SuiteError(f"suite {ref!r}: not a file and not in the catalog; {known}")
        path = candidate
    path = path.resolve()
    data = read_yaml(path, SuiteError, "fitness suite")
    if not isinstance(data, Mapping):
        raise SuiteError(f"{path}: expected a mapping with 'tasks', got {type(data).__name__}")
    try:
        config = SuiteConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise SuiteError(f"{path}: invalid fitness suite:\n{format_errors(exc)}") from None
    suite = Suite(path, config.description, config.tasks, config.objectives)
    if config.objectives is not None:
        resolve_objectives(config.objectives, suite.task_names, where=f"{path}: objectives")
    for task in suite.tasks:
        for split in SPLITS:
            suite.data_file(task, split)
    return suite


def resolve_objectives(
    specs: Sequence[ObjectiveSpec | Mapping[str, Any]] | None, task_names: Sequence[str],
    where: str = "objectives",
) -> list[tuple[Objective, tuple[str, ...]]]:
    """``[(Objective, its tasks)]``; default: one objective per task, named after it.

    Raises SuiteError naming the objective for unknown tasks, duplicate names, bad fields.
    """
    if specs is None:
        return [(Objective(t), (t,)) for t in task_names]
    if isinstance(specs, (str, bytes, Mapping)) or not isinstance(specs, Sequence):
        raise SuiteError(f"{where}: expected a list of {{name, tasks, direction}} mappings, "
                         f"got {type(specs).__name__}")
    if not specs:
        raise SuiteError(f"{where}: empty; give at least one objective or leave it out")
    resolved: list[tuple[Objective, tuple[str, ...]]] = []
    for i, raw in enumerate(specs):
        try:
            spec = raw if isinstance(raw, ObjectiveSpec) else ObjectiveSpec.model_validate(raw)
        except ValidationError as exc:
            raise SuiteError(f"{where}[{i}]: invalid objective:\n{format_errors(exc)}") from None
        if spec.name in [o.name for o, _ in resolved]:
            raise SuiteError(f"{where}[{i}].name: duplicate objective name {spec.name!r}")
        tasks = tuple(task_names) if spec.tasks == "all" else spec.tasks
        unknown = [t for t in tasks if t not in task_names]
        if unknown:
            raise SuiteError(f"{where}[{i}].tasks: unknown task(s) {', '.join(unknown)}; "
                             f"the suite has {', '.join(task_names)}")
        resolved.append((Objective(spec.name, spec.direction), tasks))
    return resolved


def combine_objectives(
    task_scores: Mapping[str, float], objectives: Sequence[tuple[Objective, tuple[str, ...]]],
) -> dict[str, float]:
    """Objective values from task accuracies: ``value = mean(task_scores[t] for t in tasks)``.

    A macro mean: every task weighs the same, whatever its item count.
    """
    return {obj.name: sum(float(task_scores[t]) for t in tasks) / len(tasks)
            for obj, tasks in objectives}


def load_items(path: Path, kind: str) -> list[GenerateItem] | list[ChoiceItem]:
    """The items of a JSON-lines data file, validated; SuiteError naming file, line and field."""
    items: list[Any] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SuiteError(f"{where}: not valid JSON: {exc}") from None
        item = _parse_item(row, kind, where)
        if item.id in seen:
            raise SuiteError(f"{where}: id {item.id!r} repeats line {seen[item.id]}")
        seen[item.id] = lineno
        items.append(item)
    if not items:
        raise SuiteError(f"{path}: no items")
    return items


def _parse_item(row: Any, kind: str, where: str) -> GenerateItem | ChoiceItem:
    keys = ("id", "prompt", "answer") if kind == "generate" else ("id", "prompt", "choices", "gold")
    if not isinstance(row, dict):
        raise SuiteError(f"{where}: expected an object with {', '.join(keys)}")
    missing = [k for k in keys if k not in row]
    if missing:
        raise SuiteError(f"{where}: missing field(s) {', '.join(missing)} for a {kind} item")
    for key in ("id", "prompt") + (("answer",) if kind == "generate" else ()):
        if not isinstance(row[key], str):
            raise SuiteError(f"{where}: {key}: expected a string, got {row[key]!r}")
    if not row["prompt"]:
        raise SuiteError(f"{where}: prompt: empty; the model needs a context")
    if kind == "generate":
        return GenerateItem(row["id"], row["prompt"], row["answer"])
    choices, gold = row["choices"], row["gold"]
    if not isinstance(choices, list) or not choices or not all(
            isinstance(c, str) and c for c in choices):
        raise SuiteError(f"{where}: choices: expected a non-empty list of non-empty strings")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise SuiteError(f"{where}: gold: {gold!r} is not an index into the "
                         f"{len(choices)} choices")
    return ChoiceItem(row["id"], row["prompt"], tuple(choices), gold)
