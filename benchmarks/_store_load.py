"""Many worker processes through one store: the load behind the store stress test and benchmark.

``run_load(url, workers=16, trials=400)`` enqueues ``trials`` candidates, starts ``workers``
spawned processes that each open their own :class:`~evomerge.store.Store` and pop / finish
trials with a trivial, deterministic evaluation (:func:`fake_result`), and reports trials per
second from the moment all workers are ready (process start and imports excluded) to the last
finish. Each worker writes what it evaluated to its own file, one JSON line per trial, so a
caller can check the store against what the workers did: nothing lost, nothing evaluated twice,
nothing corrupted (see tests/test_stores.py).

Worker modes for the fault tests: ``"hang"`` claims one trial and beats while it sleeps forever
(a worker to SIGKILL while it holds a trial); ``"hang_silent"`` claims one and never beats (a
worker that died right after its claim).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.store import Slot, Store

N_ITEMS = 20  # per-item scores each fake evaluation writes


def fake_result(x: np.ndarray) -> tuple[list[float], np.ndarray, np.ndarray]:
    """The no-op evaluation: two objectives, a 0/1 item vector and a float one, all from ``x``
    alone, so anyone can recompute what a trial must hold."""
    x = np.asarray(x, dtype=float)
    values = [float(x.sum()), float(x[0] - x[-1])]
    phase = np.arange(N_ITEMS) * 0.37 + 10 * x.sum()
    bits = (np.sin(phase) > 0).astype(np.float32)
    floats = np.round((np.cos(phase) + 1) / 2, 4).astype(np.float32)
    return values, bits, floats


def store_args(url: str, study: str, dim: int, *, heartbeat_s: float | None = None,
               grace_s: float | None = None) -> dict[str, Any]:
    return {"url": url, "study_name": study, "directions": ["maximize", "minimize"],
            "lower": [0.0] * dim, "upper": [1.0] * dim, "objective_names": ["sum", "spread"],
            "heartbeat_s": heartbeat_s, "grace_s": grace_s}


def enqueue(store: Store, trials: int, dim: int, seed: int = 0) -> list[int]:
    """``trials`` random candidates, slots (0, 0..trials-1); their trial ids."""
    rng = np.random.default_rng(seed)
    return [store.enqueue(rng.random(dim), Slot(0, i)) for i in range(trials)]


def worker_main(args: dict[str, Any], record: str, ready: Any, go: Any,
                mode: str = "serve") -> None:
    """One worker process: open the store, wait for ``go``, serve until the queue is empty."""
    store = Store(**args)
    owner = f"load:{os.getpid()}"
    ready.set()
    go.wait()
    with open(record, "a") as out:
        while (claim := store.pop(owner)) is not None:
            x = np.array([claim.trial.params[f"x{i}"] for i in range(len(args["lower"]))])
            out.write(json.dumps({"trial_id": claim.trial._trial_id, "number": claim.number,
                                  "index": claim.meta["index"],
                                  "x": x.tolist(), "pid": os.getpid()}) + "\n")
            out.flush()
            if mode == "hang_silent":
                time.sleep(3600)
            with store.beating(claim):
                if mode == "hang":
                    time.sleep(3600)
                values, bits, floats = fake_result(x)
                store.finish(claim, values, timings={"eval_s": 0.0},
                             item_scores={"bits": bits, "floats": floats})


def start_workers(args: dict[str, Any], record_dir: Path, workers: int, mode: str = "serve"
                  ) -> tuple[list[mp.Process], Any]:
    """``workers`` spawned processes, each ready (store open) and waiting; and their go event."""
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    procs, readies = [], []
    for k in range(workers):
        ready = ctx.Event()
        proc = ctx.Process(target=worker_main, daemon=True,
                           args=(args, str(record_dir / f"worker{k}.jsonl"), ready, go, mode))
        proc.start()
        procs.append(proc)
        readies.append(ready)
    for ready, proc in zip(readies, procs):
        while not ready.wait(0.5):
            if not proc.is_alive():
                raise RuntimeError(f"worker {proc.pid} died before it was ready "
                                   f"(exit code {proc.exitcode})")
    return procs, go


def read_records(record_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """What each worker says it evaluated: {file name: [records]}."""
    return {p.name: [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted(record_dir.glob("worker*.jsonl"))}


def run_load(url: str, study: str, record_dir: Path, *, workers: int = 16, trials: int = 400,
             dim: int = 8, timeout_s: float = 600.0) -> dict[str, Any]:
    """Enqueue ``trials``, let ``workers`` processes drain them; the throughput.

    Returns ``{"backend", "workers", "trials", "dim", "wall_s", "trials_per_s"}``; the workers'
    records are in ``record_dir`` (:func:`read_records`). Raises if a worker fails or the queue
    is not drained within ``timeout_s``.
    """
    record_dir.mkdir(parents=True, exist_ok=True)
    args = store_args(url, study, dim)
    enqueue(Store(**args), trials, dim)
    procs, go = start_workers(args, record_dir, workers)
    started = time.perf_counter()
    go.set()
    for proc in procs:
        proc.join(timeout=max(1.0, timeout_s - (time.perf_counter() - started)))
    wall = time.perf_counter() - started
    stuck = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    if stuck or any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"store load on {url}: workers stuck {stuck}, exit codes "
                           f"{[p.exitcode for p in procs]}")
    return {"backend": url.split(":", 1)[0], "workers": workers, "trials": trials, "dim": dim,
            "wall_s": round(wall, 3), "trials_per_s": round(trials / wall, 2)}



def main(argv: list[str] | None = None) -> None:
    """``python benchmarks/_store_load.py [--workers 16] [--trials 400] [--dim 8] URL...``:
    one JSON line per URL (a fresh study each; records under a temporary directory)."""
    import argparse
    import tempfile
    import uuid

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("urls", nargs="+", help="sqlite:///… journal:///… postgresql://…")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--trials", type=int, default=400)
    parser.add_argument("--dim", type=int, default=8)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for url in args.urls:
            study = f"load-{uuid.uuid4().hex[:8]}"
            result = run_load(url, study, Path(tmp) / study, workers=args.workers,
                              trials=args.trials, dim=args.dim)
            print(json.dumps({**result, "load_avg_1m": os.getloadavg()[0]}), flush=True)


if __name__ == "__main__":
    main()
