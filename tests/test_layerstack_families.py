"""DFS layer stacks on every decoder family, against Sakana's definition computed by hand.

For each family (``tests/arch_models.py``: base + 2 sources, tiny and random) a DFS genome is
decoded into a layer recipe whose path hops between the sources and revisits blocks, with hop
scales on every hop. The reference is Sakana's model written directly: the source models' own
block modules run in path order by the family's own ``forward`` (embeddings of the first path
model, final norm and head of the last), each block's *incoming hidden state* multiplied by its
hop scale (a forward pre-hook), in float64. Against it:

* the stacked model (by reference, hop scales carried as the family's
  :class:`~evomerge.recipe.layers.HopForm` says) gives the reference's logits -- in float32
  with norm epsilons at 1e-12 (the forms are exact but for the norms' epsilon: see
  ``evomerge/merge/layerstack.py``) to float32 rounding, and in bf16 to bf16 rounding;
* the export (``LayerStack.materialise`` + ``export_model``, and ``evomerge merge`` of the
  recipe file) reloads with ``AutoModelForCausalLM.from_pretrained`` and gives the stacked
  model's logits, and its ``recipe.yaml`` reads back as the recipe; where the scales are mergekit
  ``scale`` parameters mergekit's passthrough writes the same tensors; Gemma's ``norm_scale``
  (``w -> s (1 + w) - 1``, which mergekit's ``scale`` cannot say) mergekit ignores, and the file
  says so;
* mixed sliding / full attention (Gemma 2, and Gemma 3, OLMo 3 and Qwen2 with sliding layers
  made here; sliding window 4 over 20 tokens, so the attention type matters): each position
  keeps its source block's layer type in the stacked and the exported config;
* a short DFS ``evomerge run`` per family (bf16, CPU, perplexity fitness) fails no candidate and
  exports a checkpoint that re-scores as the search scored it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from evomerge.execution.driver import run_experiment
from evomerge.spaces import DfsSpace
from evomerge.merge.engine import Merger, layer_group
from evomerge.merge.export import export_model
from evomerge.merge.layerstack import LayerStack
from evomerge.recipe import LayerRecipe, LayerSlice, RecipeError
from evomerge.recipe.layers import HOP_FORMS

try:
    from arch_models import make_family, tokenizer
    from helpers import cast_model, load_weights
    from test_dfs import run_mergekit
except ImportError:  # tests/ imported as a package
    from tests.arch_models import make_family, tokenizer
    from tests.helpers import cast_model, load_weights
    from tests.test_dfs import run_mergekit

FAMILIES = ("llama", "gemma2", "olmo2", "gpt_neox", "qwen3", "gpt2", "phi3")
#: mixed sliding / full attention (``layer_types`` S, F, S) in more families: made here
MIXED = {
    "gemma3_text": lambda **kw: transformers.Gemma3TextConfig(head_dim=8, **kw),
    "olmo3": lambda **kw: transformers.Olmo3Config(**kw),
    "qwen2_sliding": lambda **kw: transformers.Qwen2Config(use_sliding_window=True, **kw),
}
LAYERS = 3
EPS_FIELDS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon")
#: ids within every family's vocabulary (the toy tokenizer's 44 tokens), 20 long: past Gemma 2's
#: sliding window of 4
IDS = torch.randint(4, 44, (2, 20), generator=torch.Generator().manual_seed(0))
#: the path: slots a0, b0, b2 (repeat 0), a1, b0 (repeat 1) -> blocks 0, 0, 2, 1, 0
SLOTS = (0, 3, 5, 7, 9)
W = (0.7, 1.3, 0.6, 1.2)  # W[a->a], W[a->b], W[b->a], W[b->b]
HOPS = [1.0, 1.3, 1.2, 0.6, 1.3]
CORPUS = ["copy a b c = a b c", "reverse 1 2 3 = 3 2 1", "sort q 3 z = 3 q z",
          "copy x y = x y", "reverse a 7 k = k 7 a", "sort 9 1 m = 1 9 m",
          "copy 5 5 z = 5 5 z", "reverse b c = c b", "sort d a c = a c d", "copy 0 = 0"]


def _configure(paths: list[Path], family: str) -> None:
    """Norm epsilons at 1e-12 (the hop forms' one approximation, see the module docstring) and
    Gemma 2's sliding window at 4 tokens (shorter than IDS, so layer types change the logits)."""
    for path in paths:
        file = path / "config.json"
        config = json.loads(file.read_text())
        for key in EPS_FIELDS:
            if key in config:
                config[key] = 1e-12
        if family == "gemma2":
            config["sliding_window"] = 4
        file.write_text(json.dumps(config, indent=2))


def make_mixed(family: str, root: Path) -> list[Path]:
    """base, s0, s1 of a :data:`MIXED` family, as ``make_family`` writes its own (bf16, the
    toy tokenizer, norms off their constant init, sources 0.2 per entry off the base)."""
    tok = tokenizer()
    config = MIXED[family](
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        sliding_window=4, layer_types=["sliding_attention", "full_attention",
                                       "sliding_attention"], tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    paths = []
    for i, name in enumerate(("base", "s0", "s1")):
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for key, param in model.state_dict().items():
                spread = 0.1 if param.ndim == 1 else 0.0
                param.copy_(base[key] + (spread + 0.2 * (i > 0)) * torch.randn(
                    param.shape, generator=gen))
        copy.deepcopy(model).to(torch.bfloat16).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths.append(root / name)
    return paths


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """(family, dtype) -> [base, s0, s1], written on first use: the bf16 family (sources differ
    clearly: 0.2 per entry), and its float32 copy (the same weights, computed in float32)."""
    root = tmp_path_factory.mktemp("stack")
    made: dict[tuple[str, torch.dtype], list[Path]] = {}

    def get(family: str, dtype: torch.dtype = torch.float32) -> list[Path]:
        if (family, torch.bfloat16) not in made:
            paths = (make_mixed(family, root / family) if family in MIXED
                     else make_family(family, root / family, n_models=3, scale=0.2))
            _configure(paths, family)
            made[family, torch.bfloat16] = paths
        if (family, dtype) not in made:
            made[family, dtype] = [cast_model(p, root / f"{family}-{str(dtype)[6:]}" / p.name,
                                              dtype) for p in made[family, torch.bfloat16]]
        return made[family, dtype]

    return get


def model_type(path: Path) -> str:
    return json.loads((path / "config.json").read_text())["model_type"]


def space_for(paths: list[Path]):
    sources = {"a": str(paths[1]), "b": str(paths[2])}
    return DfsSpace(kind="dfs", repeats=2, scales="model_pairs").bind(sources, LAYERS,
                                                                      model_type(paths[1]))


def genome(space, scales=W) -> np.ndarray:
    x = np.full(space.dim, -0.5)
    x[list(SLOTS)] = 0.5
    x[2 * LAYERS * 2:] = scales
    return x


def stacker(paths: list[Path]) -> LayerStack:
    merger = Merger([str(p) for p in paths])
    template = transformers.AutoModelForCausalLM.from_pretrained(paths[1]).eval()
    return LayerStack(merger.state, template.config, template)


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits.double()


def _layers(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The decoder (``model.model``, ``transformer``, ``gpt_neox``) and its block list's name."""
    decoder = model.base_model
    return decoder, ("h" if hasattr(decoder, "h") else "layers")


def _final_norm(decoder: torch.nn.Module) -> str:
    return next(n for n in ("norm", "ln_f", "final_layer_norm") if hasattr(decoder, n))


def sakana_reference(paths: list[Path], path: list[tuple[int, int, float]]) -> torch.nn.Module:
    """Sakana's DFS model, literally, in float64: the source models' own blocks in path order
    (each keeps its own layer type and index), block ``p``'s incoming hidden state multiplied by
    its hop scale; embeddings from the first path model, final norm and head from the last (the
    head is the first's embeddings in tied models)."""
    models = [transformers.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float64).eval()
              for p in paths[1:]]
    ref = copy.deepcopy(models[path[0][0]])
    last = models[path[-1][0]]
    decoder, name = _layers(ref)
    blocks = []
    for source, block, hop in path:
        module = copy.deepcopy(getattr(_layers(models[source])[0], name)[block])

        def scale_input(_module, args, kwargs, s=hop):
            if args:
                return (args[0] * s, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * s}

        module.register_forward_pre_hook(scale_input, with_kwargs=True)
        blocks.append(module)
    setattr(decoder, name, torch.nn.ModuleList(blocks))
    ref.config.num_hidden_layers = len(path)
    if getattr(ref.config, "layer_types", None):  # the forward picks each block's mask by it
        ref.config.layer_types = [models[m].config.layer_types[b] for m, b, _ in path]
    norm = _final_norm(decoder)
    setattr(decoder, norm, copy.deepcopy(getattr(_layers(last)[0], norm)))
    if not ref.config.tie_word_embeddings:
        ref.set_output_embeddings(copy.deepcopy(last.get_output_embeddings()))
    return ref


def close(ours: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    """Logits agree within ``rel`` of the reference's largest logit."""
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel} x {scale:.3g}"


# ---- the stack against Sakana's definition --------------------------------------------------


@pytest.mark.parametrize("family", [*FAMILIES, *MIXED])
def test_stack_equals_scaling_the_hidden_state_fp32(families, family):
    paths = families(family)
    space = space_for(paths)
    x = genome(space)
    path = space.path(x)
    assert [b for _, b, _ in path] == [0, 0, 2, 1, 0]
    assert [h for _, _, h in path] == HOPS
    recipe = space.decode(x)
    form = HOP_FORMS[model_type(paths[1])]
    assert (recipe.projections, recipe.inputs, recipe.offset) == (form.outputs, form.inputs,
                                                                  form.offset)
    builder = stacker(paths)
    ours = logits(builder.build(recipe))
    ref = logits(sakana_reference(paths, path))
    close(ours, ref, 1e-5)
    # the hop scales matter: the same path unscaled is clearly another function
    plain = logits(builder.build(space.decode(genome(space, (1.0,) * 4))))
    assert (plain - ref).abs().max() > 1e-3 * ref.abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_stack_equals_scaling_the_hidden_state_bf16(families, family):
    paths = families(family, torch.bfloat16)
    space = space_for(paths)
    x = genome(space)
    stacked = stacker(paths).build(space.decode(x))
    assert next(stacked.parameters()).dtype == torch.bfloat16
    # bf16 rounding: each bf16 source model alone is 1-4% of its largest logit off its float64
    # self here; the hop scales move the logits by 30-60% (the fp32 test)
    close(logits(stacked), logits(sakana_reference(paths, space.path(x))), 0.06)


# ---- export -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", [*FAMILIES, *MIXED])
def test_export_reloads_as_the_stacked_model(families, family, dtype, tmp_path):
    paths = families(family, dtype)
    space = space_for(paths)
    recipe = space.decode(genome(space))
    builder = stacker(paths)
    state, updates = builder.materialise(recipe)
    # the sources' layout: their names outside the blocks, theirs renumbered in them
    source = load_weights(paths[1])
    assert {n for n in state if layer_group(n).layer is None} == {
        n for n in source if layer_group(n).layer is None}
    assert len(state) == len(source) + 2 * len([n for n in source if layer_group(n).layer == 0])
    out = export_model(state, tmp_path / "dfs", base_dir=paths[1], recipe_yaml=recipe.to_yaml(),
                       config_updates=updates)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.num_hidden_layers == len(recipe.path) == 5
    stacked = logits(builder.build(recipe))
    # fp32: the same function to rounding; bf16: scales folded into bf16 weights against hooks
    # scaling bf16 activations
    close(logits(loaded), stacked, 1e-5 if dtype == torch.float32 else 0.03)
    assert LayerRecipe.from_yaml(out / "recipe.yaml") == recipe


@pytest.mark.parametrize("family", ["gemma2", "olmo2"])
def test_evomerge_merge_materialises_the_recipe_file(families, family, tmp_path):
    """The recipe file as exported (Gemma's with its norm_scale note) through `evomerge merge`:
    the checkpoint computes the stacked model's function."""
    from typer.testing import CliRunner

    from evomerge.cli import app

    paths = families(family)
    space = space_for(paths)
    recipe = space.decode(genome(space))
    (tmp_path / "dfs.yaml").write_text(recipe.to_yaml())
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "dfs.yaml"), "-o",
                                      str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    close(logits(loaded), logits(stacker(paths).build(recipe)), 1e-5)


def test_scales_must_mean_what_the_family_computes(families):
    """``scale`` on Gemma's (1 + w) norms would scale w, not the output; ``norm_scale`` is for
    those norms alone: both are refused rather than built as something else."""
    gemma, llama = families("gemma2"), families("llama")
    gemma_recipe = space_for(gemma).decode(genome(space_for(gemma)))
    as_plain = LayerRecipe(gemma_recipe.slices, gemma_recipe.projections)
    with pytest.raises(RecipeError, match="gemma2 norms compute x \\(1 \\+ weight\\)"):
        stacker(gemma).build(as_plain)
    llama_recipe = space_for(llama).decode(genome(space_for(llama)))
    as_offset = LayerRecipe(llama_recipe.slices, llama_recipe.projections, offset=True)
    with pytest.raises(RecipeError, match="norm_scale: .* do not apply to llama"):
        stacker(llama).materialise(as_offset)
    with pytest.raises(RecipeError, match="zero scale"):
        LayerRecipe.of_form(
            [LayerSlice("m", 0, 1, 0.0)], HOP_FORMS["olmo2"])


@pytest.mark.parametrize("family", ["gemma2", *MIXED])
def test_layer_types_follow_the_path(families, family, tmp_path):
    """Sliding window 4 over 20 tokens: each position keeps its source block's attention type,
    in the stacked model (config and attention modules) and in the exported config."""
    paths = families(family)
    source_types = transformers.AutoConfig.from_pretrained(paths[1]).layer_types
    assert len(set(source_types)) == 2
    space = space_for(paths)
    recipe = space.decode(genome(space))
    want = [source_types[b] for _, b, _ in recipe.path]
    builder = stacker(paths)
    stacked = builder.build(recipe)
    assert stacked.config.layer_types == want
    assert [getattr(layer.self_attn, "layer_type", None)
            or layer.self_attn.attention_type for layer in stacked.model.layers] == want
    state, updates = builder.materialise(recipe)
    assert updates["layer_types"] == want
    out = export_model(state, tmp_path / "dfs", base_dir=paths[1], config_updates=updates)
    assert transformers.AutoConfig.from_pretrained(out).layer_types == want
    # and the types matter here: the same stack with other types is another function (the
    # forward picks each block's mask by the config's entry)
    wrong = builder.build(recipe)
    wrong.config.layer_types = want[::-1]
    assert want[::-1] != want
    assert (logits(wrong) - logits(stacked)).abs().max() > 1e-3 * logits(stacked).abs().max()


# ---- mergekit ---------------------------------------------------------------------------------


def same_depth_recipe(paths: list[Path]) -> LayerRecipe:
    """A scaled 3-block path (a0, b2, a1: hops 1.3 and 0.6): mergekit changes only
    ``num_hidden_layers``, so for families with ``layer_types`` (Gemma 2, Qwen3) only a stack of
    the sources' depth makes a config that loads."""
    space = space_for(paths)
    x = np.full(space.dim, -0.5)
    x[[0, 5, 7]] = 0.5
    x[2 * LAYERS * 2:] = W
    recipe = space.decode(x)
    assert [(b, s) for _, b, s in recipe.path] == [(0, 1.0), (2, 1 / 1.3), (1, 1 / 1.3 / 0.6)]
    return recipe


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if not HOP_FORMS[f].offset])
def test_scales_are_mergekit_scales(families, family, tmp_path):
    """Where the recipe writes mergekit ``scale`` parameters, mergekit's passthrough writes the
    tensors we export (OLMo 2: ``s`` on the post-branch norms and ``1 / s`` on the input maps)."""
    pytest.importorskip("mergekit")
    paths = families(family)
    recipe = same_depth_recipe(paths)
    ours, _ = stacker(paths).materialise(recipe)
    run_mergekit(recipe.to_mergekit(), tmp_path / "mk")
    theirs = load_weights(tmp_path / "mk")
    assert set(theirs) <= set(ours)
    assert {n for n in ours if n not in theirs} <= {n for n in ours if "attention.bias" in n
                                                    or "masked_bias" in n or "inv_freq" in n}
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=0, rtol=1e-6, msg=name)


