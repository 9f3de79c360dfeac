"""From-scratch searches on the reference digits setting, recorded compactly, resumable by replay.

The genome is all 19,210 weights of the reference MLP (:class:`evomerge.search.m2n2.FlatDigitsMLP`),
so these runs do not go through the merge driver (whose trials hold ``x`` as Optuna params and
whose workers build recipes): they evaluate each generation in-process with one batched forward
and record every evaluation in an Optuna study, compactly and in batches:

* the study is a journal file (``RUN_DIR/study.log``; Optuna's ``JournalStorage``): 2.4 ms per
  written trial measured here, against 20 ms for SQLite;
* one trial per ``record_every`` evaluations (default 500; a generation is never split, so a
  trial may hold up to ``popsize - 1`` more): its value is the best training
  accuracy among them, its user attribute ``scratch`` holds, per evaluation, the compact record
  (M2N2: ``[step, parent A's step, parent B's step, split, mix]``; CMA-ES: ``[step]``) and the
  packed correctness bits (``evomerge.store.encode_scores``). Weights are never stored.

Resume is replay, as for the merge driver: the search is re-created from the config and seed, the
stored records and scores are fed back in step order (M2N2 recomputes every child and checks its
record; CMA-ES asks its generations again and is told the stored values), and only the remaining
evaluations run. Evaluations made after the last written trial are evaluated again: the same
children, the same scores (the searches are deterministic).

Config (``experiments/digits_m2n2_scratch.yaml``, ``digits_cmaes_scratch.yaml``)::

    name: digits_m2n2_scratch
    setting: digits_reference   # load_digits, first 80 % train / last 20 % test, unshuffled
    strategy: {name: m2n2, archive: 20, alpha: 1.0, ...}   # or {name: cmaes, popsize: 20, ...}
                                # m2n2 init: experts = start from the reference's two experts
                                # (digits 0-4 / 5-9; use mutation_std: 0 as the reference does)
    budget: 50000               # forward passes over the training split
    seed: 42
    record_every: 500
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

SETTINGS = ("digits_reference",)
_KEYS = ("name", "setting", "strategy", "budget", "seed", "record_every", "run_dir")
_M2N2 = ("archive", "alpha", "matchmaker", "init_std", "mutation_std", "popsize", "init")
_CMAES = ("popsize", "sigma0", "init_std", "diagonal")
ATTR = "scratch"


def check_config(config: Mapping[str, Any], where: str = "config") -> dict[str, Any]:
    """The validated config (defaults filled); ValueError naming the field before any compute."""
    if not isinstance(config, Mapping):
        raise TypeError(f"{where}: expected a mapping")
    unknown = sorted(set(config) - set(_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(_KEYS)}")
    out = {"record_every": 500, "seed": 0, "setting": "digits_reference", **config}
    if out["setting"] not in SETTINGS:
        raise ValueError(f"{where}.setting: {out['setting']!r}; known: {', '.join(SETTINGS)}")
    for key in ("budget", "record_every", "seed"):
        v = out.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "seed" else 1):
            kind = "non-negative" if key == "seed" else "positive"
            raise ValueError(f"{where}.{key}: expected a {kind} integer, got {v!r}")
    strategy = out.get("strategy")
    if not isinstance(strategy, Mapping) or strategy.get("name") not in ("m2n2", "cmaes"):
        raise ValueError(f"{where}.strategy: expected {{name: m2n2 | cmaes, ...options}}, "
                         f"got {strategy!r}")
    known = _M2N2 if strategy["name"] == "m2n2" else _CMAES
    bad = sorted(set(strategy) - {"name", *known})
    if bad:
        raise ValueError(f"{where}.strategy: unknown option(s) {', '.join(bad)} for "
                         f"{strategy['name']}; known: {', '.join(known)}")
    if strategy.get("init", "random") not in ("random", "experts"):
        raise ValueError(f"{where}.strategy.init: 'random' (two N(0, init_std^2) members) or "
                         f"'experts' (the reference's two experts), got {strategy['init']!r}")
    if not isinstance(out.get("name"), str) or not out["name"]:
        raise ValueError(f"{where}.name: expected a non-empty string")
    return out


def run_scratch(config: Mapping[str, Any], *, run_dir: str | Path | None = None,
                resume: bool = False, storage: Any = None) -> dict[str, Any]:
    """Run (or with ``resume`` continue) a from-scratch search; a summary with the test accuracy
    of the member with the best training accuracy (the reference's metric), evaluations, time.

    ``storage`` overrides the journal file (an Optuna storage object or URL, e.g. in tests).
    """
    import optuna

    from evomerge.search.m2n2 import FlatDigitsMLP, reference_digits

    config = check_config(config)
    started = time.perf_counter()
    run = Path(run_dir or config.get("run_dir") or Path("runs") / config["name"]).absolute()
    run.mkdir(parents=True, exist_ok=True)
    if storage is None:
        from optuna.storages.journal import JournalFileBackend

        storage = optuna.storages.JournalStorage(JournalFileBackend(str(run / "study.log")))
    study = optuna.create_study(storage=storage, study_name=config["name"],
                                direction="maximize", load_if_exists=True)
    stored = _stored(study)
    if stored and not resume:
        raise ValueError(f"{run} already holds {len(stored)} evaluations of {config['name']}: "
                         "resume it, or remove it")
    (x_train, y_train), (x_test, y_test) = reference_digits()
    train, test = FlatDigitsMLP(x_train, y_train), FlatDigitsMLP(x_test, y_test)
    writer = _Writer(study, config["record_every"])
    options = {k: v for k, v in config["strategy"].items() if k != "name"}
    search = _m2n2 if config["strategy"]["name"] == "m2n2" else _cmaes
    with single_threaded():
        genome, train_acc = search(train, config["budget"], config["seed"], options, stored,
                                   writer.add)
    writer.flush()
    return {"name": config["name"], "strategy": config["strategy"]["name"],
            "evaluations": len(stored) + writer.count, "replayed": len(stored),
            "train_acc": train_acc, "test_acc": test.accuracy(genome),
            "trials": len(study.trials), "wall_s": time.perf_counter() - started,
            "run_dir": str(run)}


@contextmanager
def single_threaded() -> Iterator[None]:
    """One BLAS and one torch thread while the block runs (restored after). The per-child work
    is small (a 19,210-long slerp, one forward of 1,437 images): thread start-up and spinning
    cost more than they save, and on a loaded machine (load 17 on 2 cores here) multi-threaded
    BLAS made a 19k-element dot take 13 ms; single-threaded a whole evaluation took 5 ms."""
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(threads)


def _m2n2(train: Any, budget: int, seed: int, options: dict[str, Any],
          stored: list[tuple[list[float], np.ndarray]],
          on_batch: Callable[..., None]) -> tuple[np.ndarray, float]:
    from evomerge.search.m2n2 import ChildRecord, scratch_search, train_reference_experts

    replay = [(ChildRecord.from_list(r), s) for r, s in stored]
    if options.pop("init", "random") == "experts":
        options["init"] = train_reference_experts()
    niches = scratch_search(train, train.dim, budget, seed=seed, stored=replay,
                            on_batch=lambda recs, s: on_batch([r.as_list() for r in recs], s),
                            **options)
    best = niches.best()
    return niches.genomes[best], float(niches.scores[best].mean())


def _cmaes(train: Any, budget: int, seed: int, options: dict[str, Any],
           stored: list[tuple[list[float], np.ndarray]],
           on_batch: Callable[..., None]) -> tuple[np.ndarray, float]:
    """The reference's CMA-ES baseline (``x0 ~ N(0, init_std^2)``, ``sigma0`` 0.01, popsize 20,
    unbounded, maximise training accuracy), made separable (``CMA_diagonal``): a full covariance
    of 19,210^2 doubles is ~3 GB per matrix and pycma keeps several (~15 GB), too much here.
    The answer is cma's best-ever point, as in the reference."""
    import cma

    popsize, sigma0 = int(options.get("popsize", 20)), float(options.get("sigma0", 0.01))
    init_std = float(options.get("init_std", 0.01))
    rng = np.random.RandomState(seed)
    x0 = np.random.default_rng([seed, 2**31]).standard_normal(train.dim) * init_std
    es = cma.CMAEvolutionStrategy(x0, sigma0, {
        "popsize": popsize, "CMA_diagonal": bool(options.get("diagonal", True)),
        "seed": float("nan"), "randn": rng.randn, "verbose": -9, "verb_log": 0,
        "verb_disp": 0, "signals_filename": ""})
    replay: Iterator[tuple[list[float], np.ndarray]] = iter(stored)
    best_x, best_f, step = x0, -1.0, 0
    while step < budget:
        xs = np.asarray(es.ask())
        n = min(popsize, budget - step)
        scores = [s for _, s in (next(replay, (None, None)) for _ in range(n))]
        known = [s for s in scores if s is not None]
        if len(known) < n:
            new = train(xs[len(known):n])
            on_batch([[step + k] for k in range(len(known), n)], new)
            known += list(new)
        acc = [float(np.mean(np.asarray(s, dtype=np.float64))) for s in known]
        k = int(np.argmax(acc))
        if acc[k] > best_f:
            best_x, best_f = xs[k].copy(), acc[k]
        if n == popsize:
            es.tell(list(xs), [-a for a in acc])
        step += n
    return best_x, best_f


