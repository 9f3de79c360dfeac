"""Experiment: one YAML file = one runnable search (models + space + fitness + strategy + store).

Everything is validated before any compute: unknown keys and names, bounds, a budget smaller than
one generation — each as one error naming the field. Model paths are resolved against the current
directory (as ``evomerge merge`` does) and stored absolute in the run directory, so ``evomerge
resume`` works from anywhere.

An Experiment is configuration only: running one is :func:`evomerge.run`'s (an Experiment, a
path or a mapping; or the driver's, :func:`evomerge.execution.driver.run_experiment`), so this
module imports nothing that runs::

    import evomerge
    summary = evomerge.run("experiments/digits_cmaes.yaml")
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError,
                      field_serializer, field_validator, model_validator)

from evomerge.config_io import format_errors, read_yaml
from evomerge.fitness.reduced import ReducedSpec
from evomerge.registry import import_object, is_object_name


class ExperimentError(ValueError):
    """An experiment that cannot run; the message names the field."""


RUN_RECORD = "experiment.yaml"  # a run directory's copy of its resolved experiment
# files only a run directory holds (provenance.json: every run since issue 4; run.json: its id)
RUN_MARKERS = ("run.json", "provenance.json")


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is a run directory (what ``evomerge run`` wrote), not a folder that
    merely holds an experiment file."""
    path = Path(path)
    return (path / RUN_RECORD).is_file() and any((path / m).is_file() for m in RUN_MARKERS)


def _rebased(url: str, old: Path, new: Path) -> str:
    """A file store URL inside ``old`` moved to the same place inside ``new``; else ``url``."""
    for prefix in ("sqlite:///", "journal://"):  # then the path, as open_storage reads it
        if url.startswith(prefix):
            try:
                return prefix + str(new / Path(url.removeprefix(prefix)).relative_to(old))
            except ValueError:
                return url
    return url


DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


