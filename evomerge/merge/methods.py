"""Merge methods: pure functions on tensors, and the kernels the method table names.

Semantics follow mergekit 0.1.5 (``mergekit/merge_methods/generalized_task_arithmetic.py``,
``sparsify.py``, ``linear.py``, ``slerp.py``, ``model_stock.py``), so a recipe found here means the
same thing when taken to mergekit. Where we differ, it is on purpose and named:

* **Memory.** Every method streams over a tensor in chunks of at most ``TensorInputs.chunk``
  elements (DELLA: whole rows). Scratch is a fixed number of chunk-sized buffers, one 2^20-element
  random block per source, and small per-source statistics; nothing shaped like a tensor or a
  model is allocated besides the output. mergekit stacks every source's task vector, mask and sort
  permutation at full size.
* **Precision.** Inputs are read into a work dtype wider than they are (float32 for bf16/fp16,
  float64 for float32/float64, see :func:`work_dtype`); every difference, product and sum happens
  there and the result is rounded once, into ``out``'s dtype. mergekit computes in the inputs'
  dtype (bf16 arithmetic for bf16 checkpoints).
* **Exactly k, ties broken by position.** Magnitude selection (TIES, breadcrumbs) ranks |delta|
  (delta exact in the work dtype) by a *stable* ascending sort: equal magnitudes rank by flat
  index, lower index first. TIES keeps the ``k = max(1, int(density * n))`` highest ranks,
  breadcrumbs the ranks ``[n_bot, n_bot + target)``: exactly mergekit's counts, with a
  deterministic pick where mergekit's argsort is arbitrary. The threshold is found exactly at
  every build (:func:`select_rank`), so the first build costs what every build costs.
* **Reproducible random masks.** DARE/DELLA draw uniforms block by block: the elements
  ``[b * 2^20, (b + 1) * 2^20)`` of a tensor come from a ``torch.Generator`` seeded per (recipe
  seed, tensor name, source index, block b), so one recipe gives the same model bit for bit (on
  one device type) whatever the chunk size. mergekit's masks come from the global RNG; they agree
  in distribution.

Every method is reached through :class:`TensorInputs`, which hands out the base, the sources, the
chunk size and the optional caches the engine keeps across builds.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.recipe.params import (METHODS, RANDOM_SPARSIFIERS, SPARSIFIERS, MethodSpec,
                                    rescale_mode)

Tensor = torch.Tensor

#: Elements per chunk when the caller does not say (4 MB of float32 scratch per buffer).
DEFAULT_CHUNK = 1 << 20
#: Random masks are drawn in blocks of this many elements, each from its own seeded generator.
RNG_BLOCK = 1 << 20
#: DARE/DELLA masks drawn for the rescale factors are replayed from bytes in the merge pass when
#: one tensor's masks (a byte per element per source) fit in MASK_STORE x chunk bytes; larger
#: tensors draw (and DELLA ranks) them again. 256 MB at the default CPU chunk.
MASK_STORE = 256
#: Magnitude thresholds of tensors larger than one chunk are bracketed from a sorted sample of
#: 1/SAMPLE_RATIO of |delta| (kept across builds: 1/256 of a source's elements).
SAMPLE_RATIO = 256


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype methods compute in: wider than the inputs so the result is rounded only once."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


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


def block_seed(seed: int, tensor_name: str, source_index: int, block: int) -> int:
    """The seed of random block ``block``; block 0 keeps :func:`tensor_seed` so a tensor of at
    most ``RNG_BLOCK`` elements draws exactly ``torch.rand(shape)`` from that seed."""
    name = tensor_name if block == 0 else f"{tensor_name}\0block{block}"
    return tensor_seed(seed, name, source_index)


class Workspace:
    """Reusable flat scratch buffers, one per (slot, dtype, device), grown to the largest request.

    Freshly allocated large CPU tensors are page-faulted in on every allocation, which costs as
    much as the arithmetic itself; methods therefore reuse a few chunk-sized buffers.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, Tensor] = {}

    def get(self, slot: Hashable, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (slot, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


@dataclass
class TensorInputs:
    """Everything a method may read to merge one tensor.

    ``sources`` are the non-base inputs in recipe order (for ``linear`` the base, when given, is
    appended as the last source, as mergekit does). ``stats`` (small per-source statistics: L1
    norms, sorted |delta| samples) and ``cache`` (opt-in, source-sized: fully sorted |delta|,
    DELLA ranks) are dicts the engine keeps across builds; keys carry ``base_key`` and
    ``source_keys`` (model identities) so recipes that reorder or swap models never read another
    pair's entry. Standalone calls get fresh dicts.
    """

    name: str
    base: Tensor | None
    sources: Sequence[Tensor]
    seed: int = 0
    chunk: int = DEFAULT_CHUNK
    stats: dict[tuple, Any] = field(default_factory=dict)
    cache: dict[tuple, Tensor] | None = None
    source_keys: Sequence[Hashable] | None = None
    base_key: Hashable = None
    workspace: Workspace = field(default_factory=Workspace)

    def key(self, kind: str, k: int) -> tuple:
        return (kind, self.base_key, self.source_keys[k] if self.source_keys is not None else k)

    def spans(self, rows: bool = False) -> list[tuple[int, int]]:
        """Flat ``[start, end)`` chunks of the tensor; with ``rows``, whole rows (dim 1)."""
        ref = self.base if self.base is not None else self.sources[0]
        n = ref.numel()
        if rows:
            width = ref.shape[1] if ref.dim() == 2 else n  # 1-D and >2-D: one piece
            step = max(1, self.chunk // max(width, 1)) * width
        else:
            step = max(1, self.chunk)
        return [(s, min(n, s + step)) for s in range(0, n, step)] or [(0, 0)]

    def delta(self, k: int, start: int, end: int, base_chunk: Tensor, slot: Hashable = "delta"
              ) -> Tensor:
        """``source_k - base`` on ``[start, end)``, exact in the work dtype of ``base_chunk``."""
        d = self.workspace.get(slot, end - start, base_chunk.dtype, base_chunk.device)
        return d.copy_(_flat(self.sources[k])[start:end]).sub_(base_chunk)

    def base_chunk(self, start: int, end: int, slot: Hashable = "base") -> Tensor:
        assert self.base is not None
        b = self.workspace.get(slot, end - start, work_dtype(self.base.dtype), self.base.device)
        return b.copy_(_flat(self.base)[start:end])

    def abs_sum(self, k: int) -> float:
        """||delta_k||_1 (float64 sum), the target of ``rescale``; kept in ``stats``."""
        key = self.key("abs_sum", k)
        if key not in self.stats:
            total = 0.0
            for s, e in self.spans():
                total += float(self.delta(k, s, e, self.base_chunk(s, e)).abs_().sum(
                    dtype=torch.float64))
            self.stats[key] = total
        return self.stats[key]


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1)


def _store(out: Tensor, value: Tensor, dtype: torch.dtype, ws: Workspace) -> None:
    """Round ``value`` once to the inputs' ``dtype`` and write it into ``out``.

    A wider target (a float32 fitness model over bf16 checkpoints) still receives the
    bf16-rounded merge, so the model a search evaluates is the one it exports.
    """
    if out.dtype == dtype or value.dtype == dtype:
        out.copy_(value)
    else:
        out.copy_(ws.get("rounded", value.numel(), dtype, value.device).view(value.shape)
                  .copy_(value))


# --------------------------------------------------------------------------------------------
# Exact rank selection over |delta|, without a tensor-sized buffer
# --------------------------------------------------------------------------------------------


@dataclass
class Rank:
    """Stable ascending rank ``r`` of |delta| located: its ``value`` and how many elements equal
    to it rank below ``r`` (``ties_before``: those come first in flat-index order)."""

    r: int
    value: float = 0.0
    ties_before: int = 0


def _abs_delta(inputs: TensorInputs, k: int, start: int, end: int, slot: str = "abs") -> Tensor:
    return inputs.delta(k, start, end, inputs.base_chunk(start, end), slot).abs_()


def _sorted_sample(inputs: TensorInputs, k: int, n: int) -> Tensor:
    """|delta_k| at ``n / SAMPLE_RATIO`` random positions (fixed per size), sorted; in stats."""
    key = inputs.key("sample", k)
    if key not in inputs.stats:
        m = min(n, max(4096, n // SAMPLE_RATIO))
        gen = torch.Generator().manual_seed(n)
        idx = torch.randint(0, n, (m,), generator=gen).sort().values.to(inputs.base.device)
        work = work_dtype(inputs.base.dtype)
        src = _flat(inputs.sources[k]).index_select(0, idx).to(work)
        inputs.stats[key] = src.sub_(_flat(inputs.base).index_select(0, idx).to(work)).abs_().sort(
            ).values
    return inputs.stats[key]


def select_rank(inputs: TensorInputs, k: int, r: int) -> Rank:
    """Locate stable ascending rank ``r`` (0 <= r < n) of |delta_k| exactly.

    One pass over the tensor: a sorted sample of |delta| brackets the r-th value between two
    sample values ``lo <= v <= hi`` (6 binomial sigmas wide); the pass counts elements below
    ``lo``, equal to ``lo`` and ``hi``, and keeps only those strictly between (about
    ``100 * sqrt(n)`` values), whose k-th value is the answer. A miss (probability ~1e-9) widens
    the bracket to 48 sigmas, then (never seen; it would hold the whole tensor) to everything. With the opt-in cache, a fully sorted |delta| answers without a pass.
    """
    n = inputs.base.numel()
    if inputs.cache is not None:
        key = inputs.key("sorted_abs", k)
        if key not in inputs.cache:
            inputs.cache[key] = torch.cat([_abs_delta(inputs, k, s, e).clone()
                                           for s, e in inputs.spans()]).sort().values
        ordered = inputs.cache[key]
        value = ordered[r]
        below = int(torch.searchsorted(ordered, value, right=False))
        return Rank(r, float(value), r - below)
    if n <= inputs.chunk:
        a = _abs_delta(inputs, k, 0, n)
        value = a.kthvalue(r + 1).values
        return Rank(r, float(value), r - int((a < value).sum()))
    sample = _sorted_sample(inputs, k, n)
    m = sample.numel()
    q = (r + 0.5) / n
    for width in (6.0, 48.0, math.inf):
        lo, hi = -math.inf, math.inf
        if width < math.inf:
            half = width * math.sqrt(m * q * (1 - q)) + 2
            i_lo, i_hi = math.floor(q * m - half), math.ceil(q * m + half)
            lo = float(sample[i_lo]) if i_lo >= 0 else lo
            hi = float(sample[i_hi]) if i_hi < m else hi
        found = _bracket_pass(inputs, k, r, lo, hi)
        if found is not None:
            return found
    raise AssertionError("unreachable: an unbounded bracket always holds the rank")


def _count(flags: Tensor) -> int:
    """How many 1.0s a float 0/1 tensor holds (float sums are exact below 2^24 terms)."""
    return int(flags.sum(dtype=torch.float64) if flags.numel() > 1 << 24 else flags.sum())


def _bracket_pass(inputs: TensorInputs, k: int, r: int, lo: float, hi: float) -> Rank | None:
    below = eq_lo = eq_hi = 0
    inside: list[Tensor] = []
    ws = inputs.workspace
    for s, e in inputs.spans():
        a = _abs_delta(inputs, k, s, e)
        # compare into reused float buffers: several times faster on CPU than bool outputs, and
        # fresh chunk-sized temporaries would be page-faulted in on every call
        flag = ws.get("flag", e - s, a.dtype, a.device)
        if lo > -math.inf:
            under = _count(torch.lt(a, lo, out=flag))
            below += under
            eq_lo += _count(torch.le(a, lo, out=flag)) - under
        if hi < math.inf and hi != lo:
            eq_hi += _count(torch.eq(a, hi, out=flag))
        torch.gt(a, lo, out=flag).mul_(torch.lt(a, hi, out=ws.get("flag2", e - s, a.dtype,
                                                                     a.device)))
        inside.append(a.masked_select(flag.bool()))
    values = torch.cat(inside)
    if r < below:
        return None
    if r < below + eq_lo:
        return Rank(r, lo, r - below)
    t = r - below - eq_lo
    if t < values.numel():
        value = values.kthvalue(t + 1).values
        return Rank(r, float(value), t - int((values < value).sum()))
    t -= values.numel()
    return Rank(r, hi, t) if t < eq_hi else None


class _AtLeastRank:
    """Float mask of ``rank >= r`` over consecutive chunks (ties kept from ``ties_before`` on)."""

    def __init__(self, rank: Rank, workspace: Workspace) -> None:
        self.rank, self.workspace = rank, workspace
        self.seen = 0  # elements equal to the value met in earlier chunks

    def __call__(self, a: Tensor, out: Tensor) -> Tensor:
        value, skip = self.rank.value, self.rank.ties_before
        if skip == 0:
            return torch.ge(a, value, out=out)
        torch.gt(a, value, out=out)
        eq = torch.eq(a, value, out=self.workspace.get("tie", a.numel(), a.dtype, a.device))
        count = _count(eq)
        first = skip - self.seen  # chunk-local ordinal of the first tie that is kept
        self.seen += count
        if count == 0 or first >= count:  # every tie in this chunk ranks below r
            return out
        if first > 0:  # the one chunk where the kept ties start
            eq.mul_(eq.cumsum(0) > first)
        return out.add_(eq)


# --------------------------------------------------------------------------------------------
# Sparsification: one per-source mask maker per pass over the tensor
# --------------------------------------------------------------------------------------------


class _Uniforms:
    """Uniform [0, 1) float32 draws for flat positions of one (tensor, source), block-seeded."""

    def __init__(self, inputs: TensorInputs, k: int) -> None:
        self.seed, self.name, self.k = inputs.seed, inputs.name, k
        ref = inputs.base if inputs.base is not None else inputs.sources[k]
        self.n, self.device = ref.numel(), ref.device
        self.buffer = inputs.workspace.get(("rng", k), min(self.n, RNG_BLOCK), torch.float32,
                                           self.device)
        self.block = -1

    def fill(self, start: int, end: int, out: Tensor) -> Tensor:
        pos = start
        while pos < end:
            b = pos // RNG_BLOCK
            origin = b * RNG_BLOCK
            if b != self.block:
                length = min(RNG_BLOCK, self.n - origin)
                gen = torch.Generator(device=self.device)
                gen.manual_seed(block_seed(self.seed, self.name, self.k, b))
                torch.rand(length, generator=gen, out=self.buffer[:length])
                self.block = b
            stop = min(end, origin + RNG_BLOCK)
            out[pos - start:stop - start].copy_(self.buffer[pos - origin:stop - origin])
            pos = stop
        return out


def della_ranks(a: Tensor) -> Tensor:
    """Per-row rank of ``a`` >= 0 (rows = dim 1; 1-D: one row), stable ascending, as int64.

    float32 magnitudes sort as int64 keys ``bits(a) << 32 | column``: non-negative floats order
    like their bit patterns, and the column makes every key unique, so a plain sort gives the
    stable order at about half the cost of a stable float argsort.
    """
    rows = a if a.dim() >= 2 else a[None]
    width = rows.shape[1]
    column = torch.arange(width, device=a.device).view(1, -1, *[1] * (rows.dim() - 2))
    if rows.dtype == torch.float32:
        keys = rows.contiguous().view(torch.int32).to(torch.int64).bitwise_left_shift_(32)
        order = keys.bitwise_or_(column).sort(dim=1).indices
    else:
        order = rows.argsort(dim=1, stable=True)
    ranks = torch.empty_like(order)
    return ranks.scatter_(1, order, column.expand_as(order)).reshape(a.shape)


def della_rank_norm(delta: Tensor) -> Tensor:
    """Rank of |delta| along dim 1 scaled to [0, 1] (1-D tensors are one row), as mergekit."""
    ranks = della_ranks(delta.abs()).to(work_dtype(delta.dtype))
    width = (delta.shape[1] if delta.dim() >= 2 else delta.numel()) - 1
    return ranks / width if width > 0 else torch.zeros_like(ranks)


@dataclass(frozen=True)
class Sparsify:
    """One source's sparsification: method, density and its extra knobs."""

    method: str | None
    density: float
    gamma: float = 0.01
    epsilon: float = 0.15

    @property
    def keeps_all(self) -> bool:
        return self.method is None or self.density >= 1

    def keeps_none(self, n: int) -> bool:
        if self.keeps_all:
            return False
        if self.method == "magnitude_outliers":
            return int(self.density * n) <= 0
        return self.density <= 0

    def check(self) -> None:
        """Raise ValueError for an unknown method, or a DELLA ramp reaching outside (0, 1)
        (checked, as mergekit does, only when some but not all of delta is kept)."""
        if self.method is not None and self.method not in SPARSIFIERS:
            raise ValueError(f"unknown sparsification {self.method!r}; known: "
                             f"{', '.join(SPARSIFIERS)}")
        eps = self.epsilon
        if (self.method == "della_magprune" and not self.keeps_all and self.density > 0
                and (self.density + eps >= 1 or self.density - eps <= 0)):
            raise ValueError(
                f"della needs 0 < density - epsilon and density + epsilon < 1, "
                f"got density={self.density}, epsilon={eps}"
            )


class _Masker:
    """Writes one source's keep-mask (1.0 keep, 0.0 drop) chunk by chunk, in order, for one pass.

    Thresholds (magnitude ranks) are located once per build; streaming state (tie counters, the
    current random block) restarts with every new masker, so each pass sees the same mask.
    """

    def __init__(self, inputs: TensorInputs, k: int, spec: Sparsify,
                 ranks: tuple[Rank, ...], inverse_p: bool = False) -> None:
        self.inputs, self.k, self.spec = inputs, k, spec
        #: write keep / p (``rescale: inverse_p``) instead of keep (random masks only)
        self.inverse_p = inverse_p
        self.bounds = [_AtLeastRank(r, inputs.workspace) for r in ranks]
        self.uniforms = _Uniforms(inputs, k) if spec.method in ("random", "della_magprune") \
            else None

    def __call__(self, start: int, end: int, delta: Tensor, out: Tensor) -> Tensor:
        method, ws = self.spec.method, self.inputs.workspace
        if method in ("magnitude", "magnitude_outliers"):
            a = torch.abs(delta, out=ws.get("mask_abs", delta.numel(), delta.dtype, delta.device))
            self.bounds[0](a, out)
            if len(self.bounds) == 2:  # breadcrumbs: rank >= n_bot and not rank >= n_bot + target
                upper = self.bounds[1](a, ws.get("mask_hi", delta.numel(), delta.dtype,
                                                 delta.device))
                out.sub_(upper)
            return out
        u = self.uniforms.fill(start, end, ws.get("uniform", end - start, torch.float32,
                                                  delta.device))
        if method == "random":
            keep = torch.lt(u, self.spec.density, out=out)
            return keep.div_(self.spec.density) if self.inverse_p else keep
        # DELLA: keep with probability p = (density - eps) + 2 eps * rank / (width - 1), per row
        d, eps = self.spec.density, self.spec.epsilon
        ranks = self._ranks(start, end, delta)
        ref = self.inputs.base
        width = (ref.shape[1] if ref.dim() >= 2 else ref.numel()) - 1
        threshold = torch.mul(ranks, 2 * eps / width if width > 0 else 0.0,
                              out=ws.get("della_p", delta.numel(), delta.dtype, delta.device))
        keep = torch.lt(u.to(delta.dtype).sub_(d - eps), threshold, out=out)
        return keep.div_(threshold.add_(d - eps)) if self.inverse_p else keep

    def _ranks(self, start: int, end: int, delta: Tensor) -> Tensor:
        inputs = self.inputs
        shape = inputs.base.shape

        def rows(flat: Tensor) -> Tensor:  # a row chunk of a matrix, else the whole tensor
            return flat.view(-1, shape[1]) if len(shape) == 2 else flat.view(shape)

        if inputs.cache is None:
            return della_ranks(rows(delta).abs()).reshape(-1).to(delta.dtype)
        key = inputs.key("della_rank", self.k)
        if key not in inputs.cache:  # int16 ranks when rows are narrow enough: 2 bytes/element
            width = shape[1] if inputs.base.dim() >= 2 else inputs.base.numel()
            small = torch.int16 if width <= torch.iinfo(torch.int16).max else torch.int32
            parts = []
            for s, e in inputs.spans(rows=True):
                # own slots: this runs inside another pass, whose chunk buffers stay live
                d = inputs.delta(self.k, s, e, inputs.base_chunk(s, e, "rank_base"), "rank_delta")
                parts.append(della_ranks(rows(d).abs()).reshape(-1).to(small))
            inputs.cache[key] = torch.cat(parts)
        return inputs.cache[key][start:end].to(delta.dtype)


def locate_ranks(inputs: TensorInputs, k: int, spec: Sparsify) -> tuple[Rank, ...]:
    """The rank boundaries a magnitude sparsifier needs (none for the random ones)."""
    n = inputs.base.numel()
    if spec.method == "magnitude":
        keep = max(1, int(spec.density * n))
        return (select_rank(inputs, k, n - keep),)
    if spec.method == "magnitude_outliers":
        target = int(spec.density * n)
        n_bot = max(0, n - target - int(spec.gamma * n))
        lower = select_rank(inputs, k, n_bot) if n_bot > 0 else Rank(0, -math.inf, 0)
        upper = (select_rank(inputs, k, n_bot + target) if n_bot + target < n
                 else Rank(n, math.inf, 0))
        return (lower, upper)
    return ()


def keep_mask(inputs: TensorInputs, k: int, spec: Sparsify) -> Tensor:
    """Source k's whole keep-mask as a bool tensor (for tests and benchmarks; the methods never
    materialise it)."""
    spec.check()
    n = inputs.base.numel()
    if spec.keeps_all:
        return torch.ones(inputs.base.shape, dtype=torch.bool, device=inputs.base.device)
    if spec.keeps_none(n):
        return torch.zeros(inputs.base.shape, dtype=torch.bool, device=inputs.base.device)
    masker = _Masker(inputs, k, spec, locate_ranks(inputs, k, spec))
    rows = spec.method == "della_magprune"
    parts = []
    for s, e in inputs.spans(rows=rows):
        d = inputs.delta(k, s, e, inputs.base_chunk(s, e))
        out = torch.empty_like(d)
        parts.append(masker(s, e, d, out) > 0)
    return torch.cat(parts).reshape(inputs.base.shape)


# --------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------


def generalized_task_arithmetic(
    inputs: TensorInputs,
    *,
    weights: Sequence[float],
    densities: Sequence[float],
    sparsify: str | None,
    consensus: bool,
    normalize: bool,
    rescale: bool | str,
    lambda_: float = 1.0,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """theta = base + lambda * [sum_k m_k u_k] / [normalize ? sum_k w_k m_k : 1].

    ``u_k = w_k * f_k * s_k(delta_k)`` with ``s_k`` the sparsifier's mask and ``f_k`` the
    ``rescale`` rule (:func:`~evomerge.recipe.params.rescale_mode`): ``l1`` (``true``, mergekit
    0.1.5) the factor ``||delta_k||_1 / ||s_k(delta_k)||_1`` (1 when either norm is below 1e-7); ``inverse_p``
    (the DARE paper) ``1 / p`` per kept entry, p its keep probability (DARE: density; DELLA:
    the entry's ramp value), so no extra pass; ``none`` (``false``) 1. With ``consensus`` (TIES
    sign election) ``sign = sgn(sum_k u_k)`` (zero counts as +) and ``m_k = [sgn(u_k) ==
    sign]``; without it ``m_k = 1`` and the divisor is ``sum_k w_k`` (|.| < 1e-8 -> 1). mergekit stacks every u_k; here each chunk streams over the
    sources: the entries that agree with the elected sign are exactly the positive (or negative)
    ones, so the result is ``P ? sum_k max(u_k, 0) : sum_k min(u_k, 0)`` with ``P = [sum_k u_k
    >= 0]``: a fixed number of chunk buffers whatever the number of sources.

    Passes over the tensor: one per magnitude threshold (exact rank selection), one for the L1
    rescale factors when ``rescale`` is ``l1`` and a mask is drawn, and the merge pass.
    """
    base = inputs.base
    if base is None:
        raise ValueError(f"{inputs.name}: task-vector methods need a base model")
    mode = rescale_mode(rescale)
    if mode == "inverse_p" and sparsify not in RANDOM_SPARSIFIERS:
        raise ValueError(f"{inputs.name}: rescale inverse_p needs a random mask "
                         f"({', '.join(RANDOM_SPARSIFIERS)}), not {sparsify!r}")
    n = len(inputs.sources)
    gammas = gammas or [0.01] * n
    epsilons = epsilons or [0.15] * n
    specs = [Sparsify(sparsify, densities[k], gammas[k], epsilons[k]) for k in range(n)]
    for spec in specs:
        spec.check()
    numel = base.numel()
    active = [k for k in range(n) if weights[k] != 0 and not specs[k].keeps_none(numel)]
    ranks = {k: locate_ranks(inputs, k, specs[k]) for k in active if not specs[k].keeps_all}
    rows = any(specs[k].method == "della_magprune" for k in ranks)

    def maskers(inverse_p: bool = False) -> dict[int, _Masker]:
        return {k: _Masker(inputs, k, specs[k], r, inverse_p) for k, r in ranks.items()}

    factors = {k: 1.0 for k in active}
    replay: dict[int, _Replay] = {}
    if mode == "l1" and ranks:
        drawn = [k for k in ranks if specs[k].method in ("random", "della_magprune")]
        store = None
        if drawn and len(drawn) * numel <= MASK_STORE * inputs.chunk:
            flat = inputs.workspace.get("mask_store", len(drawn) * numel, torch.uint8,
                                        base.device)
            store = {k: flat[i * numel:(i + 1) * numel] for i, k in enumerate(drawn)}
        factors.update(_rescale_factors(inputs, maskers(), rows, store))
        replay = {k: _Replay(t) for k, t in (store or {}).items()}

    if out is None:
        out = torch.empty_like(base)
    flat_out = _flat(out)
    ws, work, device = inputs.workspace, work_dtype(base.dtype), base.device
    total_w = float(sum(weights))
    scale = lambda_ / (total_w if normalize and not consensus and abs(total_w) >= 1e-8 else 1.0)
    masks = {**maskers(mode == "inverse_p"), **replay}
    for s, e in inputs.spans(rows=rows):
        m = e - s
        b = inputs.base_chunk(s, e)
        acc = ws.get("acc", m, work, device).zero_()
        if consensus:
            pos = ws.get("pos", m, work, device).zero_()
            tmp = ws.get("tmp", m, work, device)
            if normalize:
                pos_w = ws.get("pos_w", m, work, device).zero_()
                neg_w = ws.get("neg_w", m, work, device).zero_()
        for k in active:
            u = inputs.delta(k, s, e, b)
            if k in masks:
                u.mul_(masks[k](s, e, u, ws.get("mask", m, work, device)))
            w = weights[k] * factors[k]
            if not consensus:
                acc.add_(u, alpha=w)
                continue
            u.mul_(w)
            acc.add_(u)
            pos.add_(torch.clamp(u, min=0, out=tmp))
            if normalize:
                pos_w.add_(torch.gt(u, 0, out=tmp), alpha=weights[k])
                neg_w.add_(torch.lt(u, 0, out=tmp), alpha=weights[k])
        if consensus:  # the positive sign wins (ties count as +); 0/1 floats, not torch.where
            plus = torch.ge(acc, 0, out=ws.get("plus", m, work, device))
            minus = torch.lt(acc, 0, out=ws.get("minus", m, work, device))
            acc.sub_(pos).mul_(minus).addcmul_(pos, plus)  # total - pos = the negative part
            if normalize:
                divisor = pos_w.mul_(plus).addcmul_(neg_w, minus)
                acc.div_(divisor.add_(torch.eq(divisor, 0, out=minus)))  # an empty divisor is 1
        if scale != 1:
            acc.mul_(scale)
        _store(flat_out[s:e], acc.add_(b), base.dtype, ws)
    return out


class _Replay:
    """A keep-mask replayed from the bytes an earlier pass over the same chunks recorded."""

    def __init__(self, store: Tensor) -> None:
        self.store = store

    def __call__(self, start: int, end: int, delta: Tensor, out: Tensor) -> Tensor:
        return out.copy_(self.store[start:end])


def _rescale_factors(inputs: TensorInputs, maskers: dict[int, _Masker], rows: bool,
                     store: dict[int, Tensor] | None = None) -> dict[int, float]:
    """f_k = ||delta_k||_1 / ||mask_k * delta_k||_1 (1 when either is below 1e-7), one pass;
    masks of the sources in ``store`` are recorded there for the merge pass."""
    base = inputs.base
    ws, work = inputs.workspace, work_dtype(base.dtype)
    kept = {k: 0.0 for k in maskers}
    for s, e in inputs.spans(rows=rows):
        b = inputs.base_chunk(s, e)
        for k, masker in maskers.items():
            d = inputs.delta(k, s, e, b)
            mask = masker(s, e, d, ws.get("mask", e - s, work, base.device))
            if store is not None and k in store:
                store[k][s:e].copy_(mask)
            d.mul_(mask)
            kept[k] += float(d.abs_().sum(dtype=torch.float64))
    factors = {}
    for k, after in kept.items():
        before = inputs.abs_sum(k)
        factors[k] = 1.0 if before < 1e-7 or after < 1e-7 else before / after
    return factors


def linear(
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    normalize: bool = True,
    out: Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
    workspace: Workspace | None = None,
) -> Tensor:
    """theta = sum_k w_k theta_k, divided by sum_k w_k when ``normalize`` (mergekit default).

    Accumulates in the work dtype and rounds once; a one-hot weight therefore returns that tensor
    exactly (0 + 1 * x = x in every float format). Non-float tensors (Pythia's bool causal mask)
    cannot be averaged: they pass through when every input holds the same values, as the
    task-vector methods keep the base's.
    """
    first = tensors[0]
    out = out if out is not None else torch.empty_like(first)
    if not first.is_floating_point():
        if any(not torch.equal(first, t) for t in tensors[1:]):
            raise TypeError(f"linear merging of {first.dtype} tensors needs them equal in every "
                            "model; they differ")
        return out.copy_(first)
    ws = workspace or Workspace()
    work = work_dtype(first.dtype)
    flat_out, n = _flat(out), first.numel()
    divisor = float(sum(weights)) if normalize else 1.0
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        acc = ws.get("acc", e - s, work, first.device).copy_(_flat(first)[s:e]).mul_(weights[0])
        for tensor, w in zip(tensors[1:], weights[1:]):
            if w != 0:
                acc.add_(ws.get("x", e - s, work, first.device).copy_(_flat(tensor)[s:e]),
                         alpha=w)
        if normalize:
            acc.div_(divisor)
        _store(flat_out[s:e], acc, first.dtype, ws)
    return out


def slerp(t: float, v0: Tensor, v1: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8,
          out: Tensor | None = None, chunk: int = DEFAULT_CHUNK,
          workspace: Workspace | None = None) -> Tensor:
    """Spherical interpolation of two tensors, each taken as one flattened vector (mergekit).

    Omega = arccos(<v0/|v0|, v1/|v1|>); result = sin((1-t) Omega)/sin Omega * v0 +
    sin(t Omega)/sin Omega * v1, falling back to (1-t) v0 + t v1 when |cos Omega| > threshold.
    Two passes: norms and dot product (per-chunk sums added in float64), then the mix.
    """
    ws = workspace or Workspace()
    work = work_dtype(v0.dtype)
    a, b, n = _flat(v0), _flat(v1), v0.numel()
    ca, cb = 1 - t, t
    if n:
        aa = bb = ab = 0.0
        for s in range(0, n, chunk):
            x = ws.get("x", min(n, s + chunk) - s, work, v0.device).copy_(a[s:s + chunk])
            y = ws.get("y", x.numel(), work, v0.device).copy_(b[s:s + chunk])
            aa, bb, ab = aa + float(x @ x), bb + float(y @ y), ab + float(x @ y)
        na, nb = math.sqrt(aa), math.sqrt(bb)
        dot = min(1.0, max(-1.0, ab / ((na if na > eps else 1.0) * (nb if nb > eps else 1.0))))
        if abs(dot) <= dot_threshold:
            theta = math.acos(dot)
            ca = math.sin((1 - t) * theta) / math.sin(theta)
            cb = math.sin(t * theta) / math.sin(theta)
    out = out if out is not None else torch.empty_like(v0)
    flat_out = _flat(out)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        x = ws.get("x", e - s, work, v0.device).copy_(a[s:e]).mul_(ca)
        y = ws.get("y", e - s, work, v0.device).copy_(b[s:e])
        _store(flat_out[s:e], x.add_(y, alpha=cb), v0.dtype, ws)
    return out


def model_stock(base: Tensor, sources: Sequence[Tensor], filter_wise: bool = False,
                out: Tensor | None = None, chunk: int = DEFAULT_CHUNK,
                workspace: Workspace | None = None) -> Tensor:
    """Model Stock: theta = t * mean(sources) + (1 - t) * base, t = N cos / (1 + (N - 1) cos).

    cos is the mean pairwise cosine between the sources' offsets from the base (per row, i.e. per
    index of all but the last dim, with ``filter_wise``); at the singularity 1 + (N-1) cos ~ 0
    the base is kept. Each block of rows (the whole tensor as one row without ``filter_wise``)
    takes two passes over column chunks: the dot products (float64 sums), then the mix.
    """
    out = out if out is not None else torch.empty_like(base)
    if base.numel() == 0:
        return out
    ws = workspace or Workspace()
    work, device = work_dtype(base.dtype), base.device
    if filter_wise and base.dim() > 1:
        width = base.shape[-1]
        rows, per, step = base.numel() // width, max(1, chunk // width), width
    else:
        width, rows, per, step = base.numel(), 1, 1, chunk
    views = [_flat(t).view(rows, width) for t in (base, *sources)]
    flat_out = _flat(out).view(rows, width)
    n = len(sources)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]

    def block(slot: Hashable, view: Tensor, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        buf = ws.get(slot, (r1 - r0) * (c1 - c0), work, device).view(r1 - r0, c1 - c0)
        return buf.copy_(view[r0:r1, c0:c1])

    for r0 in range(0, rows, per):
        r1 = min(rows, r0 + per)
        cols = [(c0, min(width, c0 + step)) for c0 in range(0, width, step)]
        dots = torch.zeros(len(pairs), r1 - r0, dtype=torch.float64, device=device)
        norms = torch.zeros(n, r1 - r0, dtype=torch.float64, device=device)
        for c0, c1 in cols:
            w0 = block("w0", views[0], r0, r1, c0, c1)
            offs = [block(("off", i), views[i + 1], r0, r1, c0, c1).sub_(w0) for i in range(n)]
            for i in range(n):
                norms[i] += (offs[i] * offs[i]).sum(dim=-1, dtype=torch.float64)
            for p, (i, j) in enumerate(pairs):
                dots[p] += (offs[i] * offs[j]).sum(dim=-1, dtype=torch.float64)
        cos = torch.stack([(dots[p] / (norms[i].sqrt() * norms[j].sqrt()).clamp(min=1e-6))
                           .clamp(-1, 1) for p, (i, j) in enumerate(pairs)]).mean(dim=0)
        denom = 1 + (n - 1) * cos
        singular = denom.abs() < 1e-6
        t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1, denom))
        t = t.to(work).unsqueeze(-1)
        for c0, c1 in cols:
            mean = block("mean", views[1], r0, r1, c0, c1)
            for v in views[2:]:
                mean.add_(block("x", v, r0, r1, c0, c1))
            w0 = block("w0", views[0], r0, r1, c0, c1)
            _store(flat_out[r0:r1, c0:c1], mean.div_(n).mul_(t).add_(w0.mul_(1 - t)), base.dtype,
                   ws)
    return out


# --------------------------------------------------------------------------------------------
# Kernels: what :data:`~evomerge.recipe.params.METHODS` entries name, one tensor each
# --------------------------------------------------------------------------------------------

#: a method's entry in the one table (:class:`~evomerge.recipe.params.MethodSpec`): its
#: parameters and, as :attr:`~evomerge.recipe.params.MethodSpec.fn`, its kernel
MergeMethod = MethodSpec


def get_method(name: str) -> MethodSpec:
    """The registered method ``name`` (KeyError listing the known names)."""
    return METHODS[name]


def register(method: MethodSpec) -> MethodSpec:
    """Add a method (its table and its ``kernel`` target) under its name; recipes naming it
    then validate and merge."""
    return METHODS.register(method.name, method)


def gta_kernel(inputs: TensorInputs, shared: Mapping[str, Any],
               per_source: Sequence[Mapping[str, Any]], out: Tensor | None, *,
               sparsify: str | None, consensus: bool) -> Tensor:
    """The generalized-task-arithmetic family; ``sparsify`` and ``consensus`` come from the
    method's :class:`~evomerge.recipe.params.GTA` configuration."""
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


def linear_kernel(inputs: TensorInputs, shared: Mapping[str, Any],
                  per_source: Sequence[Mapping[str, Any]], out: Tensor | None) -> Tensor:
    return linear(inputs.sources, [p["weight"] for p in per_source], shared["normalize"], out,
                  inputs.chunk, inputs.workspace)


def slerp_kernel(inputs: TensorInputs, shared: Mapping[str, Any],
                 per_source: Sequence[Mapping[str, Any]], out: Tensor | None) -> Tensor:
    return slerp(shared["t"], inputs.base, inputs.sources[0], out=out, chunk=inputs.chunk,
                 workspace=inputs.workspace)


def model_stock_kernel(inputs: TensorInputs, shared: Mapping[str, Any],
                       per_source: Sequence[Mapping[str, Any]], out: Tensor | None) -> Tensor:
    return model_stock(inputs.base, inputs.sources, shared["filter_wise"], out=out,
                       chunk=inputs.chunk, workspace=inputs.workspace)
