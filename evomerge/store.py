"""The store: one Optuna study per run, the single source of truth and the work queue.

Every candidate becomes an Optuna trial before it is evaluated: the driver *enqueues* it (a
WAITING trial holding ``x`` and, as one user attribute, its generation, index and recipe);
a worker *pops* it (WAITING -> RUNNING, atomically in the storage, so two workers never get
the same trial), records the parameters, evaluates, and *finishes* it (COMPLETE with the
objective values, or FAIL with the reason). Results, timings and per-item scores travel in one
user attribute so a trial costs a fixed number of storage writes plus one per parameter: the
parameters themselves are written as Optuna params so optuna-dashboard can plot them.

A worker that dies while it holds a trial must not strand it. Two mechanisms give such a trial
back (FAIL with ``RESULT = {"error": INTERRUPTED}``, which the driver enqueues again by slot):
the local executor sees its dead child and calls :meth:`Store.fail_interrupted` with the owner;
for workers it cannot watch (Ray, SLURM, or any claim on PostgreSQL / journal, where the owner is
written just after the claim), workers *beat* (:meth:`Store.beating`) and the driver's poll loop
calls :meth:`Store.fail_stale`.

The store knows nothing of merging: it moves vectors, plain dicts and numbers.
"""

from __future__ import annotations

import base64
import fcntl
import logging
import math
import socket
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

optuna.logging.set_verbosity(optuna.logging.WARNING)
_log = logging.getLogger(__name__)

META = "evomerge"  # user attribute set at enqueue: generation, index, recipe
RESULT = "result"  # user attribute set on finish: timings, item scores, error
INTERRUPTED = "interrupted"
EXPERIMENT = "experiment"  # study user attribute: the resolved experiment, for remote workers
STORE_ARGS = "evomerge:store_args"  # study user attribute: Store's arguments, for remote workers
OWNER = "evomerge:owner"  # system attribute: the worker ("host:pid") running a trial
HEARTBEAT = "evomerge:heartbeat"  # system attribute: a worker's last beat (its time.time())
PARAMS = "evomerge:params"  # study user attribute: the Optuna parameter names, x[i] -> PARAMS[i]
RUN = "evomerge:run"  # study user attribute: the run that owns the study ({"id", "run_dir", ...})
NOTE_PIECE = 2045  # optuna-dashboard's longest note piece (optuna_dashboard._note)


def legacy_names(dim: int) -> list[str]:
    """The parameter names of studies made before parameters were named: ``x0 .. x{dim-1}``."""
    return [f"x{i}" for i in range(dim)]


class StoreError(RuntimeError):
    """A store that cannot be used as asked; the message says why and what to do."""


class RunOwnedError(StoreError):
    """The study belongs to another run (see :meth:`Store.claim_run`)."""


class StoreFullError(StoreError):
    """A write failed for lack of disk space (see :func:`explain_write_errors`)."""


_NO_SPACE = ("database or disk is full", "no space left on device", "disk full",
             "could not extend file")


def no_space_cause(exc: BaseException) -> str | None:
    """The line of ``exc``'s chain that says the disk is full, or None.

    Optuna reports a failed commit as ``StorageInternalError`` ("invalid data in the commit,
    e.g. exceeding max length"); the real cause (SQLite's ``database or disk is full``,
    PostgreSQL's ``could not extend file ... No space left on device``, the journal's
    ``OSError(ENOSPC)``) is further down the chain."""
    import errno

    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"{e.strerror or e} ({e.filename})" if e.filename else str(e.strerror or e)
        text = str(getattr(e, "orig", None) or e)
        if any(k in text.lower() for k in _NO_SPACE):
            return text.strip().splitlines()[0]
        todo += [e.__cause__, e.__context__, getattr(e, "orig", None)]
    return None


@contextmanager
def explain_write_errors(url: str, resume_hint: str = "evomerge resume RUN_DIR") -> Iterator[None]:
    """Turn a store write that failed for lack of disk space into one clear
    :class:`StoreFullError` naming the cause; every other error passes unchanged."""
    try:
        yield
    except StoreError:
        raise
    except Exception as exc:
        cause = no_space_cause(exc)
        if cause is None:
            raise
        raise StoreFullError(no_space_message(url, cause, resume_hint)) from exc


