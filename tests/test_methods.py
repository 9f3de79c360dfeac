"""Specification tests for evomerge.merge.methods.

Every expected value below is worked out by hand (the arithmetic is in the comments) or follows
from a stated property (determinism, a norm that must be preserved, a binomial mean), never by
re-running the code under test. Semantics are mergekit 0.1.5's (sparsify.py,
merge_methods/generalized_task_arithmetic.py, linear.py, slerp.py, model_stock.py, registry.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.merge.methods import (
    METHODS,
    Sparsify,
    TensorInputs,
    della_rank_norm,
    generalized_task_arithmetic,
    get_method,
    keep_mask,
    linear,
    model_stock,
    register,
    slerp,
    tensor_seed,
)

F64 = torch.float64


def t64(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def as_f64(mask: torch.Tensor) -> torch.Tensor:
    """A keep-mask (bool or 0/1 float) as float64 0/1."""
    return mask.to(F64)


def gta_shared(method: str, **overrides) -> dict:
    """The shared parameters a recipe resolves to: the method's defaults, then overrides."""
    shared = {p.name: p.default for p in METHODS[method].params if p.scope == "shared"}
    shared.update(overrides)
    return shared


def call(method: str, inputs: TensorInputs, shared: dict, per_source: list[dict], out=None):
    return METHODS[method].fn(inputs, shared, per_source, out)


def mask_of(delta: torch.Tensor, method: str, density: float, **extra) -> torch.Tensor:
    """The keep-mask (bool) a sparsifier draws for ``delta`` over a zero base."""
    inputs = TensorInputs("w", torch.zeros_like(delta), [delta])
    return keep_mask(inputs, 0, Sparsify(method, density, **extra))


# ============================================================================================
# Registry
# ============================================================================================

ISSUE_METHODS = {
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "della", "della_linear",
    "breadcrumbs", "breadcrumbs_ties", "slerp", "model_stock",
}


def test_every_method_of_the_issue_is_registered():
    assert ISSUE_METHODS <= set(METHODS)
    for name in ISSUE_METHODS:
        assert get_method(name) is METHODS[name]
        assert METHODS[name].name == name


def test_get_method_of_an_unknown_name_raises_keyerror_listing_known_names():
    with pytest.raises(KeyError) as info:
        get_method("tie")
    message = str(info.value)
    assert "'tie'" in message
    for name in ISSUE_METHODS:
        assert name in message


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register(METHODS["ties"])


# Defaults copied by hand from mergekit 0.1.5 merge_methods/registry.py:
# (normalize, rescale) for each generalized-task-arithmetic method.
MERGEKIT_GTA_DEFAULTS = {
    "task_arithmetic": (False, False),
    "ties": (True, False),
    "dare_ties": (False, True),
    "dare_linear": (False, True),
    "breadcrumbs": (False, False),
    "breadcrumbs_ties": (False, False),
    "della": (True, True),
    "della_linear": (False, True),
}


@pytest.mark.parametrize("name", sorted(MERGEKIT_GTA_DEFAULTS))
def test_task_vector_methods_have_mergekit_parameters_and_defaults(name):
    method = METHODS[name]
    normalize, rescale = MERGEKIT_GTA_DEFAULTS[name]
    params = {p.name: p for p in method.params}
    assert params["normalize"].default is normalize and params["normalize"].scope == "shared"
    assert params["rescale"].default is rescale and params["rescale"].scope == "shared"
    assert params["int8_mask"].default is False
    assert params["lambda"].default == 1.0 and params["lambda"].scope == "shared"
    assert params["weight"].required and params["weight"].scope == "source"
    assert params["density"].default == 1.0 and params["density"].scope == "source"
    # gamma only for breadcrumbs (magnitude_outliers), epsilon only for della (della_magprune)
    assert ("gamma" in params) == name.startswith("breadcrumbs")
    assert ("epsilon" in params) == name.startswith("della")
    if "gamma" in params:
        assert params["gamma"].default == 0.01
    if "epsilon" in params:
        assert params["epsilon"].default == 0.15
    assert method.base == "required"


def test_input_contracts_match_mergekit():
    assert METHODS["linear"].base == "optional"
    assert METHODS["linear"].param("normalize").default is True
    assert METHODS["linear"].param("weight").required
    slerp_method = METHODS["slerp"]
    assert (slerp_method.base, slerp_method.min_inputs, slerp_method.max_inputs) == ("required", 2, 2)
    assert slerp_method.param("t").required
    stock = METHODS["model_stock"]
    assert (stock.base, stock.min_inputs, stock.max_inputs) == ("required", 3, None)
    assert stock.param("filter_wise").default is False


# ============================================================================================
# tensor_seed and TensorInputs
# ============================================================================================


def test_tensor_seed_is_stable_across_processes_and_versions():
    # Golden values: changing them silently changes every DARE/DELLA mask of every stored recipe.
    assert tensor_seed(0, "model.layers.0.mlp.up_proj.weight", 0) == 8585380405802286720
    assert tensor_seed(42, "a", 1) == 2496816683344813660
    assert tensor_seed(42, "a", 1) == tensor_seed(42, "a", 1)


def test_tensor_seed_is_distinct_per_seed_tensor_and_source_and_fits_63_bits():
    seeds = {
        tensor_seed(s, name, k)
        for s in (0, 1, 2)
        for name in ("a", "b", "ab", "model.layers.1.self_attn.q_proj.weight")
        for k in (0, 1, 2)
    }
    assert len(seeds) == 3 * 4 * 3
    assert all(0 <= s < 2**63 for s in seeds)
    # no naive concatenation collision: ("a", 11) vs ("a1", 1)
    assert tensor_seed(0, "a", 11) != tensor_seed(0, "a1", 1)


def test_tensor_inputs_keeps_only_small_statistics_across_calls():
    base = t64(1, 1, 1)
    stats: dict = {}
    inputs = TensorInputs("w", base, [t64(3, 0, 1)], stats=stats)
    assert inputs.abs_sum(0) == 3.0  # |3-1| + |0-1| + |1-1|
    assert list(stats.values()) == [3.0]  # one float per (tensor, source), nothing tensor-sized
    stats[next(iter(stats))] = 10.0  # a kept statistic is what later calls read
    assert TensorInputs("w", base, [t64(3, 0, 1)], stats=stats).abs_sum(0) == 10.0


def test_chunked_deltas_are_exact_in_the_work_dtype():
    # bf16 inputs: the difference is formed in float32, where it is exact
    base = torch.tensor([1.0, 256.0], dtype=torch.bfloat16)
    src = torch.tensor([1.0078125, 258.0], dtype=torch.bfloat16)
    inputs = TensorInputs("w", base, [src])
    b = inputs.base_chunk(0, 2)
    assert b.dtype == torch.float32
    assert inputs.delta(0, 0, 2, b).tolist() == [0.0078125, 2.0]


