"""DFS layer-path merges: the genome's decoding (worked by hand: which coordinate of Sakana's
layer-indexed W, of the factored W and of the model-pair W scales which hop), the by-reference
layer stack against the source model itself, the hop scales (the first block's input included)
against a literal scaling of the hidden state, the materialised export against
``transformers`` loading it and against mergekit's passthrough."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml

from evomerge.spaces import LAYER_SCALES_LIMIT, DfsSpace
from evomerge.merge.engine import Merger
from evomerge.merge.export import export_model
from evomerge.merge.layerstack import LayerStack, fold_scales
from evomerge.recipe import LayerRecipe, LayerSlice, MergeRecipe, RecipeError, parse_recipe

try:
    from helpers import load_weights, make_family
except ImportError:  # tests/ imported as a package
    from tests.helpers import load_weights, make_family

LAYERS = 3


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """base + 2 sources with clearly different blocks (perturbation 0.2), tiny norm epsilon so
    the scale-invariance of RMSNorm holds to float rounding."""
    root = tmp_path_factory.mktemp("dfs")
    fam = make_family(root, n_sources=2, layers=LAYERS, scale=0.2)
    for path in fam.all:  # rms_norm_eps 1e-6 -> 1e-12 (weights unchanged)
        config = transformers.AutoConfig.from_pretrained(path)
        config.rms_norm_eps = 1e-12
        config.save_pretrained(path)
    return fam


@pytest.fixture(scope="module")
def stack(family):
    merger = Merger([str(p) for p in family.all])
    template = transformers.AutoModelForCausalLM.from_pretrained(family.sources[0]).eval()
    return LayerStack(merger.state, template.config, template), merger


def bound(family, **options) -> object:
    sources = {"a": str(family.sources[0]), "b": str(family.sources[1])}
    return DfsSpace(kind="dfs", **options).bind(sources, LAYERS, "llama")


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(0))


# ---- the genome, by hand --------------------------------------------------------------------


def test_fold_scales_by_hand():
    # hidden *= 2 entering block 0 (the embedding output), *= 2 entering block 1, *= 0.5
    # entering block 2, *= 4 entering block 3: cumulative 2, 4, 2, 8
    assert fold_scales([2.0, 2.0, 0.5, 4.0]) == [0.5, 0.25, 0.5, 0.125]
    assert fold_scales([1.0, 2.0, 0.5, 4.0]) == [1.0, 0.5, 1.0, 0.25]


def test_slots_names_bounds_and_start_point(family):
    space = bound(family, repeats=2)
    assert space.scales == "layers"  # the default: Sakana's W over layers
    # T = M * r = (2 models x 3 blocks) x 2 slots, then W: an embedding row + 6 layer rows, 6
    # columns (layer a.b = block b of source a)
    assert space.dim == 12 + 7 * 6
    assert space.names[:4] == ("in[r0.a.0]", "in[r0.a.1]", "in[r0.a.2]", "in[r0.b.0]")
    assert space.names[6] == "in[r1.a.0]"
    assert space.names[12:19] == ("W[embed->a.0]", "W[embed->a.1]", "W[embed->a.2]",
                                  "W[embed->b.0]", "W[embed->b.1]", "W[embed->b.2]",
                                  "W[a.0->a.0]")
    # W[a.2->b.0]: row 1 + 2 (out of layer a.2), column 3 (b.0)
    assert space.names[-1] == "W[b.2->b.2]" and space.names[12 + 6 * 3 + 3] == "W[a.2->b.0]"
    assert list(space.lower) == [-1.0] * 12 + [0.5] * 42
    assert list(space.upper) == [1.0] * 12 + [1.5] * 42
    assert list(space.start_point) == [0.5] * 3 + [-0.5] * 9 + [1.0] * 42
    recipe = space.decode(space.start_point)
    assert recipe.slices == (LayerSlice(str(family.sources[0]), 0, 3),)


# A 2-model, 2-block example: layers a.0, a.1, b.0, b.1 (indices 0..3), repeated twice: slots
# 0..7 = r0.a.0, r0.a.1, r0.b.0, r0.b.1, r1.a.0, r1.a.1, r1.b.0, r1.b.1. The path of slots 1,
# 2, 6, 7 is a.1, b.0, b.0 (repeat 1 re-enters layer b.0), b.1.
SMALL = {"a": "/models/a", "b": "/models/b"}
SMALL_SLOTS = (1, 2, 6, 7)


def small_genome(space, scales: dict[str, float]) -> np.ndarray:
    """The SMALL path, every scale coordinate at a distinct filler value but those named."""
    x = np.full(space.dim, -0.5)
    x[list(SMALL_SLOTS)] = 0.5
    x[8:] = np.linspace(0.55, 1.45, space.dim - 8)
    for name, value in scales.items():
        x[space.names.index(name)] = value
    return x


def test_layer_w_coordinates_by_hand():
    space = DfsSpace(kind="dfs", repeats=2, scales="layers").bind(SMALL, 2, "llama")
    # W is (1 + 4) x 4, row-major after the 8 slots: W[row, col] at 8 + 4 * row + col, row 0
    # the embedding row, row 1 + k the hops out of layer k
    assert space.dim == 8 + 20
    assert space.names[8 + 1] == "W[embed->a.1]"      # the first block's input, a.1
    assert space.names[8 + 4 * 2 + 2] == "W[a.1->b.0]"  # a.1 (row 1 + 1) -> b.0 (column 2)
    assert space.names[8 + 4 * 3 + 2] == "W[b.0->b.0]"  # the repeat re-entering b.0
    assert space.names[8 + 4 * 3 + 3] == "W[b.0->b.1]"
    x = small_genome(space, {"W[embed->a.1]": 0.5, "W[a.1->b.0]": 1.25,
                             "W[b.0->b.0]": 0.8, "W[b.0->b.1]": 1.5})
    assert space.path(x) == [(0, 1, 0.5), (1, 0, 1.25), (1, 0, 0.8), (1, 1, 1.5)]
    # no other coordinate scales any hop of this path
    y = x.copy()
    used = [space.names.index(n) for n in ("W[embed->a.1]", "W[a.1->b.0]", "W[b.0->b.0]",
                                           "W[b.0->b.1]")]
    others = [i for i in range(8, space.dim) if i not in used]
    y[others] = 1.4
    assert space.path(y) == space.path(x)
    # cumulative hidden-state scales 0.5, 0.625, 0.5, 0.75 -> residual scales their inverses
    recipe = space.decode(x)
    assert [(s.model, s.start, s.end) for s in recipe.slices] == [
        ("/models/a", 1, 2), ("/models/b", 0, 1), ("/models/b", 0, 1), ("/models/b", 1, 2)]
    assert [s.scale for s in recipe.slices] == pytest.approx([2.0, 1.6, 2.0, 4 / 3])


def test_factored_w_by_hand():
    space = DfsSpace(kind="dfs", repeats=2, scales="factored").bind(SMALL, 2, "llama")
    # P: (embed, a, b) x (a, b), then q per layer entered: 6 + 4 coordinates
    assert space.names[8:] == ("P[embed->a]", "P[embed->b]", "P[a->a]", "P[a->b]", "P[b->a]",
                               "P[b->b]", "q[a.0]", "q[a.1]", "q[b.0]", "q[b.1]")
    x = small_genome(space, {"P[embed->a]": 0.6, "P[a->b]": 1.2, "P[b->b]": 0.9,
                             "q[a.1]": 1.1, "q[b.0]": 0.7, "q[b.1]": 1.3})
    # W[embed->a.1] = P[embed->a] q[a.1]; W[a.1->b.0] = P[a->b] q[b.0];
    # W[b.0->b.0] = P[b->b] q[b.0]; W[b.0->b.1] = P[b->b] q[b.1]
    assert [h for _, _, h in space.path(x)] == pytest.approx(
        [0.6 * 1.1, 1.2 * 0.7, 0.9 * 0.7, 0.9 * 1.3])


def test_model_pair_w_by_hand():
    """The model-pair form (ours, evomerge's earlier one): W[model left, model entered] on every
    hop after the first, an ordinary step inside one model included; the first input unscaled."""
    space = DfsSpace(kind="dfs", repeats=2, scales="model_pairs").bind(SMALL, 2, "llama")
    assert space.names[8:] == ("W[a->a]", "W[a->b]", "W[b->a]", "W[b->b]")
    x = small_genome(space, {"W[a->b]": 1.25, "W[b->b]": 0.8})
    assert [h for _, _, h in space.path(x)] == [1.0, 1.25, 0.8, 0.8]


def test_scales_option_values():
    def form(scales, n=2, layers=2):
        sources = {f"s{i}": f"/m/{i}" for i in range(n)}
        options = {} if scales is None else {"scales": scales}
        return DfsSpace(kind="dfs", **options).bind(sources, layers, "llama")

    assert [form(s).scales for s in (None, True, False, "layers", "factored", "model_pairs",
                                     "none")] == ["layers", "layers", "none", "layers",
                                                  "factored", "model_pairs", "none"]
    assert form("none").dim == form(False).dim == 2 * 2 * 2  # the slots alone
    # the default: layers while (M + 1) M <= the limit (4096: M = 63 -> 4032), else factored
    assert LAYER_SCALES_LIMIT == 4096
    assert form(None, n=1, layers=63).scales == "layers"
    big = form(None, n=2, layers=32)  # M = 64: (65) 64 = 4160 entries
    assert big.scales == "factored" and big.dim == 64 * 2 + 3 * 2 + 64
    assert form("layers", n=2, layers=32).dim == 64 * 2 + 65 * 64  # explicit: honoured


def test_bad_dfs_options_are_one_error_naming_each():
    with pytest.raises(ValueError) as info:
        DfsSpace.from_dict({"kind": "dfs", "scales": "layer", "repeats": 0,
                            "scale_bounds": [1.1, 2.0]})
    message = str(info.value)
    assert message.startswith("space: invalid dfs space:")
    assert "scales: expected one of layers, factored, model_pairs, none (or true: the " \
        "default, false: none), got 'layer'" in message
    assert "repeats" in message and "scale_bounds [1.1, 2.0]" in message
    with pytest.raises(ValueError, match="'embed' names the embedding row"):
        DfsSpace(kind="dfs", scales="factored").bind({"embed": "/m/e", "b": "/m/b"}, 2,
                                                     "llama")


def test_decode_worked_example(family):
    space = bound(family, repeats=2, scales="model_pairs")
    x = np.full(space.dim, -0.3)
    # path: a0, a1, b2 (rep 0), then a1 (rep 1); W[a->b] = 0.8, W[b->a] = 1.25, W[a->a] = 1
    for slot in (0, 1, 5, 7):
        x[slot] = 0.4
    x[12:] = [1.0, 0.8, 1.25, 1.0]
    recipe = space.decode(x)
    a, b = str(family.sources[0]), str(family.sources[1])
    # hidden-state scales entering each block: -, 1, 0.8, 1.25 -> cumulative 1, 1, 0.8, 1.0
    # output-projection scales = 1 / cumulative
    assert recipe.slices == (LayerSlice(a, 0, 2, 1.0), LayerSlice(b, 2, 3, 1.25),
                             LayerSlice(a, 1, 2, 1.0))
    assert recipe.path == [(a, 0, 1.0), (a, 1, 1.0), (b, 2, 1.25), (a, 1, 1.0)]


def test_all_off_keeps_the_strongest_slot(family):
    space = bound(family, repeats=1, scales=False)
    x = np.full(space.dim, -0.9)
    x[4] = -0.1  # b1
    assert space.decode(x).slices == (LayerSlice(str(family.sources[1]), 1, 2),)


def test_recipe_round_trips_as_plain_data(family):
    space = bound(family, repeats=2)
    x = np.random.default_rng(0).uniform(space.lower, space.upper)
    recipe = space.decode(x)
    again = parse_recipe(yaml.safe_load(yaml.safe_dump(recipe.to_dict())))
    assert again == recipe
    assert isinstance(parse_recipe({"merge_method": "linear", "models": [
        {"model": "x", "parameters": {"weight": 1.0}}]}), MergeRecipe)


@pytest.mark.parametrize("options, message", [
    ({"layers_from": ["a", "c"]}, "layers_from: 'c' is neither a source"),
    ({"start": "zz"}, "start: 'zz' is not a layer source"),
    ({"merged": {"a": "x.yaml"}}, "merged.a: the name is already a source"),
])
def test_bad_spaces_name_the_field(family, options, message):
    with pytest.raises(ValueError, match=message):
        bound(family, **options)


def test_scales_need_a_family_that_can_carry_them(family):
    sources = {"a": str(family.sources[0])}
    with pytest.raises(ValueError, match="scales: hop scales are supported.*gemma2.*'falcon'"):
        DfsSpace(kind="dfs").bind(sources, LAYERS, "falcon")
    with pytest.raises(ValueError, match="set scales: none to search the path alone"):
        DfsSpace(kind="dfs", scales="model_pairs").bind(sources, LAYERS, "falcon")
    assert DfsSpace(kind="dfs", scales=False).bind(sources, LAYERS, "falcon").dim == LAYERS * 2
    # sandwich-norm and post-norm families carry them too (tests/test_layerstack_families.py)
    for family_type in ("gemma2", "olmo2", "gpt_neox"):
        assert DfsSpace(kind="dfs").bind(sources, LAYERS, family_type).dim == (
            LAYERS * 2 + (LAYERS + 1) * LAYERS)


def test_scale_bounds_must_reach_one():
    with pytest.raises(ValueError, match="scale_bounds"):
        DfsSpace.from_dict({"kind": "dfs", "scale_bounds": [1.1, 2.0]})


def test_merged_recipe_must_read_loaded_models(family, tmp_path):
    recipe = tmp_path / "ps.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(tmp_path / "elsewhere"), "parameters": {"weight": 1.0}}]}))
    with pytest.raises(ValueError, match="merged.ps: .* reads .*elsewhere"):
        DfsSpace(kind="dfs", merged={"ps": str(recipe)}).bind(
            {"a": str(family.sources[0])}, LAYERS, "llama", loaded=[str(family.sources[0])])


# ---- the stack against real models ------------------------------------------------------------


def test_path_of_model_a_with_unit_scales_is_model_a_exactly(family, stack):
    builder, _ = stack
    space = bound(family, repeats=3)
    model = builder.build(space.decode(space.start_point))
    source = transformers.AutoModelForCausalLM.from_pretrained(family.sources[0]).eval()
    assert torch.equal(logits(model, IDS), logits(source, IDS))
    # generation with the KV cache walks the same path
    out = model.generate(IDS, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = source.generate(IDS, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)


def test_stack_shares_the_resident_weights(family, stack):
    builder, merger = stack
    recipe = LayerRecipe((LayerSlice(str(family.sources[1]), 1, 3),
                          LayerSlice(str(family.sources[1]), 1, 2)))
    model = builder.build(recipe)
    resident = merger.state(family.sources[1])["model.layers.1.mlp.up_proj.weight"]
    assert model.model.layers[0].mlp.up_proj.weight.data_ptr() == resident.data_ptr()
    assert model.model.layers[2].mlp.up_proj.weight.data_ptr() == resident.data_ptr()
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]


def _scaled_hidden_reference(family, path: list[tuple[int, int, float]]) -> torch.nn.Module:
    """Sakana's definition, literally: a stacked model whose block p multiplies its *input*
    hidden state by the hop scale (forward pre-hook), weights copied from the sources."""
    models = [transformers.AutoModelForCausalLM.from_pretrained(p).eval()
              for p in family.sources]
    config = transformers.AutoConfig.from_pretrained(family.sources[0])
    config.num_hidden_layers = len(path)
    ref = transformers.AutoModelForCausalLM.from_config(config).eval()
    first, last = models[path[0][0]], models[path[-1][0]]
    ref.model.embed_tokens.load_state_dict(first.model.embed_tokens.state_dict())
    ref.model.norm.load_state_dict(last.model.norm.state_dict())
    ref.lm_head.load_state_dict(last.lm_head.state_dict())
    for p, (m, block, hop) in enumerate(path):
        ref.model.layers[p].load_state_dict(models[m].model.layers[block].state_dict())

        def scale_input(_module, args, kwargs, s=hop):
            if args:
                return (args[0] * s, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * s}

        ref.model.layers[p].register_forward_pre_hook(scale_input, with_kwargs=True)
    return ref


def test_model_pair_scales_equal_scaling_the_hidden_state(family, stack):
    builder, _ = stack
    space = bound(family, repeats=2, scales="model_pairs")
    x = np.full(space.dim, -0.5)
    for slot in (0, 4, 5, 7, 9):  # a0, b1, b2, a1, b0
        x[slot] = 0.5
    x[12:] = [0.7, 1.3, 0.6, 1.2]
    path = space.path(x)
    assert [h for _, _, h in path] == [1.0, 1.3, 1.2, 0.6, 1.3]
    ours = logits(builder.build(space.decode(x)), IDS)
    theirs = logits(_scaled_hidden_reference(family, path), IDS)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    # and the scales matter: unit scales give a clearly different function
    x[12:] = 1.0
    plain = logits(builder.build(space.decode(x)), IDS)
    assert (plain - theirs).abs().max() > 1e-3


def layer_genome(space, slots: Sequence[int], seed: int = 0) -> np.ndarray:
    """``slots`` on, every W entry drawn in [0.6, 1.4] (the first block's input included)."""
    x = np.full(space.dim, -0.5)
    x[list(slots)] = 0.5
    t = len(space.slots)
    x[t:] = np.random.default_rng(seed).uniform(0.6, 1.4, space.dim - t)
    return x


def test_layer_scales_equal_scaling_the_hidden_state(family, stack):
    """Sakana's W over layers, every hop scaled: the first block's input by W[embed->a.0], an
    ordinary step a.0 -> a.1 by W[a.0->a.1], repeat 1 re-entering b.2 by W[b.2->b.2]."""
    builder, _ = stack
    space = bound(family, repeats=2, scales="layers")
    x = layer_genome(space, (0, 1, 5, 11, 6))  # a0, a1, b2 (repeat 0), a0, b2 (repeat 1)
    path = space.path(x)
    w = {n: x[i] for i, n in enumerate(space.names)}
    assert path == [(0, 0, w["W[embed->a.0]"]), (0, 1, w["W[a.0->a.1]"]),
                    (1, 2, w["W[a.1->b.2]"]), (0, 0, w["W[b.2->a.0]"]),
                    (1, 2, w["W[a.0->b.2]"])]
    ours = logits(builder.build(space.decode(x)), IDS)
    theirs = logits(_scaled_hidden_reference(family, path), IDS)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    # the re-entry hop b.2 -> b.2 of another path, and the first input, each matter
    x = layer_genome(space, (5, 11))
    assert [h for _, _, h in space.path(x)] == [w["W[embed->b.2]"], w["W[b.2->b.2]"]]
    torch.testing.assert_close(logits(builder.build(space.decode(x)), IDS),
                               logits(_scaled_hidden_reference(family, space.path(x)), IDS),
                               atol=2e-5, rtol=1e-4)
    first = space.names.index("W[embed->b.2]")
    unscaled_first = x.copy()
    unscaled_first[first] = 1.0
    plain = logits(builder.build(space.decode(unscaled_first)), IDS)
    scaled = logits(builder.build(space.decode(x)), IDS)
    assert (plain - scaled).abs().max() > 1e-3


@pytest.mark.parametrize("family_type", ["llama", "gemma2", "olmo2", "gpt_neox"])
def test_layer_scales_on_each_hop_form(family_type, tmp_path):
    """The first-hop fold in every hop form (pre-norm, sandwich norms, post-branch norms with
    inputs divided), fp32, against the families test's float64 Sakana reference."""
    try:
        import test_layerstack_families as families
        from arch_models import make_family as make_arch
        from helpers import cast_model
    except ImportError:  # tests/ imported as a package
        from tests import test_layerstack_families as families
        from tests.arch_models import make_family as make_arch
        from tests.helpers import cast_model

    paths = make_arch(family_type, tmp_path / "bf16", n_models=3, scale=0.2)
    families._configure(paths, family_type)
    paths = [cast_model(p, tmp_path / "fp32" / p.name, torch.float32) for p in paths]
    sources = {"a": str(paths[1]), "b": str(paths[2])}
    space = DfsSpace(kind="dfs", repeats=2, scales="layers").bind(sources, LAYERS, family_type)
    x = layer_genome(space, (3, 5, 6, 7, 11), seed=1)  # b0, b2, a0, a1, b2
    path = space.path(x)
    assert path[0][2] != 1.0
    ours = families.logits(families.stacker(paths).build(space.decode(x)))
    families.close(ours, families.logits(families.sakana_reference(paths, path)), 1e-5)


def _mixed_recipe(family) -> LayerRecipe:
    space = bound(family, repeats=2)
    return space.decode(layer_genome(space, (0, 1, 4, 5, 6, 8)))


def test_materialised_export_loads_with_transformers(family, stack, tmp_path):
    builder, _ = stack
    recipe = _mixed_recipe(family)
    state, updates = builder.materialise(recipe)
    out = export_model(state, tmp_path / "dfs", base_dir=family.sources[0],
                       recipe_yaml=recipe.to_yaml(), config_updates=updates)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.num_hidden_layers == len(recipe.path) == 6
    torch.testing.assert_close(logits(loaded, IDS), logits(builder.build(recipe), IDS),
                               atol=1e-5, rtol=1e-5)
    assert yaml.safe_load((out / "recipe.yaml").read_text()) == recipe.to_mergekit()
    # mergekit's form alone names the scaled projections in its filters: nothing is lost
    assert LayerRecipe.from_yaml(out / "recipe.yaml") == recipe


def run_mergekit(config: dict, out: Path) -> None:
    """mergekit's own merge of ``config`` into ``out`` (in process, the global RNGs kept)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        run_merge(MergeConfiguration.model_validate(config), str(out),
                  options=MergeOptions(device="cpu", copy_tokenizer=False,
                                       write_model_card=False, quiet=True, lazy_unpickle=False))
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def test_materialised_export_equals_mergekit_passthrough(family, stack, tmp_path):
    pytest.importorskip("mergekit")
    builder, _ = stack
    recipe = _mixed_recipe(family)
    ours, _ = builder.materialise(recipe)
    run_mergekit(recipe.to_mergekit(), tmp_path / "mk")
    theirs = load_weights(tmp_path / "mk")
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=0, rtol=1e-6, msg=name)
    config = transformers.AutoConfig.from_pretrained(tmp_path / "mk")
    assert config.num_hidden_layers == len(recipe.path)


def test_merged_models_join_the_layer_sources(family, tmp_path):
    """PS+DFS: a named merge (here a linear mix) is built once and routed through like a
    source; a path of its blocks alone is that merge exactly."""
    ps = MergeRecipe.from_dict({"merge_method": "linear", "models": [
        {"model": str(family.sources[0]), "parameters": {"weight": 0.3}},
        {"model": str(family.sources[1]), "parameters": {"weight": 0.7}}]})
    file = tmp_path / "ps.yaml"
    file.write_text(ps.to_yaml())
    sources = {"a": str(family.sources[0]), "b": str(family.sources[1])}
    space = DfsSpace(kind="dfs", merged={"ps": str(file)}).bind(
        sources, LAYERS, "llama", loaded=[str(p) for p in family.all])
    assert space.labels == ("ps", "a", "b")
    recipe = space.decode(space.start_point)
    assert recipe.slices == (LayerSlice("ps", 0, 3),) and set(recipe.merged) == {"ps"}

    from evomerge.execution.evaluator import Evaluator

    evaluator = Evaluator.__new__(Evaluator)  # the stacking half of an evaluator, no fitness
    merger = Merger([str(p) for p in family.all])
    template = transformers.AutoModelForCausalLM.from_pretrained(family.sources[0]).eval()
    evaluator.merger, evaluator.model, evaluator._stack = merger, template, None
    stacked = evaluator.build(recipe)
    merged = transformers.AutoModelForCausalLM.from_pretrained(family.sources[0]).eval()
    merger.build(ps, into=merged)
    assert torch.equal(logits(stacked, IDS), logits(merged, IDS))
    docs = list(yaml.safe_load_all(recipe.to_yaml()))
    assert [d["name"] for d in docs] == ["ps", "dfs"]
    assert docs[1]["slices"][0]["sources"][0]["model"] == "ps"


def test_bad_layer_recipes_are_refused():
    with pytest.raises(RecipeError, match="at least one slice"):
        LayerRecipe(())
    with pytest.raises(RecipeError, match="need 0 <= start < end"):
        LayerSlice("m", 2, 2)
    with pytest.raises(RecipeError, match="no output projections"):
        LayerRecipe((LayerSlice("m", 0, 1, 0.5),))
    with pytest.raises(RecipeError, match="exactly one source"):
        LayerRecipe.from_dict({"merge_method": "passthrough", "slices": [{"sources": []}]})


def test_unknown_block_is_refused(family, stack):
    builder, _ = stack
    with pytest.raises(RecipeError, match="has no block 7"):
        builder.build(LayerRecipe((LayerSlice(str(family.sources[0]), 7, 8),)))


def test_paths_are_relative_to_nothing(family):
    """Decoded recipes name models by the absolute paths they were bound with."""
    recipe = bound(family).decode(bound(family).start_point)
    assert all(Path(s.model).is_absolute() for s in recipe.slices)


def test_evomerge_merge_materialises_layer_recipes(family, stack, tmp_path):
    """The exported recipe.yaml round-trips through `evomerge merge`: a plain slices file, and
    a mergekit-multi file whose first document is the merge the slices read."""
    from typer.testing import CliRunner

    from evomerge.cli import app

    builder, merger = stack
    recipe = _mixed_recipe(family)
    (tmp_path / "dfs.yaml").write_text(recipe.to_yaml())
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "dfs.yaml"), "-o",
                                      str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(loaded, IDS), logits(builder.build(recipe), IDS),
                               atol=1e-5, rtol=1e-5)

    ps = MergeRecipe.from_dict({"merge_method": "linear", "models": [
        {"model": str(family.sources[0]), "parameters": {"weight": 0.5}},
        {"model": str(family.sources[1]), "parameters": {"weight": 0.5}}]})
    multi = LayerRecipe((LayerSlice("ps", 0, 2), LayerSlice(str(family.sources[1]), 2, 3, 0.8)),
                        ("o_proj", "down_proj"), merged={"ps": ps})
    (tmp_path / "multi.yaml").write_text(multi.to_yaml())
    assert LayerRecipe.from_yaml(tmp_path / "multi.yaml") == multi
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "multi.yaml"), "-o",
                                      str(tmp_path / "multi")])
    assert result.exit_code == 0, result.output
    weights = load_weights(tmp_path / "multi")
    merged = merger.build(ps)
    assert torch.equal(weights["model.layers.1.mlp.up_proj.weight"],
                       merged["model.layers.1.mlp.up_proj.weight"])
    down = merger.state(family.sources[1])["model.layers.2.mlp.down_proj.weight"]
    torch.testing.assert_close(weights["model.layers.2.mlp.down_proj.weight"], down * 0.8)
    assert torch.equal(weights["lm_head.weight"], merger.state(family.sources[1])["lm_head.weight"])


def test_tied_embeddings_stack_and_export(tmp_path):
    """Tied models have no lm_head tensor: the shell ties its head to the first slice's
    embeddings, and the export (embeddings only, tied config) loads to the same function."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, tie_word_embeddings=True)
    for i in range(2):
        torch.manual_seed(i)
        transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / f"s{i}")
    a, b = str(tmp_path / "s0"), str(tmp_path / "s1")
    merger = Merger([a, b])
    template = transformers.AutoModelForCausalLM.from_pretrained(a).eval()
    builder = LayerStack(merger.state, template.config, template)
    assert torch.equal(logits(builder.build(LayerRecipe((LayerSlice(a, 0, 3),))), IDS),
                       logits(template, IDS))
    recipe = LayerRecipe((LayerSlice(a, 0, 2), LayerSlice(b, 1, 3, 0.7)), ("o_proj", "down_proj"))
    stacked = builder.build(recipe)
    assert stacked.lm_head.weight is stacked.model.embed_tokens.weight
    state, updates = builder.materialise(recipe)
    assert "lm_head.weight" not in state
    export_model(state, tmp_path / "out", base_dir=a, config_updates=updates)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(loaded, IDS), logits(stacked, IDS), atol=1e-6, rtol=1e-5)


def test_source_points_are_each_layer_source_alone(family):
    space = bound(family, repeats=2)
    a, b = str(family.sources[0]), str(family.sources[1])
    recipes = [space.decode(x) for x in space.source_points()]
    assert [r.slices for r in recipes] == [(LayerSlice(a, 0, 3),), (LayerSlice(b, 0, 3),)]