def test_gemma_norm_scales_are_not_mergekit_scales(families, tmp_path):
    """Gemma's post-branch norms compute x (1 + w): mergekit's ``scale`` (w -> s w) would be
    another function, so the recipe says ``norm_scale``; mergekit ignores that parameter (its
    output is ours but for those norms, left unscaled), and the recipe file says so."""
    pytest.importorskip("mergekit")
    paths = families("gemma2")
    recipe = same_depth_recipe(paths)
    doc = recipe.to_mergekit()
    params = [s["sources"][0].get("parameters") for s in doc["slices"]]
    assert params[0] is None and all(set(p) == {"norm_scale"} for p in params[1:])
    assert recipe.to_yaml().startswith("# norm_scale: ") and "mergekit ignores it" in (
        recipe.to_yaml())
    ours, _ = stacker(paths).materialise(recipe)
    run_mergekit(doc, tmp_path / "mk")
    theirs = load_weights(tmp_path / "mk")
    assert set(theirs) == set(ours)
    scaled = {n for n in ours if layer_group(n).layer in (1, 2) and "post_" in n}
    assert len(scaled) == 4
    a, b = load_weights(paths[1]), load_weights(paths[2])
    for name in ours:
        if name in scaled:  # position 1 is b's block 2, position 2 is a's block 1
            position = layer_group(name).layer
            source = (b if position == 1 else a)[name.replace(f".{position}.",
                                                              f".{3 - position}.")]
            assert torch.equal(theirs[name], source), name
            assert not torch.equal(ours[name], source), name
        else:
            torch.testing.assert_close(ours[name], theirs[name], atol=0, rtol=0, msg=name)