# ============================================================================================
# linear
# ============================================================================================


def test_linear_normalized_and_unnormalized_by_hand():
    a, b = t64(1, 2, 3), t64(3, 6, -3)
    # 1*a + 3*b = (1+9, 2+18, 3-9) = (10, 20, -6); / (1+3) = (2.5, 5, -1.5)
    assert torch.equal(linear([a, b], [1.0, 3.0]), t64(2.5, 5, -1.5))
    assert torch.equal(linear([a, b], [1.0, 3.0], normalize=False), t64(10, 20, -6))


def test_linear_one_hot_weight_returns_that_tensor_exactly():
    a = torch.tensor([0.1, 1 / 3, 7.7, -1e-8], dtype=torch.float32)
    b = torch.tensor([1e30, -2.5, 1 / 7, 3e-5], dtype=torch.float32)
    assert torch.equal(linear([a, b], [0.0, 1.0]), b)
    assert torch.equal(linear([a, b], [1.0, 0.0]), a)
    ab, bb = a.to(torch.bfloat16), b.to(torch.bfloat16)
    assert torch.equal(linear([ab, bb], [0.0, 1.0]), bb)


def test_linear_keeps_bfloat16():
    a = torch.tensor([1, 2, 3], dtype=torch.bfloat16)
    b = torch.tensor([3, 6, -3], dtype=torch.bfloat16)
    out = linear([a, b], [1.0, 1.0])
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.tensor([2, 4, 0], dtype=torch.bfloat16))  # ((1+3)/2, (2+6)/2, 0)


def test_linear_rejects_integer_tensors():
    with pytest.raises(TypeError):
        linear([torch.tensor([1, 2]), torch.tensor([3, 4])], [0.5, 0.5])


def test_linear_via_registry_writes_into_preallocated_out():
    a, b = t64(1, 2, 3), t64(3, 6, -3)
    out = torch.full((3,), float("nan"), dtype=F64)
    inputs = TensorInputs("w", None, [a, b])
    result = call("linear", inputs, {"normalize": True}, [{"weight": 1.0}, {"weight": 3.0}], out)
    assert result is out
    assert torch.equal(out, t64(2.5, 5, -1.5))


def test_linear_via_registry_writes_bfloat16_out_from_float32_sources():
    a = torch.tensor([1.0, 2.0], dtype=torch.float32)
    b = torch.tensor([3.0, 4.0], dtype=torch.float32)
    out = torch.zeros(2, dtype=torch.bfloat16)
    result = call("linear", TensorInputs("w", None, [a, b]), {"normalize": False},
                  [{"weight": 0.5}, {"weight": 0.5}], out)
    assert result is out and out.dtype == torch.bfloat16
    assert torch.equal(out, torch.tensor([2.0, 3.0], dtype=torch.bfloat16))


# ============================================================================================
# task_arithmetic
# ============================================================================================

TA_BASE = t64(1, 1, 1, 1)
TA_SOURCES = [t64(2, 0, 1, 3), t64(1, 3, 0, 1)]  # deltas (1, -1, 0, 2) and (0, 2, -1, 0)


def ta(weights, lambda_=1.0, normalize=False, out=None):
    return call("task_arithmetic", TensorInputs("w", TA_BASE, TA_SOURCES),
                gta_shared("task_arithmetic", normalize=normalize, **{"lambda": lambda_}),
                [{"weight": w, "density": 1.0} for w in weights], out)


def test_task_arithmetic_by_hand():
    # 0.5*(1,-1,0,2) + 2*(0,2,-1,0) = (0.5, 3.5, -2, 1); + base 1 = (1.5, 4.5, -1, 2)
    assert torch.equal(ta([0.5, 2.0]), t64(1.5, 4.5, -1, 2))
    # lambda 2: 1 + 2*(0.5, 3.5, -2, 1) = (2, 8, -3, 3)
    assert torch.equal(ta([0.5, 2.0], lambda_=2.0), t64(2, 8, -3, 3))


def test_task_arithmetic_normalize_divides_by_the_sum_of_weights():
    # (0.5, 3.5, -2, 1) / 2.5 = (0.2, 1.4, -0.8, 0.4); + 1 = (1.2, 2.4, 0.2, 1.4)
    assert torch.allclose(ta([0.5, 2.0], normalize=True), t64(1.2, 2.4, 0.2, 1.4), atol=1e-14)
    # weights summing to 0: divisor -> 1: 1 + (1,-1,0,2) - (0,2,-1,0) = (2, -2, 2, 3)
    assert torch.equal(ta([1.0, -1.0], normalize=True), t64(2, -2, 2, 3))


def test_task_arithmetic_lambda_zero_returns_base_exactly():
    base = torch.tensor([0.1, -3.3, 1e-20, 7.0], dtype=torch.float32)
    sources = [torch.tensor([5.5, 1.0, -2.0, 0.3]), torch.tensor([1e3, 2.0, 0.0, 1.0])]
    result = call("task_arithmetic", TensorInputs("w", base, sources),
                  gta_shared("task_arithmetic", **{"lambda": 0.0}),
                  [{"weight": 0.7, "density": 1.0}, {"weight": 0.3, "density": 1.0}])
    assert torch.equal(result, base)


def test_task_arithmetic_without_sources_returns_base():
    base = t64(1, 2)
    assert torch.equal(generalized_task_arithmetic(
        TensorInputs("w", base, []), weights=[], densities=[], sparsify=None, consensus=False,
        normalize=False, rescale=False), base)


def test_task_arithmetic_writes_into_out():
    out = torch.empty(4, dtype=F64)
    result = ta([0.5, 2.0], out=out)
    assert result is out and torch.equal(out, t64(1.5, 4.5, -1, 2))


# ============================================================================================
# ties
# ============================================================================================

TIES_BASE = t64(10, 10, 10, 10)
TIES_DELTAS = [t64(3, -1, 2, -0.5), t64(-2, 4, -1, 0.25), t64(1, -3, 0.5, 1.5)]


def ties(weights, densities, normalize=True, int8_mask=False, out=None, deltas=TIES_DELTAS):
    sources = [TIES_BASE + d for d in deltas]
    return call("ties", TensorInputs("w", TIES_BASE, sources),
                gta_shared("ties", normalize=normalize, int8_mask=int8_mask),
                [{"weight": w, "density": d} for w, d in zip(weights, densities)], out)