def no_space_message(url: str, cause: str, resume_hint: str = "evomerge resume RUN_DIR") -> str:
    where = _file_of(url)
    disk = f"the disk that holds {where}" if where else "the database server's disk"
    kept = ("nothing was corrupted: the journal keeps every write that completed"
            if url.startswith("journal:") else
            "nothing was corrupted: the database rolled the failed write back")
    return (f"the store cannot be written: {cause} ({disk} is full). {kept[0].upper()}"
            f"{kept[1:]}, and every finished trial is kept. Free some space, then continue "
            f"the run with `{resume_hint}`.")


def _file_of(url: str) -> Path | None:
    """The file behind a ``sqlite:///`` or ``journal:///`` URL; None for a server."""
    for prefix in ("sqlite:///", "journal://"):
        if url.startswith(prefix):
            return Path(url.removeprefix(prefix))
    return None


def storage_url(url: str | None, run_dir: Path) -> str:
    """The experiment's storage URL, default SQLite at ``run_dir/study.db``."""
    return url or f"sqlite:///{(run_dir / 'study.db').absolute()}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL: ``sqlite:///``, ``postgresql://``, ``journal:///path`` or
    ``memory``. SQLite gets a generous lock timeout for multi-process workers. A bare
    ``postgresql://`` means psycopg2 (the ``postgres`` extra): SQLAlchemy 2.1 would pick psycopg
    3, which we do not install; name a driver (``postgresql+psycopg://``) to choose another."""
    if url == "memory":
        return optuna.storages.InMemoryStorage()
    if url.startswith("journal:///"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal://")))
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    if url.startswith("postgresql+psycopg2://"):
        try:
            import psycopg2  # noqa: F401 - only to fail with a clear message
        except ImportError:
            raise ImportError("a postgresql:// storage needs psycopg2: "
                              "pip install 'evomerge[postgres]'") from None
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    # get_storage adds Optuna's trial cache in front of the database; the study and our direct
    # storage calls must share that one object or the cache misses trials we create.
    return optuna.storages.get_storage(_rdb_storage(url, engine_kwargs))


def _rdb_storage(url: str, engine_kwargs: dict, tries: int = 5) -> optuna.storages.RDBStorage:
    """RDBStorage, retried when another process creates the same fresh database's schema at the
    same moment: both insert the schema version and one gets an IntegrityError (seen with a
    SLURM worker polling a SQLite file its driver was creating). The loser's retry finds the
    schema there and only reads it."""
    import sqlalchemy.exc

    for attempt in range(tries):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
            if attempt == tries - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def many_writers_warning(url: str, workers: int, remote: bool) -> str | None:
    """The advice for a SQLite store written by many processes, or None when it fits.

    SQLite serialises every write behind one file lock (and our claim lock is a local file lock,
    useless across nodes on a shared filesystem): from about 4 writers, or any remote worker,
    the journal file or PostgreSQL is the right backend."""
    if not url.startswith("sqlite") or (workers < 4 and not remote):
        return None
    who = "remote workers" if remote else f"{workers} worker processes"
    return (f"storage {url} is SQLite, written by {who}: SQLite serialises all writes and its "
            "claim lock works on one machine only. Use `storage: journal:///ABS/PATH/study.log` "
            "(a file on a shared filesystem) or `storage: postgresql://USER:PASS@HOST/DB` "
            "(many nodes) in the experiment.")


@dataclass(frozen=True)
class Slot:
    """A candidate's place in the run: generation and index within it."""

    generation: int
    index: int


@dataclass(frozen=True)
class Claim:
    """A trial a worker holds: the live Optuna trial and the metadata it was enqueued with.

    ``claimed_at`` is the worker's ``time.monotonic()`` just *before* it claimed: the start of
    its lease (see :meth:`Store.beating`)."""

    trial: optuna.trial.Trial
    meta: dict[str, Any]
    claimed_at: float = field(default=0.0, compare=False)

    @property
    def number(self) -> int:
        return self.trial.number


def encode_scores(scores: np.ndarray) -> dict[str, Any]:
    """Per-item scores compactly: 0/1 vectors as packed bits (base64), else rounded floats."""
    arr = np.asarray(scores, dtype=np.float32).ravel()
    if np.all((arr == 0) | (arr == 1)):
        bits = np.packbits(arr.astype(np.uint8))
        return {"n": int(arr.size), "bits": base64.b64encode(bits.tobytes()).decode()}
    return {"n": int(arr.size), "values": [round(float(v), 6) for v in arr]}


def scored_in_full(trial: FrozenTrial, *, reduced: bool) -> bool:
    """Whether a finished trial's values are full scores rather than an IRT estimate from
    anchor items (``reduced``: the run's fitness is IRT-reduced): enqueued for every item (an
    IRT warmup), raced to every item, or of a run without reduction. A reduced run's trial
    recorded before trials named their fidelity holds an estimate."""
    if trial.user_attrs.get(META, {}).get("fidelity", {}).get("full"):
        return True
    return trial.user_attrs.get(RESULT, {}).get("fidelity", "anchors" if reduced else "full") \
        == "full"


def items_scored(trial: FrozenTrial) -> int:
    """How many item evaluations a finished trial spent (the lengths of its item scores)."""
    return sum(int(v["n"]) for v in trial.user_attrs.get(RESULT, {}).get("item_scores", {})
               .values())


def decode_scores(data: Mapping[str, Any]) -> np.ndarray:
    if "bits" in data:
        bits = np.frombuffer(base64.b64decode(data["bits"]), dtype=np.uint8)
        return np.unpackbits(bits)[: data["n"]].astype(np.float32)
    return np.asarray(data["values"], dtype=np.float32)


def check_heartbeat(heartbeat_s: float | None, grace_s: float | None) -> None:
    """Both or neither; positive; a grace longer than one beat (else a live worker looks dead)."""
    if (heartbeat_s is None) != (grace_s is None):
        raise ValueError(f"heartbeat_s ({heartbeat_s}) and grace_s ({grace_s}) go together: "
                         "set both or neither")
    if heartbeat_s is not None and grace_s is not None and not 0 < heartbeat_s < grace_s:
        raise ValueError(f"need 0 < heartbeat_s < grace_s, got heartbeat_s = {heartbeat_s}, "
                         f"grace_s = {grace_s}")


class Store:
    """An Optuna study used as record and queue. ``lower``/``upper`` define the parameters.

    ``param_names`` (the bound space's ``names``) name them in Optuna, so the dashboard shows
    ``weight[expert_add][layers.3]`` rather than ``x7``. The names a study was made with are
    kept in its user attribute ``PARAMS`` and win over the arguments: a study made before
    parameters were named keeps ``x0 .. xN`` (:func:`legacy_names`) and still resumes. The only
    mapping between ``x`` and names is ``x[i] <-> names[i]`` (see :func:`x_of`).

    With ``heartbeat_s``/``grace_s``, workers beat while they hold a trial and
    :meth:`fail_stale` gives back the trials of silent ones (see :meth:`beating`).
    """

    def __init__(self, url: str, study_name: str, directions: Sequence[str],
                 lower: Sequence[float], upper: Sequence[float], *,
                 param_names: Sequence[str] | None = None,
                 objective_names: Sequence[str] | None = None,
                 heartbeat_s: float | None = None, grace_s: float | None = None) -> None:
        check_heartbeat(heartbeat_s, grace_s)
        if len(lower) != len(upper):
            raise ValueError(f"{len(lower)} lower bounds for {len(upper)} upper bounds")
        self.heartbeat_s, self.grace_s = heartbeat_s, grace_s
        # fail_stale: trial id -> (last heartbeat value seen, monotonic time it was first seen)
        self._seen: dict[int, tuple[Any, float]] = {}
        # beating: trial id -> monotonic time just before the last write that renewed the lease
        self._leases: dict[int, float] = {}
        self._waiting: deque[FrozenTrial] = deque()  # pop's snapshot of the queue (see _claim)
        self.url = url
        self.run_id: str | None = None  # set by claim_run: enqueue checks the study is still ours
        self.resume_hint = "evomerge resume RUN_DIR"
        with explain_write_errors(url):
            self.storage = open_storage(url)
            self.created = True  # whether this store made the study (see claim_run)
            try:
                self.study = optuna.create_study(storage=self.storage, study_name=study_name,
                                                 directions=list(directions))
            except optuna.exceptions.DuplicatedStudyError:
                self.created = False
                self.study = optuna.load_study(storage=self.storage, study_name=study_name)
        if [d.name.lower() for d in self.study.directions] != [d.lower() for d in directions]:
            raise ValueError(f"study {study_name!r} in {url} has directions "
                             f"{[d.name.lower() for d in self.study.directions]}, "
                             f"the experiment asks for {list(directions)}")
        with explain_write_errors(url):
            if objective_names and self.study.metric_names != list(objective_names):
                with warnings.catch_warnings():  # experimental since Optuna 3.2, stable
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    self.study.set_metric_names(list(objective_names))
            self.names = self._param_names(param_names, len(lower))
        self.n_objectives = len(directions)
        self._lock_path = (Path(url.removeprefix("sqlite:///")).with_suffix(".claim.lock")
                           if url.startswith("sqlite:///") else None)
        self.distributions = {name: FloatDistribution(float(lo), float(hi))
                              for name, lo, hi in zip(self.names, lower, upper)}

    def _param_names(self, asked: Sequence[str] | None, dim: int) -> list[str]:
        """The names this study's parameters have: as recorded in the study, else ``asked``
        (recorded now) for a new study, ``x0..`` for one made before names were recorded."""
        recorded = self.user_attrs().get(PARAMS)
        if recorded is not None:
            recorded = list(recorded)
            if len(recorded) != dim:
                raise ValueError(f"study {self.study.study_name!r} in {self.url} has "
                                 f"{len(recorded)} parameters, the search space {dim}: the "
                                 "experiment must be the one the run started with")
            if asked is not None and recorded not in (list(asked), legacy_names(dim)):
                first = next(i for i, (a, b) in enumerate(zip(recorded, asked)) if a != b)
                raise ValueError(f"study {self.study.study_name!r} in {self.url} names its "
                                 f"parameter {first} {recorded[first]!r}, the search space "
                                 f"{list(asked)[first]!r}: the experiment must be the one the "
                                 "run started with")
            return recorded
        names = legacy_names(dim)
        if asked is not None and not self.study.get_trials(deepcopy=False):
            names = [str(n) for n in asked]
            if len(names) != dim or len(set(names)) != dim or not all(names):
                raise ValueError(f"param_names: expected {dim} distinct, non-empty names, "
                                 f"got {names}")
        self.study.set_user_attr(PARAMS, names)
        return names

    def user_attrs(self) -> dict[str, Any]:
        """The study's user attributes, read now (not cached)."""
        return self.storage.get_study_user_attrs(self.study._study_id)

    # ---- the run that owns the study ---------------------------------------------------------

    def claim_run(self, run_id: str, run_dir: str | Path, *, resume: bool) -> None:
        """Make the study this run's, or refuse with one :class:`RunOwnedError` that says whose
        it is and what to do. ``run_id`` is the run's identity (kept in ``RUN_DIR/run.json``).

        A new run (``resume=False``) takes a study nobody owns and that holds no trial; a resume
        takes a study it owns already, or one nobody owns (made before runs had an identity).
        Afterwards :meth:`enqueue` checks the owner before every trial it adds, so two drivers
        that raced for the same study name cannot both add trials to it: the one whose claim was
        overwritten stops at its next enqueue.
        """
        run_dir = str(Path(run_dir).absolute())
        self.resume_hint = f"evomerge resume {run_dir}"
        owner = self.user_attrs().get(RUN)
        if owner is None and not self.created and not resume:
            time.sleep(0.2)  # a driver that has just created the study writes its owner next
            owner = self.user_attrs().get(RUN)
        if owner is not None and owner.get("id") != run_id:
            raise RunOwnedError(self._owned_message(owner, run_dir, resume))
        n = len(self.trials())
        if owner is None and n and not resume:
            raise RunOwnedError(
                f"study {self.study.study_name!r} in {self.url} already holds {n} trials of "
                f"a run that has no identity recorded (made by an older evomerge): if that is "
                f"the run in {run_dir}, continue it with `evomerge resume {run_dir}`; else "
                "give this experiment another `name:` (the study name) or `storage:`")
        if owner is None:
            with explain_write_errors(self.url, self.resume_hint):
                self.study.set_user_attr(RUN, {"id": run_id, "run_dir": run_dir,
                                               "host": socket.gethostname(),
                                               "claimed_at": time.time()})
        self.run_id = run_id
        self.check_owner()  # a driver that claimed at the same moment wrote last: it wins

    def check_owner(self) -> None:
        """RunOwnedError when another run has taken the study since :meth:`claim_run`."""
        if self.run_id is None:
            return
        owner = self.user_attrs().get(RUN) or {}
        if owner.get("id") != self.run_id:
            raise RunOwnedError(self._owned_message(owner, None, False))

    def _owned_message(self, owner: Mapping[str, Any], run_dir: str | None,
                       resume: bool) -> str:
        name, there = self.study.study_name, owner.get("run_dir", "?")
        if run_dir is not None and there == run_dir and not resume:
            return (f"{run_dir} already holds run {owner.get('id')} (study {name!r} in "
                    f"{self.url}, {len(self.trials())} trials): continue it with `evomerge "
                    f"resume {run_dir}`, or remove it, or pick another --run-dir")
        return (f"study {name!r} in {self.url} belongs to another run (id {owner.get('id')}, "
                f"run directory {there}, host {owner.get('host', '?')}): give this experiment "
                f"another `name:` (the study name) or `storage:`, or continue that run with "
                f"`evomerge resume {there}`")

    # ---- driver side ---------------------------------------------------------------------

    def enqueue(self, x: np.ndarray, slot: Slot, recipe: Mapping[str, Any] | None = None, *,
                note: str | None = None, extra: Mapping[str, Any] | None = None) -> int:
        """Record a candidate as a WAITING trial (before anyone evaluates it); its trial id.
        ``extra``: more metadata for its worker (:attr:`Claim.meta`), such as an IRT-reduced
        run's ``fidelity``.

        Like ``study.enqueue_trial``, through the storage so the id comes back, and with the
        parameters already set (a WAITING trial shows them in optuna-dashboard). ``note``:
        Markdown that optuna-dashboard shows on the trial's page (two writes more). After
        :meth:`claim_run`, refuses (:class:`RunOwnedError`) once another run owns the study.
        """
        x = np.asarray(x, dtype=float).ravel()
        if x.size != len(self.names):
            raise ValueError(f"x: {x.size} values for {len(self.names)} parameters")
        params = {name: float(v) for name, v in zip(self.names, x)}
        meta: dict[str, Any] = {"generation": slot.generation, "index": slot.index}
        if recipe is not None:
            meta["recipe"] = dict(recipe)
        meta.update(extra or {})
        # The parameters go in with the trial, in one transaction. Written at the claim instead
        # (``suggest_float`` per parameter, as ``study.enqueue_trial`` + ``ask`` do), each was a
        # transaction of its own: 40 parameters cost 0.063 s on SQLite there, 0.040 s here.
        # A point a strategy proposed past its bounds (a float overshoot) is no param of the
        # distributions: it goes as ``fixed_params``, written at the claim (Optuna warns).
        inside = all(d.low <= v <= d.high for d, v in zip(self.distributions.values(), x))
        fields = ({"params": params, "distributions": self.distributions} if inside
                  else {"system_attrs": {"fixed_params": params}})
        template = optuna.trial.create_trial(state=TrialState.WAITING, user_attrs={META: meta},
                                             **fields)
        with explain_write_errors(self.url, self.resume_hint):
            self.check_owner()
            trial_id = self.storage.create_new_trial(self.study._study_id,
                                                     template_trial=template)
            if note:
                self.save_note(trial_id, note)
        return trial_id

    def save_note(self, trial_id: int, text: str) -> None:
        """``text`` (Markdown) as the trial's note in optuna-dashboard, written as
        ``optuna_dashboard.save_note`` writes it (study system attributes, version 1, 2045
        characters a piece) minus its read of every study system attribute, which grows with
        each note and would make a run's notes cost quadratic time."""
        prefix = f"dashboard:{trial_id}:note_str:"
        self.storage.set_study_system_attr(self.study._study_id,
                                           f"dashboard:{trial_id}:note_ver", 1)
        for i in range(0, max(len(text), 1), NOTE_PIECE):
            self.storage.set_study_system_attr(self.study._study_id,
                                               f"{prefix}{i // NOTE_PIECE}",
                                               text[i:i + NOTE_PIECE])

    def get(self, trial_id: int) -> FrozenTrial:
        return self.storage.get_trial(trial_id)

    def trials(self, states: Sequence[TrialState] | None = None) -> list[FrozenTrial]:
        """Our trials (those with a slot), in creation order."""
        return [t for t in self.study.get_trials(deepcopy=False, states=states)
                if META in t.user_attrs]

    def slots(self) -> dict[Slot, FrozenTrial]:
        """The trial that stands for each slot: a finished one if any, else the newest."""
        best: dict[Slot, FrozenTrial] = {}
        for t in self.trials():
            if t.user_attrs.get(RESULT, {}).get("error") == INTERRUPTED:
                continue
            slot = slot_of(t)
            if slot not in best or not best[slot].state.is_finished():
                best[slot] = t
        return best

    def fail_interrupted(self, owner: str | None = None) -> list[FrozenTrial]:
        """Mark RUNNING trials left by a dead process as FAIL(interrupted); returns them.

        With ``owner``, only the trials that worker claimed (see :meth:`pop`); without, every
        RUNNING trial, which is right only when no worker is alive (resume).
        """
        stale = [t for t in self.trials(states=(TrialState.RUNNING,))
                 if owner is None or t.system_attrs.get(OWNER) == owner]
        return [t for t in stale if self._give_back(t._trial_id)]

    def fail_stale(self) -> list[FrozenTrial]:
        """Give back the RUNNING trials of silent workers (FAIL, interrupted); returns them as
        they were before.

        A trial is stale when its heartbeat (see :meth:`beating`) has not changed for longer
        than ``grace_s`` since this store first saw its current value, a trial that never beat
        included (its worker died between the claim and its first beat, or, on PostgreSQL and
        the journal, between the claim and writing its owner). Time is this process's monotonic
        clock and the stamps are only compared for change, so clock skew between nodes cannot
        make a live worker look dead; the price is that a fresh store waits one grace period
        before it gives anything back (resume uses :meth:`fail_interrupted`, which does not).

        Why not Optuna's own heartbeat: in Optuna 5.0 only ``RDBStorage`` implements
        ``BaseHeartbeat`` (``JournalStorage`` does not), ``RDBStorage._get_stale_trial_ids``
        skips trials that never beat (exactly the stranded claim), and a retry callback in the
        spirit of ``RetryFailedTrialCallback`` creates a new trial, which would double-count a
        slot that the driver enqueues again itself. We reuse Optuna's atomic state change:
        whoever moves the trial out of RUNNING first wins (this, another checker, or the worker
        finishing), so no trial is both completed and given back.

        Cost: one read of the RUNNING trials, no write unless something is stale; meant to be
        called from an executor's poll loop about every second.
        """
        if self.grace_s is None:
            raise ValueError("fail_stale needs heartbeats: Store(..., heartbeat_s=, grace_s=)")
        now = time.monotonic()
        seen: dict[int, tuple[Any, float]] = {}
        stale = []
        for t in _uncached(self.storage).get_all_trials(self.study._study_id, deepcopy=False,
                                                        states=(TrialState.RUNNING,)):
            if META not in t.user_attrs:
                continue
            beat = t.system_attrs.get(HEARTBEAT)
            previous = self._seen.get(t._trial_id)
            since = previous[1] if previous is not None and previous[0] == beat else now
            seen[t._trial_id] = (beat, since)
            if now - since > self.grace_s:
                stale.append(t)
        self._seen = seen
        return [t for t in stale if self._give_back(t._trial_id)]

    def _give_back(self, trial_id: int) -> bool:
        """RUNNING -> FAIL(interrupted); False if the trial had finished (someone was first)."""
        try:
            with explain_write_errors(self.url, self.resume_hint):
                self.storage.set_trial_user_attr(trial_id, RESULT, {"error": INTERRUPTED})
                return self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False

    def set_finished(self, finished: bool = True) -> None:
        """Tell workers polling the queue that no more work will come."""
        with explain_write_errors(self.url, self.resume_hint):
            self.study.set_user_attr("finished", finished)

    def is_finished(self) -> bool:
        return bool(self.storage.get_study_user_attrs(self.study._study_id).get("finished"))

    # ---- worker side ---------------------------------------------------------------------

    def pop(self, owner: str | None = None) -> Claim | None:
        """Claim one WAITING trial (atomically); None if the queue is empty. Never creates a
        trial: a missing candidate must not be invented by a worker.

        ``owner`` (a worker's "host:pid") is recorded so the trial can be given back if that
        worker dies; the in-process executor skips it (one storage write less per trial).
        """
        claimed_at = time.monotonic()
        with explain_write_errors(self.url, self.resume_hint):
            with self._claim_lock():
                waiting = self._claim(owner)
            if waiting is None:
                return None
            trial = optuna.trial.Trial(self.study, waiting._trial_id)
            # enqueue wrote the parameters with the trial: these read them back without a
            # write; a trial enqueued by an older evomerge (``fixed_params``) gets them written
            for name, dist in self.distributions.items():
                trial.suggest_float(name, dist.low, dist.high)
        return Claim(trial, dict(waiting.user_attrs[META]), claimed_at)

    def _claim(self, owner: str | None) -> FrozenTrial | None:
        """Move the first WAITING trial to RUNNING; its (pre-claim) snapshot, or None.

        Under the SQLite claim lock the owner is written *before* the state changes, so a worker
        killed at any point leaves either a WAITING trial (claimed by the next worker) or a
        RUNNING one that names it. Without the lock (PostgreSQL, journal) two workers may race
        for one trial, so the owner is written after the claim succeeds; a worker killed between
        the two leaves a RUNNING trial without owner, which :meth:`fail_stale` gives back (it
        never beats).

        Candidates come from this store's snapshot of the WAITING trials, read again only when
        it runs out. Reading them all per pop (as ``Study.ask`` does) made draining N queued
        trials cost N reads of up to N trials with all their attributes: 8 workers took 246 s
        (SQLite) and 221 s (PostgreSQL) for 400 trials, contended. A stale candidate (claimed by
        another worker since the snapshot) costs one failed claim, or on SQLite one read.
        """
        claimed = self._claim_next(owner) if self._waiting else None
        if claimed is None:
            # Through Optuna's cache on purpose: writing params needs the trials registered there.
            self._waiting = deque(self.storage.get_all_trials(
                self.study._study_id, deepcopy=False, states=(TrialState.WAITING,)))
            claimed = self._claim_next(owner)
        return claimed

    def _claim_next(self, owner: str | None) -> FrozenTrial | None:
        locked = self._lock_path is not None
        while self._waiting:
            t = self._waiting.popleft()
            try:
                # Under the lock nobody claims between this read and our write, so the owner
                # written next can never land on another worker's trial.
                if locked and self.storage.get_trial(t._trial_id).state != TrialState.WAITING:
                    continue
                if owner is not None and locked:
                    self.storage.set_trial_system_attr(t._trial_id, OWNER, owner)
                if self.storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                    if owner is not None and not locked:
                        self.storage.set_trial_system_attr(t._trial_id, OWNER, owner)
                    return t
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
        return None

    @contextmanager
    def beating(self, claim: Claim) -> Iterator[None]:
        """Heartbeats for ``claim`` while the block runs; a no-op without ``heartbeat_s``.

        A daemon thread writes the trial's system attribute ``HEARTBEAT`` every ``heartbeat_s``
        (the first after one interval: a trial shorter than that costs no write), so a worker
        costs one storage write per interval, not per trial. Run :meth:`finish` inside the block.

        The beats are also the worker's *lease*: a checker gives a trial back no sooner than
        ``grace_s`` after the last beat it saw, so :meth:`finish` writes only while the last
        successful beat (or the claim) is younger than ``(heartbeat_s + grace_s) / 2``, leaving
        ``(grace_s - heartbeat_s) / 2`` for its writes to land before anyone may give the trial
        back. A worker whose beats failed that long (a network partition, a paused process)
        gives the trial back itself and drops its result: the slot is evaluated again.
        """
        if self.heartbeat_s is None:
            yield
            return
        trial_id = claim.trial._trial_id
        self._leases[trial_id] = claim.claimed_at
        stop = threading.Event()
        thread = threading.Thread(target=self._beat, args=(trial_id, stop), daemon=True,
                                  name=f"evomerge-heartbeat-{claim.number}")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=self.heartbeat_s)  # a write stuck longer is abandoned (daemon)
            self._leases.pop(trial_id, None)

    def _beat(self, trial_id: int, stop: threading.Event) -> None:
        assert self.heartbeat_s is not None
        while not stop.wait(self.heartbeat_s):
            started = time.monotonic()
            try:
                self.storage.set_trial_system_attr(trial_id, HEARTBEAT, time.time())
            except optuna.exceptions.UpdateFinishedTrialError:
                return  # given back by a checker: nothing left to keep alive
            except Exception as exc:  # noqa: BLE001 - a lost beat only shortens the lease
                _log.warning("heartbeat of trial id %d failed: %s", trial_id, exc)
                continue
            if not stop.is_set():
                self._leases[trial_id] = started

    def _lease_expired(self, trial_id: int) -> bool:
        lease = self._leases.get(trial_id)
        if lease is None or self.heartbeat_s is None or self.grace_s is None:
            return False
        return time.monotonic() - lease > (self.heartbeat_s + self.grace_s) / 2

    @contextmanager
    def _claim_lock(self) -> Iterator[None]:
        """Serialise claims on SQLite, whose deferred transactions let two processes both move
        one WAITING trial to RUNNING (seen here with 2 workers). SQLite is single-node, so an
        advisory lock file beside the database covers every writer. Other backends claim
        atomically on their own (PostgreSQL row locks, the journal's replay)."""
        if self._lock_path is None:
            yield
            return
        with open(self._lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def finish(self, claim: Claim, values: Sequence[float] | None, *,
               timings: Mapping[str, float] | None = None,
               item_scores: Mapping[str, np.ndarray] | None = None,
               error: str | None = None, worker: Mapping[str, Any] | None = None,
               info: Mapping[str, Any] | None = None) -> bool:
        """COMPLETE with values, or FAIL with ``error``; timings and scores in one attribute,
        with ``worker``: where it ran (device, dtype; see execution/devices.describe), and
        ``info``: what the evaluation was (an IRT-reduced one's fidelity and estimate).

        False when the trial is no longer this worker's to finish: a checker gave it back
        (:meth:`fail_stale`, a resuming driver), or the worker's lease ran out (see
        :meth:`beating`), in which case it gives the trial back itself. The result is dropped
        and the driver has the slot evaluated again.
        """
        result: dict[str, Any] = {k: round(float(v), 6) for k, v in (timings or {}).items()}
        if item_scores:
            result["item_scores"] = {k: encode_scores(v) for k, v in item_scores.items()}
        ok = error is None and values is not None and all(math.isfinite(v) for v in values)
        if not ok:
            result["error"] = error or f"non-finite objective values {list(values or [])}"
        if worker:
            result["worker"] = dict(worker)
        result.update(info or {})
        result["finished_at"] = time.time()
        if ok and len(values) != self.n_objectives:
            raise ValueError(f"trial {claim.number}: {len(values)} values for "
                             f"{self.n_objectives} objectives")
        trial_id = claim.trial._trial_id
        if self._lease_expired(trial_id):
            self._give_back(trial_id)
            _log.warning("trial %d: this worker's heartbeats failed for longer than its lease; "
                         "the trial was given back and its result dropped", claim.number)
            return False
        with explain_write_errors(self.url, self.resume_hint):
            return self._finish(claim, trial_id, result, values if ok else None)

    def _finish(self, claim: Claim, trial_id: int, result: dict[str, Any],
                values: Sequence[float] | None) -> bool:
        ok = values is not None
        try:
            self.storage.set_trial_user_attr(trial_id, RESULT, result)
            # Written directly rather than through Study.tell, which re-reads and deep-copies
            # the whole trial (recipe and item scores included) to return a copy nobody needs;
            # nothing samples from this study, so tell's sampler hooks have no work. Measured:
            # evomerge's overhead over bare Optuna went from 1.42x to 1.05x on in-memory storage.
            if ok:
                self.storage.set_trial_state_values(trial_id, TrialState.COMPLETE,
                                                    [float(v) for v in values])
            else:
                self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            _log.warning("trial %d was given back while this worker ran it; result dropped",
                         claim.number)
            return False
        return True

    # ---- reading -------------------------------------------------------------------------

    def best_trials(self) -> list[FrozenTrial]:
        """The Pareto set (the best trial, for one objective), from Optuna."""
        if not self.trials(states=(TrialState.COMPLETE,)):
            return []
        return self.study.best_trials


def _uncached(storage: optuna.storages.BaseStorage) -> optuna.storages.BaseStorage:
    """The database behind Optuna's trial cache (``get_storage`` wraps every RDBStorage in one).

    The cache keeps finished trials only; asked for RUNNING trials it re-reads *every*
    unfinished one, WAITING included, with all their attributes: 0.5 s (SQLite) to 2.5 s
    (PostgreSQL) per call with 400 queued trials, measured contended here. The database itself
    filters by state in SQL. Reading around the cache is safe: it only ever holds finished
    trials, and writes pass straight through it.
    """
    backend = getattr(storage, "_backend", None)
    return backend if isinstance(backend, optuna.storages.RDBStorage) else storage


def slot_of(trial: FrozenTrial) -> Slot:
    meta = trial.user_attrs[META]
    return Slot(int(meta["generation"]), int(meta["index"]))


def x_of(trial: FrozenTrial, names: Sequence[str] | int) -> np.ndarray:
    """The candidate vector of a trial (from its params, or the enqueued fixed params):
    ``x[i]`` is the parameter ``names[i]`` (:attr:`Store.names`); an int ``dim`` means the
    unnamed ``x0 .. x{dim-1}``."""
    if isinstance(names, int):
        names = legacy_names(names)
    params = trial.params or trial.system_attrs.get("fixed_params", {})
    return np.array([params[name] for name in names], dtype=float)
