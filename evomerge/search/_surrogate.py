"""The math of MAP, as small pure functions: quadratic surrogates, their error, hyperspherical
bins for Bayesian MAP, and the surrogate front search.

Surrogate of one task metric over merge coefficients ``c`` in R^d (MAP's eq. for task n)::

    f(c) = act(sum_i a_ii c_i^2 + sum_{i<j} a_ij c_i c_j + sum_i b_i c_i + e)

``T = (d + 1)(d + 2) / 2`` parameters; ``act`` is the link: ``sigmoid`` for accuracies in [0, 1],
``softplus`` for losses (>= 0), ``identity`` otherwise. Fitted by nonlinear least squares
(``scipy.optimize.least_squares``, analytic Jacobian) started from the linear least-squares fit
of the link's inverse of the targets, which is already exact for noise-free data that does not
saturate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import expit, logit, softmax

LINKS = ("sigmoid", "softplus", "identity")
_EPS = 1e-3  # targets are clipped this far inside a link's range for the initial linear fit


def n_terms(d: int) -> int:
    """Parameters of a full quadratic in ``d`` variables: (d + 1)(d + 2) / 2."""
    return (d + 1) * (d + 2) // 2


def quadratic_features(C: np.ndarray) -> np.ndarray:
    """Rows ``[c_1^2..c_d^2, c_i c_j (i < j, row-major), c_1..c_d, 1]`` for each point."""
    C = np.atleast_2d(np.asarray(C, dtype=float))
    i, j = np.triu_indices(C.shape[1], k=1)
    return np.hstack([C**2, C[:, i] * C[:, j], C, np.ones((len(C), 1))])


def activate(z: np.ndarray, link: str) -> np.ndarray:
    """``act(z)`` for a link name."""
    if link == "sigmoid":
        return expit(z)
    if link == "softplus":
        return np.logaddexp(0.0, z)
    return np.asarray(z, dtype=float)


def _activate_grad(z: np.ndarray, link: str) -> np.ndarray:
    """``act'(z)``: sigmoid' = s(1 - s), softplus' = sigmoid, identity' = 1."""
    if link == "sigmoid":
        s = expit(z)
        return s * (1.0 - s)
    if link == "softplus":
        return expit(z)
    return np.ones_like(z)


def _inverse(y: np.ndarray, link: str) -> np.ndarray:
    """``act^-1(y)`` on targets clipped into the link's range (for the starting point only)."""
    if link == "sigmoid":
        return logit(np.clip(y, _EPS, 1.0 - _EPS))
    if link == "softplus":
        return np.log(np.expm1(np.maximum(y, _EPS)))
    return np.asarray(y, dtype=float)


def auto_link(y: np.ndarray) -> str:
    """The link MAP uses for data like ``y``: sigmoid for values in [0, 1] (accuracies),
    softplus for other non-negative values (losses), identity otherwise."""
    y = np.asarray(y, dtype=float)
    if np.all((y >= 0.0) & (y <= 1.0)):
        return "sigmoid"
    return "softplus" if np.all(y >= 0.0) else "identity"


@dataclass(frozen=True)
class QuadraticFit:
    """A fitted surrogate: weights ``w`` in :func:`quadratic_features` order and its link."""

    w: np.ndarray
    link: str
    dim: int

    def predict(self, C: np.ndarray) -> np.ndarray:
        return activate(quadratic_features(C) @ self.w, self.link)

    def coefficients(self) -> dict[str, np.ndarray | float]:
        """``A`` (upper-triangular: a_ii on the diagonal, a_ij above it), ``b`` and ``e``."""
        d = self.dim
        A = np.diag(self.w[:d])
        i, j = np.triu_indices(d, k=1)
        A[i, j] = self.w[d:d + len(i)]
        return {"A": A, "b": self.w[-d - 1:-1].copy(), "e": float(self.w[-1])}


def fittable(C: np.ndarray) -> bool:
    """Whether a quadratic can be fitted to points ``C``: more points than parameters and the
    feature matrix of full column rank (points on a line or a circle are not enough)."""
    C = np.atleast_2d(C)
    t = n_terms(C.shape[1])
    return len(C) > t and np.linalg.matrix_rank(quadratic_features(C)) == t


