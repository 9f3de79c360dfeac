"""``optuna``: any Optuna sampler, by name, as an ask/tell strategy.

The strategy owns a private in-memory Optuna study: it is the sampler's working memory, not the
run's record (the store is a separate study the driver writes). Each coordinate is a
``FloatDistribution(lower[i], upper[i])`` named ``x0 .. x{d-1}``; ``ask(n)`` calls
``study.ask(distributions)`` n times, ``tell`` calls ``study.tell(trial, values)``. A failed
evaluation is told as the penalty values (the worst seen so far), not as a FAIL state: samplers
treat failed trials in their own ways and this keeps every sampler on one, replayable path.

Options (experiment YAML ``strategy.options``):

``sampler``          ``tpe`` (default; Optuna's default sampler), ``cmaes`` (CmaEsSampler, needs
                     the ``cmaes`` package; single objective), ``nsgaii``, ``gp`` (GPSampler,
                     needs torch and scipy), ``random``, ``qmc`` (QMCSampler, scrambled Sobol').
``sampler_options``  keyword arguments for the sampler's constructor (e.g.
                     ``{n_startup_trials: 5}`` for tpe/gp, ``{multivariate: true}`` for tpe,
                     ``{use_separable_cma: true}`` for cmaes); ``seed`` is refused (it is the
                     strategy's ``seed``). Optuna 5 deprecates CmaEsSampler's ``x0``,
                     ``sigma0`` and ``restart_strategy`` (the last already does nothing): the
                     ``cmaes`` strategy (pycma) has those.
``popsize``          candidates per ``ask()``; default 8, except ``nsgaii`` (its
                     ``population_size``, Optuna's default 50) and ``cmaes`` (its ``popsize``,
                     ``4 + floor(3 ln d)`` as in the cmaes package): asking exactly one sampler
                     generation per ``ask()`` keeps the driver's generations aligned with the
                     sampler's.

Defaults the wrapper adds: every sampler gets ``seed=seed``; ``qmc`` gets ``scramble=True``
(Optuna's default ``False`` ignores the seed and starts at the lower corner of the box). Every
other default is Optuna's; note that Optuna 5's TPE is multivariate for one objective and
independent for several, and uses the constant liar for pending trials, by default.

Determinism: all six samplers ask identical candidates for the same seed and the same tell
sequence, in one process and across fresh strategies, also when other code uses the global
``np.random``, ``random`` or ``torch`` RNGs in between (each sampler owns its
``RandomState``; checked in the tests). ``gp`` fits its Gaussian process with torch and L-BFGS-B:
bit-for-bit replay assumes the same library versions and CPU kind (1 and 2 torch threads gave
identical points in a check here, but torch/BLAS reductions are not guaranteed to round the same
on other builds or hardware). ``gp`` costs ~0.2-0.7 s per candidate on 2 CPU cores at tens of
trials (sequential L-BFGS-B without the ``greenlet`` package, which Optuna logs once).
``ask(n)`` with several pending trials is deterministic too (TPE's constant liar, NSGA-II's
generation bookkeeping and CmaEs' popsize all depend only on the trial sequence).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from evomerge.registry import Registry
from evomerge.search.base import Candidate, Direction, Result, Strategy, register

#: sampler name -> Optuna sampler class (imported on use); plugins: entry-point group
#: ``evomerge.samplers`` (a class taking ``seed=`` and its ``sampler_options``).
SAMPLERS: Registry[type] = Registry("sampler", "evomerge.samplers", {
    "tpe": "optuna.samplers:TPESampler",
    "cmaes": "optuna.samplers:CmaEsSampler",
    "nsgaii": "optuna.samplers:NSGAIISampler",
    "gp": "optuna.samplers:GPSampler",
    "random": "optuna.samplers:RandomSampler",
    "qmc": "optuna.samplers:QMCSampler",
})


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Silence Optuna's INFO lines ("Trial 3 finished ...") for the private study: the store's
    study reports the same trials. Warnings still show."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(level, optuna.logging.WARNING))
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


@register("optuna")
class OptunaStrategy(Strategy):
    """An Optuna sampler over the box; see the module docstring for options."""

    generational = False

    def __init__(self, lower: Sequence[float], upper: Sequence[float],
                 directions: Sequence[Direction], *, seed: int = 0, popsize: int | None = None,
                 sampler: str = "tpe", sampler_options: dict[str, Any] | None = None,
                 **options: Any) -> None:
        super().__init__(lower, upper, directions, seed=seed, popsize=popsize)
        self._reject_options(options, ("sampler", "sampler_options"))
        import optuna
        from optuna.distributions import FloatDistribution

        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: unknown {sampler!r}; known: {', '.join(SAMPLERS)}")
        kwargs = dict(sampler_options or {})
        if "seed" in kwargs:
            raise ValueError("sampler_options: seed is the strategy's own `seed`; remove it here")
        if sampler == "cmaes" and len(self.directions) != 1:
            raise ValueError(f"directions: Optuna's CmaEsSampler optimises one objective, got "
                             f"{self.directions}; use sampler nsgaii, tpe or gp")

        # Align the strategy's generation with the sampler's own population, where it has one.
        if sampler == "nsgaii":
            size = kwargs.get("population_size", popsize or 50)
            if popsize is not None and size != popsize:
                raise ValueError(f"popsize {popsize} and sampler_options.population_size {size} "
                                 "differ; give one of them")
            kwargs["population_size"] = self.popsize = int(size)
        elif sampler == "cmaes":
            size = kwargs.get("popsize") or popsize or 4 + math.floor(3 * math.log(self.dim))
            if popsize is not None and size != popsize:
                raise ValueError(f"popsize {popsize} and sampler_options.popsize {size} differ; "
                                 "give one of them")
            kwargs["popsize"] = self.popsize = int(size)
        elif sampler == "qmc":
            kwargs.setdefault("scramble", True)
        self.sampler_name = sampler

        cls = SAMPLERS[sampler]
        with warnings.catch_warnings():
            # The user chose the sampler by name; "experimental" is not news to them.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                self._sampler = cls(seed=self.seed, **kwargs)
            except TypeError as e:
                raise ValueError(f"sampler_options for {sampler} ({cls.__name__}): {e}") \
                    from None
        with _quiet_optuna():
            self._study = optuna.create_study(
                storage=optuna.storages.InMemoryStorage(), sampler=self._sampler,
                directions=self.directions, study_name="evomerge-strategy")
        self._distributions = {f"x{i}": FloatDistribution(float(lo), float(hi))
                               for i, (lo, hi) in enumerate(zip(self.lower, self.upper))}
        self._trials: list[Any] = []  # every Trial asked, in order: index = meta["serial"]

    def _ask(self, n: int) -> list[np.ndarray]:
        out = []
        with _quiet_optuna():
            for _ in range(n):
                trial = self._study.ask(self._distributions)
                self._trials.append(trial)
                x = np.array([trial.params[name] for name in self._distributions], dtype=float)
                out.append(np.clip(x, self.lower, self.upper))
        return out

    def _tell(self, candidates: list[Candidate], results: list[Result]) -> None:
        """Tell any asked candidates (a whole ``ask`` batch or part of it), in any grouping."""
        with _quiet_optuna():
            for c, r in zip(candidates, results):
                self._study.tell(self._trials[c.meta["serial"]], r.values)
