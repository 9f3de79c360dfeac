"""The Merger: resident sources, in-place builds, layer groups, gradients, cache, errors."""

from __future__ import annotations

import pytest
import torch
import transformers

from evomerge.merge.checkpoints import IncompatibleModelsError, load_state_dict
from evomerge.merge.engine import LayerGroup, Merger, gradient_position, layer_group
from evomerge.recipe import MergeRecipe, RecipeError

CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A base and three sources = base + distinct small perturbations, as HF directories."""
    root = tmp_path_factory.mktemp("zoo")
    config = transformers.LlamaConfig(**CFG)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    paths = [str(root / "base")]
    for k in range(3):
        model = transformers.LlamaForCausalLM(config)
        model.load_state_dict(base.state_dict())
        gen = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(root / f"src{k}")
        paths.append(str(root / f"src{k}"))
    return paths


@pytest.fixture(scope="module")
def merger(zoo):
    return Merger(zoo)


def recipe(method, base, sources, params=None, source_params=None, **extra):
    models = [{"model": s, **({"parameters": source_params} if source_params else {})}
              for s in sources]
    return MergeRecipe.from_dict({"merge_method": method, "base_model": base, "models": models,
                                  "parameters": params or {}, **extra})


def test_layer_groups_cover_llama_gpt2_and_neox_names():
    assert layer_group("model.embed_tokens.weight") == LayerGroup("embed")
    assert layer_group("model.layers.7.self_attn.q_proj.weight") == LayerGroup("layers.7", 7)
    assert layer_group("model.norm.weight") == LayerGroup("final_norm")
    assert layer_group("lm_head.weight") == LayerGroup("head")
    assert layer_group("transformer.wte.weight") == LayerGroup("embed")
    assert layer_group("transformer.h.11.mlp.c_fc.weight") == LayerGroup("layers.11", 11)
    assert layer_group("transformer.ln_f.bias") == LayerGroup("final_norm")
    assert layer_group("gpt_neox.layers.0.attention.dense.weight") == LayerGroup("layers.0", 0)
    assert layer_group("embed_out.weight") == LayerGroup("head")


def test_gradient_position_is_mergekits_layer_fraction():
    # mergekit: t = i / (L - 1) inside blocks, 0 for embeddings/norm/head, 1 with a single layer
    assert gradient_position(LayerGroup("layers.0", 0), 5) == 0.0
    assert gradient_position(LayerGroup("layers.2", 2), 5) == 0.5
    assert gradient_position(LayerGroup("layers.4", 4), 5) == 1.0
    assert gradient_position(LayerGroup("head"), 5) == 0.0
    assert gradient_position(LayerGroup("layers.0", 0), 1) == 1.0


def test_every_tensor_of_a_llama_lands_in_a_group(merger):
    assert merger.num_layers == 3
    assert merger.group_names == ["embed", "layers.0", "layers.1", "layers.2", "final_norm", "head"]
    assert all(g.name != "other" for g in merger.groups.values())


def test_build_writes_into_the_given_model_in_place(zoo, merger):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG))
    before = {n: p.data_ptr() for n, p in model.state_dict().items()}
    r = recipe("task_arithmetic", zoo[0], zoo[1:], source_params={"weight": 0.5})
    merger.build(r, into=model)
    after = model.state_dict()
    assert {n: p.data_ptr() for n, p in after.items()} == before  # same storage, no new model
    # hand formula: base + 0.5 * sum_k (src_k - base)
    base = load_state_dict(zoo[0])
    srcs = [load_state_dict(p) for p in zoo[1:]]
    for name, value in base.items():
        expected = value + 0.5 * sum(s[name] - value for s in srcs)
        torch.testing.assert_close(after[name], expected, rtol=1e-5, atol=1e-6)


def test_one_hot_linear_gives_that_models_logits_exactly(zoo, merger):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).eval()
    r = MergeRecipe.from_dict({"merge_method": "linear", "models": [
        {"model": zoo[1], "parameters": {"weight": 0.0}},
        {"model": zoo[2], "parameters": {"weight": 1.0}},
        {"model": zoo[3], "parameters": {"weight": 0.0}}]})
    merger.build(r, into=model)
    reference = transformers.LlamaForCausalLM.from_pretrained(zoo[2]).eval()
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_task_arithmetic_with_lambda_zero_is_the_base_bit_for_bit(zoo, merger):
    out = merger.build(recipe("task_arithmetic", zoo[0], zoo[1:], params={"lambda": 0.0},
                              source_params={"weight": 0.7}))
    base = load_state_dict(zoo[0])
    assert all(torch.equal(out[n], base[n]) for n in base)


def test_slerp_endpoints_through_the_engine(zoo, merger):
    base, other = load_state_dict(zoo[0]), load_state_dict(zoo[1])
    for t, expected in ((0.0, base), (1.0, other)):
        out = merger.build(MergeRecipe.from_dict({
            "merge_method": "slerp", "base_model": zoo[0],
            "models": [{"model": zoo[0]}, {"model": zoo[1]}], "parameters": {"t": t}}))
        for name in expected:
            torch.testing.assert_close(out[name], expected[name], rtol=1e-5, atol=1e-6)


def test_gradient_weight_reaches_each_layer_at_its_position(zoo, merger):
    # weight [0, 1] across 3 layers: layer i gets i / 2; embeddings/head get t = 0 -> 0
    out = merger.build(recipe("task_arithmetic", zoo[0], zoo[1:2],
                              source_params={"weight": [0.0, 1.0]}))
    base, src = load_state_dict(zoo[0]), load_state_dict(zoo[1])
    for name in base:
        group = layer_group(name)
        w = group.layer / 2 if group.layer is not None else 0.0
        torch.testing.assert_close(out[name], base[name] + w * (src[name] - base[name]),
                                   rtol=1e-5, atol=1e-6)


def test_filters_select_attention_and_mlp_separately(zoo, merger):
    weight = [{"filter": "self_attn", "value": 1.0}, {"filter": "mlp", "value": 0.0},
              {"value": 0.5}]
    out = merger.build(recipe("task_arithmetic", zoo[0], zoo[1:2], source_params={"weight": weight}))
    base, src = load_state_dict(zoo[0]), load_state_dict(zoo[1])
    for name in base:
        w = 1.0 if "self_attn" in name else 0.0 if "mlp" in name else 0.5
        torch.testing.assert_close(out[name], base[name] + w * (src[name] - base[name]),
                                   rtol=1e-5, atol=1e-6)


def test_dare_is_reproducible_per_seed_and_differs_across_seeds(zoo):
    fresh = Merger(zoo)  # separate caches: reproducibility must not depend on them
    r = recipe("dare_ties", zoo[0], zoo[1:], source_params={"weight": 1.0, "density": 0.3})
    a = {n: t.clone() for n, t in fresh.build(r).items()}
    b = Merger(zoo, chunk=100).build(r)  # chunking changes nothing
    c = fresh.build(r.model_copy(update={"seed": 1}))
    name = "model.layers.1.mlp.up_proj.weight"
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a[name], c[name])


def test_opt_in_cache_holds_sorted_magnitudes_and_results_do_not_change(zoo):
    cached, uncached = Merger(zoo, cache="on"), Merger(zoo)
    r = recipe("ties", zoo[0], zoo[1:], source_params={"weight": 1.0, "density": 0.4})
    first = {n: t.clone() for n, t in cached.build(r).items()}
    name = "model.layers.0.mlp.down_proj.weight"
    assert {key[0] for key in cached._cache[name]} == {"sorted_abs"}
    second = cached.build(r)
    reference = uncached.build(r)
    assert all(torch.equal(first[n], second[n]) and torch.equal(first[n], reference[n])
               for n in first)
    assert uncached._cache == {} and uncached.memory()["cache"] == 0
    assert cached.memory()["cache"] > 0


def test_cache_budget_caches_tensors_only_while_they_fit(zoo):
    name = "model.layers.0.mlp.down_proj.weight"
    numel = load_state_dict(zoo[0])[name].numel()
    # float32 checkpoints: float64 work dtype (8) + 4 bytes per element, for each of 4 models
    merger = Merger(zoo, cache=numel * 12 * 4)
    merger.build(recipe("ties", zoo[0], zoo[1:], source_params={"weight": 1.0, "density": 0.4}))
    assert len(merger._cache) == 1
    assert merger.memory()["cache"] <= numel * 12 * 4
    with pytest.raises(ValueError, match="cache"):
        Merger(zoo, cache="lots")


def test_cache_is_keyed_by_base_so_a_different_base_is_not_confused(zoo, merger):
    # task vectors of src0 relative to src1 (not to base) must be recomputed
    out = merger.build(recipe("task_arithmetic", zoo[2], [zoo[1]], source_params={"weight": 1.0}))
    src0 = load_state_dict(zoo[1])
    for name, value in src0.items():
        torch.testing.assert_close(out[name], value, rtol=1e-5, atol=1e-6)


def test_unknown_model_in_recipe_is_an_error_naming_the_field(zoo, merger, tmp_path):
    r = recipe("task_arithmetic", zoo[0], [zoo[1], str(tmp_path)], source_params={"weight": 1.0})
    with pytest.raises(RecipeError, match=r"models\[1\]\.model"):
        merger.build(r)


def test_for_recipe_reports_every_missing_directory_before_loading(tmp_path):
    r = recipe("ties", str(tmp_path / "nope"), [str(tmp_path / "a"), str(tmp_path / "b")],
               source_params={"weight": 1.0})
    with pytest.raises(RecipeError) as err:
        Merger.for_recipe(r)
    for field in ("base_model", "models[0].model", "models[1].model"):
        assert field in str(err.value)


def test_incompatible_models_are_refused_before_loading(zoo, tmp_path):
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**CFG, "hidden_size": 48}))
    other.save_pretrained(tmp_path / "wide")
    with pytest.raises(IncompatibleModelsError, match="shape"):
        Merger([zoo[0], str(tmp_path / "wide")])


def test_build_target_with_wrong_shapes_is_refused_before_writing(zoo, merger):
    target = merger.allocate()
    target["lm_head.weight"] = torch.zeros(3, 3)
    sentinel = target["model.norm.weight"].fill_(7.0).clone()
    with pytest.raises(ValueError, match="lm_head.weight"):
        merger.build(recipe("task_arithmetic", zoo[0], zoo[1:], source_params={"weight": 1.0}),
                     into=target)
    assert torch.equal(target["model.norm.weight"], sentinel)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_build_on_cuda_matches_cpu(zoo):
    r = recipe("ties", zoo[0], zoo[1:], source_params={"weight": 1.0, "density": 0.5})
    cpu = Merger(zoo).build(r)
    gpu = Merger(zoo, device="cuda").build(r)
    for name, value in cpu.items():
        torch.testing.assert_close(gpu[name].cpu(), value, rtol=1e-5, atol=1e-6)


def test_checkpoints_in_different_dtypes_merge_when_a_dtype_is_given(zoo, tmp_path):
    half = transformers.LlamaForCausalLM.from_pretrained(zoo[1], dtype=torch.bfloat16)
    half.save_pretrained(tmp_path / "bf16")
    with pytest.raises(IncompatibleModelsError, match="dtype"):
        Merger([zoo[0], str(tmp_path / "bf16")])
    merger = Merger([zoo[0], str(tmp_path / "bf16")], dtype="float32")
    out = merger.build(recipe("task_arithmetic", zoo[0], [str(tmp_path / "bf16")],
                              source_params={"weight": 1.0}))
    expected = load_state_dict(tmp_path / "bf16", dtype=torch.float32)
    assert all(torch.equal(out[n], expected[n]) or torch.allclose(out[n], expected[n], atol=1e-6)
               for n in expected)
