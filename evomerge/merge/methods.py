"""Merge methods: pure functions on tensors, plus the registry that names them.

Semantics follow mergekit 0.1.5 (``mergekit/merge_methods/generalized_task_arithmetic.py``,
``sparsify.py``, ``linear.py``, ``slerp.py``, ``model_stock.py``), so a recipe found here means the
same thing when taken to mergekit. Where we differ, it is on purpose and named:

* Random masks (DARE, DELLA) draw from a ``torch.Generator`` seeded per (recipe seed, tensor name,
  source index) instead of torch's global RNG, so one recipe reproduces the same model bit for bit
  (on one device type). mergekit's masks cannot be reproduced; they agree in distribution.
* Magnitude selection (TIES, breadcrumbs) compares against a threshold read from the sorted
  magnitudes instead of scattering an argsort. This keeps the same elements except among exact
  ties in |delta| at the threshold, where mergekit's pick is itself arbitrary; the sorted
  magnitudes depend only on the sources, so the engine computes them once, not once per candidate.

Every method is reached through :class:`TensorInputs`, which hands out the base, the sources and
the derived per-source quantities (task vectors, sorted magnitudes, DELLA ranks, generators). A
standalone call computes those on the fly; the engine passes a cached view.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Tensor = torch.Tensor

# --------------------------------------------------------------------------------------------
# Inputs of one tensor merge
# --------------------------------------------------------------------------------------------


def tensor_seed(seed: int, tensor_name: str, source_index: int) -> int:
    """A 63-bit seed that depends on the recipe seed, the tensor and the source, nothing else.

    Hashing (rather than ``seed + index``) keeps masks of different tensors independent and the
    same tensor's mask stable when other tensors are added or reordered.
    """
    digest = hashlib.blake2b(f"{seed}\0{tensor_name}\0{source_index}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


class Workspace:
    """Reusable flat scratch buffers, viewed to each tensor's shape.

    Freshly allocated large CPU tensors are page-faulted in on every allocation (glibc maps them
    anew), which costs as much as the arithmetic itself; a candidate build therefore reuses a
    few buffers sized to the largest tensor: O(largest tensor) scratch, whatever the model.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, Tensor] = {}

    def get(self, slot: int, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        dtype = dtype or like.dtype
        key = (slot, dtype, like.device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < like.numel():
            buf = self._buffers[key] = torch.empty(like.numel(), dtype=dtype, device=like.device)
        return buf[: like.numel()].view(like.shape)


@dataclass
class TensorInputs:
    """Everything a method may read to merge one tensor.

    ``sources`` are the non-base inputs in recipe order (for ``linear`` the base, when given, is
    appended as the last source, as mergekit does). Derived quantities are computed lazily and
    memoised in ``cache`` (a dict the caller may keep across calls: the engine keeps one per
    tensor so task vectors and sort statistics are computed once per run, not per candidate).
    Cache entries are keyed by ``base_key`` and ``source_keys`` (model identities) when given, so
    recipes that reorder or change models never read another pair's task vector.
    """

    name: str
    base: Tensor | None
    sources: Sequence[Tensor]
    seed: int = 0
    cache: dict[tuple, Tensor] = field(default_factory=dict)
    source_keys: Sequence[Hashable] | None = None
    base_key: Hashable = None
    workspace: Workspace = field(default_factory=Workspace)

    def _memo(self, kind: str, k: int, make: Callable[[], Tensor]) -> Tensor:
        key = (kind, self.base_key, self.source_keys[k] if self.source_keys is not None else k)
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def delta(self, k: int) -> Tensor:
        """Task vector of source k: ``source_k - base``."""
        assert self.base is not None
        return self._memo("delta", k, lambda: self.sources[k] - self.base)

    def sorted_abs(self, k: int) -> Tensor:
        """|delta_k| flattened and sorted ascending, in float32 (float64 inputs stay float64)."""
        return self._memo("sorted_abs", k, lambda: _work(self.delta(k)).abs().flatten().sort().values)

    def abs_sum(self, k: int) -> Tensor:
        """L1 norm of delta_k, the target of ``rescale``."""
        return self._memo("abs_sum", k, lambda: torch.linalg.vector_norm(_work(self.delta(k)), 1))

    def della_rank(self, k: int) -> Tensor:
        """Per-row magnitude rank of delta_k normalised to [0, 1] (DELLA's keep-probability ramp)."""
        return self._memo("della_rank", k, lambda: della_rank_norm(self.delta(k)))

    def generator(self, k: int) -> torch.Generator:
        """A fresh generator for source k's random mask, seeded per tensor and source."""
        device = (self.base if self.base is not None else self.sources[k]).device
        gen = torch.Generator(device=device)
        gen.manual_seed(tensor_seed(self.seed, self.name, k))
        return gen


def _work(t: Tensor) -> Tensor:
    """Sorting/statistics dtype: float32, or float64 when the tensor already is."""
    return t if t.dtype == torch.float64 else t.float()


# --------------------------------------------------------------------------------------------
# Sparsification: keep-masks of delta's shape (1.0 keep, 0.0 drop), written into ``out``
# --------------------------------------------------------------------------------------------
# Masks are float, not bool: float compare-and-multiply with ``out=`` runs several times faster
# on CPU than ``torch.where`` on a bool mask, and the engine reuses the buffers across tensors.


def magnitude_mask(delta: Tensor, density: float, sorted_abs: Tensor | None = None,
                   out: Tensor | None = None) -> Tensor:
    """Keep the ``k = max(1, int(density * n))`` largest |delta| (TIES "trim")."""
    n = delta.numel()
    if sorted_abs is None:
        sorted_abs = _work(delta).abs().flatten().sort().values
    k = max(1, int(density * n))
    out = out if out is not None else torch.empty_like(delta)
    torch.abs(delta, out=out)
    return torch.ge(out, sorted_abs[n - k], out=out)


def magnitude_outliers_mask(delta: Tensor, density: float, gamma: float,
                            sorted_abs: Tensor | None = None, out: Tensor | None = None,
                            scratch: Tensor | None = None) -> Tensor:
    """Model Breadcrumbs: drop the top ``gamma`` fraction by |delta|, then the smallest.

    Kept: ranks ``[n_bot, n_bot + target)`` in ascending magnitude, with ``target =
    int(density * n)``, ``n_bot = max(0, n - target - int(gamma * n))``.
    """
    n = delta.numel()
    target = int(density * n)
    out = out if out is not None else torch.empty_like(delta)
    if target <= 0:
        return out.zero_()
    n_bot = max(0, n - target - int(gamma * n))
    if sorted_abs is None:
        sorted_abs = _work(delta).abs().flatten().sort().values
    scratch = scratch if scratch is not None else torch.empty_like(delta)
    torch.abs(delta, out=out)
    torch.ge(out, sorted_abs[n_bot], out=scratch)
    torch.le(out, sorted_abs[n_bot + target - 1], out=out)
    return out.mul_(scratch)


def bernoulli_mask(delta: Tensor, density: float, generator: torch.Generator,
                   out: Tensor | None = None) -> Tensor:
    """DARE: keep each entry independently with probability ``density``."""
    out = _buffer(out, delta)
    torch.rand(delta.shape, generator=generator, out=out)
    return torch.lt(out, density, out=out)


def della_rank_norm(delta: Tensor) -> Tensor:
    """Rank of |delta| along dim 1, scaled to [0, 1] (1-D tensors are one row), as mergekit."""
    rows = _work(delta) if delta.dim() >= 2 else _work(delta)[None]
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(rows.dtype)
    width = rows.shape[1] - 1
    return (ranks / width if width > 0 else torch.zeros_like(ranks)).reshape(delta.shape)


def della_mask(delta: Tensor, density: float, epsilon: float, generator: torch.Generator,
               rank_norm: Tensor | None = None, out: Tensor | None = None,
               scratch: Tensor | None = None) -> Tensor:
    """DELLA MagPrune: keep with probability ``density - eps + 2 eps * rank_norm`` per row."""
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(
            f"della needs 0 < density - epsilon and density + epsilon < 1, "
            f"got density={density}, epsilon={epsilon}"
        )
    if rank_norm is None:
        rank_norm = della_rank_norm(delta)
    out, scratch = _buffer(out, delta), _buffer(scratch, delta)
    torch.rand(delta.shape, generator=generator, out=out)
    # u < (density - eps) + 2 eps r, as (u - density + eps) < 2 eps r
    torch.mul(rank_norm, 2 * epsilon, out=scratch)
    return torch.lt(out.sub_(density - epsilon), scratch, out=out)


def _buffer(out: Tensor | None, delta: Tensor) -> Tensor:
    return out if out is not None else torch.empty_like(delta, dtype=_work(delta).dtype)


def l1_rescale_factor(kept: Tensor, l1_before: Tensor, eps: float = 1e-7) -> float:
    """||delta||_1 / ||delta * mask||_1, or 1 when either is ~0 (mergekit's ``rescale``)."""
    after = torch.linalg.vector_norm(_work(kept), 1)
    if l1_before < eps or after < eps:
        return 1.0
    return float(l1_before / after)


# --------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------

SPARSIFIERS = ("magnitude", "random", "magnitude_outliers", "della_magprune")


def sparsified_delta(
    inputs: TensorInputs,
    k: int,
    method: str | None,
    density: float,
    rescale: bool,
    gamma: float = 0.01,
    epsilon: float = 0.15,
) -> tuple[Tensor, float]:
    """(delta_k with dropped entries zeroed, its L1 rescale factor), in delta's dtype.

    The factor is returned rather than applied so callers fold it into the source weight (one
    pass instead of two). The result may live in ``inputs.workspace`` slot 0: use it before the
    next call.
    """
    delta = inputs.delta(k)
    if method is None or density >= 1:
        return delta, 1.0
    if density <= 0 and method in ("magnitude", "della_magprune"):
        return torch.zeros_like(delta), 1.0
    ws = inputs.workspace
    # magnitude masks compare |delta| in delta's own dtype (exact); random ones draw in float32
    mask_dtype = delta.dtype if method.startswith("magnitude") else _work(delta).dtype
    mask, scratch = ws.get(1, delta, mask_dtype), ws.get(2, delta, mask_dtype)
    if method == "magnitude":
        magnitude_mask(delta, density, inputs.sorted_abs(k), out=mask)
    elif method == "magnitude_outliers":
        magnitude_outliers_mask(delta, density, gamma, inputs.sorted_abs(k), mask, scratch)
    elif method == "random":
        bernoulli_mask(delta, density, inputs.generator(k), out=mask)
    elif method == "della_magprune":
        della_mask(delta, density, epsilon, inputs.generator(k), inputs.della_rank(k), mask,
                   scratch)
    else:
        raise ValueError(f"unknown sparsification {method!r}; known: {', '.join(SPARSIFIERS)}")
    kept = torch.mul(delta, mask, out=ws.get(0, delta))
    return kept, (l1_rescale_factor(kept, inputs.abs_sum(k)) if rescale else 1.0)


def generalized_task_arithmetic(
    inputs: TensorInputs,
    *,
    weights: Sequence[float],
    densities: Sequence[float],
    sparsify: str | None,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    lambda_: float = 1.0,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """theta = base + lambda * [sum_k m_k u_k] / [normalize ? sum_k w_k m_k : 1].

    ``u_k = w_k * s(delta_k)`` with ``s`` the sparsifier (and optional L1 rescale). With
    ``consensus`` (TIES sign election) ``sign = sgn(sum_k u_k)`` (zero counts as +) and ``m_k =
    [sgn(u_k) == sign]``; without it ``m_k = 1`` and the divisor is ``sum_k w_k`` (|.| < 1e-8 ->
    1). mergekit stacks all u_k; here the sums are streamed over sources: the entries that
    agree with the elected sign are exactly the positive (or negative) ones, so the result is
    ``P ? sum_k max(u_k, 0) : sum_k min(u_k, 0)`` with ``P = [sum_k u_k >= 0]``, which needs a
    fixed number of accumulators whatever the number of sources.
    """
    base = inputs.base
    assert base is not None
    n = len(inputs.sources)
    gammas = gammas or [0.01] * n
    epsilons = epsilons or [0.15] * n
    acc = out if out is not None and out.dtype == base.dtype else torch.empty_like(base)
    if not consensus:
        total = float(sum(weights))
        scale = lambda_ / (total if normalize and abs(total) >= 1e-8 else 1.0)
        acc.copy_(base)
        for k, w in enumerate(weights):
            if w != 0:
                kept, factor = sparsified_delta(
                    inputs, k, sparsify, densities[k], rescale, gammas[k], epsilons[k])
                acc.add_(kept, alpha=w * factor * scale)
        return acc if acc is out else _into(out, acc, base.dtype)

    ws = inputs.workspace
    total, pos = ws.get(3, base).zero_(), ws.get(4, base).zero_()
    pos_w = ws.get(5, base).zero_() if normalize else None
    neg_w = ws.get(6, base).zero_() if normalize else None
    tmp = ws.get(7, base)
    for k, w in enumerate(weights):
        kept, factor = sparsified_delta(inputs, k, sparsify, densities[k], rescale, gammas[k],
                                        epsilons[k])
        u = kept.mul_(w * factor) if kept is not inputs.delta(k) else torch.mul(
            kept, w * factor, out=ws.get(0, base))
        total.add_(u)
        pos.add_(torch.clamp(u, min=0, out=tmp))
        if normalize:
            pos_w.add_(torch.gt(u, 0, out=tmp), alpha=w)
            neg_w.add_(torch.lt(u, 0, out=tmp), alpha=w)
    elected = total >= 0  # the positive sign wins (ties count as +)
    mixed = torch.where(elected, pos, total.sub_(pos), out=total)  # total - pos = negative part
    if normalize:
        divisor = torch.where(elected, pos_w, neg_w, out=pos_w)
        mixed.div_(divisor.masked_fill_(divisor == 0, 1))
    if lambda_ != 1:
        mixed.mul_(lambda_)
    torch.add(base, mixed, out=acc)
    return acc if acc is out else _into(out, acc, base.dtype)


def linear(
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    normalize: bool = True,
    out: Tensor | None = None,
) -> Tensor:
    """theta = sum_k w_k theta_k, divided by sum_k w_k when ``normalize`` (mergekit default).

    Accumulates in float32 (float64 stays float64) and casts back, as mergekit does; a one-hot
    weight therefore returns that tensor exactly (0 + 1 * x = x in every float format).
    """
    first = tensors[0]
    if not first.is_floating_point():
        raise TypeError(f"linear merging needs floating-point tensors, got {first.dtype}")
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    # Accumulate straight into ``out`` when it already has the work dtype: no scratch at all.
    acc = out if out is not None and out.dtype == dtype else torch.empty(
        first.shape, dtype=dtype, device=first.device)
    torch.mul(first.to(dtype), weights[0], out=acc)
    for tensor, w in zip(tensors[1:], weights[1:]):
        if w != 0:
            acc.add_(tensor.to(dtype), alpha=w)
    if normalize:
        acc.div_(sum(weights))
    if acc is out:
        return out
    return _into(out, acc, first.dtype)


def slerp(t: float, v0: Tensor, v1: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8,
          out: Tensor | None = None) -> Tensor:
    """Spherical interpolation of two tensors, each taken as one flattened vector (mergekit).

    Omega = arccos(<v0/|v0|, v1/|v1|>); result = sin((1-t) Omega)/sin Omega * v0 +
    sin(t Omega)/sin Omega * v1, falling back to (1-t) v0 + t v1 when |cos Omega| > threshold.
    Computed in float32 (float64 stays float64).
    """
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.to(dtype).flatten(), v1.to(dtype).flatten()
    ca, cb = 1 - t, t
    if a.numel():
        aa, bb, ab = _norms_and_dot(a, b)
        na, nb = math.sqrt(aa), math.sqrt(bb)
        dot = min(1.0, max(-1.0, ab / ((na if na > eps else 1.0) * (nb if nb > eps else 1.0))))
        if abs(dot) <= dot_threshold:
            theta = math.acos(dot)
            ca = math.sin((1 - t) * theta) / math.sin(theta)
            cb = math.sin(t * theta) / math.sin(theta)
    result = torch.mul(a, ca).add_(b, alpha=cb)
    return _into(out, result.reshape(v0.shape), v0.dtype)


_CHUNK = 1 << 20


def _norms_and_dot(a: Tensor, b: Tensor) -> tuple[float, float, float]:
    """(|a|^2, |b|^2, <a, b>) of flat vectors: 1M-element chunks summed in float64.

    One float32 reduction over tens of millions of elements drifts by ~0.1% here, enough to move
    slerp's angle visibly on an embedding matrix; per-chunk partial sums keep it near exact.
    """
    aa = bb = ab = 0.0
    for start in range(0, a.numel(), _CHUNK):
        x, y = a[start:start + _CHUNK], b[start:start + _CHUNK]
        aa += float(torch.dot(x, x))
        bb += float(torch.dot(y, y))
        ab += float(torch.dot(x, y))
    return aa, bb, ab


def model_stock(base: Tensor, sources: Sequence[Tensor], filter_wise: bool = False,
                out: Tensor | None = None) -> Tensor:
    """Model Stock: theta = t * mean(sources) + (1 - t) * base, t = N cos / (1 + (N - 1) cos).

    cos is the mean pairwise cosine between the sources' offsets from the base (per row with
    ``filter_wise``); at the singularity 1 + (N-1) cos ~ 0 the base is kept.
    """
    shape = base.shape
    if filter_wise:
        w0 = base if base.dim() > 1 else base[None]
        ws = [s if s.dim() > 1 else s[None] for s in sources]
    else:
        w0 = base.reshape(-1)
        ws = [s.reshape(-1) for s in sources]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, oa in enumerate(offsets):
        for ob in offsets[i + 1:]:
            norms = (torch.norm(oa, dim=-1) * torch.norm(ob, dim=-1)).clamp(min=1e-6)
            cosines.append(((oa * ob).sum(dim=-1) / norms).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1, denom))
    average = sum(ws) / n
    return _into(out, (t * average + (1 - t) * w0).reshape(shape), base.dtype)


def _into(out: Tensor | None, value: Tensor, dtype: torch.dtype) -> Tensor:
    """Write ``value`` into ``out`` (casting to out's dtype), else return it cast to ``dtype``."""
    if out is None:
        return value.to(dtype)
    out.copy_(value)
    return out


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSpec:
    """One recipe parameter: scope ``shared`` (one value) or ``source`` (one per non-base input)."""

    name: str
    type: type
    scope: str  # "shared" | "source"
    default: Any = None  # None: required
    low: float | None = None
    high: float | None = None
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is None


MergeFn = Callable[[TensorInputs, Mapping[str, Any], Sequence[Mapping[str, Any]], Tensor | None], Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A named merge method: its parameters, its contract on inputs, and its tensor kernel.

    ``fn(inputs, shared, per_source, out)`` merges one tensor. ``base`` is "required", "optional"
    (linear: an extra weighted input) or "ignored"; counts include the base when it is an input.
    """

    name: str
    params: tuple[ParamSpec, ...]
    fn: MergeFn
    base: str = "required"
    min_inputs: int = 1
    max_inputs: int | None = None
    reference: str = ""

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(
            f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}"
        ) from None


_WEIGHT = ParamSpec("weight", float, "source", doc="scale of this model's task vector")
_DENSITY = ParamSpec("density", float, "source", 1.0, 0.0, 1.0, "fraction of the task vector kept")
_GAMMA = ParamSpec("gamma", float, "source", 0.01, 0.0, 1.0, "fraction of largest |delta| dropped")
_EPSILON = ParamSpec("epsilon", float, "source", 0.15, 0.0, 1.0, "half-width of DELLA's ramp")
_LAMBDA = ParamSpec("lambda", float, "shared", 1.0, doc="scale of the merged task vector")
# Accepted for mergekit compatibility; it only shrinks mergekit's stacked sign masks, which the
# streamed sign election here never materialises.
_INT8 = ParamSpec("int8_mask", bool, "shared", False, doc="mergekit memory option (no effect)")


def _gta(name: str, sparsify: str | None, consensus: bool, normalize: bool, rescale: bool,
         reference: str) -> MergeMethod:
    params = [_INT8, ParamSpec("normalize", bool, "shared", normalize, doc="divide by sum of weights"),
              ParamSpec("rescale", bool, "shared", rescale, doc="restore L1 norm after masking"),
              _LAMBDA, _WEIGHT, _DENSITY]
    if sparsify == "magnitude_outliers":
        params.append(_GAMMA)
    if sparsify == "della_magprune":
        params.append(_EPSILON)

    def fn(inputs: TensorInputs, shared: Mapping[str, Any],
           per_source: Sequence[Mapping[str, Any]], out: Tensor | None) -> Tensor:
        return generalized_task_arithmetic(
            inputs,
            weights=[p["weight"] for p in per_source],
            densities=[p["density"] for p in per_source],
            sparsify=sparsify,
            consensus=consensus,
            normalize=shared["normalize"],
            rescale=shared["rescale"],
            lambda_=shared["lambda"],
            gammas=[p.get("gamma", 0.01) for p in per_source],
            epsilons=[p.get("epsilon", 0.15) for p in per_source],
            out=out,
        )

    return MergeMethod(name, tuple(params), fn, base="required", min_inputs=1, reference=reference)


for _m in (
    _gta("task_arithmetic", None, False, False, False, "https://arxiv.org/abs/2212.04089"),
    _gta("ties", "magnitude", True, True, False, "https://arxiv.org/abs/2306.01708"),
    _gta("dare_ties", "random", True, False, True, "https://arxiv.org/abs/2311.03099"),
    _gta("dare_linear", "random", False, False, True, "https://arxiv.org/abs/2311.03099"),
    _gta("breadcrumbs", "magnitude_outliers", False, False, False, "https://arxiv.org/abs/2312.06795"),
    _gta("breadcrumbs_ties", "magnitude_outliers", True, False, False,
         "https://arxiv.org/abs/2312.06795"),
    _gta("della", "della_magprune", True, True, True, "https://arxiv.org/abs/2406.11617"),
    _gta("della_linear", "della_magprune", False, False, True, "https://arxiv.org/abs/2406.11617"),
):
    register(_m)

register(MergeMethod(
    "linear",
    (ParamSpec("weight", float, "source", doc="this model's share"),
     ParamSpec("normalize", bool, "shared", True, doc="divide by sum of weights")),
    lambda inputs, shared, per_source, out: linear(
        inputs.sources, [p["weight"] for p in per_source], shared["normalize"], out),
    base="optional",
    min_inputs=1,
    reference="https://arxiv.org/abs/2203.05482",
))
register(MergeMethod(
    "slerp",
    (ParamSpec("t", float, "shared", None, 0.0, 1.0, "0 = base, 1 = the other model"),),
    lambda inputs, shared, per_source, out: slerp(shared["t"], inputs.base, inputs.sources[0], out=out),
    base="required",
    min_inputs=2,
    max_inputs=2,
    reference="https://en.wikipedia.org/wiki/Slerp",
))
register(MergeMethod(
    "model_stock",
    (ParamSpec("filter_wise", bool, "shared", False, doc="one interpolation ratio per row"),),
    lambda inputs, shared, per_source, out: model_stock(
        inputs.base, inputs.sources, shared["filter_wise"], out=out),
    base="required",
    min_inputs=3,
    reference="https://arxiv.org/abs/2403.19522",
))
del _m
