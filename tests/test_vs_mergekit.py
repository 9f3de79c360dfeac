"""evomerge's merge engine against mergekit itself, method by method.

Each case writes one mergekit YAML config over tiny Llama checkpoints (a random base and sources
that are the base plus small random perturbations), runs mergekit's own ``run_merge`` on it, and
compares every output tensor with ``Merger.build`` of the same config.

* Deterministic methods (and the random ones at density 1, where no mask is drawn) must agree to
  float32 rounding on every tensor. The configs use gradients (``[0.3, 0.9]``, ``[0, 0.5, 1]``)
  and ``filter`` conditionals so that per-layer ``t`` and filter resolution are checked against
  mergekit's, plus ``lambda``, ``normalize``, ``int8_mask`` and ``filter_wise`` variants.
* Random methods (DARE, DELLA) cannot agree mask for mask (mergekit draws from torch's global RNG,
  evomerge from per-tensor seeded generators), so both outputs are checked for the same
  statistics: kept fraction ~ density within a few binomial sigmas, kept entries equal to the
  (weighted) task vector, L1 rescaling, DELLA's preference for large-magnitude entries.
* bfloat16 checkpoints: every method (the random ones at density 1) against a float64 reference
  computed here from the stored tensors, rounded once to bf16; evomerge must match it but for
  float32 noise (<= 1e-4 of elements) and be no farther from it than mergekit, which works in
  bf16. TIES and breadcrumbs keep exactly k elements per tensor (stable-sort tie-break).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mergekit")

from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

from evomerge.merge.engine import Merger  # noqa: E402
from evomerge.recipe import MergeRecipe  # noqa: E402

try:
    from helpers import Family, load_weights, make_family  # noqa: E402
except ImportError:  # tests/ imported as a package
    from tests.helpers import Family, load_weights, make_family  # noqa: E402

pytestmark = pytest.mark.slow  # ~25 s: one mergekit run per case

ATOL, RTOL = 1e-6, 1e-5
SIGMAS = 5.0  # binomial tolerance for kept fractions

# --------------------------------------------------------------------------------------------
# Fixtures and runners
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Family:
    """hidden 32, 3 layers (gradients see t = 0, 0.5, 1), base + 3 sources."""
    return make_family(tmp_path_factory.mktemp("family"), n_sources=3)


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Family:
    """hidden 128, 2 layers (~300k entries): enough entries for tight binomial statistics."""
    return make_family(tmp_path_factory.mktemp("wide"), n_sources=3, hidden=128,
                       intermediate=256, layers=2, seed=1)


def mergekit_merge(config: dict, out: Path, seed: int = 1234) -> dict[str, torch.Tensor]:
    """Run mergekit's own merge of ``config`` on the CPU and load what it wrote."""
    options = MergeOptions(
        device="cpu", copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=seed,
        lazy_unpickle=False,
    )  # fmt: skip
    # random_seed makes mergekit's DARE/DELLA masks (torch's global RNG) reproducible; it seeds
    # python, numpy and torch globally, so put their states back for the tests that follow.
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        run_merge(MergeConfiguration.model_validate(config), str(out), options=options)
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
    return load_weights(out)


