"""IRT reduction: estimate a model's full-benchmark accuracy from a few anchor items.

Follows tinyBenchmarks (Polo et al. 2024) and MERGE^3 (Mencattini et al. 2025), per task (a task
is one benchmark; nothing is shared across tasks):

* **Model.** A multidimensional two-parameter logistic (2PL) model on a response matrix ``Y``
  (models x items, entries in [0, 1]; graded scores act as soft labels)::

      P(Y_li = 1) = sigmoid(alpha_i . theta_l - beta_i)

  fitted by joint maximum a posteriori: Bernoulli NLL plus Gaussian priors theta ~ N(0, I),
  alpha ~ N(0, s_a^2 I), beta ~ N(0, s_b^2), the priors fixing location and scale. The sign of
  each ability axis is then fixed so that item discriminations sum to >= 0 (a higher theta means
  more items right); for ``dim > 1`` a rotation of the axes stays free, which changes no
  probability and so no estimate.
* **Ability** of a new model from its answers on seen items: argmin over theta of the same NLL
  plus the theta prior (BFGS from theta = 0, as tinyBenchmarks).
* **Anchors.** k-means (scikit-learn, seeded) on item features (the IRT embeddings
  ``[alpha_i; beta_i]`` or the items' correctness vectors across the reference models); the
  anchor of a cluster is its member nearest the centroid, its weight the cluster's share of items.
* **Estimators** (``ESTIMATORS``), with ``n`` anchors of ``N`` items, ``y`` the anchor answers:
  ``anchor`` = sum_i w_i y_i; ``p-irt`` = (n/N) mean(y) + (1 - n/N) mean_unseen P(theta_hat);
  ``gp-irt`` = lam* anchor + (1 - lam*) p-irt (lam* per task, see :func:`gp_lambda`);
  ``mp-irt`` (MERGE^3) = (n/N) anchor + (1 - n/N) mean_unseen P(sum_k lam_k theta_k), the mixture
  lam of the endpoint (source) models' abilities fitted by ML on the anchors from lam = 1/K;
  ``gmp-irt`` = 0.5 anchor + 0.5 mp-irt.

Why torch and scipy rather than py-irt: py-irt needs Pyro and fits by stochastic variational
inference over hundreds of epochs; the joint MAP fit of a (multidimensional) 2PL is a smooth
problem of a few thousand parameters that torch's L-BFGS solves exactly in well under a second,
in a few dozen lines that the tests check against simulated truth. The per-candidate problems
(ability, mixture weights) have at most a handful of unknowns and analytic gradients, so scipy's
BFGS solves them in microseconds with no autograd overhead.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import expit
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

from evomerge.registry import Registry

__all__ = [
    "ESTIMATORS",
    "IRTFit",
    "Reduction",
    "TaskReduction",
    "anchor_estimate",
    "build_task_reduction",
    "estimate",
    "estimate_ability",
    "fit_irt",
    "fit_mixture",
    "gmp_irt",
    "gp_irt",
    "gp_lambda",
    "mp_irt",
    "p_irt",
    "probabilities",
    "select_anchors",
]

Features = Literal["irt", "correctness"]
GMP_DELTA = 0.5  # MERGE^3's fixed mix of the anchor and mp-IRT estimates


# ---------------------------------------------------------------------------------------------
# The 2PL model and its fit
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IRTFit:
    """Item parameters ``alpha`` (N, d), ``beta`` (N,) and the fitted abilities ``theta`` (M, d)."""

    alpha: np.ndarray
    beta: np.ndarray
    theta: np.ndarray


def probabilities(theta: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """P(correct) = sigmoid(alpha_i . theta - beta_i); theta (d,) -> (N,), or (M, d) -> (M, N)."""
    return expit(np.asarray(theta) @ alpha.T - beta)


def _check_responses(y: np.ndarray, where: str) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 2 or y.shape[0] < 2 or y.shape[1] < 1:
        raise ValueError(f"{where}: expected a (models x items) matrix with >= 2 models, "
                         f"got shape {y.shape}")
    if not np.all(np.isfinite(y)) or y.min() < 0 or y.max() > 1:
        raise ValueError(f"{where}: scores must be finite and in [0, 1]")
    return y


def _initial_guess(y: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic start: abilities from the leading singular vectors of the centred matrix
    (a linear factor model of Y), discriminations from the matching right vectors, difficulties
    from each item's mean (beta = -logit p)."""
    m = y.shape[0]
    centred = y - y.mean(axis=0)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    theta = np.zeros((m, dim))
    alpha = np.zeros((y.shape[1], dim))
    k = min(dim, len(s))
    theta[:, :k] = u[:, :k] * np.sqrt(m)
    # 4x: the logistic's slope at 0 is 1/4, so a linear loading l maps to a logit loading ~4l.
    alpha[:, :k] = 4.0 * vt[:k].T * s[:k] / np.sqrt(m)
    p = np.clip(y.mean(axis=0), 0.02, 0.98)
    return theta, alpha, -np.log(p / (1 - p))


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch, BLAS and OpenMP (k-means) on one thread, then restore the settings.

    The matrices here are small (models x items): splitting them across threads only adds
    synchronisation, which on a busy machine made the fit 30x slower (5.8 s vs 0.17 s for
    300 x 60 with the CPU oversubscribed), and k-means likewise.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(before)


