"""``rescale`` rules of the sparsifying task-vector methods: ``l1`` (= ``true``, mergekit 0.1.5),
``inverse_p`` (the DARE paper: kept entries divided by their keep probability) and ``none``
(= ``false``).

Expected values are worked by hand or from the masks the same seed draws without rescaling
(the masks themselves are specified in tests/test_methods.py); mergekit 0.1.5's behaviour is
read from the installed package.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evomerge.merge import methods
from evomerge.merge.methods import (
    METHODS,
    Sparsify,
    TensorInputs,
    generalized_task_arithmetic,
    keep_mask,
    rescale_mode,
)
from evomerge.recipe import MergeRecipe, RecipeError

F64 = torch.float64


def merge(method: str, base: torch.Tensor, sources: list[torch.Tensor], per: list[dict],
          seed: int = 0, chunk: int = methods.DEFAULT_CHUNK, **shared) -> torch.Tensor:
    """One tensor merged by a registered method, its shared parameters the method's defaults
    plus ``shared``."""
    params = {p.name: p.default for p in METHODS[method].params if p.scope == "shared"}
    params.update(shared)
    inputs = TensorInputs("w", base, sources, seed=seed, chunk=chunk)
    return METHODS[method].fn(inputs, params, per, None)


def drawn_mask(delta: torch.Tensor, spec: Sparsify, seed: int = 0, k: int = 0,
               sources: int = 1) -> torch.Tensor:
    """Source k's keep-mask for ``delta`` over a zero base (the same draw every rule sees)."""
    inputs = TensorInputs("w", torch.zeros_like(delta), [delta] * sources, seed=seed)
    return keep_mask(inputs, k, spec)


# --------------------------------------------------------------------------------------------
# The rule a setting names
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,mode", [(True, "l1"), ("l1", "l1"), (False, "none"),
                                        ("none", "none"), ("inverse_p", "inverse_p")])
def test_rescale_settings_name_three_rules_and_booleans_keep_their_meaning(value, mode):
    assert rescale_mode(value) == mode


@pytest.mark.parametrize("value", ["maybe", 1, 0.5, None, "L1"])
def test_other_rescale_values_are_refused_naming_what_is_accepted(value):
    with pytest.raises(ValueError, match=r"expected true/false or one of l1, inverse_p, none"):
        rescale_mode(value)


# --------------------------------------------------------------------------------------------
# inverse_p: kept entries = delta / p
# --------------------------------------------------------------------------------------------


def test_dare_inverse_p_divides_each_kept_entry_by_the_density():
    delta = torch.arange(1, 2001, dtype=F64) * 0.5  # distinct, so a kept entry names itself
    zero = torch.zeros_like(delta)
    for density in (0.25, 0.3):
        kept = drawn_mask(delta, Sparsify("random", density))
        merged = merge("dare_linear", zero, [delta], [{"weight": 1.0, "density": density}],
                       rescale="inverse_p")
        assert torch.equal(merged[~kept], zero[~kept])
        if density == 0.25:  # 1 / 0.25 = 4 is exact: bit for bit
            assert torch.equal(merged[kept], delta[kept] * 4)
        else:  # delta * fl(1 / 0.3): within one float64 rounding of delta / 0.3
            torch.testing.assert_close(merged[kept], delta[kept] / 0.3, rtol=3e-16, atol=0)
        # the same mask the other rules draw (same seed): only the kept values differ
        unscaled = merge("dare_linear", zero, [delta], [{"weight": 1.0, "density": density}],
                         rescale=False)
        assert torch.equal(unscaled != 0, kept)