def evomerge_merge(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    recipe = MergeRecipe.from_dict({**config, "seed": seed})
    return Merger.for_recipe(recipe).build(recipe)


def both(config: dict, tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    mk = mergekit_merge(config, tmp_path / "mergekit-out")
    ev = evomerge_merge(config)
    assert set(ev) == set(mk), f"tensor names differ: {sorted(set(ev) ^ set(mk))}"
    return ev, mk


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_weights(path)


# --------------------------------------------------------------------------------------------
# Deterministic methods: equal to float32 rounding on every tensor
# --------------------------------------------------------------------------------------------

# Per-source settings that exercise gradients and filters. With 3 layers, block i reads
# t = i / 2, so [0.3, 0.9] gives 0.3, 0.6, 0.9; tensors outside blocks read t = 0.
ATTN_FILTER = [{"filter": "self_attn", "value": 0.2}, {"value": 0.8}]
MLP_FIRST = [{"filter": "mlp", "value": [0.1, 0.9]}, {"filter": "*", "value": 0.5}]


def _models(fam: Family, per_source: list[dict]) -> list[dict]:
    return [{"model": str(p), "parameters": params} for p, params in zip(fam.sources, per_source)]


def _gta(method: str, fam: Family, per_source: list[dict], *, dtype: str = "float32",
         **shared) -> dict:
    cfg = {"merge_method": method, "base_model": str(fam.base), "dtype": dtype,
           "models": _models(fam, per_source)}
    if shared:
        cfg["parameters"] = shared
    return cfg


def _cases(fam: Family) -> dict[str, dict]:
    s0, s1, s2 = (str(p) for p in fam.sources)
    base = str(fam.base)
    mixed = [
        {"weight": ATTN_FILTER, "density": [0.3, 0.9]},
        {"weight": 0.5, "density": 0.5},
        {"weight": [1.0, -0.3], "density": MLP_FIRST},
    ]
    sparse_all = [{"weight": 0.6, "density": 1.0}, {"weight": ATTN_FILTER, "density": 1.0},
                  {"weight": [0.2, 1.0], "density": 1.0}]
    return {
        "linear": {
            "merge_method": "linear", "dtype": "float32",
            "models": [{"model": s0, "parameters": {"weight": ATTN_FILTER}},
                       {"model": s1, "parameters": {"weight": [0.1, 0.7]}},
                       {"model": s2, "parameters": {"weight": 0.3}}],
        },
        "linear-unnormalized-with-base": {
            "merge_method": "linear", "base_model": base, "dtype": "float32",
            "parameters": {"normalize": False},
            "models": [{"model": base, "parameters": {"weight": 0.4}},
                       {"model": s0, "parameters": {"weight": [0.5, 0.1]}},
                       {"model": s1, "parameters": {"weight": ATTN_FILTER}}],
        },
        "task_arithmetic": _gta("task_arithmetic", fam, [
            {"weight": ATTN_FILTER}, {"weight": [0.0, 1.0]}, {"weight": -0.4}], **{"lambda": 0.7}),
        "task_arithmetic-normalize": _gta("task_arithmetic", fam, [
            {"weight": 0.3}, {"weight": [1.0, 0.2]}, {"weight": ATTN_FILTER}],
            normalize=True, **{"lambda": 1.5}),
        "ties-int8": _gta("ties", fam, mixed, int8_mask=True),
        "ties-lambda-unnormalized": _gta("ties", fam, mixed, normalize=False, int8_mask=False,
                                         **{"lambda": 0.6}),
        "breadcrumbs": _gta("breadcrumbs", fam, [
            {"weight": ATTN_FILTER, "density": [0.3, 0.9], "gamma": 0.05},
            {"weight": 0.5, "density": 0.6},
            {"weight": 1.0, "density": 0.8, "gamma": [0.0, 0.1]}]),
        "breadcrumbs_ties": _gta("breadcrumbs_ties", fam, [
            {"weight": 0.7, "density": [0.3, 0.9], "gamma": 0.02},
            {"weight": ATTN_FILTER, "density": 0.5, "gamma": [0.1, 0.0]},
            {"weight": -0.5, "density": MLP_FIRST}], normalize=True),
        "slerp-gradient": {
            "merge_method": "slerp", "base_model": base, "dtype": "float32",
            "parameters": {"t": [0, 0.5, 1]},
            "models": [{"model": base}, {"model": s0}],
        },
        "slerp-filters": {  # the canonical mergekit slerp example
            "merge_method": "slerp", "base_model": base, "dtype": "float32",
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                                 {"value": 0.5}]},
            "models": [{"model": base}, {"model": s1}],
        },
        "model_stock": {
            "merge_method": "model_stock", "base_model": base, "dtype": "float32",
            "models": [{"model": s0}, {"model": s1}, {"model": s2}],
        },
        "model_stock-filter_wise": {
            "merge_method": "model_stock", "base_model": base, "dtype": "float32",
            "parameters": {"filter_wise": True},
            "models": [{"model": s0}, {"model": s1}, {"model": s2}],
        },
        # Random methods at density 1 draw no mask: they must agree exactly too.
        "dare_linear-density1": _gta("dare_linear", fam, sparse_all),
        "dare_ties-density1": _gta("dare_ties", fam, sparse_all, **{"lambda": 0.9}),
        "della-density1": _gta("della", fam, sparse_all),
        "della_linear-density1": _gta("della_linear", fam, sparse_all, normalize=True),
    }


CASE_NAMES = [
    "linear", "linear-unnormalized-with-base", "task_arithmetic", "task_arithmetic-normalize",
    "ties-int8", "ties-lambda-unnormalized", "breadcrumbs", "breadcrumbs_ties", "slerp-gradient",
    "slerp-filters", "model_stock", "model_stock-filter_wise", "dare_linear-density1",
    "dare_ties-density1", "della-density1", "della_linear-density1",
]  # fmt: skip


def test_every_method_is_covered(family):
    from evomerge.merge.methods import METHODS

    covered = {_cases(family)[name]["merge_method"] for name in CASE_NAMES}
    assert set(_cases(family)) == set(CASE_NAMES)
    assert covered == set(METHODS)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_matches_mergekit_exactly(case, family, tmp_path):
    config = _cases(family)[case]
    ev, mk = both(config, tmp_path)
    bad = []
    for name, ref in mk.items():
        got = ev[name]
        assert got.dtype == ref.dtype == torch.float32, (name, got.dtype, ref.dtype)
        assert got.shape == ref.shape, name
        if not torch.allclose(got, ref, atol=ATOL, rtol=RTOL):
            bad.append(f"{name}: max |diff| {(got - ref).abs().max().item():.3g}")
    assert not bad, f"{case}: {len(bad)} tensor(s) differ from mergekit:\n  " + "\n  ".join(bad)
    # The merge must actually do something: not simply the base (or one source) copied.
    base = weights(family.base)
    assert any(not torch.equal(ev[n], base[n]) for n in ev)


