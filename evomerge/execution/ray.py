"""Ray execution: a pool of long-lived Ray actors that pop trials from the store.

``executor: {kind: ray, workers: N}`` starts N actors (``num_cpus=cpus_per_worker``,
``num_gpus=gpus_per_worker``). Each loads the sources once (an
:class:`~evomerge.execution.evaluator.Evaluator`; start-up costs seconds, so actors live for the
whole run) and evaluates one queued trial per call through
:func:`~evomerge.execution.worker.process_one`, under its own owner id (``host:pid``), so
progress, results and failures land in the same store as in a local run. The driver keeps one
call in flight per actor and ticks as each returns; an actor that found the queue empty rests
until the next generation is enqueued.

``address: local`` starts a private single-node Ray for the run (shut down by ``close``);
``auto`` or ``ray://host:port`` joins an existing cluster, whose nodes must have evomerge
installed and reach the storage URL (SQLite only works when every actor shares the driver's
disk; use PostgreSQL across nodes). A process that has already called ``ray.init`` keeps its Ray:
the executor joins it and leaves it running.

The private Ray listens on loopback only (:func:`start_local_ray`). Ray has no bind-host
setting; every listener follows the node address. The gRPC servers (GCS, raylet, the core
workers of the driver and of each actor, the dashboard agent's) and the metrics servers (the
autoscaler monitor's, the dashboard process's, the dashboard agent's) bind loopback when the node
address is exactly ``127.0.0.1`` and all interfaces otherwise; the dashboard agent's HTTP server
(port 52365) and the runtime-env agent bind the node address itself. ``ray.init`` rewrites
``_node_ip_address="127.0.0.1"`` to the machine's network address unless Ray's cluster mode is
off (``ray._private.ray_constants.ENABLE_RAY_CLUSTER``, which ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``
sets when ray is imported), so the executor turns it off for the duration of its ``ray.init``.
Measured with Ray 2.60 (psutil, every LISTEN socket of the driver and its descendants during a
run, ``tests/test_ray.py``): before, GCS, raylet, the core workers and the agent's gRPC server on
``[::]``, the three metrics servers on ``0.0.0.0``, the agent's HTTP and the runtime-env agent on
the network address (the agent's HTTP on 127.0.0.1 too); after, every one on 127.0.0.1 (the gRPC
servers as ``::ffff:127.0.0.1``: IPv4 loopback on a dual-stack socket). Ray's dashboard stays
off unless ``EVOMERGE_RAY_DASHBOARD=1`` (then on 127.0.0.1:8265); the dashboard process itself
always starts, as Ray starts it, serving only its metrics. evomerge opens no port of its own.
A joined cluster (``auto``, ``ray://``) binds as it was started.

Sources are read from their files in each actor, not put in Ray's object store: safetensors
loads are memory maps, so actors on one node already share the sources' pages through the page
cache, zero-copy, as plasma would. Measured here (3 sources of 200 MB, 2 actors): the same
start-up either way, and per actor after computing task vectors 590 MB private memory either way
(PSS 905 MB from files, 810 MB from plasma, the difference being the plasma store counted as a
third sharer); derived tensors (task vectors, casts to another dtype, copies to a GPU) are
per-actor in both. Sharing bought nothing for its extra machinery.

A dead actor (``kill -9``, OOM, node loss) gives its running trial back (FAIL "interrupted",
which the driver enqueues again) and is replaced; repeated deaths end the run with an error.
"""

from __future__ import annotations

import ipaddress
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from evomerge.execution.evaluator import evaluator_for
from evomerge.execution.worker import Executor, process_one, worker_id
from evomerge.experiment import Experiment, ExperimentError
from evomerge.store import Store

POLL_S = 0.05  # how often the driver re-checks the generation while actors are busy
LOOPBACK = "127.0.0.1"
DASHBOARD_ENV = "EVOMERGE_RAY_DASHBOARD"  # "1": a local Ray serves its dashboard (on loopback)


def check_address(address: str) -> str:
    """``local``, ``auto`` or ``ray://host:port``; ExperimentError naming the field otherwise."""
    if address in ("local", "auto") or (address.startswith("ray://") and len(address) > 6):
        return address
    raise ExperimentError(f"executor.address: {address!r} is not one of local, auto, "
                          "ray://host:port")