def fit_irt(y: np.ndarray, dim: int = 1, *, alpha_sd: float = 2.0, beta_sd: float = 3.0,
            max_iter: int = 500) -> IRTFit:
    """Joint MAP fit of a ``dim``-dimensional 2PL to responses ``y`` (models x items).

    Minimises sum BCE(y_li, alpha_i . theta_l - beta_i) + |theta|^2 / 2 + |alpha|^2 / (2 s_a^2)
    + beta^2 / (2 s_b^2) with L-BFGS (strong Wolfe line search) in float64. The priors are what
    make the problem well posed: without them location and scale of theta are free, and an item
    every model gets right drives beta to -infinity.
    """
    y = _check_responses(y, "responses")
    if dim < 1:
        raise ValueError(f"dim: expected >= 1, got {dim}")
    with _one_thread():
        return _fit(y, dim, alpha_sd, beta_sd, max_iter)


def _fit(y: np.ndarray, dim: int, alpha_sd: float, beta_sd: float, max_iter: int) -> IRTFit:
    theta0, alpha0, beta0 = _initial_guess(y, dim)
    target = torch.from_numpy(y)
    theta = torch.tensor(theta0, requires_grad=True)
    alpha = torch.tensor(alpha0, requires_grad=True)
    beta = torch.tensor(beta0, requires_grad=True)
    params = [theta, alpha, beta]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=1e-7,
                            tolerance_change=1e-10, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = theta @ alpha.T - beta
        nll = torch.nn.functional.binary_cross_entropy_with_logits(logits, target,
                                                                   reduction="sum")
        loss = (nll + 0.5 * (theta ** 2).sum() + 0.5 * (alpha ** 2).sum() / alpha_sd ** 2
                + 0.5 * (beta ** 2).sum() / beta_sd ** 2)
        loss.backward()
        return loss

    opt.step(closure)
    th, al, be = (p.detach().numpy().copy() for p in params)
    signs = np.where(al.sum(axis=0) < 0, -1.0, 1.0)  # higher ability = more items right
    return IRTFit(alpha=al * signs, beta=be, theta=th * signs)


def _nll_and_grad(theta: np.ndarray, y: np.ndarray, alpha: np.ndarray, beta: np.ndarray,
                  prior_sd: float) -> tuple[float, np.ndarray]:
    """Bernoulli NLL of answers ``y`` plus |theta|^2 / (2 s^2), and its gradient in theta."""
    logits = alpha @ theta - beta
    nll = float(np.sum(np.logaddexp(0.0, logits) - y * logits))
    grad = alpha.T @ (expit(logits) - y)
    return nll + 0.5 * float(theta @ theta) / prior_sd ** 2, grad + theta / prior_sd ** 2


def estimate_ability(y: np.ndarray, alpha: np.ndarray, beta: np.ndarray,
                     prior_sd: float = 1.0) -> np.ndarray:
    """theta_hat = argmin NLL(y | theta) + |theta|^2 / (2 s^2) over the seen items (BFGS from 0).

    The prior (the fit's own theta prior) keeps theta finite when every seen item is right or
    every one wrong, where the plain MLE of tinyBenchmarks runs off to infinity.
    """
    y = np.asarray(y, dtype=np.float64)
    res = minimize(_nll_and_grad, np.zeros(alpha.shape[1]), args=(y, alpha, beta, prior_sd),
                   jac=True, method="BFGS")
    return res.x