def test_ties_by_hand():
    # trim (k = int(density * 4), largest |delta| kept):
    #   d1 (3,-1,2,-0.5),  density 0.5  -> k=2: (3, 0, 2, 0)
    #   d2 (-2,4,-1,0.25), density 0.5  -> k=2: (-2, 4, 0, 0)
    #   d3 (1,-3,0.5,1.5), density 0.75 -> k=3: (1, -3, 0, 1.5)
    # weighted, w = (1, 1, 2): u1 (3,0,2,0), u2 (-2,4,0,0), u3 (2,-6,0,3)
    # elect: sums (3, -2, 2, 3) -> signs (+, -, +, +)
    # agreeing: pos0 u1,u3 -> 5 / (1+2); pos1 u3 -> -6 / 2; pos2 u1 -> 2 / 1; pos3 u3 -> 3 / 2
    expected = TIES_BASE + t64(5 / 3, -3, 2, 1.5)
    assert torch.allclose(ties([1, 1, 2], [0.5, 0.5, 0.75]), expected, atol=1e-14)
    # without normalize: base + (5, -6, 2, 3)
    assert torch.equal(ties([1, 1, 2], [0.5, 0.5, 0.75], normalize=False),
                       TIES_BASE + t64(5, -6, 2, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_ties_by_hand_in_checkpoint_dtypes(dtype):
    # the same example as above, without normalize (every value is exact in bf16/fp16):
    # 10 + (5, -6, 2, 3) = (15, 4, 12, 13)
    base = TIES_BASE.to(dtype)
    inputs = TensorInputs("w", base, [(TIES_BASE + d).to(dtype) for d in TIES_DELTAS])
    result = call("ties", inputs, gta_shared("ties", normalize=False),
                  [{"weight": w, "density": d} for w, d in zip([1, 1, 2], [0.5, 0.5, 0.75])])
    assert result.dtype == dtype
    assert torch.equal(result, torch.tensor([15, 4, 12, 13], dtype=dtype))


def test_ties_int8_mask_changes_nothing_but_storage():
    assert torch.allclose(ties([1, 1, 2], [0.5, 0.5, 0.75], int8_mask=True),
                          TIES_BASE + t64(5 / 3, -3, 2, 1.5), atol=1e-14)


def test_ties_zero_sum_election_counts_as_positive_and_empty_divisor_is_one():
    deltas = [t64(2, 0, 1, -1), t64(-2, 0, 1, 3)]
    # pos0: 2 + (-2) = 0 -> elected + -> only source 1 agrees: 2 / 1 = 2
    # pos1: every delta 0 -> nobody agrees (sign 0), divisor 0 -> 1: 0 / 1 = 0 (not NaN)
    # pos2: both +: (1 + 1) / 2 = 1
    # pos3: -1 + 3 = 2 -> +: only source 2: 3 / 1 = 3
    result = ties([1, 1], [1, 1], deltas=deltas)
    assert torch.equal(result, TIES_BASE + t64(2, 0, 1, 3))


def test_ties_via_function_and_out():
    out = torch.zeros(4, dtype=F64)
    result = ties([1, 1, 2], [0.5, 0.5, 0.75], out=out)
    assert result is out
    assert torch.allclose(out, TIES_BASE + t64(5 / 3, -3, 2, 1.5), atol=1e-14)
    pure = generalized_task_arithmetic(
        TensorInputs("w", TIES_BASE, [TIES_BASE + d for d in TIES_DELTAS]),
        weights=[1, 1, 2], densities=[0.5, 0.5, 0.75], sparsify="magnitude", consensus=True,
        normalize=True, rescale=False)
    assert torch.allclose(pure, TIES_BASE + t64(5 / 3, -3, 2, 1.5), atol=1e-14)


def test_magnitude_mask_keeps_at_least_one_entry():
    # int(0.1 * 4) = 0 -> max(1, 0) = 1: only the largest |delta| (-4) survives
    assert torch.equal(as_f64(mask_of(t64(1, -4, 2, 3), "magnitude", 0.1)), t64(0, 1, 0, 0))


def test_ties_density_zero_drops_every_task_vector():
    assert torch.equal(ties([1, 1, 2], [0.0, 0.0, 0.0]), TIES_BASE)


# ============================================================================================
# DARE (dare_linear, dare_ties)
# ============================================================================================

# One non-consensus kernel per sparsifier: with a zero base, one source of weight w and
# normalize off, the merge is exactly w * (rescaled) sparsified delta.
SPARSIFIER_METHOD = {"random": "dare_linear", "della_magprune": "della_linear",
                     "magnitude_outliers": "breadcrumbs", "magnitude": "ties"}


def sparsify_via(kind: str, delta: torch.Tensor, density: float, rescale: bool, *, seed=0,
                 name="w", weights=(1.0,), **extra) -> torch.Tensor:
    """Merged task vector of ``len(weights)`` copies of ``delta`` over a zero base."""
    method = SPARSIFIER_METHOD[kind]
    base = torch.zeros_like(delta)
    inputs = TensorInputs(name, base, [delta.clone() for _ in weights], seed=seed)
    shared = gta_shared(method, normalize=False, rescale=rescale)
    per = [{"weight": w, "density": density, **extra} for w in weights]
    return call(method, inputs, shared, per) - base


def _big_inputs(name="model.layers.0.mlp.down_proj.weight", seed=7, n=4000, sources=1):
    gen = torch.Generator().manual_seed(1234)
    base = torch.randn(n, generator=gen, dtype=F64)
    srcs = [base + torch.randn(n, generator=gen, dtype=F64) for _ in range(sources)]
    return TensorInputs(name, base, srcs, seed=seed)


def _sparse_merge(name, inputs, density=0.5, **shared):
    per = [{"weight": 1.0, "density": density} for _ in inputs.sources]
    return call(name, inputs, gta_shared(name, **shared), per)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_masks_are_deterministic_per_seed_and_tensor(name):
    a = _sparse_merge(name, _big_inputs())
    b = _sparse_merge(name, _big_inputs())  # fresh inputs, fresh cache, same seed and name
    assert torch.equal(a, b)
    assert not torch.equal(a, _sparse_merge(name, _big_inputs(name="model.layers.1.mlp.down_proj.weight")))
    assert not torch.equal(a, _sparse_merge(name, _big_inputs(seed=8)))


def test_dare_masks_differ_between_sources_of_one_tensor():
    ones = torch.ones(1000, dtype=F64)
    # two identical sources; weights (1, 0) shows source 0's mask, (0, 1) source 1's
    kept0 = sparsify_via("random", ones, 0.5, False, seed=3, weights=(1.0, 0.0)) != 0
    kept1 = sparsify_via("random", ones, 0.5, False, seed=3, weights=(0.0, 1.0)) != 0
    assert not torch.equal(kept0, kept1)
    # and each is the same draw it would be alone: source 0's mask does not depend on source 1
    assert torch.equal(kept0, sparsify_via("random", ones, 0.5, False, seed=3) != 0)


def test_dare_keeps_a_density_fraction():
    n, density = 1_000_000, 0.3
    kept = (sparsify_via("random", torch.ones(n), density, False, seed=11) != 0).sum().item()
    # Binomial(n, p): mean n p = 300000, sd sqrt(n p (1-p)) = sqrt(210000) ~ 458.3
    assert abs(kept - n * density) < 4 * math.sqrt(n * density * (1 - density))


def test_dare_rescale_restores_the_l1_norm_not_one_over_density():
    n = 1000
    merged = sparsify_via("random", torch.ones(n, dtype=F64), 0.3, True, seed=5)
    kept = int((merged != 0).sum())
    # delta = ones: L1 = n; kept entries are scaled by n / kept (mergekit since Feb 2025),
    # not by the paper's 1 / density
    assert kept != 300  # (this seed; otherwise the two rules would coincide)
    assert torch.allclose(merged[merged != 0], torch.full((kept,), n / kept, dtype=F64),
                          rtol=1e-12)


def test_dare_without_rescale_keeps_entries_unchanged():
    delta = torch.arange(1, 1001, dtype=F64)
    merged = sparsify_via("random", delta, 0.5, False, seed=5)
    kept = merged != 0
    assert torch.equal(merged[kept], delta[kept])


@pytest.mark.parametrize("kind,extra", [("random", {}), ("della_magprune", {"epsilon": 0.1}),
                                        ("magnitude", {}),
                                        ("magnitude_outliers", {"gamma": 0.05})])
def test_rescale_preserves_the_l1_norm_of_each_delta(kind, extra):
    inputs = _big_inputs(n=2000)
    delta = inputs.sources[0] - inputs.base
    merged = sparsify_via(kind, delta, 0.4, True, **extra)
    assert (merged == 0).sum() > 1000  # 60% dropped (about, for the random kinds)
    assert torch.allclose(merged.abs().sum(), delta.abs().sum(), rtol=1e-12)
    # one common factor on every kept entry
    ratio = merged[merged != 0] / delta[merged != 0]
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio), rtol=1e-12)