class Models(BaseModel):
    """The checkpoints: local Hugging Face directories, or Hub ids ``org/name[@revision]``
    (see :mod:`evomerge.hub`: resolved through the Hugging Face cache, downloaded unless
    ``HF_HUB_OFFLINE`` is set; an existing local directory is always a path, write
    ``./org/name`` to force one). ``dtype``: what the fitness model is allocated and evaluated
    in; ``auto`` (default) is the checkpoints' own floating-point dtype (bf16 stays bf16).
    Merges always compute in a wider dtype and round once to the checkpoints' dtype, so a
    ``float32`` override evaluates the very merge a bf16 export writes."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    base: str | None = None
    sources: dict[str, str]
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # field -> the Hub model it was resolved from (set by resolved(); for provenance)
    _hub: dict[str, Any] = PrivateAttr(default_factory=dict)

    @field_validator("sources")
    @classmethod
    def _some_sources(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("at least one source model is needed")
        return v

    def references(self) -> list[tuple[str, str]]:
        """``(field, reference)`` of every model: ``models.base`` first, then each source."""
        fields = [("models.base", self.base)] if self.base else []
        return fields + [(f"models.sources.{k}", p) for k, p in self.sources.items()]

    def resolved(self) -> "Models":
        """Every reference an absolute local directory: paths made absolute, Hub ids resolved
        to their snapshot directory (downloaded if need be); the Hub models resolved are kept
        for :meth:`hub_models`."""
        from evomerge import hub

        found = dict(self._hub)

        def local(field: str, ref: str) -> str:
            if not hub.is_hub_id(ref):
                return str(Path(ref).expanduser().absolute())
            try:
                found[field] = hub.resolve(ref)
            except hub.HubError as exc:
                raise ExperimentError(f"{field}: {exc}") from None
            return found[field].path

        out = self.model_copy(update={
            "base": local("models.base", self.base) if self.base else None,
            "sources": {k: local(f"models.sources.{k}", p) for k, p in self.sources.items()}})
        out._hub = found
        return out

    def hub_models(self) -> dict[str, dict[str, str | None]]:
        """``field -> {repo_id, revision, commit, path}`` for each model that is a snapshot of
        a Hugging Face cache (``revision``: as asked when this process resolved it, else None)."""
        from evomerge import hub

        out: dict[str, dict[str, str | None]] = {}
        for field, path in self.references():
            known = self._hub.get(field)
            if known is not None and known.path == path:
                out[field] = known.provenance()
            elif (cached := hub.cached_model(path)) is not None:
                out[field] = {"repo_id": cached.repo_id, "revision": None,
                              "commit": cached.commit, "path": path}
        return out

    def missing(self) -> list[str]:
        """One line per model that is neither a local directory nor a resolvable Hub id
        (cache first; the Hub unless ``HF_HUB_OFFLINE``), naming the field."""
        from evomerge import hub

        return hub.missing(self.references())


class Named(BaseModel):
    """``{name: ..., <options>}``: a registry name plus the options passed to its constructor."""

    model_config = ConfigDict(frozen=True, extra="allow")
    name: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class FitnessConfig(Named):
    """``{name: ..., <options>, reduced: {...}}``: the fitness, its constructor's options, and
    optionally its IRT reduction (:class:`~evomerge.fitness.reduced.ReducedSpec`: score the
    search on a few anchor items per task; see :mod:`evomerge.execution.reduction`), validated
    with the rest of the experiment."""

    reduced: ReducedSpec | None = None

    @field_validator("reduced", mode="before")
    @classmethod
    def _reduced(cls, value: Any) -> Any:
        if value is None or isinstance(value, ReducedSpec):
            return value
        if not isinstance(value, dict):  # pydantic reports ValueErrors, not TypeErrors
            raise ValueError(  # noqa: TRY004
                f"expected a mapping (estimator, anchors, design, ...), got {value!r}")
        return ReducedSpec.from_dict(value)

    @field_serializer("reduced")
    def _dump_reduced(self, spec: ReducedSpec | None) -> dict[str, Any] | None:
        """The block's fields as given (``race: false`` stays a bool, which pydantic's typed
        dump would coerce); None, "chosen for the run's strategy", is left out as if unset."""
        return None if spec is None else {k: v for k, v in asdict(spec).items()
                                           if v is not None}


class Engine(BaseModel):
    """The merge engine's options (:class:`evomerge.merge.engine.Merger`): ``cache`` of
    source-sized tables that make TIES/breadcrumbs/DELLA builds faster (``off``, ``on``,
    ``auto`` = half the free memory, or a size such as ``4GB``), ``chunk`` elements per scratch
    buffer (default: the engine's), and ``device_budget``: bytes of inputs that may live on a GPU
    (``auto``: what is free after one output; larger inputs stay in host memory and stream)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    cache: str = "off"
    chunk: int | None = Field(None, ge=1)
    device_budget: str | int = "auto"

    @field_validator("cache", "device_budget", mode="before")
    @classmethod
    def _size(cls, value: Any, info: Any) -> Any:
        from evomerge.merge.export import parse_size

        named = {"cache": ("off", "on", "auto"), "device_budget": ("auto",)}[info.field_name]
        text = str(value).strip().lower() if isinstance(value, str) else value
        if text in named:
            return text
        try:
            parse_size(text)
        except (ValueError, TypeError):
            raise ValueError(f"expected {', '.join(named)} or a size such as '4GB', "
                             f"got {value!r}") from None
        return value

    def options(self) -> dict[str, Any]:
        """The Merger keywords."""
        return {"cache": self.cache, "chunk": self.chunk, "device_budget": self.device_budget}


class Executor(BaseModel):
    """Where candidates are evaluated (see ``evomerge.execution.EXECUTORS``).

    ``device``: ``auto`` (default: a GPU when torch sees one, else the CPU), ``cpu``, ``cuda``
    or ``cuda:N``. N local workers on G visible GPUs take them round-robin (worker k gets GPU
    k mod G); a SLURM task uses the GPU(s) Slurm allocated it (``CUDA_VISIBLE_DEVICES``); a Ray
    actor the GPU Ray gave it (``gpus_per_worker``). Sources, the build target and the fitness
    model all live on the worker's device.

    ``local``: in the driver (``workers: 0``) or in N local processes. ``ray``: N Ray actors at
    ``address``. ``slurm``: the driver only enqueues; N array-job workers started by
    ``evomerge slurm submit`` (or any ``evomerge worker``) evaluate. Remote workers record a
    heartbeat every ``heartbeat_s``; a trial whose worker is silent for ``grace_s`` goes back
    to the queue.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["local", "ray", "slurm"] = "local"
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    workers: int = Field(0, ge=0, description="0: evaluate in the driver process; N: N workers")
    address: str = Field("local", description="ray: local | auto | ray://host:port")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    threads: int | None = Field(None, ge=1, description="torch threads per evaluator; default: "
                                "torch's own in-process, cores // workers for local workers")
    heartbeat_s: float = Field(10.0, gt=0)
    grace_s: float = Field(60.0, gt=0)
    slurm: dict[str, str | int] = Field(default_factory=dict,
                                        description="sbatch options: partition, gres, time, ...")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value.strip().lower()) is None:
            raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {value!r}")
        return value.strip().lower()

    @model_validator(mode="after")
    def _remote_needs_workers(self) -> "Executor":
        if self.kind != "local" and self.workers < 1:
            raise ValueError(f"workers: executor kind {self.kind!r} needs workers >= 1")
        if (self.kind == "ray" and self.device.startswith("cuda")
                and self.gpus_per_worker == 0):
            raise ValueError(f"device: {self.device!r} on Ray needs gpus_per_worker > 0 (Ray "
                             "hides GPUs from actors that did not ask for one)")
        if self.grace_s <= self.heartbeat_s:
            raise ValueError(f"grace_s ({self.grace_s}) must exceed heartbeat_s "
                             f"({self.heartbeat_s})")
        return self


def _unknown_names(strategy: Any, fitness: Any) -> list[str]:
    """A line per strategy or fitness name (a string; anything else is pydantic's to report)
    that is not registered; ``module:qualname`` names are the Plan's to resolve."""
    from evomerge.fitness.base import FITNESSES
    from evomerge.search import STRATEGIES

    strategy, fitness = ((None if is_object_name(n) else n) for n in (strategy, fitness))
    problems = []
    if isinstance(strategy, str) and strategy not in STRATEGIES:
        problems.append(f"strategy.name: unknown strategy {strategy!r}; known: "
                        f"{', '.join(sorted(STRATEGIES))}")
    if isinstance(fitness, str) and fitness not in FITNESSES:
        problems.append(f"fitness.name: unknown fitness {fitness!r}; known: "
                        f"{', '.join(sorted(FITNESSES))}")
    return problems


def _field_line(field: str, message: str) -> str:
    """``field: message``, unless the message names its field itself (``fitness.reduced.anchors:
    ...`` from :class:`~evomerge.fitness.reduced.ReducedSpec`)."""
    if not field or message.startswith((f"{field}.", f"{field}:")):
        return message
    return f"{field}: {message}"


class Experiment(BaseModel):
    """A search. ``budget`` counts evaluated candidates (failed ones included).
    ``budget_items`` (optional) caps what they cost instead, in item evaluations (an IRT
    reduction's calibration included): the run starts no generation once it has spent that
    many, so a reduced run's cheap candidates buy more search than a full one's. The first
    generation always runs (a run needs a best), and the last may end past the cap by its own
    items."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    models: Models
    space: str | dict[str, Any]
    fitness: FitnessConfig
    strategy: Named
    budget: int = Field(gt=0)
    budget_items: int | None = Field(None, gt=0)
    seed: int = 0
    executor: Executor = Executor()
    engine: Engine = Engine()
    storage: str | None = None
    run_dir: str | None = None
    export: bool = True
    max_fail_share: float = Field(0.5, gt=0, le=1)
    # field ("fitness", "strategy") -> the Python object given to evomerge.run for it; never
    # serialised: the experiment records the object's module:qualname as the field's name
    _objects: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _names_exist(self) -> "Experiment":
        problems = _unknown_names(self.strategy.name, self.fitness.name)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "experiment", **overrides: Any) -> "Experiment":
        if not isinstance(data, dict):
            raise ExperimentError(f"{where}: expected a mapping of experiment fields")
        data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            text = format_errors(exc, _field_line)
            # Field errors stop pydantic before _names_exist: name the unknown names too.
            names = [data[k].get("name") if isinstance(data.get(k), dict) else None
                     for k in ("strategy", "fitness")]
            extra = [f"  {p}" for p in _unknown_names(*names) if p not in text]
            raise ExperimentError(f"{where}: invalid experiment:\n"
                                  + "\n".join([text, *extra])) from None

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "Experiment":
        """An experiment file; a run directory's own ``experiment.yaml`` (see
        :func:`is_run_dir`) is read as :meth:`from_run_dir` reads it."""
        path = Path(path)
        if path.name == RUN_RECORD and is_run_dir(path.parent):
            return cls.from_run_dir(path.parent, **overrides)
        data = read_yaml(path, ExperimentError, "experiment")
        return cls.from_dict(data, where=str(path), **overrides)

    @classmethod
    def from_run_dir(cls, directory: str | Path, /, **overrides: Any) -> "Experiment":
        """The experiment recorded in ``directory``, *living in* it: the directory as
        named now, not the absolute ``run_dir`` recorded when the run started, so a run
        directory that was copied or moved resumes (and its dashboard reads) the copy, never the
        original. A file store (``sqlite:///``, ``journal:///``) recorded inside the old
        directory follows too; any other store stays where it is."""
        run_dir = Path(directory).absolute()
        path = run_dir / RUN_RECORD
        data = read_yaml(path, ExperimentError, "experiment")
        if isinstance(data, dict):
            recorded = data.get("run_dir")
            data = {**data, "run_dir": str(run_dir)}
            if recorded and isinstance(data.get("storage"), str):
                data["storage"] = _rebased(data["storage"], Path(recorded), run_dir)
        return cls.from_dict(data, where=str(path), **overrides)

    def with_objects(self, **objects: Any) -> "Experiment":
        """This experiment with Python objects standing for its ``fitness`` or ``strategy``
        (named by their ``module:qualname``; see :func:`evomerge.run`)."""
        out = self.model_copy()
        out._objects = {**self._objects, **{k: v for k, v in objects.items() if v is not None}}
        return out

    def component(self, field: Literal["fitness", "strategy"]) -> Any | None:
        """The Python object behind ``field``: the one given to :meth:`with_objects`, else the
        one its ``module:qualname`` name imports; None for a registered name. ExperimentError
        when an object's name cannot be imported in this process (a lambda, a closure, an
        instance, ``__main__`` of another process): it must be given again."""
        name = getattr(self, field).name
        if field in self._objects or not is_object_name(name):
            return self._objects.get(field)
        try:
            return import_object(name)
        except ImportError as exc:
            raise ExperimentError(
                f"{field}.name: {exc}; a {field} given to evomerge.run as an object must be given "
                f"again to resume the run (evomerge.resume(run_dir, {field}=...)), or be "
                "importable (defined at module level)") from None

    def resolved(self) -> "Experiment":
        """Model paths absolute (a DFS space's ``merged`` recipe files too), run_dir fixed:
        what the run directory records, so a resume works from any directory."""
        space = self.space
        if isinstance(space, dict) and isinstance(space.get("merged"), dict):
            space = {**space, "merged": {k: str(Path(v).expanduser().absolute())
                                         for k, v in space["merged"].items()}}
        return self.model_copy(update={"models": self.models.resolved(), "space": space,
                                       "run_dir": str(self.run_path)})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir or Path("runs") / self.name).absolute()