def test_della_inverse_p_divides_each_kept_entry_by_its_own_keep_probability():
    # One row of 5 |delta| ranks, density 0.5, epsilon 0.2: p = 0.3 + 0.4 * rank / 4.
    #   delta   0.1  -0.5   0.3   0.2  -0.4
    #   rank    0     4     2     1     3
    #   p       0.3   0.7   0.5   0.4   0.6
    row = [0.1, -0.5, 0.3, 0.2, -0.4]
    p_row = [0.3, 0.7, 0.5, 0.4, 0.6]
    # 40 rows: permutations of that row, so every row has the same ranks-to-p mapping
    gen = np.random.default_rng(3)
    perms = [gen.permutation(5) for _ in range(40)]
    delta = torch.tensor([[row[j] for j in perm] for perm in perms], dtype=F64)
    p = torch.tensor([[p_row[j] for j in perm] for perm in perms], dtype=F64)
    spec = Sparsify("della_magprune", 0.5, epsilon=0.2)
    kept = drawn_mask(delta, spec)
    assert 0 < int(kept.sum()) < kept.numel()
    zero = torch.zeros_like(delta)
    merged = merge("della_linear", zero, [delta],
                   [{"weight": 1.0, "density": 0.5, "epsilon": 0.2}], rescale="inverse_p")
    assert torch.equal(merged[~kept], zero[~kept])
    torch.testing.assert_close(merged[kept], delta[kept] / p[kept], rtol=5e-16, atol=0)


@pytest.mark.parametrize("method,extra", [("dare_linear", {}),
                                          ("della_linear", {"epsilon": 0.2})])
def test_inverse_p_is_unbiased_over_masks_where_l1_is_not_per_entry(method, extra):
    """E[kept / p] = delta entry by entry: the mean over many seeds' masks approaches delta.
    Var(kept / p) = delta^2 (1 - p) / p, so with S seeds the mean is within 4 sd of delta."""
    delta = torch.tensor([[0.1, -0.5, 0.3, 0.2, -0.4]], dtype=F64)
    p = torch.tensor([[0.3, 0.7, 0.5, 0.4, 0.6]], dtype=F64) if extra else torch.full_like(
        delta, 0.5)
    seeds = 1500
    zero = torch.zeros_like(delta)
    per = [{"weight": 1.0, "density": 0.5, **extra}]
    mean = sum(merge(method, zero, [delta], per, seed=s, rescale="inverse_p")
               for s in range(seeds)) / seeds
    sd = delta.abs() * torch.sqrt((1 - p) / p / seeds)
    assert bool(((mean - delta).abs() <= 4 * sd).all()), (mean, delta)


def test_dare_ties_inverse_p_elects_signs_on_the_rescaled_weighted_deltas():
    """u_k = w_k * m_k * delta_k / d_k; sign = sgn(sum u_k) (0 counts +); sum of the agreeing
    u_k (dare_ties: normalize off), worked in float64 from the drawn masks."""
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(300, generator=gen, dtype=F64)
    sources = [base + torch.randn(300, generator=gen, dtype=F64) for _ in range(2)]
    weights, densities = [0.7, 1.3], [0.4, 0.6]
    inputs = TensorInputs("w", base, sources, seed=5)
    us = [w * (s - base) * keep_mask(inputs, k, Sparsify("random", d)).to(F64) / d
          for k, (s, w, d) in enumerate(zip(sources, weights, densities))]
    total = us[0] + us[1]
    sign = torch.where(total >= 0, 1.0, -1.0).to(F64)
    expected = base + sum(u * (torch.sign(u) == sign) for u in us)
    per = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    got = merge("dare_ties", base, sources, per, seed=5, rescale="inverse_p")
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("method,sparsify", [("dare_ties", "random"), ("della", "della_magprune")])
def test_spelled_rules_merge_exactly_as_the_booleans_they_name(method, sparsify):
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(20, 30, generator=gen).to(torch.bfloat16)
    sources = [(base.float() + 0.05 * torch.randn(20, 30, generator=gen)).to(torch.bfloat16)
               for _ in range(2)]
    per = [{"weight": 0.9, "density": 0.4, "epsilon": 0.1},
           {"weight": 0.6, "density": 0.6, "epsilon": 0.2}]
    if sparsify == "random":
        per = [{k: v for k, v in p.items() if k != "epsilon"} for p in per]
    for spelled, boolean in (("l1", True), ("none", False)):
        assert torch.equal(merge(method, base, sources, per, rescale=spelled),
                           merge(method, base, sources, per, rescale=boolean))
    assert not torch.equal(merge(method, base, sources, per, rescale="inverse_p"),
                           merge(method, base, sources, per, rescale=True))