def test_dare_linear_rescaled_merge_keeps_the_task_vector_l1_norm():
    inputs = _big_inputs(n=2000)
    merged = _sparse_merge("dare_linear", inputs, density=0.25)
    l1 = (inputs.sources[0] - inputs.base).abs().sum()
    assert torch.allclose((merged - inputs.base).abs().sum(), l1, rtol=1e-12)


def test_density_one_dare_equals_task_arithmetic_and_ties():
    inputs = _big_inputs(n=500, sources=3)
    per = [{"weight": w, "density": 1.0} for w in (0.3, -0.5, 1.2)]
    ta_result = call("task_arithmetic", inputs, gta_shared("task_arithmetic"), per)
    assert torch.allclose(call("dare_linear", inputs, gta_shared("dare_linear"), per), ta_result,
                          atol=1e-12)
    ties_result = call("ties", inputs, gta_shared("ties"), per)
    dare_ties = call("dare_ties", inputs, gta_shared("dare_ties", normalize=True), per)
    assert torch.allclose(dare_ties, ties_result, atol=1e-12)
    # and ties with density 1 really differs from plain task arithmetic (sign election acts)
    assert not torch.allclose(ties_result, ta_result)


# ============================================================================================
# DELLA (della, della_linear)
# ============================================================================================


def test_della_rank_is_per_row_and_normalised_to_unit_interval():
    # row 0 |.| = (1, 3, 2): ranks (0, 2, 1) / 2 = (0, 1, 0.5)
    # row 1 |.| = (30, 10, 20): ranks (2, 0, 1) / 2 = (1, 0, 0.5)
    assert torch.equal(della_rank_norm(t64(1, -3, 2, 30, 10, -20).reshape(2, 3)),
                       t64(0, 1, 0.5, 1, 0, 0.5).reshape(2, 3))
    # 1-D is one row: |.| = (5, 7, 1): ranks (1, 2, 0) / 2
    assert torch.equal(della_rank_norm(t64(5, -7, 1)), t64(0.5, 1, 0))


def test_della_keep_probability_ramps_with_magnitude_rank():
    n, m, density, epsilon = 100_000, 10_000, 0.5, 0.2
    gen = torch.Generator().manual_seed(0)
    magnitudes = (torch.randperm(n, generator=gen) + 1).to(F64)  # distinct, known ranks
    kept = sparsify_via("della_magprune", magnitudes[None], density, False, seed=9,
                        epsilon=epsilon)[0] != 0
    order = magnitudes.argsort()
    bottom, top = kept[order[:m]].double().mean(), kept[order[-m:]].double().mean()
    # p(rank r) = d - e + 2 e r / (n-1).
    # top m ranks: mean r/(n-1) = (n-1 - (m-1)/2)/(n-1) = 0.950005 -> p = 0.3 + 0.4*0.950005 = 0.680002
    # bottom m ranks: mean = ((m-1)/2)/(n-1) = 0.049995 -> p = 0.3 + 0.4*0.049995 = 0.319998
    # sd of a mean of m Bernoulli(0.68) = sqrt(0.68*0.32/1e4) = 0.00466; 4 sd < 0.019
    assert abs(top - 0.680002) < 0.019
    assert abs(bottom - 0.319998) < 0.019
    assert abs(kept.double().mean() - density) < 4 * math.sqrt(0.25 / n)


def test_della_ranks_within_each_row():
    # row 0 holds small magnitudes, row 1 large ones: ranking per row gives both rows the same
    # ramp, so row 1 is not kept more often than row 0 (a global rank would keep it at ~0.68)
    n = 20_000
    gen = torch.Generator().manual_seed(1)
    small = (torch.randperm(n, generator=gen) + 1).to(F64)
    delta = torch.stack([small, small + 1e6])
    kept = sparsify_via("della_magprune", delta, 0.5, False, seed=2, epsilon=0.2) != 0
    # each row: mean p = d - e + 2e * 0.5 = 0.5; sd of a row mean = sqrt(0.25/2e4) = 0.0035
    assert abs(kept[0].double().mean() - 0.5) < 0.015
    assert abs(kept[1].double().mean() - 0.5) < 0.015