def fit_mixture(y: np.ndarray, alpha: np.ndarray, beta: np.ndarray, endpoints: np.ndarray,
                prior_sd: float = 1.0) -> np.ndarray:
    """MERGE^3's mixture: lam = argmin NLL(y | theta = sum_k lam_k theta_k), BFGS from 1/K.

    ``endpoints`` (K, d) are the source models' abilities. The merged theta also carries the
    ability prior, for the same reason as :func:`estimate_ability`.
    """
    y = np.asarray(y, dtype=np.float64)
    k = endpoints.shape[0]

    def objective(lam: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad_theta = _nll_and_grad(lam @ endpoints, y, alpha, beta, prior_sd)
        return value, endpoints @ grad_theta

    return minimize(objective, np.full(k, 1.0 / k), jac=True, method="BFGS").x


# ---------------------------------------------------------------------------------------------
# Anchors
# ---------------------------------------------------------------------------------------------


def select_anchors(features: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means anchors: ``(indices, weights)``, sorted by item index, weights summing to 1.

    Clusters the items' feature rows into ``k`` groups; each cluster contributes the member
    nearest its centroid, weighted by the cluster's share of items. tinyBenchmarks takes the item
    nearest the centroid over all items; taking it among the cluster's members is the same in
    practice and guarantees one distinct anchor per cluster. With ``k`` >= the number of distinct
    feature rows, there are only that many clusters (fewer anchors than asked), and a cluster
    that k-means leaves empty (rows equal up to rounding) contributes no anchor.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"features: expected an (items x features) matrix, got shape {x.shape}")
    if k < 1:
        raise ValueError(f"anchors: expected >= 1 per task, got {k}")
    clusters = min(k, len(np.unique(x, axis=0)))
    with _one_thread(), warnings.catch_warnings():
        # Rows equal up to rounding: k-means warns, and the empty clusters are skipped below.
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit(x)
    anchors, weights = [], []
    for c in range(clusters):
        members = np.flatnonzero(km.labels_ == c)
        if len(members) == 0:  # near-duplicate rows can leave a cluster empty: no anchor
            continue
        dist = np.linalg.norm(x[members] - km.cluster_centers_[c], axis=1)
        anchors.append(members[np.argmin(dist)])
        weights.append(len(members) / len(x))
    order = np.argsort(anchors)
    return np.asarray(anchors, dtype=np.int64)[order], np.asarray(weights)[order]


def item_features(fit: IRTFit, responses: np.ndarray, kind: Features) -> np.ndarray:
    """What anchors cluster on: ``[alpha_i; beta_i]`` or the item's column of ``responses``."""
    if kind == "irt":
        return np.column_stack([fit.alpha, fit.beta])
    if kind == "correctness":
        return np.asarray(responses, dtype=np.float64).T
    raise ValueError(f"features: expected 'irt' or 'correctness', got {kind!r}")


# ---------------------------------------------------------------------------------------------
# Per-task reduction and the estimators
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskReduction:
    """Everything needed to estimate one task's accuracy from its anchor answers."""

    alpha: np.ndarray       # (N, d) item discriminations
    beta: np.ndarray        # (N,) item difficulties
    anchors: np.ndarray     # (n,) item indices, ascending
    weights: np.ndarray     # (n,) cluster shares, summing to 1
    endpoints: np.ndarray   # (K, d) abilities of the source models (mp-IRT)
    gp_lambda: float        # gp-IRT's weight on the anchor estimate

    @property
    def num_items(self) -> int:
        return len(self.beta)

    def unseen(self) -> np.ndarray:
        """Indices of the items that are not anchors."""
        mask = np.ones(self.num_items, dtype=bool)
        mask[self.anchors] = False
        return np.flatnonzero(mask)

    def to_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha.tolist(), "beta": self.beta.tolist(),
                "anchors": self.anchors.tolist(), "weights": self.weights.tolist(),
                "endpoints": self.endpoints.tolist(), "gp_lambda": float(self.gp_lambda)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskReduction:
        alpha = np.asarray(data["alpha"], dtype=np.float64)
        endpoints = np.asarray(data["endpoints"], dtype=np.float64).reshape(-1, alpha.shape[1])
        return cls(alpha=alpha, beta=np.asarray(data["beta"], dtype=np.float64),
                   anchors=np.asarray(data["anchors"], dtype=np.int64),
                   weights=np.asarray(data["weights"], dtype=np.float64),
                   endpoints=endpoints, gp_lambda=float(data["gp_lambda"]))


def _unseen_mean(task: TaskReduction, theta: np.ndarray) -> float:
    unseen = task.unseen()
    if len(unseen) == 0:
        return 0.0
    return float(probabilities(theta, task.alpha[unseen], task.beta[unseen]).mean())


def anchor_estimate(task: TaskReduction, y: np.ndarray) -> float:
    """sum_i w_i y_i: the cluster-weighted anchor accuracy."""
    return float(task.weights @ y)


def p_irt(task: TaskReduction, y: np.ndarray) -> float:
    """(n/N) mean(y) + (1 - n/N) mean_unseen P(theta_hat), theta_hat from the anchors."""
    a = task.anchors
    theta = estimate_ability(y, task.alpha[a], task.beta[a])
    lam = len(a) / task.num_items
    return lam * float(np.mean(y)) + (1 - lam) * _unseen_mean(task, theta)


def gp_irt(task: TaskReduction, y: np.ndarray) -> float:
    """lam* anchor + (1 - lam*) p-IRT with the task's calibrated lam*."""
    lam = task.gp_lambda
    return lam * anchor_estimate(task, y) + (1 - lam) * p_irt(task, y)


def mp_irt(task: TaskReduction, y: np.ndarray) -> float:
    """(n/N) anchor + (1 - n/N) mean_unseen P(sum_k lam_k theta_k), lam fitted on the anchors."""
    if len(task.endpoints) == 0:
        raise ValueError("mp-irt needs the endpoint (source) models' abilities; the reduction "
                         "has none (calibrate with num_endpoints >= 1)")
    a = task.anchors
    lam_k = fit_mixture(y, task.alpha[a], task.beta[a], task.endpoints)
    lam = len(a) / task.num_items
    return lam * anchor_estimate(task, y) + (1 - lam) * _unseen_mean(task, lam_k @ task.endpoints)


def gmp_irt(task: TaskReduction, y: np.ndarray) -> float:
    """delta anchor + (1 - delta) mp-IRT, delta = 0.5 (MERGE^3)."""
    return GMP_DELTA * anchor_estimate(task, y) + (1 - GMP_DELTA) * mp_irt(task, y)


#: name -> ``fn(task, anchor_answers) -> accuracy``; plugins: entry-point group
#: ``evomerge.estimators``.
ESTIMATORS: Registry[Callable[[TaskReduction, np.ndarray], float]] = Registry(
    "estimator", "evomerge.estimators", {
        "anchor": anchor_estimate,
        "p-irt": p_irt,
        "gp-irt": gp_irt,
        "mp-irt": mp_irt,
        "gmp-irt": gmp_irt,
    })


def estimate(name: str, task: TaskReduction, y: np.ndarray) -> float:
    """Full-task accuracy estimated by estimator ``name`` from anchor answers ``y``."""
    try:
        fn = ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"estimator: unknown {name!r}; known: {', '.join(ESTIMATORS)}") from None
    y = np.asarray(y, dtype=np.float64)
    if y.shape != task.anchors.shape:
        raise ValueError(f"anchor answers: expected {len(task.anchors)} scores (one per anchor), "
                         f"got shape {y.shape}")
    return fn(task, y)