@pytest.mark.parametrize("method,chunk", [("dare_ties", 7), ("della", 30), ("della_linear", 60)])
def test_inverse_p_streams_the_same_merge_at_any_chunk_without_an_l1_pass(method, chunk,
                                                                        monkeypatch):
    """inverse_p scales inside the merge pass: no L1 factor pass, no mask store, and the
    block-seeded masks make every chunk size (DELLA: whole rows of 30) give the same bits."""
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(20, 30, generator=gen).to(torch.bfloat16)
    sources = [(base.float() + 0.05 * torch.randn(20, 30, generator=gen)).to(torch.bfloat16)
               for _ in range(2)]
    extra = {"epsilon": 0.1} if method.startswith("della") else {}
    per = [{"weight": 0.9, "density": 0.4, **extra}, {"weight": 0.6, "density": 0.6, **extra}]
    whole = merge(method, base, sources, per, rescale="inverse_p")

    def no_l1_pass(*args, **kwargs):
        raise AssertionError("inverse_p must not compute L1 rescale factors")

    monkeypatch.setattr(methods, "_rescale_factors", no_l1_pass)
    chunked = merge(method, base, sources, per, chunk=chunk, rescale="inverse_p")
    assert torch.equal(whole, chunked)


@pytest.mark.parametrize("sparsify", [None, "magnitude", "magnitude_outliers"])
def test_inverse_p_without_a_random_mask_is_refused_by_the_kernel(sparsify):
    base = torch.zeros(4, dtype=F64)
    inputs = TensorInputs("w", base, [base + 1])
    with pytest.raises(ValueError, match="inverse_p needs a random mask"):
        generalized_task_arithmetic(inputs, weights=[1.0], densities=[0.5], sparsify=sparsify,
                                    consensus=False, normalize=False, rescale="inverse_p")


# --------------------------------------------------------------------------------------------
# Recipes and search spaces
# --------------------------------------------------------------------------------------------


def recipe(method: str, rescale, **per) -> dict:
    return {"merge_method": method, "base_model": "base",
            "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5, **per}}],
            "parameters": {"rescale": rescale}}


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_recipes_of_random_mask_methods_accept_inverse_p_and_keep_its_spelling(method):
    per = {"epsilon": 0.1} if method.startswith("della") else {}
    r = MergeRecipe.from_dict(recipe(method, "inverse_p", **per))
    shared, _ = r.resolve("model.layers.0.mlp.down_proj.weight", 0.0)
    assert shared["rescale"] == "inverse_p"
    # and today's booleans resolve as written, meaning what they meant
    assert MergeRecipe.from_dict(recipe(method, True, **per)).resolve("w")[0]["rescale"] is True


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties", "task_arithmetic"])
def test_inverse_p_is_refused_where_the_mask_is_not_random(method):
    with pytest.raises(RecipeError, match=r"parameters.rescale: inverse_p divides kept entries "
                                          r"by their keep probability, which only random masks"):
        MergeRecipe.from_dict(recipe(method, "inverse_p"))
    MergeRecipe.from_dict(recipe(method, "l1"))  # the other spellings stay valid there


def test_a_bad_rescale_is_named_with_the_other_problems_of_the_recipe():
    data = recipe("dare_ties", "maybe")
    data["models"][0]["parameters"]["density"] = 2.0
    with pytest.raises(RecipeError) as err:
        MergeRecipe.from_dict(data)
    text = str(err.value)
    assert "parameters.rescale: expected true/false or one of l1, inverse_p, none, got 'maybe'" \
        in text
    assert "models[0].parameters.density: 2.0 is outside [0.0, 1.0]" in text


def test_inverse_p_recipe_yaml_says_how_mergekit_reads_it_and_round_trips():
    r = MergeRecipe.from_dict(recipe("dare_ties", "inverse_p"))
    text = r.to_yaml()
    comment = [line for line in text.splitlines() if line.startswith("#")]
    assert comment and "Feb 2025" in " ".join(comment) and "L1" in " ".join(comment)
    assert MergeRecipe.from_yaml(text) == r
    # a boolean recipe has no comment: the text mergekit has always read
    assert not MergeRecipe.from_dict(recipe("dare_ties", True)).to_yaml().startswith("#")