@pytest.mark.parametrize("density,epsilon", [(0.9, 0.15), (0.1, 0.15), (0.5, 0.5)])
def test_della_rejects_density_epsilon_outside_the_unit_interval(density, epsilon):
    inputs = TensorInputs("w", torch.zeros(2, 3), [torch.ones(2, 3)])
    for name in ("della", "della_linear"):
        with pytest.raises(ValueError, match="epsilon"):
            call(name, inputs, gta_shared(name),
                 [{"weight": 1.0, "density": density, "epsilon": epsilon}])
    with pytest.raises(ValueError, match="epsilon"):
        mask_of(torch.ones(2, 3), "della_magprune", density, epsilon=epsilon)


def test_della_density_one_and_zero_skip_the_epsilon_check():
    # mergekit: density >= 1 returns the delta, density <= 0 returns zeros, before the check
    delta = t64(1, -2, 3)
    assert torch.equal(sparsify_via("della_magprune", delta, 1.0, True, epsilon=0.15), delta)
    assert torch.equal(sparsify_via("della_magprune", delta, 0.0, True, epsilon=0.15),
                       t64(0, 0, 0))


def test_della_rescale_keeps_l1_in_the_merge():
    inputs = _big_inputs(n=3000)
    l1 = (inputs.sources[0] - inputs.base).abs().sum()
    for name in ("della", "della_linear"):
        merged = call(name, inputs, gta_shared(name),
                      [{"weight": 1.0, "density": 0.4, "epsilon": 0.1}])
        assert torch.allclose((merged - inputs.base).abs().sum(), l1, rtol=1e-12)


# ============================================================================================
# Every task-vector method: writing into ``out``, dtypes
# ============================================================================================

GTA_METHODS = sorted(MERGEKIT_GTA_DEFAULTS)


def _per_source(name, n):
    extra = {"gamma": 0.1} if name.startswith("breadcrumbs") else {}
    extra |= {"epsilon": 0.1} if name.startswith("della") else {}
    return [{"weight": 0.5 + k, "density": 0.5, **extra} for k in range(n)]


@pytest.mark.parametrize("name", GTA_METHODS)
def test_task_vector_methods_write_into_out(name):
    inputs = _big_inputs(n=64, sources=2)
    expected = call(name, inputs, gta_shared(name), _per_source(name, 2))
    out = torch.full((64,), float("nan"), dtype=F64)
    result = call(name, _big_inputs(n=64, sources=2), gta_shared(name), _per_source(name, 2), out)
    assert result is out
    assert torch.equal(out, expected)
    # an out of another dtype receives the cast result
    out16 = torch.zeros(64, dtype=torch.bfloat16)
    result = call(name, _big_inputs(n=64, sources=2), gta_shared(name), _per_source(name, 2), out16)
    assert result is out16 and torch.equal(out16, expected.to(torch.bfloat16))


@pytest.mark.parametrize("name", GTA_METHODS)
def test_task_vector_methods_keep_bfloat16(name):
    inputs = _big_inputs(n=64, sources=2)
    low = TensorInputs("w", inputs.base.to(torch.bfloat16),
                       [s.to(torch.bfloat16) for s in inputs.sources], seed=inputs.seed)
    result = call(name, low, gta_shared(name), _per_source(name, 2))
    assert result.dtype == torch.bfloat16
    assert torch.isfinite(result).all()


# ============================================================================================
# breadcrumbs (breadcrumbs, breadcrumbs_ties)
# ============================================================================================

CRUMB_DELTA = t64(-3, 7, 1, -10, 5, 2, -8, 4, 6, -9)  # |.| = a permutation of 1..10


def test_breadcrumbs_mask_by_hand():
    # n = 10, density 0.5, gamma 0.1: target = 5, top = 1, bottom = 10 - 5 - 1 = 4
    # drop |.| in {1,2,3,4} and {10}; keep {5,6,7,8,9}
    mask = mask_of(CRUMB_DELTA, "magnitude_outliers", 0.5, gamma=0.1)
    assert torch.equal(CRUMB_DELTA * mask, t64(0, 7, 0, 0, 5, 0, -8, 0, 6, -9))


def test_breadcrumbs_outlier_removal_shrinks_to_reach_density():
    # density 0.95 -> target int(9.5) = 9; gamma 0.2 -> top 2; bottom = max(0, 10-9-2) = 0
    # kept ascending ranks [0, 9): only the largest (|-10|) is dropped
    mask = mask_of(CRUMB_DELTA, "magnitude_outliers", 0.95, gamma=0.2)
    assert torch.equal(as_f64(mask), t64(1, 1, 1, 0, 1, 1, 1, 1, 1, 1))
    # density 0 keeps nothing
    assert torch.equal(as_f64(mask_of(CRUMB_DELTA, "magnitude_outliers", 0.0, gamma=0.1)),
                       torch.zeros(10, dtype=F64))


def test_breadcrumbs_method_by_hand():
    base = torch.ones(10, dtype=F64)
    inputs = TensorInputs("w", base, [base + CRUMB_DELTA])
    result = call("breadcrumbs", inputs, gta_shared("breadcrumbs"),
                  [{"weight": 2.0, "density": 0.5, "gamma": 0.1}])
    # not normalized (mergekit default): 1 + 2 * (0,7,0,0,5,0,-8,0,6,-9)
    assert torch.equal(result, base + t64(0, 14, 0, 0, 10, 0, -16, 0, 12, -18))


def test_breadcrumbs_ties_by_hand():
    base = torch.ones(10, dtype=F64)
    inputs = TensorInputs("w", base, [base + CRUMB_DELTA, base - CRUMB_DELTA])
    result = call("breadcrumbs_ties", inputs, gta_shared("breadcrumbs_ties"),
                  [{"weight": 1.0, "density": 0.5, "gamma": 0.1},
                   {"weight": 2.0, "density": 0.5, "gamma": 0.1}])
    # both keep |.| in {5..9}: u1 = kept, u2 = -2 * kept; sum = -kept -> the second wins
    # everywhere; not normalized: base - 2 * kept
    assert torch.equal(result, base - 2 * t64(0, 7, 0, 0, 5, 0, -8, 0, 6, -9))
    # normalized: -2 kept / 2 = -kept
    normalized = call("breadcrumbs_ties", inputs, gta_shared("breadcrumbs_ties", normalize=True),
                      [{"weight": 1.0, "density": 0.5, "gamma": 0.1},
                       {"weight": 2.0, "density": 0.5, "gamma": 0.1}])
    assert torch.equal(normalized, base - t64(0, 7, 0, 0, 5, 0, -8, 0, 6, -9))


# ============================================================================================
# slerp
# ============================================================================================