def gp_lambda(responses: np.ndarray, *, anchors: int, dim: int, features: Features, seed: int,
              validation: np.ndarray) -> float:
    """gp-IRT's lam* from the variance/bias trade-off, measured on held-out models.

    The anchor estimate is (nearly) unbiased but noisy (error variance v); p-IRT is steady but
    biased where the IRT model misfits (bias b). For lam A + (1 - lam) P with independent errors
    the MSE lam^2 v + (1 - lam)^2 b^2 is least at lam* = b^2 / (b^2 + v). Both are measured as
    mean squared errors against the true accuracy on the ``validation`` rows, after refitting the
    IRT model and re-selecting anchors on the other rows only (so the bias is out of sample).
    """
    train = np.setdiff1d(np.arange(len(responses)), validation)
    fit = fit_irt(responses[train], dim)
    idx, w = select_anchors(item_features(fit, responses[train], features), anchors, seed)
    task = TaskReduction(fit.alpha, fit.beta, idx, w, np.zeros((0, dim)), 0.0)
    err_anchor, err_pirt = [], []
    for row in responses[validation]:
        truth = float(row.mean())
        err_anchor.append(anchor_estimate(task, row[idx]) - truth)
        err_pirt.append(p_irt(task, row[idx]) - truth)
    v, b2 = float(np.mean(np.square(err_anchor))), float(np.mean(np.square(err_pirt)))
    return 0.5 if v + b2 == 0 else b2 / (b2 + v)