def fit_quadratic(C: np.ndarray, y: np.ndarray, link: str,
                  w0: np.ndarray | None = None) -> QuadraticFit:
    """Least-squares fit of ``act(quadratic(c))`` to ``y`` (start: ``w0`` or the linear fit of
    ``act^-1(y)``)."""
    from scipy.optimize import least_squares

    if link not in LINKS:
        raise ValueError(f"link: {link!r} is not one of {', '.join(LINKS)}")
    Phi = quadratic_features(C)
    y = np.asarray(y, dtype=float)
    if w0 is None:
        w0 = np.linalg.lstsq(Phi, _inverse(y, link), rcond=None)[0]
    if link == "identity":
        return QuadraticFit(w=np.linalg.lstsq(Phi, y, rcond=None)[0], link=link, dim=C.shape[1])
    res = least_squares(lambda w: activate(Phi @ w, link) - y, w0,
                        jac=lambda w: _activate_grad(Phi @ w, link)[:, None] * Phi,
                        method="trf", xtol=1e-12, ftol=1e-12, gtol=1e-12)
    return QuadraticFit(w=res.x, link=link, dim=np.atleast_2d(C).shape[1])


def loo_predictions(C: np.ndarray, y: np.ndarray, fit: QuadraticFit) -> np.ndarray:
    """Leave-one-out predictions: point k predicted by a fit to all the others (started from
    ``fit``); NaN where the others cannot determine a quadratic."""
    C = np.atleast_2d(C)
    out = np.full(len(C), np.nan)
    for k in range(len(C)):
        rest = np.arange(len(C)) != k
        if fittable(C[rest]):
            out[k] = fit_quadratic(C[rest], y[rest], fit.link, fit.w).predict(C[k:k + 1])[0]
    return out


def errors(y: np.ndarray, pred: np.ndarray) -> dict[str, float | int | None]:
    """MAE and R^2 (sklearn's) of predictions that exist; R^2 is None for constant targets."""
    from sklearn.metrics import mean_absolute_error, r2_score

    keep = np.isfinite(pred)
    y, pred = np.asarray(y)[keep], np.asarray(pred)[keep]
    if len(y) == 0:
        return {"n": 0, "mae": None, "r2": None}
    r2 = float(r2_score(y, pred)) if len(y) > 1 and np.ptp(y) > 0 else None
    return {"n": len(y), "mae": float(mean_absolute_error(y, pred)), "r2": r2}


# ---- Bayesian MAP: hyperspherical bins ---------------------------------------------------------

def reference_bins(d: int) -> int:
    """Bins per hyperspherical angle in MAP's reference code (``get_sample_n_bins``): 4 for
    fewer than 4 coefficients, 2 from 4 on (the reference warns that it does not support more
    than 6). The ``d - 1`` angles make ``bins^(d - 1)`` cells: 4 at d = 2, 16 at d = 3, 8 at
    d = 4, 16 at d = 5, 32 at d = 6."""
    return 4 if d < 4 else 2


def to_angles(C: np.ndarray) -> np.ndarray:
    """Hyperspherical angles of points in the non-negative orthant, each in [0, pi/2]:
    phi_k = atan2(||c_{k+1..d}||, c_k), k = 1..d-1."""
    C = np.atleast_2d(np.asarray(C, dtype=float))
    tails = np.sqrt(np.cumsum(C[:, ::-1] ** 2, axis=1)[:, ::-1])  # ||c_k..d|| per k
    return np.arctan2(tails[:, 1:], C[:, :-1])


def from_angles(phi: np.ndarray) -> np.ndarray:
    """Unit vectors with hyperspherical angles ``phi``: u_k = cos(phi_k) prod_{l<k} sin(phi_l),
    u_d = prod_l sin(phi_l)."""
    phi = np.atleast_2d(phi)
    n = len(phi)
    sines = np.hstack([np.ones((n, 1)), np.cumprod(np.sin(phi), axis=1)])
    cosines = np.hstack([np.cos(phi), np.ones((n, 1))])
    return sines * cosines


def cell_of(phi: np.ndarray, bins: int) -> np.ndarray:
    """The flat grid cell of each angle vector: ``bins`` equal bins of [0, pi/2] per angle."""
    phi = np.atleast_2d(phi)
    idx = np.clip(np.floor(phi / (np.pi / 2) * bins).astype(int), 0, bins - 1)
    return np.ravel_multi_index(tuple(idx.T), (bins,) * phi.shape[1])