def test_slerp_endpoints():
    gen = torch.Generator().manual_seed(0)
    v0 = torch.randn(3, 4, generator=gen, dtype=F64)
    v1 = torch.randn(3, 4, generator=gen, dtype=F64)
    assert torch.allclose(slerp(0.0, v0, v1), v0, atol=1e-12)
    assert torch.allclose(slerp(1.0, v0, v1), v1, atol=1e-12)
    f32 = slerp(1.0, v0.float(), v1.float())
    assert f32.dtype == torch.float32 and torch.allclose(f32, v1.float(), atol=1e-5)


def test_slerp_orthogonal_unit_rows_by_hand():
    v0, v1 = t64(1, 0, 0)[None], t64(0, 1, 0)[None]
    # Omega = pi/2; coefficients sin(pi/4)/sin(pi/2) = 1/sqrt(2) each
    assert torch.allclose(slerp(0.5, v0, v1), (v0 + v1) / math.sqrt(2), atol=1e-15)
    # t = 1/3: (sin(pi/3), sin(pi/6)) = (sqrt(3)/2, 1/2)
    assert torch.allclose(slerp(1 / 3, v0, v1), t64(math.sqrt(3) / 2, 0.5, 0)[None], atol=1e-15)


def test_slerp_nearly_collinear_rows_fall_back_to_lerp():
    v0, v1 = t64(1, 0)[None], t64(1, 0.01)[None]
    # cos = 1/sqrt(1.0001) = 0.999950 > 0.9995 -> (1-t) v0 + t v1 = (1, 0.005)
    assert torch.equal(slerp(0.5, v0, v1), t64(1, 0.005)[None])
    # antipodal: |cos| = 1 -> lerp too: midpoint of (1, 2) and (-1, -2) is 0
    assert torch.equal(slerp(0.5, t64(1, 2)[None], t64(-1, -2)[None]), t64(0, 0)[None])


def test_slerp_takes_the_whole_tensor_as_one_vector():
    # mergekit 0.1.5's slerp kernel batches over *tensors* (TensorBatch is [output, *weight]), so
    # one Omega serves the whole flattened tensor; a row that is collinear on its own is not lerped.
    v0 = t64(1, 0, 1, 0).reshape(2, 2)
    v1 = t64(0, 1, 1, 0).reshape(2, 2)
    # flattened: |a| = |b| = sqrt(2), cos = 1/2 -> Omega = pi/3;
    # t = 0.5: sin(pi/6) / sin(pi/3) = (1/2) / (sqrt(3)/2) = 1/sqrt(3) for both -> (a + b)/sqrt(3)
    expected = t64(1, 1, 2, 0).reshape(2, 2) / math.sqrt(3)
    assert torch.allclose(slerp(0.5, v0, v1), expected, atol=1e-15)
    # (row by row, row 1 would have been lerped to (1, 0))


def test_slerp_of_a_vector_by_hand():
    # a = (1, 2), b = (3, -4): cos = (3 - 8) / (sqrt(5) * 5) = -1/sqrt(5)
    # t = 0.5: both coefficients sin(Omega/2)/sin(Omega) = 1 / (2 cos(Omega/2)),
    # cos(Omega/2) = sqrt((1 + cos) / 2)
    c = 1 / (2 * math.sqrt((1 - 1 / math.sqrt(5)) / 2))
    assert torch.allclose(slerp(0.5, t64(1, 2), t64(3, -4)), c * t64(4, -2), atol=1e-14)


def test_slerp_keeps_dtype_and_writes_out_via_registry():
    v0 = torch.tensor([[1.0, 0.0]], dtype=torch.bfloat16)
    v1 = torch.tensor([[0.0, 1.0]], dtype=torch.bfloat16)
    assert slerp(0.5, v0, v1).dtype == torch.bfloat16
    out = torch.zeros(1, 2, dtype=F64)
    result = call("slerp", TensorInputs("w", t64(1, 0)[None], [t64(0, 1)[None]]), {"t": 0.5}, [{}],
                  out)
    assert result is out
    assert torch.allclose(out, t64(1, 1)[None] / math.sqrt(2), atol=1e-15)


# ============================================================================================
# model_stock
# ============================================================================================


def test_model_stock_by_hand():
    base = t64(1, 2)
    # offsets o1 = (1, 0), o2 = (3, 4): cos = 3 / (1 * 5) = 0.6
    # N = 2: t = 2 * 0.6 / (1 + 0.6) = 0.75
    # mean of sources = ((2+4)/2, (2+6)/2) = (3, 4)
    # 0.75 * (3, 4) + 0.25 * (1, 2) = (2.5, 3.5)
    sources = [t64(2, 2), t64(4, 6)]
    assert torch.allclose(model_stock(base, sources), t64(2.5, 3.5), atol=1e-14)
    out = torch.zeros(2, dtype=F64)
    result = call("model_stock", TensorInputs("w", base, sources), {"filter_wise": False}, [{}, {}],
                  out)
    assert result is out and torch.allclose(out, t64(2.5, 3.5), atol=1e-14)


def test_model_stock_filter_wise_gives_each_row_its_own_ratio():
    base = t64(1, 2, 5, 5).reshape(2, 2)
    sources = [t64(2, 2, 6, 5).reshape(2, 2), t64(4, 6, 5, 6).reshape(2, 2)]
    # row 0: as above, t = 0.75 -> (2.5, 3.5)
    # row 1: offsets (1, 0), (0, 1): cos = 0 -> t = 0 -> base row (5, 5)
    expected = t64(2.5, 3.5, 5, 5).reshape(2, 2)
    assert torch.allclose(model_stock(base, sources, filter_wise=True), expected, atol=1e-14)
    # one ratio for the whole tensor gives a different answer
    assert not torch.allclose(model_stock(base, sources, filter_wise=False), expected)


def test_model_stock_singular_case_keeps_the_base():
    base = t64(1, 2, 3)
    # opposite offsets: cos = -1, 1 + (2-1)(-1) = 0 -> keep the base
    sources = [base + t64(1, 0, 0), base - t64(1, 0, 0)]
    assert torch.equal(model_stock(base, sources), base)


def test_model_stock_three_sources():
    base = t64(0, 0, 0)
    # offsets are the three unit axes: all pairwise cos = 0 -> t = 0 -> base
    sources = [t64(1, 0, 0), t64(0, 1, 0), t64(0, 0, 1)]
    assert torch.equal(model_stock(base, sources), base)
    # three equal offsets: cos = 1 -> t = 3 / (1 + 2) = 1 -> the mean (the common point)
    same = [t64(1, 2, 3)] * 3
    assert torch.allclose(model_stock(base, same), t64(1, 2, 3), atol=1e-14)