def test_gradient_and_filter_resolution_is_mergekit_s(family, tmp_path):
    """A linear merge whose weight differs per layer and per filter recovers each setting.

    With two sources and normalize false, merged = w0 * s0 + w1 * s1 where w1 = 0: so
    merged / s0 reads the resolved weight of s0 tensor by tensor, in both implementations.
    """
    s0, s1 = (str(p) for p in family.sources[:2])
    config = {
        "merge_method": "linear", "dtype": "float32", "parameters": {"normalize": False},
        "models": [{"model": s0, "parameters": {"weight": [
                       {"filter": "self_attn", "value": [0.1, 0.5]},
                       {"filter": "mlp.up", "value": 3.0},
                       {"value": [2.0, 4.0]}]}},
                   {"model": s1, "parameters": {"weight": 0.0}}],
    }  # fmt: skip
    ev, mk = both(config, tmp_path)
    source = weights(family.sources[0])
    for name in ev:
        if "layers." in name:
            t = int(name.split("layers.")[1].split(".")[0]) / 2
        else:
            t = 0.0
        if "self_attn" in name:
            expected = 0.1 + 0.4 * t
        elif "mlp.up" in name:
            expected = 3.0
        else:
            expected = 2.0 + 2.0 * t
        for impl, merged in (("evomerge", ev), ("mergekit", mk)):
            ratio = (merged[name] / source[name]).median().item()
            assert ratio == pytest.approx(expected, rel=1e-5), (impl, name, ratio, expected)


