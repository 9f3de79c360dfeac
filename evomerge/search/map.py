"""``map``: MAP, Bayesian MAP and Nested MAP (Li et al., "Low-compute Model Merging with
Amortized Pareto Fronts via Quadratic Approximation").

For a task-arithmetic space with one coefficient per task vector (``theta = theta_base +
sum_n c_n tau_n``; e.g. ``params: [{name: weight, per: source, bounds: [0, 1.5]}]``) MAP spends
few real evaluations to learn the whole trade-off front between the task metrics:

1. **design**: ``design`` points (Latin hypercube, seeded), evaluated for real.
2. **fit**: one quadratic surrogate per objective, ``act(c^T A c + b^T c + e)`` (see
   ``_surrogate.py``), by nonlinear least squares; its leave-one-out error (MAE, R^2) on the
   evaluated points is reported by :meth:`MAPStrategy.surrogate_report`.
3. **front**: NSGA-II (NSGA-III above 3 objectives) on the surrogates (population 100 and
   SBX/PM eta 20 as MAP's reference code; 150 generations, its ``find_pareto_front`` default,
   though its callers pass 25) gives the amortised (predicted) front;
   ``front_points`` points spread along it are evaluated for real, so the run's Pareto set holds
   real values. The error of the surrogate at those points (predicted before they were
   evaluated: truly held out) is reported too.
4. **refine**: the driver stops at its budget, not the strategy, so after the first front round
   MAP goes on: refit on every real evaluation, search the surrogates again, and ask
   ``front_points`` more points, spread away from the ones already asked (farthest-point
   sampling in predicted objective space). Each round's error at its new points is measured
   before they enter the fit.

Options (experiment YAML ``strategy`` entries):

``popsize``          the largest generation handed to the driver; default 16. Every phase's batch
                     is asked in generations of at most this many.
``design``           initial design size; default ``2T + 4`` with ``T = (d+1)(d+2)/2`` surrogate
                     parameters (16 at d = 2): MAP needs more points than parameters. A design
                     whose failures leave too few points to fit is drawn again.
``sampling``         ``lhs`` (default) or ``random`` (uniform) for design points.
``link``             ``auto`` (default: sigmoid for values in [0, 1], softplus for other
                     non-negative values, identity otherwise, decided per objective from the
                     data), ``sigmoid``, ``softplus``, ``identity``, or a list: one per objective.
``front_points``     real evaluations per front round; default ``popsize``.
``front_pop``, ``front_generations``  the surrogate NSGA-II's population (100) and generations
                     (150).
``bayesian``         Bayesian MAP: ``true`` or ``{rounds: 3, per_round: popsize, temperature:
                     0.07, bins: B}``. After the design, each round maps the evaluated points to
                     hyperspherical angles, bins each angle over [0, pi/2] (``bins`` per angle;
                     default the reference code's ``get_sample_n_bins(d)``: 4 below d = 4, else
                     2, so 4 cells at d = 2, 16 at d = 3, 8 at d = 4), scores each cell by the
                     squared in-sample residuals of its points (summed over objectives; mean +
                     std/2), samples ``per_round`` cells by softmax(score / max score /
                     temperature) and in each a point (angles uniform in the cell, radius
                     uniform along the ray inside the box), evaluates them and refits. Needs
                     ``lower >= 0`` (the angles live in the non-negative orthant).
                     Ours where the reference code differs: scores are divided by their maximum
                     before the softmax (raw squared residuals of accuracies are ~1e-3, which
                     temperature 0.07 would turn into uniform sampling); an empty cell scores
                     as the best one (the reference gives it -inf: never sampled); the std is
                     that of the cell's residuals (the reference's is the std of 30 means over
                     shrinking random subsets); the radius is uniform inside the box (the
                     reference's: uniform in [0.2, 0.8]); one surrogate per objective fitted to
                     all points (the newer reference fits each task on its own samples).
``nested``           Nested MAP for many tasks, as the reference code runs it (Li et al.'s
                     ``run_MAP_nested``): ``true`` or ``{preference: [p_1..p_N], design: 20,
                     isotropic: 0.2, generations: 25}``. Needs one objective per coefficient
                     (objective n measures task n; all in one direction) and ``lower <= 0 <
                     upper``. Steps:

                     1. Each expert alone (``c = e_n``, capped at ``upper``) is evaluated, and
                        its score on its own task starts the pool (the reference reads these
                        accuracies from a table instead: N evaluations it does not count).
                     2. The two pool entries whose scores differ least merge (ties: the first
                        pair in index order); they leave the pool. The merged model of groups A
                        and B is ``a v_A + b v_B`` (``v_G``: a group's coefficient vector, other
                        tasks off).
                     3. Design: the reference's sampler over ``(a, b)`` in ``[0, 1]^2``
                        (:func:`reference_design` with ``design`` points asked, ``isotropic``
                        of them isotropic: 19 points at 20 = 2 one-hot + 2 isotropic + 15 grid),
                        drawn once and reused for every pair as the reference does (always in
                        bounds: a group's vector is, and so is any ``s v_G`` with s in [0, 1]).
                     4. Two surrogates, one per group, of the group's metric: the
                        preference-weighted mean of its tasks' scores, on the pair's own tasks
                        only. Front search on them: NSGA-II, population ``front_pop`` (100),
                        ``generations`` (25), over each group's coefficient range within the
                        reference's [-3, 3] and the bounds.
                     5. The pick: the predicted front point with the best preference-weighted
                        sum of the two groups' predicted metrics (weights: each group's summed
                        preference) -- not a real evaluation. It is evaluated once; its
                        preference-weighted mean over the pair's tasks is the merged group's
                        score, and the merged group goes back into the pool (it can be paired
                        again). Repeat from 2 until one group is left.

                     So a pair costs ``19 + 1`` evaluations and the tree ``N + 20 (N - 1)``;
                     every evaluation is scored on all tasks by the fitness (it cannot be told
                     to score fewer), but only the pair's tasks enter its surrogates, pick and
                     score. ``surrogate_report()["nested"]`` counts both: ``evaluations`` and
                     ``task_evaluations`` (one per evaluation and task of its pair, the experts
                     one each: the paper's cost measure). Assumed where the reference differs
                     or is silent: its fit reads the saved per-task results and so fits the
                     first two tasks' raw scores of a pair (the weighted group metrics, which it
                     computes and plots, are taken here); it searches [-3, 3] (here the part of
                     that inside the bounds); DEAP's NSGA-III with a hall of fame there, pymoo's
                     NSGA-II's final population here; a pair whose failures leave too few points
                     to fit takes its best real design point by preference (the reference drops
                     the pair). After the tree (the reference stops there) the remaining budget
                     runs flat MAP over all coordinates with every evaluation so far in its fit
                     (its design is drawn only if those cannot fit a quadratic in all
                     coordinates: with 3 or more tasks they cannot, as a pair's points vary
                     only along its two group vectors).
                     A variant that paired groups by index a whole stage at a time and chose
                     each pair's result by real evaluations measured worse
                     (``benchmarks/map_front.py``) and was removed.

Determinism: every random number comes from the strategy's own ``numpy.random.default_rng(
seed)`` (design, Bayesian sampling, and the seed of each surrogate NSGA-II run, which pymoo
draws from its own generator); fits are deterministic least squares. So the same seed and the
same told values ask the same points, which is what resume-by-replay needs. Failed
evaluations get the usual penalty (for the run's bookkeeping) but are left out of every fit.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from evomerge.search._surrogate import (
    LINKS,
    QuadraticFit,
    auto_link,
    cell_of,
    cell_probabilities,
    cell_scores,
    closest_pair,
    errors,
    fit_quadratic,
    fittable,
    loo_predictions,
    n_terms,
    preference_pick,
    reference_bins,
    reference_design,
    sample_in_cells,
    spread_pick,
    surrogate_front,
    to_angles,
)
from evomerge.search.base import Candidate, Direction, Result, Strategy, register

Batch = list[tuple[np.ndarray, dict[str, Any]]]
_REFERENCE_RANGE = 3.0  # the reference's surrogate NSGA searches coefficients in [-3, 3]


@dataclass(frozen=True)
class _Group:
    """Nested MAP: tasks merged so far, their coefficient vector in the full space, and the
    group's score (preference-weighted mean over its tasks) that decides the pair order."""

    tasks: tuple[int, ...]
    v: np.ndarray
    score: float