# ============================================================================================
# Cross-check against mergekit 0.1.5's own kernels (deterministic methods)
# ============================================================================================


@pytest.fixture(scope="module")
def mergekit_methods():
    registry = pytest.importorskip("mergekit.merge_methods.registry")
    base = pytest.importorskip("mergekit.merge_methods.base")
    return registry, base


def _random_case(shape=(4, 6), sources=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=gen, dtype=F64)
    return base, [base + torch.randn(*shape, generator=gen, dtype=F64) for _ in range(sources)]


CROSS_CASES = [
    ("task_arithmetic", {"lambda": 0.8}, {"weight": [0.5, -0.3, 1.2]}),
    ("task_arithmetic", {"normalize": True}, {"weight": [0.5, 0.3, 1.2]}),
    ("ties", {}, {"weight": [1.0, 0.5, 2.0], "density": [0.5, 0.3, 0.7]}),
    ("ties", {"normalize": False, "lambda": 1.5}, {"weight": [1.0, 0.5, 2.0],
                                                    "density": [0.5, 0.3, 0.7]}),
    ("ties", {"rescale": True}, {"weight": [1.0, 0.5, 2.0], "density": [0.5, 0.3, 0.7]}),
    ("breadcrumbs", {}, {"weight": [1.0, 0.5, 2.0], "density": [0.5, 0.8, 0.6],
                         "gamma": [0.1, 0.05, 0.2]}),
    ("breadcrumbs_ties", {"normalize": True}, {"weight": [1.0, 0.5, 2.0],
                                              "density": [0.5, 0.8, 0.6],
                                              "gamma": [0.1, 0.05, 0.2]}),
]


@pytest.mark.parametrize("name,shared,per", CROSS_CASES)
def test_task_vector_methods_agree_with_mergekit(mergekit_methods, name, shared, per):
    registry, mk = mergekit_methods
    base, sources = _random_case()
    group = mk.TensorGroup.from_tensors([base] + sources, base_index=0, name="w")
    expected = registry.get(name)([group], parameters={**shared, **per})[0]
    per_source = [{k: v[i] for k, v in per.items()} for i in range(len(sources))]
    for p in METHODS[name].params:  # defaults for what the case leaves out
        if p.scope == "source":
            for d in per_source:
                d.setdefault(p.name, p.default)
    got = call(name, TensorInputs("w", base, sources), gta_shared(name, **shared), per_source)
    assert torch.allclose(got, expected, atol=1e-12)


def test_linear_agrees_with_mergekit(mergekit_methods):
    registry, mk = mergekit_methods
    _, sources = _random_case()
    for normalize in (True, False):
        expected = registry.get("linear")([mk.TensorGroup.from_tensors(sources)],
                                          parameters={"weight": [1.0, 2.0, 0.5],
                                                      "normalize": normalize})[0]
        got = call("linear", TensorInputs("w", None, sources), {"normalize": normalize},
                   [{"weight": w} for w in (1.0, 2.0, 0.5)])
        assert torch.allclose(got, expected, atol=1e-12)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_agrees_with_mergekit(mergekit_methods, t):
    registry, mk = mergekit_methods
    base, (other,) = _random_case(shape=(5, 7), sources=1)
    other[1] = 3 * base[1]  # a collinear row does not make the tensor collinear
    for v1 in (other, 3 * base):  # ... but a collinear tensor is lerped
        group = mk.TensorGroup.from_tensors([base, v1], base_index=0, name="w")
        expected = registry.get("slerp")([group], parameters={"t": t})[0]
        got = call("slerp", TensorInputs("w", base, [v1]), {"t": t}, [{}])
        assert torch.allclose(got, expected, atol=1e-12)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_agrees_with_mergekit(mergekit_methods, filter_wise):
    registry, mk = mergekit_methods
    base, sources = _random_case()
    group = mk.TensorGroup.from_tensors([base] + sources, base_index=0, name="w")
    expected = registry.get("model_stock")([group], parameters={"filter_wise": filter_wise})[0]
    got = call("model_stock", TensorInputs("w", base, sources), {"filter_wise": filter_wise},
               [{}, {}, {}])
    assert torch.allclose(got, expected, atol=1e-12)


# ============================================================================================
# Exactly k, precision and chunking (the real-scale engine's contract)
# ============================================================================================