# ---- a DFS search per family ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_dfs_run_per_family(families, family, tmp_path):
    from evomerge.experiment import Experiment
    from evomerge.fitness.perplexity import PerplexityFitness

    paths = families(family, torch.bfloat16)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    data = {
        "name": f"dfs_{family}",
        "models": {"base": str(paths[0]), "sources": {"a": str(paths[1]), "b": str(paths[2])}},
        "space": {"kind": "dfs", "repeats": 2, "scales": True, "scale_bounds": [0.5, 1.5]},
        "fitness": {"name": "perplexity", "data": str(corpus)},
        "strategy": {"name": "cmaes", "popsize": 4, "sigma0": 0.3},
        "budget": 4,
        "seed": 0,
        "executor": {"kind": "local", "threads": 1, "device": "cpu"},
        "run_dir": str(tmp_path / "run"),
    }
    summary = run_experiment(Experiment.from_dict(data), progress=False)
    assert summary["n_trials"] == 4 and summary["n_failed"] == 0
    recipe = LayerRecipe.from_dict(summary["best"]["recipe"])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "best_model")
    assert model.config.num_hidden_layers == len(recipe.path)
    source_types = transformers.AutoConfig.from_pretrained(paths[1]).layer_types if (
        family == "gemma2") else None
    if source_types:
        assert model.config.layer_types == [source_types[b] for _, b, _ in recipe.path]
    fitness = PerplexityFitness(base_model=paths[0], data=corpus)
    rescored = fitness.evaluate(model.eval(), "heldout").objectives["neg_log_ppl"]
    assert rescored == pytest.approx(summary["final"]["best"]["neg_log_ppl"], rel=0.02)