def _slerp_whole_tensor(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Reference: one spherical interpolation of the two tensors as flat vectors, in float64."""
    a, b = v0.double().flatten(), v1.double().flatten()
    omega = torch.acos(torch.dot(a / a.norm(), b / b.norm()).clamp(-1, 1))
    out = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    return out.reshape(v0.shape).float()


def test_slerp_interpolates_each_tensor_as_one_vector(family, tmp_path):
    """mergekit's slerp kernel sees each tensor as one row of a batch ([1, *shape], the leading
    axis packs *different tensors*), so a weight matrix is interpolated as one flat vector with
    one angle, not row by row. Checked on 2-D tensors where the two readings differ."""
    base = str(family.base)
    config = {"merge_method": "slerp", "base_model": base, "dtype": "float32",
              "parameters": {"t": 0.4}, "models": [{"model": base}, {"model": str(family.sources[2])}]}
    ev, mk = both(config, tmp_path)
    b, s = weights(family.base), weights(family.sources[2])
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.2.mlp.down_proj.weight",
                 "lm_head.weight"):
        expected = _slerp_whole_tensor(0.4, b[name], s[name])
        for impl, merged in (("mergekit", mk), ("evomerge", ev)):
            diff = (merged[name] - expected).abs().max().item()
            assert diff < 1e-6, f"{impl} {name}: max |diff| from whole-tensor slerp {diff:.3g}"


# --------------------------------------------------------------------------------------------
# Random methods: the same statistics in both implementations
# --------------------------------------------------------------------------------------------


def _binomial_ok(kept: int, n: int, p: float) -> bool:
    return abs(kept - n * p) <= SIGMAS * math.sqrt(n * p * (1 - p)) + 1


def _one_source(method: str, fam: Family, **params) -> dict:
    shared = {k: params.pop(k) for k in ("rescale", "normalize", "lambda") if k in params}
    cfg = {"merge_method": method, "base_model": str(fam.base), "dtype": "float32",
           "models": [{"model": str(fam.sources[0]), "parameters": params}]}
    if shared:
        cfg["parameters"] = shared
    return cfg


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_without_rescale_keeps_density_and_exact_task_vector(method, wide, tmp_path):
    density, weight = 0.3, 0.7
    config = _one_source(method, wide, weight=weight, density=density, rescale=False)
    ev, mk = both(config, tmp_path)
    base, source = weights(wide.base), weights(wide.sources[0])
    for impl, merged in (("evomerge", ev), ("mergekit", mk)):
        kept_total = n_total = 0
        for name, b in base.items():
            # A kept entry is base + weight * delta (to float32 rounding: mergekit scales by a
            # float32 weight tensor, evomerge may fold the weight into a float64 scalar).
            full = b + (source[name] - b) * weight
            kept = merged[name] != b
            torch.testing.assert_close(merged[name][kept], full[kept], atol=1e-8, rtol=1e-6,
                                       msg=lambda m, impl=impl, name=name: f"{impl} {name}: {m}")
            n, k = b.numel(), int(kept.sum())
            assert _binomial_ok(k, n, density), (impl, name, k / n)
            kept_total += k
            n_total += n
        assert _binomial_ok(kept_total, n_total, density), (impl, kept_total / n_total)
    # Different RNGs: the masks agree only by chance (~ p^2 + (1-p)^2 of entries).
    name = "model.layers.0.mlp.down_proj.weight"
    agree = ((ev[name] != base[name]) == (mk[name] != base[name])).float().mean().item()
    assert agree == pytest.approx(density**2 + (1 - density) ** 2, abs=0.02)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_rescale_restores_the_l1_norm(method, wide, tmp_path):
    density, weight = 0.3, 0.7
    config = _one_source(method, wide, weight=weight, density=density, rescale=True)
    ev, mk = both(config, tmp_path)
    base, source = weights(wide.base), weights(wide.sources[0])
    for impl, merged in (("evomerge", ev), ("mergekit", mk)):
        for name, b in base.items():
            delta = source[name] - b
            change = (merged[name] - b) / weight
            kept = merged[name] != b
            assert _binomial_ok(int(kept.sum()), b.numel(), density), (impl, name)
            # L1 restored (float32 rounding of base + x, then x = merged - base: rtol 1e-4).
            assert change.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-4), (
                impl, name)
            # Kept entries are delta times one common factor L1(delta) / L1(kept delta), about
            # 1 / density (atol: the float32 rounding of base + x, up to ulp(1) for the norms).
            factor = delta.abs().sum() / delta[kept].abs().sum()
            assert 0.8 / density < factor < 1.25 / density, (impl, name, factor)
            torch.testing.assert_close(change[kept], factor * delta[kept], atol=5e-7, rtol=1e-5,
                                       msg=lambda m, impl=impl, name=name: f"{impl} {name}: {m}")


def test_dare_ties_three_sources_changes_the_expected_fraction(wide, tmp_path):
    """An entry changes iff at least one source keeps it (the elected sign always has a member)."""
    density = 0.4
    config = {"merge_method": "dare_ties", "base_model": str(wide.base), "dtype": "float32",
              "parameters": {"rescale": False},
              "models": [{"model": str(p), "parameters": {"weight": w, "density": density}}
                         for p, w in zip(wide.sources, (1.0, 0.5, 0.8))]}
    ev, mk = both(config, tmp_path)
    base = weights(wide.base)
    p = 1 - (1 - density) ** 3
    n = sum(b.numel() for b in base.values())
    l1 = {}
    for impl, merged in (("evomerge", ev), ("mergekit", mk)):
        changed = sum(int((merged[k] != b).sum()) for k, b in base.items())
        assert _binomial_ok(changed, n, p), (impl, changed / n, p)
        l1[impl] = sum((merged[k] - b).abs().sum().item() for k, b in base.items())
    assert l1["evomerge"] == pytest.approx(l1["mergekit"], rel=0.02)


def _row_ranks(delta: torch.Tensor) -> torch.Tensor:
    """Rank of |delta| within each row (1-D tensors are one row), scaled to [0, 1]."""
    rows = delta if delta.dim() >= 2 else delta[None]
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).float() / (rows.shape[1] - 1)
    return ranks.reshape(delta.shape)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_keeps_density_and_prefers_large_entries(method, wide, tmp_path):
    density, epsilon = 0.4, 0.2
    config = _one_source(method, wide, weight=1.0, density=density, epsilon=epsilon,
                         rescale=False)
    ev, mk = both(config, tmp_path)
    base, source = weights(wide.base), weights(wide.sources[0])
    for impl, merged in (("evomerge", ev), ("mergekit", mk)):
        counts = {"all": [0, 0], "top": [0, 0], "bottom": [0, 0]}
        for name, b in base.items():
            delta = source[name] - b
            kept = merged[name] != b
            # Kept entries are the task vector itself (weight 1, one source; della divides by
            # the weight, hence allclose rather than equal).
            torch.testing.assert_close(
                merged[name][kept], source[name][kept], atol=1e-7, rtol=1e-6,
                msg=lambda m, impl=impl, name=name: f"{impl} {name}: {m}")
            rank = _row_ranks(delta)
            for key, sel in (("all", torch.ones_like(kept)), ("top", rank >= 0.75),
                             ("bottom", rank <= 0.25)):
                counts[key][0] += int(kept[sel].sum())
                counts[key][1] += int(sel.sum())
        frac = {k: kept / n for k, (kept, n) in counts.items()}
        # Keep probability density - eps + 2 eps * rank: mean density; the top quarter of ranks
        # averages density + 0.75 eps, the bottom quarter density - 0.75 eps.
        assert _binomial_ok(*counts["all"], density), (impl, frac)
        assert _binomial_ok(*counts["top"], density + 0.75 * epsilon), (impl, frac)
        assert _binomial_ok(*counts["bottom"], density - 0.75 * epsilon), (impl, frac)
        assert frac["top"] > frac["bottom"] + epsilon, (impl, frac)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_rescale_restores_the_l1_norm(method, wide, tmp_path):
    config = _one_source(method, wide, weight=0.5, density=0.5, epsilon=0.1)  # rescale default
    ev, mk = both(config, tmp_path)
    base, source = weights(wide.base), weights(wide.sources[0])
    weight = 1.0 if method == "della" else 0.5  # della normalizes by the (kept) weight
    for impl, merged in (("evomerge", ev), ("mergekit", mk)):
        for name, b in base.items():
            delta = source[name] - b
            change = (merged[name] - b) / weight
            assert change.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-4), (
                impl, name)


# --------------------------------------------------------------------------------------------
# bfloat16 checkpoints: against the exact (float64) result, rounded once
# --------------------------------------------------------------------------------------------
# mergekit merges bf16 checkpoints in bf16 (task vectors, weights and sums all rounded to 8
# bits; linear and slerp excepted, which work in float32). evomerge accumulates in float32 and
# rounds once to bf16, so it must equal the float64 result rounded to bf16 except where the
# float32 rounding error straddles a bf16 rounding boundary (a few elements in 10^5: measured
# 1 to 8 of 119232 per case for the same formulas in float32; 12 for slerp with its angle in
# float32 too, as mergekit takes it), and be at least as close to it as mergekit (which misses
# 28% to 40% of elements where it works in bf16).
#
# Magnitude selection (TIES, breadcrumbs) keeps exactly k elements per tensor, ties broken by
# a stable ascending sort of |delta| (delta exact: bf16 - bf16 in float32): TIES keeps the k =
# max(1, int(density * n)) highest ranks, breadcrumbs ranks [n_bot, n_bot + target). bf16 task
# vectors are coarse, so ties in |delta| at the cut are common and the rule matters.

BF16_MISMATCH = 1e-4  # largest fraction of elements allowed to differ from the rounded reference
# mergekit computes these in float32 too: both are within float32 noise of the reference and
# which of the two has a mismatch or two more is chance, so only the bound above applies
MERGEKIT_FLOAT32 = {"linear", "slerp"}

# mergekit's GTA variants: (sparsifier, sign consensus, normalize default, rescale default)
GTA = {
    "task_arithmetic": (None, False, False, False),
    "ties": ("magnitude", True, True, False),
    "dare_ties": ("random", True, False, True),
    "dare_linear": ("random", False, False, True),
    "breadcrumbs": ("magnitude_outliers", False, False, False),
    "breadcrumbs_ties": ("magnitude_outliers", True, False, False),
    "della": ("della_magprune", True, True, True),
    "della_linear": ("della_magprune", False, False, True),
}


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory) -> Family:
    """bf16 checkpoints (config.json says bfloat16), hidden 64, 3 layers: ~120k elements per
    model, so a mismatch fraction of 1e-4 is a dozen elements, not a coin toss."""
    return make_family(tmp_path_factory.mktemp("bf16"), n_sources=3, hidden=64,
                       intermediate=128, layers=3, seed=2, dtype=torch.bfloat16)


def _bf16_gta(method: str, fam: Family, per_source: list[dict], **shared) -> dict:
    return _gta(method, fam, per_source, dtype="bfloat16", **shared)


def f32(x: float) -> float:
    """``x`` rounded to float32, so the engine's float32 arithmetic and the float64 reference
    see the same number."""
    return float(np.float32(x))


# Weights, t and lambda of the bf16 cases: float32 numbers with irregular mantissas. Short
# decimals will not do: bf16 task vectors are small integer multiples of the bf16 step of the
# result, so with weights 0.7, 0.35, -0.4 (or normalised 1/3, 1/2, 1/6) the exact result modulo
# that step falls on a lattice of ~1/200 of a step, and ~1 element in 200 lies *on* a bf16
# rounding midpoint to within float32 noise: there the exact rounding is decided by noise (in a
# float32 engine, in mergekit, and even in the float64 reference), 2e-3 to 4e-2 of all elements.
# With these the float32 rounding error is the only cause of mismatch (a few in 10^5).
LN2, INV_E, SQRT2M1, PI_4 = (f32(math.log(2)), f32(math.exp(-1)), f32(math.sqrt(2) - 1),
                             f32(math.pi / 4))
INV_PI, SQRT3M1, E_3, EULER = (f32(1 / math.pi), f32(math.sqrt(3) - 1), f32(math.e / 3),
                               f32(0.5772156649))
# lambda: a short binary fraction keeps the weights' irregularity (a "random" one may not:
# e/3 times 1/e is 1/3, sqrt(pi)/2 times ln 2 is 43/70 to 1e-9)
LAMBDA = 0.875


def _bf16_cases(fam: Family) -> dict[str, dict]:
    """Scalar settings only (gradients and filters are checked in float32 above), different
    per source; densities whose cut falls inside runs of equal |delta|."""
    s0, s1, s2 = (str(p) for p in fam.sources)
    base = str(fam.base)
    ones = [{"weight": LN2, "density": 1.0}, {"weight": INV_E, "density": 1.0},
            {"weight": SQRT2M1, "density": 1.0}]
    return {
        "task_arithmetic": _bf16_gta("task_arithmetic", fam, [
            {"weight": LN2}, {"weight": INV_E}, {"weight": -SQRT2M1}], **{"lambda": LAMBDA}),
        "task_arithmetic-normalize": _bf16_gta("task_arithmetic", fam, [
            {"weight": INV_PI}, {"weight": PI_4}, {"weight": EULER}], normalize=True),
        "ties": _bf16_gta("ties", fam, [
            {"weight": LN2, "density": 0.3}, {"weight": EULER, "density": 0.5},
            {"weight": E_3, "density": 0.77}]),
        "ties-unnormalized": _bf16_gta("ties", fam, [
            {"weight": SQRT3M1, "density": 0.6}, {"weight": INV_E, "density": 0.2},
            {"weight": PI_4, "density": 0.9}], normalize=False, **{"lambda": f32(1.3)}),
        "breadcrumbs": _bf16_gta("breadcrumbs", fam, [
            {"weight": LN2, "density": 0.3, "gamma": 0.05},
            {"weight": EULER, "density": 0.6},
            {"weight": INV_E, "density": 0.8, "gamma": 0.1}]),
        "breadcrumbs_ties": _bf16_gta("breadcrumbs_ties", fam, [
            {"weight": SQRT3M1, "density": 0.4, "gamma": 0.02},
            {"weight": INV_PI, "density": 0.5, "gamma": 0.1},
            {"weight": -PI_4, "density": 0.7}], normalize=True),
        "linear": {
            "merge_method": "linear", "dtype": "bfloat16",
            "models": [{"model": s0, "parameters": {"weight": INV_PI}},
                       {"model": s1, "parameters": {"weight": LN2}},
                       {"model": s2, "parameters": {"weight": EULER}}],
        },
        "slerp": {
            "merge_method": "slerp", "base_model": base, "dtype": "bfloat16",
            "parameters": {"t": INV_E}, "models": [{"model": base}, {"model": s1}],
        },
        "model_stock": {
            "merge_method": "model_stock", "base_model": base, "dtype": "bfloat16",
            "models": [{"model": s0}, {"model": s1}, {"model": s2}],
        },
        "dare_linear-density1": _bf16_gta("dare_linear", fam, ones),
        "dare_ties-density1": _bf16_gta("dare_ties", fam, ones, **{"lambda": LAMBDA}),
        "della-density1": _bf16_gta("della", fam, ones),
        "della_linear-density1": _bf16_gta("della_linear", fam, ones, normalize=True),
    }


BF16_CASES = [
    "task_arithmetic", "task_arithmetic-normalize", "ties", "ties-unnormalized", "breadcrumbs",
    "breadcrumbs_ties", "linear", "slerp", "model_stock", "dare_linear-density1",
    "dare_ties-density1", "della-density1", "della_linear-density1",
]  # fmt: skip


# ---- the float64 reference ---------------------------------------------------------------------


def _stable_order(delta: torch.Tensor) -> torch.Tensor:
    """Flat indices in stable ascending order of |delta| (equal magnitudes: lower index first)."""
    return torch.sort(delta.abs().flatten(), stable=True).indices


def keep_mask(delta: torch.Tensor, method: str | None, density: float,
              gamma: float = 0.01) -> torch.Tensor:
    """Which elements of one task vector a sparsifier keeps (bool, delta's shape); the random
    ones only at density 1 (everything)."""
    n = delta.numel()
    keep = torch.zeros(n, dtype=torch.bool)
    if method is None or density >= 1:
        keep[:] = True
    elif method == "magnitude":
        k = max(1, int(density * n))
        keep[_stable_order(delta)[n - k:]] = True
    elif method == "magnitude_outliers":
        target = int(density * n)
        n_bot = max(0, n - target - int(gamma * n))
        keep[_stable_order(delta)[n_bot:n_bot + target]] = True
    else:
        raise AssertionError(f"no float64 reference for {method} below density 1")
    return keep.reshape(delta.shape)


def _gta64(method: str, base: torch.Tensor, sources: list[torch.Tensor], per_source: list[dict],
           shared: dict) -> torch.Tensor:
    sparsify, consensus, normalize, rescale = GTA[method]
    normalize = shared.get("normalize", normalize)
    rescale = shared.get("rescale", rescale)
    weights = [float(p["weight"]) for p in per_source]
    us = []
    for s, p, w in zip(sources, per_source, weights):
        delta = s - base
        density = float(p.get("density", 1.0))
        kept = delta * keep_mask(delta, sparsify, density, float(p.get("gamma", 0.01)))
        if rescale and sparsify is not None and density < 1:
            before, after = delta.abs().sum(), kept.abs().sum()
            if before >= 1e-7 and after >= 1e-7:
                kept = kept * (before / after)
        us.append(w * kept)
    u = torch.stack(us)
    w = torch.tensor(weights, dtype=base.dtype).reshape(-1, *[1] * base.dim())
    if consensus:
        elected = torch.where(u.sum(dim=0) >= 0, 1.0, -1.0).to(base.dtype)
        mask = (u.sign() == elected).to(base.dtype)
        mixed = (u * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = u.sum(dim=0)
        divisor = w.sum(dim=0).expand_as(base).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return base + float(shared.get("lambda", 1.0)) * mixed


def _slerp64(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
             eps: float = 1e-8) -> torch.Tensor:
    a, b = v0.flatten(), v1.flatten()
    na, nb = a.norm(), b.norm()
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = torch.dot(a / na, b / nb).clamp(-1, 1)
    if dot.abs() > dot_threshold:
        return ((1 - t) * v0 + t * v1)
    omega = torch.acos(dot)
    return (torch.sin((1 - t) * omega) * v0 + torch.sin(t * omega) * v1) / torch.sin(omega)


def _model_stock64(base: torch.Tensor, sources: list[torch.Tensor]) -> torch.Tensor:
    w0, ws = base.reshape(-1), [s.reshape(-1) for s in sources]
    offsets = [w - w0 for w in ws]
    cosines = [((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-6)).clamp(-1, 1)
               for i, a in enumerate(offsets) for b in offsets[i + 1:]]
    cos = torch.stack(cosines).mean()
    n = len(ws)
    denom = 1 + (n - 1) * cos
    t = 0.0 if denom.abs() < 1e-6 else n * cos / denom
    return (t * sum(ws) / n + (1 - t) * w0).reshape(base.shape)


def reference64(config: dict, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """The merge of ``config`` (scalar settings) computed in float64 from the stored tensors
    (``dtype``: the same formulas in another precision, to see what a given one achieves)."""
    method = config["merge_method"]
    shared = dict(config.get("parameters") or {})
    entries = [(e["model"], dict(e.get("parameters") or {})) for e in config["models"]]
    states = {p: {k: v.to(dtype) for k, v in weights(Path(p)).items()}
              for p in {config.get("base_model"), *(m for m, _ in entries)} - {None}}
    names = next(iter(states.values())).keys()
    base = states.get(config.get("base_model"))
    if method == "linear":
        total = sum(float(p["weight"]) for _, p in entries)
        return {n: sum(float(p["weight"]) * states[m][n] for m, p in entries) / total
                for n in names}
    others = [(m, p) for m, p in entries if m != config.get("base_model")]
    if method == "slerp":
        (other, _), = others
        return {n: _slerp64(float(shared["t"]), base[n], states[other][n]) for n in names}
    if method == "model_stock":
        return {n: _model_stock64(base[n], [states[m][n] for m, _ in others]) for n in names}
    return {n: _gta64(method, base[n], [states[m][n] for m, _ in others],
                      [p for _, p in others], shared) for n in names}


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """float64 -> bfloat16, correctly rounded (to nearest, ties to even).

    torch's own ``.to(torch.bfloat16)`` of a float64 tensor goes through float32 and so rounds
    twice: 1 + 2^-8 + 2^-30 becomes 1, not 1 + 2^-7. It is at most one bf16 step off, so the
    nearest of it and its two neighbours (adjacent bit patterns) is the right answer; the
    distances are exact in float64.
    """
    r = x.to(torch.bfloat16)
    bits = r.view(torch.int16).to(torch.int32)
    candidates = torch.stack([r, *((bits + d).to(torch.int16).view(torch.bfloat16)
                                   for d in (-1, 1))])
    dist = (candidates.double() - x).abs().nan_to_num(nan=math.inf)
    even = (torch.stack([bits, bits - 1, bits + 1]) & 1) == 0
    nearest = dist == dist.min(dim=0).values
    # an exact tie is between r and one neighbour, which differ in parity: take the even one
    best = (nearest.int() * 2 + (nearest & even).int()).argmax(dim=0)
    return candidates.gather(0, best[None])[0]


def mismatches(merged: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(elements differing from the reference rounded once to bf16, all elements)."""
    bad = sum(int((merged[n] != round_bf16(r)).sum()) for n, r in ref.items())
    return bad, sum(r.numel() for r in ref.values())


# ---- the tests -------------------------------------------------------------------------------


def test_every_method_is_covered_in_bf16(bf16_family):
    from evomerge.merge.methods import METHODS

    cases = _bf16_cases(bf16_family)
    assert set(cases) == set(BF16_CASES)
    assert {c["merge_method"] for c in cases.values()} == set(METHODS)


def test_round_bf16_rounds_once_to_nearest_even():
    one = 1.0
    step = 2.0**-7  # bf16 spacing in [1, 2)
    x = torch.tensor([one + step / 2 + 2.0**-30, one + step / 2, one + 1.5 * step,
                      -(one + step / 2 + 2.0**-30), 0.0, -0.0, 1e-40, -3.0 + 2.0**-40, 0.1],
                     dtype=torch.float64)
    want = [one + step, one, one + 2 * step, -(one + step), 0.0, -0.0, 1e-40, -3.0, 0.1]
    got = round_bf16(x)
    assert got.dtype == torch.bfloat16
    # the last ones: already exact in float32, where torch's rounding is right
    assert got.tolist() == torch.tensor(want).to(torch.bfloat16).tolist()
    assert x[:1].to(torch.bfloat16).item() == one  # torch's double rounding, for the record
    values = torch.randn(100_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = round_bf16(values)
    assert ((got.double() - values).abs() <= (values.to(torch.bfloat16).double() - values).abs()
            ).all()


def test_reference_selection_by_hand():
    """The float64 reference's exactly-k rule on a tensor full of ties."""
    delta = torch.tensor([0.5, -1.0, 0.5, 0.25, 1.0, -0.5, 0.0, 0.5], dtype=torch.float64)
    # stable ascending |delta|: 6(0) 3(.25) 0(.5) 2(.5) 5(.5) 7(.5) 1(1) 4(1)
    assert keep_mask(delta, "magnitude", 0.5).nonzero().flatten().tolist() == [1, 4, 5, 7]
    assert keep_mask(delta, "magnitude", 0.01).nonzero().flatten().tolist() == [4]  # k >= 1
    # breadcrumbs, density 0.5, gamma 0.25: target 4, n_top 2, n_bot 2 -> ranks 2..5
    assert keep_mask(delta, "magnitude_outliers", 0.5, 0.25).nonzero().flatten().tolist() == [
        0, 2, 5, 7]


@pytest.mark.parametrize("case", BF16_CASES)
def test_bf16_merge_is_the_float64_merge_rounded_once(case, bf16_family, tmp_path):
    config = _bf16_cases(bf16_family)[case]
    ev, mk = both(config, tmp_path)
    ref = reference64(config)
    for name, tensor in ev.items():
        assert tensor.dtype == mk[name].dtype == torch.bfloat16, (name, tensor.dtype)
    ours, n = mismatches(ev, ref)
    theirs, _ = mismatches(mk, ref)
    assert ours <= BF16_MISMATCH * n, (
        f"{case}: evomerge differs from the float64 merge rounded to bf16 on {ours} of {n} "
        f"elements ({ours / n:.2e}; mergekit {theirs / n:.2e})")
    if config["merge_method"] not in MERGEKIT_FLOAT32:
        assert theirs >= ours, f"{case}: mergekit {theirs} mismatches, evomerge {ours} of {n}"
    base = weights(bf16_family.base)
    assert any(not torch.equal(ev[name], base[name]) for name in ev)


SELECTIONS = [
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.77}),
    ("breadcrumbs", {"density": 0.6, "gamma": 0.05}),
    ("breadcrumbs", {"density": 0.3}),  # default gamma 0.01
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1}),
]