def cell_scores(cells: np.ndarray, sq_residuals: np.ndarray, n_cells: int) -> np.ndarray:
    """MAP's bin score: mean + std / 2 of the squared surrogate residuals of the points in each
    cell; an empty cell scores as the best-scoring one (nothing is known there)."""
    scores = np.full(n_cells, np.nan)
    for c in np.unique(cells):
        r = sq_residuals[cells == c]
        scores[c] = r.mean() + r.std() / 2.0
    top = np.nanmax(scores) if np.any(np.isfinite(scores)) else 1.0
    return np.where(np.isfinite(scores), scores, top)


def cell_probabilities(scores: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(s / temperature) of the scores scaled by their maximum (so the temperature acts
    on relative scores, whatever the metric's scale); uniform when every score is 0."""
    top = float(np.max(scores))
    return softmax((scores / top if top > 0 else np.zeros_like(scores)) / temperature)


def sample_in_cells(rng: np.random.Generator, cells: np.ndarray, bins: int,
                    lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """One point per entry of ``cells``: angles uniform within the cell, radius uniform along
    the ray's stretch inside the box, then clipped to the box."""
    m = len(lower) - 1
    idx = np.stack(np.unravel_index(cells, (bins,) * m), axis=1)
    width = (np.pi / 2) / bins
    phi = (idx + rng.random(idx.shape)) * width
    U = from_angles(phi)
    with np.errstate(divide="ignore", invalid="ignore"):
        pos = U > 1e-12
        t_hi = np.min(np.where(pos, upper / np.where(pos, U, 1.0), np.inf), axis=1)
        t_lo = np.max(np.where(pos, lower / np.where(pos, U, 1.0), 0.0), axis=1)
    t_lo = np.minimum(t_lo, t_hi)
    r = t_lo + rng.random(len(cells)) * (t_hi - t_lo)
    return np.clip(U * r[:, None], lower, upper)


# ---- the front search on the surrogates --------------------------------------------------------

def surrogate_front(objective: Callable[[np.ndarray], np.ndarray], lower: np.ndarray,
                    upper: np.ndarray, n_obj: int, *, pop: int, generations: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Minimise the (cheap, vectorised) ``objective(X) -> F`` with pymoo: NSGA-II for up to 3
    objectives, NSGA-III (Das-Dennis directions, as many as ``pop`` allows) above. Operators as
    MAP's reference code: SBX (crossover probability 0.7, eta 20) and polynomial mutation
    (probability 0.3, eta 20). Returns the final population's ``X`` and ``F``."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.algorithms.moo.nsga3 import NSGA3
    from pymoo.core.problem import Problem
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.sampling.rnd import FloatRandomSampling
    from pymoo.optimize import minimize
    from pymoo.util.ref_dirs import get_reference_directions

    class _Surrogates(Problem):
        def __init__(self) -> None:
            super().__init__(n_var=len(lower), n_obj=n_obj, xl=lower, xu=upper)

        def _evaluate(self, X: np.ndarray, out: dict, *args: object, **kwargs: object) -> None:
            out["F"] = objective(X)

    operators = {"sampling": FloatRandomSampling(), "crossover": SBX(prob=0.7, eta=20),
                 "mutation": PM(prob=0.3, eta=20)}
    if n_obj <= 3:
        algorithm = NSGA2(pop_size=pop, **operators)
    else:
        p = 1
        while _n_dirs(n_obj, p + 1) <= pop:
            p += 1
        ref_dirs = get_reference_directions("das-dennis", n_obj, n_partitions=p)
        algorithm = NSGA3(ref_dirs=ref_dirs, pop_size=pop, **operators)
    res = minimize(_Surrogates(), algorithm, ("n_gen", generations), seed=seed, verbose=False)
    return np.asarray(res.pop.get("X"), dtype=float), np.asarray(res.pop.get("F"), dtype=float)


def _n_dirs(m: int, p: int) -> int:
    """Das-Dennis directions for ``m`` objectives and ``p`` partitions: C(p + m - 1, m - 1)."""
    from math import comb

    return comb(p + m - 1, m - 1)


def spread_pick(F: np.ndarray, k: int, anchors: np.ndarray | None = None) -> list[int]:
    """``k`` row indices of ``F`` spread along it: farthest-point sampling in ``F`` scaled to
    [0, 1] per column, away from ``anchors`` (points already taken, e.g. asked in an earlier
    round), starting from the best row in column 0 when there are no anchors. Non-dominated
    rows come first: dominated ones fill up only when the front has fewer than ``k`` points."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    F = np.atleast_2d(F)
    anchors = np.zeros((0, F.shape[1])) if anchors is None else np.atleast_2d(anchors)
    both = np.vstack([F, anchors])
    lo, span = both.min(axis=0), np.ptp(both, axis=0)
    scale = np.where(span > 0, span, 1.0)
    Z, taken = (F - lo) / scale, list((anchors - lo) / scale)
    picked: list[int] = []
    for front in NonDominatedSorting().do(F):
        left = [int(i) for i in front]
        while left and len(picked) < k:
            if not taken:
                best = left[int(np.argmin(F[left, 0]))]
            else:
                dist = np.min(np.linalg.norm(Z[left, None, :] - np.asarray(taken)[None], axis=2),
                              axis=1)
                best = left[int(np.argmax(dist))]
            picked.append(best)
            taken.append(Z[best])
            left.remove(best)
        if len(picked) >= k:
            break
    return picked


# ---- Nested MAP: the reference's design, pair order and preference pick --------------------------

def reference_design(rng: np.random.Generator, dim: int, total: int,
                     prop_isotropic: float) -> np.ndarray:
    """MAP's reference design sampler (``Sampling.generate_combined_points`` with one-hot
    points included and ``prop_onehot = 0``), points in ``[0, 1]^dim``, in the reference's
    order: with ``m = total - dim`` and ``k = floor(prop_isotropic m)``,

    * ``floor(k / 2)`` isotropic points ``(u, .., u)``, ``u ~ U[0, 1]``;
    * ``floor(k / 2)`` of them again (drawn with replacement) plus N(0, 0.1^2) noise, clipped
      to [0, 1];
    * the ``dim`` one-hot points;
    * ``m - k`` points of the grid ``{0, 1/(g-1), .., 1}^dim`` with ``g = ceil((2 (m - k))^(1 /
      dim))``, leaving out one-hot, isotropic and coordinate-sum-1 points, drawn without
      replacement (all of them when fewer remain).

    So ``total = 20`` at ``dim = 2`` gives 19 points (1 + 1 + 2 + 15): an odd ``k`` loses one.
    """
    rest = total - dim
    if rest <= 0:
        raise ValueError(f"design: {total} points include the {dim} one-hot points; give more "
                         f"than {dim}")
    k = int(prop_isotropic * rest)
    iso = np.repeat(rng.random(k // 2)[:, None], dim, axis=1)
    if k // 2:
        noisy = iso[rng.integers(len(iso), size=k // 2)] + rng.normal(0.0, 0.1, (k // 2, dim))
        noisy = np.clip(noisy, 0.0, 1.0)
    else:
        noisy = np.zeros((0, dim))
    n_grid = rest - k
    g = int(np.ceil((n_grid / 0.5) ** (1.0 / dim)))
    grid = np.indices([g] * dim).reshape(dim, -1).T / (g - 1)
    onehot = (np.sum(grid == 1, axis=1) == 1) & (np.sum(grid == 0, axis=1) == dim - 1)
    keep = ~onehot & (grid.sum(axis=1) != 1) & ~np.all(grid == grid[:, [0]], axis=1)
    grid = grid[keep]
    if len(grid) > n_grid:
        grid = grid[rng.choice(len(grid), n_grid, replace=False)]
    return np.vstack([iso, noisy, np.eye(dim), grid])


def closest_pair(scores: Sequence[float]) -> tuple[int, int]:
    """Nested MAP's next pair (the reference's ``find_closest_datasets``): the indices ``i < j``
    of the two pool entries whose scores differ least; ties go to the first such pair in the
    order (0, 1), (0, 2), .., (1, 2), .."""
    if len(scores) < 2:
        raise ValueError(f"closest_pair: needs at least 2 scores, got {len(scores)}")
    best, pair = np.inf, (0, 1)
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            diff = abs(scores[i] - scores[j])
            if diff < best:
                best, pair = diff, (i, j)
    return pair


def preference_pick(F: np.ndarray, weights: np.ndarray) -> int:
    """The row of a predicted front ``F`` (minimisation form: lower is better) that Nested MAP
    takes for a pair (the reference's ``get_scaling_from_pf``): among the non-dominated rows,
    the one with the best preference-weighted sum ``F @ weights`` (the reference normalises the
    weights to unit length first, which does not change the choice); the first on ties."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    F = np.atleast_2d(F)
    front = np.sort(NonDominatedSorting().do(F, only_non_dominated_front=True))
    return int(front[int(np.argmin(F[front] @ np.asarray(weights, dtype=float)))])