def test_mergekit_0_1_5_refuses_inverse_p_and_reads_true_as_its_only_rescale():
    """What the comment claims, from the installed mergekit: its rescale is a bool (L1 when true)."""
    from mergekit import sparsify
    from mergekit.merge_methods import get

    spec = next(p for p in get("dare_ties").spec.parameters if p.name == "rescale")
    assert spec.validate(True) is True
    with pytest.raises(ValueError):
        spec.validate("inverse_p")
    # its bernoulli rescale is the L1 rule: n / kept for a delta of ones
    torch.manual_seed(0)
    out = sparsify.bernoulli(torch.ones(1000), 0.3, rescale_norm=sparsify.RescaleNorm.l1)
    kept = int((out != 0).sum())
    assert kept != 300
    torch.testing.assert_close(out[out != 0], torch.full((kept,), 1000 / kept))


def test_search_spaces_fix_the_rule_and_decode_it_into_every_recipe():
    from evomerge.spaces import SearchSpace, SpaceError

    data = {"method": "dare_ties", "fixed": {"rescale": "inverse_p"},
            "params": [{"name": "weight", "per": "source", "bounds": [0.0, 1.0]},
                       {"name": "density", "per": "source", "bounds": [0.1, 1.0]}]}
    bound = SearchSpace.from_dict(data).bind("base", ["a", "b"], 2, [])
    decoded = bound.decode(np.full(bound.dim, 0.5))
    assert decoded.parameters["rescale"] == "inverse_p"
    assert decoded.to_yaml().startswith("# rescale: inverse_p")
    with pytest.raises(SpaceError, match=r"fixed.rescale: inverse_p divides kept entries"):
        SearchSpace.from_dict({**data, "method": "ties"})
    with pytest.raises(SpaceError, match=r"fixed.rescale: expected true/false"):
        SearchSpace.from_dict({**data, "fixed": {"rescale": "sometimes"}})


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_inverse_p_builds_keep_the_engine_memory_contract_and_chunking(method, tmp_path,
                                                                     monkeypatch):
    """Through the Merger on bf16 checkpoints larger than the chunk: scratch is chunk buffers
    plus one random block per source (no mask store: inverse_p draws each mask once, in the
    merge pass), nothing is cached, and every chunk size builds the same bits."""
    from evomerge.merge.checkpoints import load_state_dict
    from evomerge.merge.engine import Merger

    try:
        from helpers import make_family
    except ImportError:  # tests/ imported as a package
        from tests.helpers import make_family

    chunk = 2048
    monkeypatch.setattr(methods, "RNG_BLOCK", chunk)
    family = make_family(tmp_path, n_sources=3, hidden=128, intermediate=256, layers=2,
                         dtype=torch.bfloat16)
    extra = {"epsilon": 0.1} if method.startswith("della") else {}
    r = MergeRecipe.from_dict({
        "merge_method": method, "base_model": str(family.base), "seed": 3,
        "parameters": {"rescale": "inverse_p"},
        "models": [{"model": str(s), "parameters": {"weight": 0.8, "density": 0.4, **extra}}
                   for s in family.sources]})
    merger = Merger(family.all, chunk=chunk)
    built = {n: t.clone() for n, t in merger.build(r).items()}
    memory = merger.memory()
    largest = max(t.numel() for t in load_state_dict(family.base).values())
    assert memory["scratch"] <= 24 * chunk * 4 + 3 * min(largest, chunk) * 4
    assert memory["cache"] == 0
    # the L1 rule's build holds, besides the same buffers, the byte store of the largest
    # tensor's three masks (one byte per element per source) for its second pass
    l1 = Merger(family.all, chunk=chunk)
    l1.build(MergeRecipe.from_dict({**r.to_dict(), "parameters": {"rescale": True}}))
    assert l1.memory()["scratch"] - memory["scratch"] == 3 * largest
    other = Merger(family.all, chunk=3 * chunk + 128).build(r)  # rows of 128 or 256
    assert all(torch.equal(built[n], other[n]) for n in built)