@pytest.mark.parametrize("method, params", SELECTIONS,
                         ids=[f"{m}-{'-'.join(map(str, p.values()))}" for m, p in SELECTIONS])
def test_bf16_selection_keeps_exactly_k_per_tensor(method, params, bf16_family):
    """One source at weight 1: kept elements become the source's value (base + delta is exact
    in float32 and bf16-representable), the others stay the base's; so ``result != base`` is
    the kept set minus zero deltas, and must be the stable-sort exactly-k set."""
    base = weights(bf16_family.base)
    for source in bf16_family.sources:
        config = {"merge_method": method, "base_model": str(bf16_family.base),
                  "dtype": "bfloat16",
                  "models": [{"model": str(source), "parameters": {"weight": 1.0, **params}}]}
        merged = evomerge_merge(config)
        state = weights(source)
        wrong = []
        for name, b in base.items():
            delta = state[name].double() - b.double()
            keep = keep_mask(delta, GTA[method][0], params["density"], params.get("gamma", 0.01))
            expected = keep & (delta != 0)
            changed = merged[name] != b
            if not torch.equal(changed, expected):
                wrong.append(f"{name}: kept {int(changed.sum())}, expected "
                             f"{int(expected.sum())} (k = {int(keep.sum())} of {b.numel()})")
        assert not wrong, f"{method} {params} {source.name}:\n  " + "\n  ".join(wrong)
