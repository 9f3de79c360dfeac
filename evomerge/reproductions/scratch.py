"""From-scratch searches on the reference digits setting, recorded compactly, resumable by replay.

A reproduction of the paper's from-scratch experiment, not a merge: it has its own config
(``setting:``), run-directory layout (one journal study per seed) and in-process loop, so it lives
beside the merge driver rather than in :mod:`evomerge.execution`.

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
    seeds: [42, 43, 44]         # or seed: 42 (one run); not both
    record_every: 500

``evomerge run CONFIG`` (:func:`run_seeds`) runs each seed in a fresh spawned process
(:func:`run_one`, so each peak RSS is the seed's own) in ``RUN_DIR/seed_<s>/`` and writes
``RUN_DIR/summary.json``: per seed the held-out accuracy, wall time and peak memory, and the
held-out accuracy's mean and sample standard deviation over the seeds. ``evomerge resume RUN_DIR``
skips the seeds that finished (their ``seed_<s>/summary.json``) and replays the others.
"""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
import queue as queue_module
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import yaml

SETTINGS = ("digits_reference",)
_KEYS = ("name", "setting", "strategy", "budget", "seed", "seeds", "record_every", "run_dir")
_M2N2 = ("archive", "alpha", "matchmaker", "init_std", "mutation_std", "popsize", "init")
_CMAES = ("popsize", "sigma0", "init_std", "diagonal")
ATTR = "scratch"
METRIC = ("test accuracy (last 20 % of load_digits, unshuffled) of the member with the best "
          "training accuracy")
PER_SEED = ("seed", "test_acc", "train_acc", "evaluations", "replayed", "wall_s", "peak_rss_mb")
SEPARABLE_NOTE = ("separable CMA-ES: pycma's CMA_diagonal option (a diagonal covariance); the "
                  "reference's full 19,210 x 19,210 covariance needs ~15 GB")


#: A from-scratch run directory: one subdirectory per seed, each with its journal study.
SEED_DIR, JOURNAL = "seed_{seed}", "study.log"


def journal(path: Path) -> Any:
    """The Optuna journal-file storage at ``path``."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def seed_journals(run_dir: Path) -> dict[int, Path]:
    """Each seed's journal in a from-scratch run directory (the seeds started so far)."""
    prefix = SEED_DIR.format(seed="")
    return {int(p.parent.name.removeprefix(prefix)): p
            for p in sorted(Path(run_dir).glob(f"{prefix}*/{JOURNAL}"))}


def scratch_storage(run_dir: Path, seed: int | None) -> tuple[Any, str]:
    """A from-scratch run's journal study for ``seed`` (None: the first seed) and its path.

    Raises FileNotFoundError before the run has written a journal, ValueError for a seed the run
    does not have.
    """
    logs = seed_journals(run_dir)
    if not logs:
        raise FileNotFoundError(f"{run_dir}: no seed_<s>/study.log yet (has the run started?)")
    if seed is not None and seed not in logs:
        raise ValueError(f"seed {seed}: {run_dir} has seeds {', '.join(map(str, logs))}")
    log = logs[seed if seed is not None else min(logs)]
    return journal(log), str(log)


def check_config(config: Mapping[str, Any], where: str = "config") -> dict[str, Any]:
    """The validated config (defaults filled); ValueError naming the field before any compute."""
    if not isinstance(config, Mapping):
        raise TypeError(f"{where}: expected a mapping")
    unknown = sorted(set(config) - set(_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(_KEYS)}")
    out = {"record_every": 500, "setting": "digits_reference", **config}
    if out["setting"] not in SETTINGS:
        raise ValueError(f"{where}: setting: {out['setting']!r}; known: {', '.join(SETTINGS)}")
    for key in ("budget", "record_every"):
        v = out.get(key)
        if not _is_int(v) or v < 1:
            raise ValueError(f"{where}: {key}: expected a positive integer, got {v!r}")
    out["seeds"] = _check_seeds(out, where)
    out.pop("seed", None)
    strategy = out.get("strategy")
    if not isinstance(strategy, Mapping) or strategy.get("name") not in ("m2n2", "cmaes"):
        raise ValueError(f"{where}: strategy: expected {{name: m2n2 | cmaes, ...options}}, "
                         f"got {strategy!r}")
    known = _M2N2 if strategy["name"] == "m2n2" else _CMAES
    bad = sorted(set(strategy) - {"name", *known})
    if bad:
        raise ValueError(f"{where}: strategy: unknown option(s) {', '.join(bad)} for "
                         f"{strategy['name']}; known: {', '.join(known)}")
    if strategy.get("init", "random") not in ("random", "experts"):
        raise ValueError(f"{where}: strategy.init: 'random' (two N(0, init_std^2) members) or "
                         f"'experts' (the reference's two experts), got {strategy['init']!r}")
    if not isinstance(out.get("name"), str) or not out["name"]:
        raise ValueError(f"{where}: name: expected a non-empty string")
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_seeds(config: Mapping[str, Any], where: str) -> list[int]:
    """``seeds`` (distinct non-negative integers), or ``[seed]``; 0 when neither is given."""
    if "seed" in config and "seeds" in config:
        raise ValueError(f"{where}: give seed (one run) or seeds (a list of runs), not both")
    if "seeds" not in config:
        seed = config.get("seed", 0)
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"{where}: seed: expected a non-negative integer, got {seed!r}")
        return [seed]
    seeds = config["seeds"]
    if (not isinstance(seeds, list) or not seeds
            or not all(_is_int(s) and s >= 0 for s in seeds) or len(set(seeds)) < len(seeds)):
        raise ValueError(f"{where}: seeds: expected a non-empty list of distinct non-negative "
                         f"integers, got {seeds!r}")
    return list(seeds)