def _positive_int(key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{key}: an integer >= {minimum}, got {value!r}")
    return int(value)


def _sub_options(key: str, value: Any, defaults: dict[str, Any]) -> dict[str, Any] | None:
    """``false``/``None`` -> off, ``true`` -> defaults, a mapping -> defaults updated by it."""
    if value is None or value is False:
        return None
    if value is True:
        return dict(defaults)
    if not isinstance(value, dict):
        raise ValueError(  # noqa: TRY004 - option errors are ValueErrors, as in every strategy
            f"{key}: true, false or a mapping of {', '.join(defaults)}; got {value!r}")
    unknown = sorted(set(value) - set(defaults))
    if unknown:
        raise ValueError(f"{key}: unknown {', '.join(unknown)}; known: {', '.join(defaults)}")
    return {**defaults, **value}


@register("map")
class MAPStrategy(Strategy):
    """MAP / Bayesian MAP / Nested MAP; see the module docstring for phases and options."""

    default_popsize = 16

    def __init__(self, lower: Sequence[float], upper: Sequence[float],
                 directions: Sequence[Direction], *, seed: int = 0, popsize: int | None = None,
                 design: int | None = None, sampling: str = "lhs", link: str | list = "auto",
                 front_points: int | None = None, front_pop: int = 100,
                 front_generations: int = 150, bayesian: bool | dict | None = None,
                 nested: bool | dict | None = None, **options: Any) -> None:
        super().__init__(lower, upper, directions, seed=seed, popsize=popsize)
        self._reject_options(options, ("design", "sampling", "link", "front_points",
                                       "front_pop", "front_generations", "bayesian", "nested"))
        d, n_obj = self.dim, len(self.directions)
        t = n_terms(d)
        self._design = _positive_int("design", 2 * t + 4 if design is None else design)
        if self._design <= t:
            raise ValueError(f"design: {self._design} points cannot fit a quadratic in {d} "
                             f"variables ({t} parameters); give more than {t}")
        if sampling not in ("lhs", "random"):
            raise ValueError(f"sampling: {sampling!r} is not one of lhs, random")
        self._sampling = sampling
        links = [link] * n_obj if isinstance(link, str) else list(link)
        if len(links) != n_obj or any(k not in ("auto", *LINKS) for k in links):
            raise ValueError(f"link: one of auto, {', '.join(LINKS)} or a list of {n_obj} of "
                             f"them (one per objective); got {link!r}")
        self._links = links
        self._front_points = _positive_int(
            "front_points", self.popsize if front_points is None else front_points)
        self._front_pop = _positive_int("front_pop", front_pop, 4)
        self._front_generations = _positive_int("front_generations", front_generations)
        self._bayes = self._check_bayesian(bayesian)
        self._nested = self._check_nested(nested)

        self._sign = np.array([-1.0 if o == "maximize" else 1.0 for o in self.directions])
        self._rng = np.random.default_rng(self.seed)
        self._X: list[np.ndarray] = []  # every told point, in order
        self._F: list[list[float]] = []  # its values (penalty for failures)
        self._ok: list[bool] = []  # whether it was a real (finite) result
        self._fits: list[QuadraticFit] = []
        self._front_asked: list[np.ndarray] = []  # flat front points asked so far
        self._front_pairs: list[tuple[list[float], list[float]]] = []  # (predicted, real)
        self._report: dict[str, Any] = {"phase": "design", "surrogates": [], "bayesian": [],
                                        "nested": None}
        self._program = self._run()
        self._batch: Batch = []
        self._pos = 0

    # ---- options -------------------------------------------------------------------------

    def _check_bayesian(self, value: Any) -> dict[str, Any] | None:
        d = self.dim
        opts = _sub_options("bayesian", value, {
            "rounds": 3, "per_round": self.popsize, "temperature": 0.07,
            "bins": reference_bins(d)})
        if opts is None:
            return None
        _positive_int("bayesian.rounds", opts["rounds"], 0)
        _positive_int("bayesian.per_round", opts["per_round"])
        _positive_int("bayesian.bins", opts["bins"])
        if not (isinstance(opts["temperature"], (int, float)) and opts["temperature"] > 0):
            raise ValueError(f"bayesian.temperature: a positive number, got "
                             f"{opts['temperature']!r}")
        if d < 2:
            raise ValueError("bayesian: needs at least 2 coefficients (it bins angles)")
        if np.any(self.lower < 0):
            raise ValueError(f"bayesian: needs lower bounds >= 0 (angles of non-negative "
                             f"coefficients); got lower {self.lower.tolist()}")
        return opts

    def _check_nested(self, value: Any) -> dict[str, Any] | None:
        d, n_obj = self.dim, len(self.directions)
        opts = _sub_options("nested", value, {"preference": None, "design": 20,
                                              "isotropic": 0.2, "generations": 25})
        if opts is None:
            return None
        problems = []
        if d < 2 or n_obj != d:
            problems.append(f"nested: needs one objective per coefficient (objective n scores "
                            f"task n) and at least 2; got {d} coefficients, {n_obj} objectives")
        if len(set(self.directions)) != 1:
            problems.append(f"nested: objectives must share one direction (group metrics are "
                            f"means); got {self.directions}")
        if np.any(self.lower > 0) or np.any(self.upper <= 0):
            problems.append("nested: needs lower <= 0 < upper per coefficient (tasks outside a "
                            "pair are switched off with coefficient 0)")
        pref = np.ones(d) if opts["preference"] is None else np.asarray(opts["preference"],
                                                                        dtype=float)
        if pref.shape != (d,) or np.any(pref < 0) or not np.any(pref > 0):
            problems.append(f"nested.preference: {d} non-negative numbers, not all 0; got "
                            f"{opts['preference']!r}")
        design, iso = opts["design"], opts["isotropic"]
        for key in ("design", "generations"):
            if isinstance(opts[key], bool) or not isinstance(opts[key], (int, np.integer)) \
                    or opts[key] < 1:
                problems.append(f"nested.{key}: an integer >= 1, got {opts[key]!r}")
        if isinstance(iso, bool) or not isinstance(iso, (int, float)) or not 0 <= iso < 1:
            problems.append(f"nested.isotropic: a number in [0, 1), got {iso!r}")
        elif isinstance(design, (int, np.integer)) and not isinstance(design, bool):
            n = len(reference_design(np.random.default_rng(0), 2, design, iso)) \
                if design > 2 else design
            if n <= n_terms(2):
                problems.append(f"nested.design: a pair's quadratic has {n_terms(2)} parameters; "
                                f"design {design} gives {n} points, give more")
        if problems:
            raise ValueError("; ".join(problems))
        return {**opts, "preference": pref}

    # ---- ask / tell ----------------------------------------------------------------------

    def _ask(self, n: int) -> Batch:
        """The next at most ``n`` (= popsize) points of the current phase's batch."""
        if self._pos >= len(self._batch):
            self._batch, self._pos = next(self._program), 0
        return [(x.copy(), copy.deepcopy(meta))
                for x, meta in self._batch[self._pos:self._pos + n]]

    def _tell(self, candidates: list[Candidate], results: list[Result]) -> None:
        for cand, r in zip(candidates, results):
            self._X.append(cand.x.copy())
            self._F.append(r.values)
            self._ok.append(not r.failed)
            if not r.failed and "predicted" in cand.meta:
                self._front_pairs.append((cand.meta["predicted"], list(r.values)))
        self._pos += len(candidates)

    def surrogate_report(self) -> dict[str, Any]:
        """Plain data on the surrogates: per objective its link, coefficients and
        leave-one-out error on the fitted points; the error at front points predicted before
        they were evaluated (``front``, updated at every tell); Bayesian rounds' cell scores and
        sample counts; Nested MAP's experts' scores, pairs (tasks, scores, leave-one-out error,
        pick, merged coefficients and score, evaluations) and final ``result``. Fits, rounds and
        a nested pair's choice are made when the next batch is planned, i.e. at the ``ask``
        after the last tell they need."""
        report = copy.deepcopy(self._report)
        if self._front_pairs:
            pred = np.array([p for p, _ in self._front_pairs])
            real = np.array([r for _, r in self._front_pairs])
            report["front"] = [errors(real[:, m], pred[:, m]) for m in range(pred.shape[1])]
        else:
            report["front"] = None
        return report

    # ---- the program: phases as a generator of batches -----------------------------------

    def _run(self) -> Iterator[Batch]:
        """Yields each phase's batch of points once the previous batch has been told."""
        if self._nested is not None:
            yield from self._nested_tree()
        self._report["phase"] = "design"
        while not fittable(self._valid()[0]):  # after Nested MAP: only if they cannot fit
            yield self._design_batch()
        self._fit()
        for r in range(self._bayes["rounds"] if self._bayes else 0):
            self._report["phase"] = "bayesian"
            yield self._bayes_batch(r)
            self._fit()
        rnd = 0
        while True:
            self._report["phase"] = "front"
            yield self._front_batch(rnd)
            self._fit()
            rnd += 1

    def _valid(self) -> tuple[np.ndarray, np.ndarray]:
        ok = np.array(self._ok, dtype=bool)
        if not ok.any():
            return np.zeros((0, self.dim)), np.zeros((0, len(self.directions)))
        return np.array(self._X)[ok], np.array(self._F)[ok]

    def _sample_box(self, n: int, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
        from scipy.stats import qmc

        if self._sampling == "lhs":
            unit = qmc.LatinHypercube(d=len(lower), rng=self._rng).random(n)
        else:
            unit = self._rng.random((n, len(lower)))
        return lower + unit * (upper - lower)

    def _design_batch(self) -> Batch:
        points = self._sample_box(self._design, self.lower, self.upper)
        return [(x, {"phase": "design"}) for x in points]

    def _fit(self) -> None:
        X, F = self._valid()
        self._fits, entries = [], []
        for m in range(F.shape[1]):
            link = self._links[m] if self._links[m] != "auto" else auto_link(F[:, m])
            fit = fit_quadratic(X, F[:, m], link)
            coef = fit.coefficients()
            self._fits.append(fit)
            entries.append({"objective": m, "link": link,
                            "loo": errors(F[:, m], loo_predictions(X, F[:, m], fit)),
                            "A": coef["A"].tolist(), "b": coef["b"].tolist(), "e": coef["e"]})
        self._report["n_fit"] = len(X)
        self._report["surrogates"] = entries

    def _predict_min(self, fits: list[QuadraticFit], sign: np.ndarray, X: np.ndarray
                     ) -> np.ndarray:
        """Surrogate predictions in minimisation form (maximised objectives negated)."""
        return np.stack([f.predict(X) for f in fits], axis=1) * sign

    def _bayes_batch(self, rnd: int) -> Batch:
        X, F = self._valid()
        pred = np.stack([f.predict(X) for f in self._fits], axis=1)
        sq = np.sum((F - pred) ** 2, axis=1)
        bins, d = self._bayes["bins"], self.dim
        n_cells = bins ** (d - 1)
        scores = cell_scores(cell_of(to_angles(X), bins), sq, n_cells)
        probs = cell_probabilities(scores, self._bayes["temperature"])
        cells = self._rng.choice(n_cells, size=self._bayes["per_round"], p=probs)
        points = sample_in_cells(self._rng, cells, bins, self.lower, self.upper)
        self._report["bayesian"].append({
            "round": rnd, "scores": scores.tolist(), "probabilities": probs.tolist(),
            "counts": np.bincount(cells, minlength=n_cells).tolist()})
        return [(x, {"phase": "bayesian", "round": rnd, "cell": int(c)})
                for x, c in zip(points, cells)]

    def _front_batch(self, rnd: int) -> Batch:
        fits, sign = list(self._fits), self._sign

        def objective(P: np.ndarray) -> np.ndarray:
            return self._predict_min(fits, sign, P)

        Xs, Fs = surrogate_front(objective, self.lower, self.upper, len(self.directions),
                                 pop=self._front_pop, generations=self._front_generations,
                                 seed=int(self._rng.integers(2**32)))
        anchors = objective(np.array(self._front_asked)) if self._front_asked else None
        picked = spread_pick(Fs, self._front_points, anchors)
        batch = []
        for i in picked:
            x = np.clip(Xs[i], self.lower, self.upper)
            self._front_asked.append(x)
            batch.append((x, {"phase": "front", "round": rnd,
                              "predicted": (Fs[i] * sign).tolist()}))
        return batch

    # ---- Nested MAP ----------------------------------------------------------------------

    def _group_metric(self, tasks: Sequence[int], F: np.ndarray) -> np.ndarray:
        """Preference-weighted mean of the tasks' metrics, per row of ``F`` (the reference's
        ``evaluate_scalings_nested``; a plain mean where the tasks' preferences are all 0,
        where the reference would divide by 0)."""
        p = self._nested["preference"][list(tasks)]
        return F[:, list(tasks)] @ p / p.sum() if p.sum() > 0 else F[:, list(tasks)].mean(1)

    def _group_link(self, g: _Group, y: np.ndarray) -> str:
        links = {self._links[t] for t in g.tasks}
        return links.pop() if len(links) == 1 and "auto" not in links else auto_link(y)

    def _pair_range(self, g: _Group) -> tuple[float, float]:
        """The coefficients ``s`` that keep ``s v_G`` inside the bounds, within the reference's
        [-3, 3]: ``lower_i <= s v_i <= upper_i`` for every coordinate of the group."""
        lo, hi = -_REFERENCE_RANGE, _REFERENCE_RANGE
        for v, low, up in zip(g.v, self.lower, self.upper):
            if v > 0:
                lo, hi = max(lo, low / v), min(hi, up / v)
            elif v < 0:
                lo, hi = max(lo, up / v), min(hi, low / v)
        return lo, hi

    def _nested_tree(self) -> Iterator[Batch]:
        """Nested MAP as the reference code runs it (``run_MAP_nested``); see the module
        docstring. Yields the experts alone, then per pair its design and its pick."""
        opts, d = self._nested, self.dim
        report: dict[str, Any] = {"pairs": []}
        self._report["nested"] = report
        self._report["phase"] = "nested-experts"
        design = reference_design(self._rng, 2, opts["design"], opts["isotropic"])
        start = len(self._X)
        yield [(np.eye(d)[i] * min(1.0, self.upper[i]), {"phase": "nested-expert", "task": i})
               for i in range(d)]
        pool = [_Group((i,), np.eye(d)[i] * min(1.0, self.upper[i]), self._F[start + i][i])
                for i in range(d)]
        report["experts"] = [g.score for g in pool]
        report["evaluations"], report["task_evaluations"] = d, d
        step = 0
        while len(pool) > 1:
            i, j = closest_pair([g.score for g in pool])
            a, b = pool[i], pool[j]
            pool = [g for k, g in enumerate(pool) if k not in (i, j)]
            self._report["phase"] = f"nested pair {step}"
            ranges = np.array([self._pair_range(a), self._pair_range(b)])
            start = len(self._X)
            yield [(self._combine(a, b, ab), {"phase": "nested-design", "pair": step,
                                              "ab": ab.tolist()}) for ab in design]
            entry = {"pair": step, "tasks": [list(a.tasks), list(b.tasks)],
                     "scores": [a.score, b.score], "loo": None}
            ab, predicted = self._pair_pick(a, b, design,
                                            list(range(start, start + len(design))), ranges, entry)
            x = self._combine(a, b, ab)
            start = len(self._X)
            yield [(x, {"phase": "nested-pick", "pair": step, "ab": ab.tolist(),
                        "predicted_groups": predicted})]
            tasks = a.tasks + b.tasks
            merged = _Group(tasks, ab[0] * a.v + ab[1] * b.v,
                            float(self._group_metric(tasks, np.array([self._F[start]]))[0]))
            pool.append(merged)
            n_tasks = len(merged.tasks)
            entry.update({"chosen_ab": ab.tolist(), "coefficients": merged.v.tolist(),
                          "score": merged.score, "evaluations": len(design) + 1,
                          "task_evaluations": (len(design) + 1) * n_tasks})
            report["pairs"].append(entry)
            report["evaluations"] += len(design) + 1
            report["task_evaluations"] += (len(design) + 1) * n_tasks
            step += 1
        report["result"] = {"coefficients": pool[0].v.tolist(), "score": pool[0].score}

    def _combine(self, a: _Group, b: _Group, ab: np.ndarray) -> np.ndarray:
        """The merged model ``a v_A + b v_B`` of a pair (clipped against rounding)."""
        return np.clip(ab[0] * a.v + ab[1] * b.v, self.lower, self.upper)

    def _pair_pick(self, a: _Group, b: _Group, AB: np.ndarray, rows: list[int],
                   ranges: np.ndarray, entry: dict) -> tuple[np.ndarray, list[float] | None]:
        """A pair's pick, as the reference's: fit one quadratic per group metric over (a, b) on
        the pair's valid design points, search the surrogates' front (``generations`` of
        NSGA-II, population ``front_pop``) and take the predicted front point with the best
        preference-weighted sum of the groups' predicted metrics (weights: each group's summed
        preference). When failures leave too few points to fit, the design point with the best
        preference-weighted real value is taken instead (ours; failures score the penalty)."""
        pref, sign = self._nested["preference"], self._sign[0]
        weights = np.array([pref[list(a.tasks)].sum(), pref[list(b.tasks)].sum()])
        F = np.array([self._F[r] for r in rows])
        Y = np.stack([self._group_metric(a.tasks, F), self._group_metric(b.tasks, F)], axis=1)
        ok = np.array([self._ok[r] for r in rows], dtype=bool)
        if not fittable(AB[ok]):
            best = int(np.argmin(sign * Y @ weights))
            entry["fallback"] = "too few valid design points to fit: best real design point"
            return AB[best], None
        fits, loo = [], []
        for g, y in zip((a, b), Y[ok].T):
            fit = fit_quadratic(AB[ok], y, self._group_link(g, y))
            fits.append(fit)
            loo.append(errors(y, loo_predictions(AB[ok], y, fit)))
        entry["loo"] = loo
        signs = np.full(2, sign)

        def objective(P: np.ndarray) -> np.ndarray:
            return self._predict_min(fits, signs, P)

        Xs, Fs = surrogate_front(objective, ranges[:, 0], ranges[:, 1], 2,
                                 pop=self._front_pop, generations=self._nested["generations"],
                                 seed=int(self._rng.integers(2**32)))
        k = preference_pick(Fs, weights)
        return np.clip(Xs[k], ranges[:, 0], ranges[:, 1]), (Fs[k] * sign).tolist()