def build_task_reduction(responses: np.ndarray, *, num_endpoints: int, anchors: int,
                         dim: int = 2, features: Features = "irt", seed: int = 0) -> TaskReduction:
    """Fit, pick anchors and calibrate gp-IRT for one task.

    ``responses`` (models x items): the first ``num_endpoints`` rows are the source models
    (their fitted abilities become mp-IRT's endpoints), the rest reference merges. lam* for
    gp-IRT is validated on every third non-endpoint model (tinyBenchmarks' split); with fewer
    than 3 such models there is nothing to validate on and lam* = 0.5.
    """
    responses = _check_responses(responses, "responses")
    if not 0 <= num_endpoints <= len(responses):
        raise ValueError(f"num_endpoints: expected 0..{len(responses)}, got {num_endpoints}")
    fit = fit_irt(responses, dim)
    idx, w = select_anchors(item_features(fit, responses, features), anchors, seed)
    validation = np.arange(num_endpoints, len(responses))[::3]
    lam = 0.5
    if len(validation) >= 3 and len(responses) - len(validation) >= 2:
        lam = gp_lambda(responses, anchors=anchors, dim=dim, features=features, seed=seed,
                        validation=validation)
    return TaskReduction(fit.alpha, fit.beta, idx, w, fit.theta[:num_endpoints], lam)


@dataclass(frozen=True)
class Reduction:
    """Per-task reductions plus the settings that produced them (plain-JSON round trip)."""

    tasks: dict[str, TaskReduction]
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, responses: Mapping[str, np.ndarray], *, num_endpoints: int, anchors: int,
              dim: int = 2, features: Features = "irt", seed: int = 0) -> Reduction:
        """One :func:`build_task_reduction` per task of ``responses`` (task -> models x items)."""
        if not responses:
            raise ValueError("responses: no tasks")
        rows = {name: np.shape(y)[0] for name, y in responses.items()}
        if len(set(rows.values())) != 1:
            raise ValueError(f"responses: every task needs the same models (rows); got {rows}")
        tasks = {name: build_task_reduction(y, num_endpoints=num_endpoints, anchors=anchors,
                                            dim=dim, features=features, seed=seed)
                 for name, y in responses.items()}
        settings = {"anchors": anchors, "dim": dim, "features": features, "seed": seed,
                    "num_endpoints": num_endpoints, "num_models": next(iter(rows.values()))}
        return cls(tasks, settings)

    def anchor_items(self) -> dict[str, np.ndarray]:
        """The items to evaluate, per task (what the inner fitness's ``items=`` takes)."""
        return {name: t.anchors.copy() for name, t in self.tasks.items()}

    def num_evaluated(self) -> int:
        return sum(len(t.anchors) for t in self.tasks.values())

    def num_items(self) -> int:
        return sum(t.num_items for t in self.tasks.values())

    def estimate(self, estimator: str, answers: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Estimated accuracy per task from the anchor answers per task (anchor order)."""
        missing = sorted(set(self.tasks) - set(answers))
        if missing:
            raise ValueError(f"anchor answers: missing task(s) {', '.join(missing)}")
        return {name: estimate(estimator, t, answers[name]) for name, t in self.tasks.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"settings": dict(self.settings),
                "tasks": {name: t.to_dict() for name, t in self.tasks.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Reduction:
        try:
            tasks = {name: TaskReduction.from_dict(t) for name, t in data["tasks"].items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"reduction: malformed JSON ({type(exc).__name__}: {exc})") from exc
        return cls(tasks, dict(data.get("settings", {})))