def run_scratch(config: Mapping[str, Any], *, run_dir: str | Path | None = None,
                resume: bool = False, storage: Any = None,
                progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run (or with ``resume`` continue) one seed of a from-scratch search in this process; a
    summary with the test accuracy of the member with the best training accuracy (the
    reference's metric), evaluations, time. :func:`run_seeds` runs a config's every seed.

    ``storage`` overrides the journal file (an Optuna storage object or URL, e.g. in tests);
    ``progress(evaluations, budget)`` is called after every evaluated batch.
    """
    import optuna

    from evomerge.search.m2n2 import FlatDigitsMLP, reference_digits

    config = check_config(config)
    if len(config["seeds"]) != 1:
        raise ValueError(f"run_scratch runs one seed, got seeds {config['seeds']}: run_seeds "
                         "runs each")
    seed = config["seeds"][0]
    started = time.perf_counter()
    run = Path(run_dir or config.get("run_dir") or Path("runs") / config["name"]).absolute()
    run.mkdir(parents=True, exist_ok=True)
    if storage is None:
        storage = journal(run / JOURNAL)
    study = optuna.create_study(storage=storage, study_name=config["name"],
                                direction="maximize", load_if_exists=True)
    study.set_metric_names(["train_acc"])  # the dashboard names the objective
    stored = _stored(study)
    if stored and not resume:
        raise ValueError(f"{run} already holds {len(stored)} evaluations of {config['name']}: "
                         "resume it, or remove it")
    (x_train, y_train), (x_test, y_test) = reference_digits()
    train, test = FlatDigitsMLP(x_train, y_train), FlatDigitsMLP(x_test, y_test)
    writer = _Writer(study, config["record_every"])
    options = {k: v for k, v in config["strategy"].items() if k != "name"}
    search = _m2n2 if config["strategy"]["name"] == "m2n2" else _cmaes

    def on_batch(records: Sequence[list[float]], scores: np.ndarray) -> None:
        writer.add(records, scores)
        if progress is not None:
            progress(len(stored) + writer.count, config["budget"])

    with single_threaded():
        genome, train_acc = search(train, config["budget"], seed, options, stored, on_batch)
    writer.flush()
    return {"name": config["name"], "seed": seed, "strategy": config["strategy"]["name"],
            "evaluations": len(stored) + writer.count, "replayed": len(stored),
            "train_acc": train_acc, "test_acc": test.accuracy(genome),
            "trials": len(study.trials), "wall_s": time.perf_counter() - started,
            "run_dir": str(run)}


def scratch_config(path: str | Path) -> dict[str, Any] | None:
    """The YAML's mapping if it is a from-scratch config (it has a ``setting:`` key), else None:
    ``evomerge run`` and ``resume`` send those here and every other file to the merge driver
    (which reports a missing or malformed file itself)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) and "setting" in data else None


def run_seeds(config: Mapping[str, Any], *, run_dir: str | Path | None = None,
              resume: bool = False, progress: Callable[[int, int, int], None] | None = None,
              where: str = "config") -> dict[str, Any]:
    """Run (or with ``resume`` continue) every seed of a from-scratch config, each in a fresh
    process in ``RUN_DIR/seed_<s>/``; write and return ``RUN_DIR/summary.json``'s content.

    The config is checked before anything is created. ``RUN_DIR/experiment.yaml`` holds the
    resolved config (what ``evomerge resume`` reads); a finished seed leaves its
    ``seed_<s>/summary.json`` and a resume skips it, an unfinished one is replayed from its
    study. ``progress(seed, evaluations, budget)`` is called as each seed advances; ``where``
    (the file) prefixes configuration errors.
    """
    from evomerge.report import write_atomic

    config = check_config(config, where)
    run = Path(run_dir or config.get("run_dir") or Path("runs") / config["name"]).absolute()
    if not resume and ((run / "experiment.yaml").exists() or any(run.glob(SEED_DIR.format(seed="*")))):
        raise ValueError(f"{run} already holds a run: continue it with `evomerge resume {run}`, "
                         "or remove it")
    run.mkdir(parents=True, exist_ok=True)
    config = {**config, "run_dir": str(run)}
    write_atomic(run / "experiment.yaml", yaml.safe_dump(config, sort_keys=False))
    runs = []
    for seed in config["seeds"]:
        seed_dir = run / SEED_DIR.format(seed=seed)
        done = _finished(seed_dir / "summary.json", config["budget"])
        if done is None:
            tick = None if progress is None else functools.partial(progress, seed)
            if tick is not None:
                tick(0, config["budget"])  # started (its process takes seconds to come up)
            done = run_one(config, seed, run_dir=seed_dir, resume=resume, progress=tick)
            write_atomic(seed_dir / "summary.json", json.dumps(done, indent=2) + "\n")
        elif progress is not None:
            progress(seed, done["evaluations"], config["budget"])
        runs.append(done)
    summary = summarize(config, runs)
    write_atomic(run / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _finished(path: Path, budget: int) -> dict[str, Any] | None:
    """A seed's summary if that seed ran its whole budget, else None."""
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("evaluations") == budget else None


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1 in the denominator; None for one value, where
    it is undefined)."""
    return (statistics.fmean(values),
            statistics.stdev(values) if len(values) > 1 else None)


def summarize(config: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``summary.json``: the per-seed rows and the held-out accuracy's mean and std over seeds.
    A row's ``wall_s`` and ``peak_rss_mb`` are those of the process that finished the seed
    (after ``replayed`` evaluations read back from its study, when it was resumed)."""
    mean, std = mean_std([r["test_acc"] for r in runs])
    strategy = config["strategy"]
    out = {"name": config["name"], "setting": config["setting"], "strategy": strategy["name"],
           "strategy_options": {k: v for k, v in strategy.items() if k != "name"},
           "budget": config["budget"], "seeds": [r["seed"] for r in runs], "metric": METRIC,
           "test_acc_mean": mean, "test_acc_std": std,
           "per_seed": [{k: r[k] for k in PER_SEED} for r in runs], "run_dir": config["run_dir"]}
    if strategy["name"] == "cmaes":
        out["note"] = (SEPARABLE_NOTE if strategy.get("diagonal", True)
                       else "full-covariance CMA-ES (pycma)")
    return out


def run_one(config: Mapping[str, Any], seed: int, *, run_dir: str | Path | None = None,
            resume: bool = False,
            progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """One seed of ``config`` in a fresh spawned process, so that its peak RSS is its own (not
    this process's, nor an earlier seed's): its :func:`run_scratch` summary plus
    ``peak_rss_mb``. Without ``run_dir`` the run lives in a temporary directory (benchmarks).
    ``progress(evaluations, budget)`` is called here as the child reports (at most every 0.2 s).
    """
    one = {k: v for k, v in config.items() if k != "seed"} | {"seeds": [seed]}
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    proc = ctx.Process(target=_child, args=(one, None if run_dir is None else str(run_dir),
                                            resume, messages))
    proc.start()
    try:
        summary = _await(proc, messages, progress)
    except BaseException:
        proc.terminate()
        proc.join()
        raise
    proc.join()
    return summary


def _await(proc: Any, messages: Any,
           progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    """The child's summary; its progress passed on; its error raised here."""
    while True:
        try:
            kind, payload = messages.get(timeout=0.5)
        except queue_module.Empty:
            if proc.is_alive():
                continue
            try:  # it may have answered just before it ended
                kind, payload = messages.get(timeout=1.0)
            except queue_module.Empty:
                raise RuntimeError(f"the run's process ended (exit code {proc.exitcode}: a "
                                   "negative code is the signal that killed it, e.g. -9 when "
                                   "out of memory) before its summary") from None
        if kind == "summary":
            return payload
        if kind == "error":
            error, message = payload
            raise (ValueError if error == "ValueError" else RuntimeError)(message)
        if progress is not None:
            progress(*payload)


def _child(config: dict[str, Any], run_dir: str | None, resume: bool, messages: Any) -> None:
    """The spawned process of :func:`run_one`: run, then send the summary (or the error)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created" per seed
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.2 or done == total:
            last[0] = now
            messages.put(("progress", (done, total)))

    try:
        if run_dir is None:
            with tempfile.TemporaryDirectory(prefix="evomerge-scratch-") as tmp:
                summary = run_scratch(config, run_dir=tmp, resume=resume, progress=report)
            summary.pop("run_dir")
        else:
            summary = run_scratch(config, run_dir=run_dir, resume=resume, progress=report)
    except ValueError as exc:
        messages.put(("error", ("ValueError", str(exc))))
        return
    except Exception as exc:
        messages.put(("error", ("RuntimeError", f"{type(exc).__name__}: {exc}")))
        raise  # its traceback on stderr
    summary["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    messages.put(("summary", summary))



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