def _stable_rank_mask(a: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Oracle: keep stable ascending ranks [lo, hi) of ``a`` (ties ordered by flat index)."""
    order = torch.sort(a.reshape(-1).double(), stable=True).indices
    keep = torch.zeros(a.numel(), dtype=torch.bool)
    keep[order[lo:hi]] = True
    return keep.reshape(a.shape)


def _tied(n: int, seed: int = 0, dtype=torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """base, source in ``dtype`` whose |delta| takes few distinct values: heavy ties."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(-4, 5, (n,), generator=gen).to(dtype)
    src = base + torch.randint(-3, 4, (n,), generator=gen).to(dtype) * 0.25
    return base, src.to(dtype)


@pytest.mark.parametrize("chunk", [7, 100, 5000])
@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("density", [0.05, 0.37, 0.5, 0.99])
def test_magnitude_keeps_exactly_k_with_ties_broken_by_position(chunk, cache, density):
    n = 5000
    base, src = _tied(n)
    inputs = TensorInputs("w", base, [src], chunk=chunk, cache={} if cache else None)
    got = keep_mask(inputs, 0, Sparsify("magnitude", density))
    k = max(1, int(density * n))
    assert int(got.sum()) == k  # mergekit's count, exactly (7 distinct |delta|: ties everywhere)
    assert torch.equal(got, _stable_rank_mask((src.float() - base.float()).abs(), n - k, n))


@pytest.mark.parametrize("chunk", [13, 5000])
@pytest.mark.parametrize("density,gamma", [(0.5, 0.1), (0.3, 0.2), (0.95, 0.2)])
def test_breadcrumbs_keeps_exactly_its_rank_window_with_ties(chunk, density, gamma):
    n = 5000
    base, src = _tied(n, seed=1)
    got = keep_mask(TensorInputs("w", base, [src], chunk=chunk), 0,
                    Sparsify("magnitude_outliers", density, gamma=gamma))
    target = int(density * n)
    n_bot = max(0, n - target - int(gamma * n))
    assert int(got.sum()) == target
    assert torch.equal(got, _stable_rank_mask((src.float() - base.float()).abs(), n_bot,
                                              n_bot + target))


def test_rank_selection_is_exact_even_when_the_sample_bracket_misses(monkeypatch):
    import evomerge.merge.methods as methods

    n = 20_000
    gen = torch.Generator().manual_seed(3)
    base, src = torch.zeros(n, dtype=F64), torch.randn(n, generator=gen, dtype=F64)
    # a sample from another distribution: every bracket it suggests is wrong
    monkeypatch.setattr(methods, "_sorted_sample",
                        lambda inputs, k, n: torch.linspace(10, 20, 4096, dtype=F64))
    got = keep_mask(TensorInputs("w", base, [src], chunk=1000), 0, Sparsify("magnitude", 0.3))
    assert torch.equal(got, _stable_rank_mask(src.abs(), n - 6000, n))


@pytest.mark.parametrize("name", sorted(MERGEKIT_GTA_DEFAULTS) + ["linear", "slerp",
                                                                  "model_stock"])
def test_results_do_not_depend_on_the_chunk_size(name, monkeypatch):
    import evomerge.merge.methods as methods

    monkeypatch.setattr(methods, "RNG_BLOCK", 256)  # several random blocks per tensor
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(40, 50, generator=gen).to(torch.bfloat16)
    sources = [(base.float() + 0.05 * torch.randn(40, 50, generator=gen)).to(torch.bfloat16)
               for _ in range(3)]
    shared = {p.name: p.default for p in METHODS[name].params if p.scope == "shared"}
    if name == "slerp":
        sources, shared, per = sources[:1], {"t": 0.3}, [{}]
    elif name == "model_stock":
        per = [{} for _ in sources]
    else:
        per = [{"weight": 0.7 + 0.2 * k, "density": 0.45, "gamma": 0.05, "epsilon": 0.1}
               for k in range(3)]
    results = [call(name, TensorInputs("model.w", base, sources, seed=3, chunk=chunk),
                    shared, per) for chunk in (50, 300, 1 << 20)]
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def _fp64_task_arithmetic(base, sources, weights):
    b = base.double()
    return b + sum(w * (s.double() - b) for w, s in zip(weights, sources))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_task_arithmetic_rounds_once_from_a_wide_accumulator(dtype):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(200_000, generator=gen).to(dtype)
    sources = [(base.double() + 0.01 * torch.randn(200_000, generator=gen, dtype=F64)).to(dtype)
               for _ in range(3)]
    weights = [0.7, 0.45, 0.3]
    got = call("task_arithmetic", TensorInputs("w", base, sources, chunk=30_000),
               gta_shared("task_arithmetic"), [{"weight": w, "density": 1.0} for w in weights])
    exact = _fp64_task_arithmetic(base, sources, weights).to(dtype)
    # the float64 result correctly rounded: mismatches only where it sits within float32
    # (resp. float64) rounding of a midpoint between two representable values
    assert (got != exact).double().mean() <= 1e-4
    if dtype != torch.float32:
        # what computing in the inputs' own dtype (mergekit) gets wrong, for contrast
        naive = base + sum(w * (s - base) for w, s in zip(weights, sources))
        assert (naive != exact).double().mean() > 0.005


def test_ties_at_bf16_matches_a_float64_reference_with_exact_k():
    gen = torch.Generator().manual_seed(2)
    n = 60_000
    base = torch.randn(n, generator=gen).to(torch.bfloat16)
    sources = [(base.double() + 0.02 * torch.randn(n, generator=gen, dtype=F64)).to(
        torch.bfloat16) for _ in range(3)]
    # dyadic weights: sums of weighted deltas are exact in float32 and float64 alike, so the
    # sign election (ill-conditioned where the sum is ~0) is decided identically
    weights, density = [1.0, 0.5, 0.75], 0.4
    got = call("ties", TensorInputs("w", base, sources, chunk=7000), gta_shared("ties"),
               [{"weight": w, "density": density} for w in weights])
    b = base.double()
    k = max(1, int(density * n))
    us = []
    for w, s in zip(weights, sources):
        d = s.double() - b
        us.append(w * d * _stable_rank_mask(d.abs(), n - k, n))
    total = sum(us)
    sign = torch.where(total >= 0, 1.0, -1.0).double()
    agree = [(torch.sign(u) == sign) for u in us]
    mixed = sum(u * a for u, a in zip(us, agree))
    divisor = sum(w * a.double() for w, a in zip(weights, agree))
    exact = (b + mixed / torch.where(divisor == 0, 1.0, divisor)).to(torch.bfloat16)
    assert (got != exact).double().mean() <= 1e-4


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_replayed_random_masks_equal_masks_drawn_again(name, monkeypatch):
    """With rescale, masks are drawn for the L1 factors and either replayed from bytes (tensor
    small enough) or drawn again in the merge pass: the same merge either way."""
    import evomerge.merge.methods as methods

    gen = torch.Generator().manual_seed(8)
    base = torch.randn(30, 40, generator=gen).to(torch.bfloat16)
    sources = [(base.float() + 0.05 * torch.randn(30, 40, generator=gen)).to(torch.bfloat16)
               for _ in range(2)]
    shared = {p.name: p.default for p in METHODS[name].params if p.scope == "shared"}
    shared["rescale"] = True
    per = [{"weight": 0.9, "density": 0.4, "epsilon": 0.1}, {"weight": 0.6, "density": 0.6,
                                                              "epsilon": 0.2}]
    replayed = call(name, TensorInputs("w", base, sources, seed=1, chunk=100), shared, per)
    monkeypatch.setattr(methods, "MASK_STORE", 0)
    drawn = call(name, TensorInputs("w", base, sources, seed=1, chunk=100), shared, per)
    assert torch.equal(replayed, drawn)


def test_della_ranks_along_dim_1_of_any_shape():
    """mergekit ranks |delta| along dim 1 (1-D: one row), also for tensors of 3 or more dims."""
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(3, 5, 4, generator=gen).abs()
    expected = a.argsort(dim=1, stable=True).argsort(dim=1)  # ranks of distinct values
    assert torch.equal(della_rank_norm(a), expected.double() / 4)
    for cache in (None, {}):
        inputs = TensorInputs("w", torch.zeros(3, 5, 4), [a], cache=cache)
        mask = keep_mask(inputs, 0, Sparsify("della_magprune", 0.5, epsilon=0.2))
        assert mask.shape == a.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_della_ranks_are_the_stable_order_with_ties(dtype):
    from evomerge.merge.methods import della_ranks

    gen = torch.Generator().manual_seed(6)
    a = torch.randint(0, 5, (7, 300), generator=gen).to(dtype) * 0.125  # ties everywhere
    stable = a.argsort(dim=1, stable=True).argsort(dim=1)
    assert torch.equal(della_ranks(a), stable)
    assert torch.equal(della_ranks(a[0]), a[0].argsort(stable=True).argsort())  # 1-D: one row
