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


def _gta(method: str, fam: Family, per_source: list[dict], **shared) -> dict:
    cfg = {"merge_method": method, "base_model": str(fam.base), "dtype": "float32",
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