def cpus_needed(workers: int, cpus_per_worker: float) -> int:
    """Logical CPUs a local Ray must offer so that all actors fit: ceil(N * cpus_per_worker)."""
    return max(1, math.ceil(workers * cpus_per_worker - 1e-9))


def missing_resources(available: dict[str, float], workers: int, cpus_per_worker: float,
                      gpus_per_worker: float) -> list[str]:
    """What the cluster lacks for N actors of the given size (empty when they all fit)."""
    need = {"CPU": workers * cpus_per_worker, "GPU": workers * gpus_per_worker}
    return [f"{key}: {workers} workers need {amount:g}, the cluster has "
            f"{available.get(key, 0.0):g}"
            for key, amount in need.items() if amount > available.get(key, 0.0) + 1e-9]


class _Actor:
    """One Ray worker: the sources resident once, then one queued trial per :meth:`step`."""

    def __init__(self, experiment_data: dict[str, Any], store_args: dict[str, Any],
                 device: str) -> None:
        """``device``: the experiment's ``executor.device`` for an actor Ray gave GPUs (Ray
        sets its ``CUDA_VISIBLE_DEVICES``, so ``auto`` is the actor's first GPU), else cpu."""
        experiment = Experiment.model_validate(experiment_data)
        self.store = Store(**store_args)
        self.evaluator = evaluator_for(experiment, device=device)
        self.owner = worker_id()

    def owner_id(self) -> str:
        """The id this actor claims trials under (``host:pid``)."""
        return self.owner

    def step(self) -> bool:
        """Evaluate one queued trial; False when the queue was empty."""
        return process_one(self.store, self.evaluator, self.owner)


_REMOTE_ACTOR = ray.remote(_Actor)