class _Writer:
    """Buffers evaluations and writes one COMPLETE trial once ``every`` of them are buffered."""

    def __init__(self, study: Any, every: int) -> None:
        self.study, self.every = study, every
        self.records: list[list[float]] = []
        self.scores: list[np.ndarray] = []
        self.count = 0

    def add(self, records: Sequence[list[float]], scores: np.ndarray) -> None:
        self.records += list(records)
        self.scores += list(scores)
        self.count += len(records)
        if len(self.records) >= self.every:
            self.flush()

    def flush(self) -> None:
        import optuna

        from evomerge.store import encode_scores

        if not self.records:
            return
        attr = {"records": self.records, "bits": [encode_scores(s) for s in self.scores]}
        best = max(float(np.mean(s)) for s in self.scores)
        self.study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE,
                                                       value=best, user_attrs={ATTR: attr}))
        self.records, self.scores = [], []


def _stored(study: Any) -> list[tuple[list[float], np.ndarray]]:
    """Every recorded evaluation, in step order (checked contiguous from 0)."""
    from evomerge.store import decode_scores

    out = []
    for t in study.get_trials(deepcopy=False):
        attr = t.user_attrs.get(ATTR)
        if attr:
            # 0/1 as uint8 (50k x 1,437 items: 72 MB, not 575 as float64), read back as
            # float64 (what a live evaluation gives: replayed means must equal live ones)
            out += [(r, decode_scores(b).astype(np.uint8))
                    for r, b in zip(attr["records"], attr["bits"])]
    out.sort(key=lambda e: e[0][0])
    steps = [int(r[0]) for r, _ in out]
    if steps != list(range(len(steps))):
        raise ValueError("stored evaluations are not the steps 0..n-1: the study was written "
                         "by something else")
    return out