class RayExecutor(Executor):
    """N Ray actors serving the store's queue (see the module docstring)."""

    def __init__(self, experiment: Experiment, store_args: dict[str, Any]) -> None:
        options = experiment.executor
        check_address(options.address)
        if options.workers < 1:  # also refused by the Experiment; kept for direct callers
            raise ExperimentError(f"executor.workers: kind 'ray' needs workers >= 1, got "
                                  f"{options.workers}")
        super().__init__(experiment, store_args)
        self.options = options
        self.workers = options.workers
        self._actors: list[Any] = []
        self._owners: list[Any] = []  # per actor: ObjectRef of its owner id
        self._pending: dict[Any, int] = {}  # ObjectRef of a step() call -> actor index
        self._deaths = 0
        self._started_ray = False
        self._temp_dir: str | None = None

    # ---- the protocol ------------------------------------------------------------------------

    def run(self, store: Store, done: Callable[[], bool], tick: Callable[..., None]) -> None:
        """Return once ``done()``; ``tick(1)`` per trial an actor returns, ``tick()`` per poll."""
        self._start()
        resting: set[int] = set()  # actors that found the queue empty during this call
        last_stale = time.monotonic()
        while not done():
            if time.monotonic() - last_stale >= 1.0:  # an actor on a lost node, or killed
                store.fail_stale()                    # between claim and owner write
                last_stale = time.monotonic()
            for k in range(len(self._actors)):
                if k not in resting and k not in self._pending.values():
                    self._pending[self._actors[k].step.remote()] = k
            if self._pending:
                ready, _ = ray.wait(list(self._pending), num_returns=1, timeout=POLL_S)
                for ref in ready:
                    self._collect(ref, store, resting, tick)
            else:  # every actor rests: the generation's last trials run elsewhere
                time.sleep(POLL_S)
            tick()
        for ref in list(self._pending):  # calls that raced the generation's end find no trial
            ray.wait([ref])
            self._collect(ref, store, resting, tick)

    def close(self, store: Store) -> None:
        """Mark the study finished, kill the actors, and stop Ray if this executor started it."""
        store.set_finished(True)
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors, self._owners, self._pending = [], [], {}
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
        if self._temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    # ---- actors ------------------------------------------------------------------------------

    def _collect(self, ref: Any, store: Store, resting: set[int],
                 tick: Callable[..., None]) -> None:
        k = self._pending.pop(ref)
        try:
            evaluated = ray.get(ref)
        except (RayActorError, RayTaskError) as exc:
            self._replace(k, store, exc)
            return
        if evaluated:
            tick(1)
        else:
            resting.add(k)

    def _replace(self, k: int, store: Store, exc: Exception) -> None:
        """Actor ``k`` died (or its call raised outside a trial): give its running trial back
        and start a new actor in its place; repeated deaths end the run instead of looping."""
        if getattr(exc, "actor_init_failed", False):  # its __init__ raised: so will the next
            raise RuntimeError(f"a Ray actor failed to start (loading the models and fitness "
                               f"of the experiment):\n{exc}") from None
        try:
            owner = ray.get(self._owners[k])
        except RayActorError:  # died while loading: it never claimed a trial
            owner = None
        if owner is not None:
            store.fail_interrupted(owner=owner)
        self._deaths += 1
        if self._deaths > 3 * self.workers:
            raise RuntimeError(f"{self._deaths} Ray actors died or failed (last: {owner}): "
                               f"{str(exc).strip().splitlines()[-1] if str(exc) else exc!r}")
        ray.kill(self._actors[k], no_restart=True)
        self._actors[k], self._owners[k] = self._spawn()

    def _start(self) -> None:
        if self._actors:
            return
        self._connect()
        problems = missing_resources(ray.cluster_resources(), self.workers,
                                     self.options.cpus_per_worker, self.options.gpus_per_worker)
        if problems:
            raise ExperimentError("executor: not enough Ray resources for the actors:\n  "
                                  + "\n  ".join(problems))
        for _ in range(self.workers):
            actor, owner = self._spawn()
            self._actors.append(actor)
            self._owners.append(owner)

    def _spawn(self) -> tuple[Any, Any]:
        """A new actor (loading in the background) and the ref of its owner id."""
        gpus = self.options.gpus_per_worker
        actor = _REMOTE_ACTOR.options(
            num_cpus=self.options.cpus_per_worker, num_gpus=gpus,
            max_restarts=0, max_task_retries=0,  # a retried trial would count twice
        ).remote(self.experiment.model_dump(mode="json"), self.store_args,
                 self.experiment.executor.device if gpus > 0 else "cpu")
        return actor, actor.owner_id.remote()

    def _connect(self) -> None:
        """Join the configured cluster, or start a private local Ray for this run."""
        if ray.is_initialized():
            return
        address = self.options.address
        if address != "local":
            _quiet_env()
            ray.init(address=address, configure_logging=False)
            return
        self._temp_dir = tempfile.mkdtemp(prefix="evomerge-ray-")  # short: Ray puts sockets here
        start_local_ray(cpus_needed(self.workers, self.options.cpus_per_worker), self._temp_dir,
                        dashboard=os.environ.get(DASHBOARD_ENV, "") == "1")
        self._started_ray = True


def start_local_ray(num_cpus: int, temp_dir: str, *, dashboard: bool = False) -> None:
    """``ray.init`` of a private single-node Ray whose every listener is on 127.0.0.1 (see the
    module docstring); its dashboard only when ``dashboard``, also on 127.0.0.1."""
    import ray._private.ray_constants as constants

    _quiet_env()
    cluster_mode = getattr(constants, "ENABLE_RAY_CLUSTER", True)
    constants.ENABLE_RAY_CLUSTER = False  # else ray.init replaces 127.0.0.1 by the LAN address
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host=LOOPBACK,
                 _node_ip_address=LOOPBACK, _temp_dir=temp_dir, configure_logging=False)
    finally:
        constants.ENABLE_RAY_CLUSTER = cluster_mode
    node = ray.util.get_node_ip_address()
    if not ipaddress.ip_address(node).is_loopback:  # a Ray that decides it another way
        warnings.warn(f"the local Ray runs on {node}, not on loopback: its listeners are "
                      "reachable from the network", RuntimeWarning, stacklevel=2)


def _quiet_env() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else Ray writes ~/.ray/auth_token
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports home
