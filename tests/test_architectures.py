"""The decoder families users bring, end to end: names, `evomerge merge` against mergekit, and a
short `evomerge run` whose exported best model is the candidate it evaluated.

Every family (``tests/arch_models.py``: tiny random bf16 checkpoints, base + 2 sources, saved with
``save_pretrained`` and a tokenizer) goes through:

* names: each checkpoint tensor lands where transformers' ``from_pretrained`` puts it
  (GPT-NeoX's ``embed_out.weight`` in ``lm_head.weight``; Pythia's old attention buffers nowhere);
* merge: ``evomerge merge`` (the CLI) writes the sources' tensor names and loads in transformers;
  ties / task_arithmetic / linear in bf16 equal the float64 merge rounded once to bf16 (within
  the float32 noise test_vs_mergekit allows) and are no farther from it than mergekit's output,
  and a per-layer linear gradient lands on the same layers as mergekit's (its layer detection
  and ours agree on every family);
* search: ``evomerge run`` with a per-layer TIES space (4 candidates, CPU, the ``lm`` fitness on
  a 6-item multiple-choice suite) fails no candidate, exports bf16 under the sources' names, and
  the export, loaded with ``AutoModelForCausalLM.from_pretrained``, holds the candidate's
  weights and buffers bit for bit and gives its logits.

Pythia's bool ``attention.bias`` passes through every method unchanged (equal in all models);
mergekit writes it as a bf16 tensor of 0/1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
import transformers
import yaml
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.execution.driver import run_experiment
from evomerge.merge.engine import Merger
from evomerge.recipe import MergeRecipe

try:
    from arch_models import FAMILIES, MERGEKIT_FAMILIES, config_for, make_family
    from helpers import cast_model, load_weights
except ImportError:  # tests/ imported as a package
    from tests.arch_models import FAMILIES, MERGEKIT_FAMILIES, config_for, make_family
    from tests.helpers import cast_model, load_weights

PROMPT = "copy a b c d = a b c d </s> sort q 3 z = 3 q z"
PYTHIA_BUFFERS = ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq")


def expected_renames(family: str, names: set[str]) -> dict[str, str | None]:
    """The checkpoint names a family's model class calls otherwise (None: does not keep)."""
    if family != "gpt_neox":
        return {}
    return {"embed_out.weight": "lm_head.weight",
            **{n: None for n in names if n.endswith(PYTHIA_BUFFERS)}}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """family -> [base, s0, s1], written on first use (well under a second each)."""
    root = tmp_path_factory.mktemp("arch")
    made: dict[str, list[Path]] = {}

    def get(family: str) -> list[Path]:
        if family not in made:
            made[family] = make_family(family, root / family, n_models=3, seed=0)
        return made[family]

    return get


def stored_names(path: Path) -> set[str]:
    with safetensors.safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


def logits(model: torch.nn.Module, tok) -> torch.Tensor:
    batch = tok([PROMPT], return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_names_land_where_from_pretrained_puts_them(family, families):
    """Build a source into a model made from its config: every tensor must be where
    ``from_pretrained`` of that source puts it, and the model must compute what it computes."""
    base, s0, _ = families(family)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(s0).eval()
    made = transformers.AutoModelForCausalLM.from_config(loaded.config).eval()
    merger = Merger([base, s0])
    names = merger.target_names(made)
    assert set(names) == stored_names(s0)
    assert {c: m for c, m in names.items() if m != c} == expected_renames(family, set(names))
    merger.copy(str(s0), into=made)
    want = loaded.state_dict()
    for checkpoint, model in names.items():
        if model is not None:
            assert torch.equal(made.state_dict()[model], want[model]), checkpoint
    tok = transformers.AutoTokenizer.from_pretrained(s0)
    assert torch.equal(logits(made, tok), logits(loaded, tok))


def test_names_follow_from_pretrained_rules():
    """Beyond the families: a bare base-model checkpoint (no ``model.`` prefix) maps into the
    ``*ForCausalLM`` class as from_pretrained maps it; a module that is not a transformers model
    keeps the checkpoint's names."""
    from evomerge.merge.names import model_names

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config_for("llama"))
    bare = ["embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "norm.weight"]
    assert model_names(model, bare) == {n: f"model.{n}" for n in bare}
    assert model_names(model, ["lm_head.weight"]) == {"lm_head.weight": "lm_head.weight"}
    assert model_names(model, ["model.layers.0.self_attn.rotary_emb.inv_freq"]) == {
        "model.layers.0.self_attn.rotary_emb.inv_freq": None}
    plain = torch.nn.Linear(2, 2)
    assert model_names(plain, ["weight", "other"]) == {"weight": "weight", "other": "other"}


def test_a_target_that_does_not_fit_is_refused_before_writing(families):
    """The `build target does not match` check names what a target lacks; nothing is written."""
    base, s0, s1 = families("llama")
    config = transformers.AutoConfig.from_pretrained(base)
    config.num_hidden_layers -= 1
    made = transformers.AutoModelForCausalLM.from_config(config)
    before = {k: v.clone() for k, v in made.state_dict().items()}
    recipe = MergeRecipe.from_dict({"merge_method": "linear", "models": [
        {"model": str(s0), "parameters": {"weight": 1.0}}]})
    with pytest.raises(ValueError, match="build target does not match") as err:
        Merger([base, s0, s1]).build(recipe, into=made)
    assert "missing tensor model.layers.2.mlp.down_proj.weight" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in made.state_dict().items())


def _tied_storing_head(families, tmp_path, head) -> list[Path]:
    """The tied family, each checkpoint also storing ``lm_head.weight = head(embeddings)``."""
    paths = []
    for k, src in enumerate(families("tied")):
        out = cast_model(src, tmp_path / f"m{k}", torch.bfloat16)
        weights = load_weights(out)
        weights["lm_head.weight"] = head(weights["model.embed_tokens.weight"]).contiguous()
        safetensors.torch.save_file(weights, str(out / "model.safetensors"),
                                    metadata={"format": "pt"})
        paths.append(out)
    return paths


def test_a_stored_tied_head_equal_to_the_embeddings_is_written_once(families, suite, tmp_path):
    """Tied-embedding checkpoints that store lm_head.weight anyway, equal to the embeddings (as
    some releases do): from_pretrained ties them; the candidate and its export hold the merged
    embeddings in both."""
    from evomerge.execution.evaluator import Evaluator

    paths = _tied_storing_head(families, tmp_path, lambda e: e.clone())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(paths[1])
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    recipe = MergeRecipe.from_dict({
        "merge_method": "task_arithmetic", "base_model": str(paths[0]),
        "models": [{"model": str(p), "parameters": {"weight": 0.6}} for p in paths[1:]]})
    evaluator = Evaluator([str(p) for p in paths], "lm", {"suite": str(suite)}, str(paths[0]))
    state, _ = evaluator.materialise(recipe)
    merged = Merger.for_recipe(recipe).build(recipe)
    assert torch.equal(state["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])
    assert torch.equal(state["lm_head.weight"], merged["lm_head.weight"])


def test_a_stored_tied_head_that_differs_is_refused_naming_the_fix(families, suite, tmp_path):
    """... but when a checkpoint's stored head differs, transformers unties the model on load,
    which a tied build target cannot follow: refused before anything is written."""
    paths = _tied_storing_head(families, tmp_path, lambda e: e.flip(0))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(paths[1])
    assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)
    made = transformers.AutoModelForCausalLM.from_config(loaded.config)
    recipe = MergeRecipe.from_dict({"merge_method": "linear", "models": [
        {"model": str(paths[1]), "parameters": {"weight": 1.0}}]})
    with pytest.raises(ValueError, match="model.embed_tokens.weight and lm_head.weight are one "
                                         "tensor .* tie_word_embeddings: false"):
        Merger([str(p) for p in paths]).build(recipe, into=made)


# --------------------------------------------------------------------------------------------
# evomerge merge, and against mergekit
# --------------------------------------------------------------------------------------------


def f32(x: float) -> float:
    return float(np.float32(x))


# irregular float32 weights (see test_vs_mergekit: short decimals put bf16 results on rounding
# midpoints, where noise decides)
LN2, INV_E, EULER, INV_PI = (f32(math.log(2)), f32(math.exp(-1)), f32(0.5772156649),
                             f32(1 / math.pi))


def merge_config(method: str, paths: list[Path]) -> dict:
    base, s0, s1 = (str(p) for p in paths)
    if method == "linear":
        return {"merge_method": "linear", "dtype": "bfloat16",
                "models": [{"model": s0, "parameters": {"weight": INV_PI}},
                           {"model": s1, "parameters": {"weight": LN2}}]}
    per_source = {"ties": [{"weight": LN2, "density": 0.3}, {"weight": EULER, "density": 0.7}],
                  "task_arithmetic": [{"weight": LN2}, {"weight": -INV_E}]}[method]
    return {"merge_method": method, "base_model": base, "dtype": "bfloat16",
            "models": [{"model": m, "parameters": p} for m, p in zip((s0, s1), per_source)]}


def test_evomerge_merge_cli_writes_the_sources_names(families, tmp_path):
    """Through the CLI, for the family whose names transformers changes: the output keeps the
    checkpoint's names (embed_out, the old buffers) and loads in transformers."""
    paths = families("gpt_neox")
    config = tmp_path / "ties.yaml"
    config.write_text(yaml.safe_dump(merge_config("ties", paths)))
    result = CliRunner().invoke(app, ["merge", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert stored_names(tmp_path / "out") == stored_names(paths[0])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.state_dict()["lm_head.weight"],
                       load_weights(tmp_path / "out")["embed_out.weight"])


MERGE_CASES = [pytest.param(f, m, id=f"{f}-{m}")
               for f in MERGEKIT_FAMILIES for m in ("ties", "task_arithmetic", "linear")]


@pytest.mark.slow
@pytest.mark.parametrize("family, method", MERGE_CASES)
def test_bf16_merge_against_mergekit(family, method, families, tmp_path):
    pytest.importorskip("mergekit")
    from test_vs_mergekit import BF16_MISMATCH, mergekit_merge, mismatches, reference64

    config = merge_config(method, families(family))
    recipe = MergeRecipe.from_dict({**config, "seed": 0})
    ev = Merger.for_recipe(recipe).build(recipe)
    mk = mergekit_merge(config, tmp_path / "mergekit-out")
    assert set(ev) == set(mk), sorted(set(ev) ^ set(mk))
    floats = {n: t for n, t in ev.items() if t.is_floating_point()}
    ref = {n: r for n, r in reference64(config).items() if n in floats}
    assert all(t.dtype == mk[n].dtype == torch.bfloat16 for n, t in floats.items())
    # non-float tensors (Pythia's bool mask) keep their values; mergekit's linear writes bf16
    assert all(torch.equal(t, mk[n].to(t.dtype)) for n, t in ev.items() if n not in floats)
    ours, n = mismatches(floats, ref)
    theirs, _ = mismatches(mk, ref)
    # a handful of float32 straddles of a bf16 boundary (test_vs_mergekit measured up to 8 in
    # 119k; here 0 to 4 of ~30k, where mergekit misses 20-35% with ties / task arithmetic)
    assert ours <= max(BF16_MISMATCH * n, 8), (family, method, ours, theirs, n)
    if method != "linear":  # mergekit computes linear in float32 too
        assert theirs >= ours, (family, method, ours, theirs, n)


@pytest.mark.slow
@pytest.mark.parametrize("family", MERGEKIT_FAMILIES)
def test_layer_gradient_lands_where_mergekit_puts_it(family, families, tmp_path):
    """Task arithmetic whose weights run over the layers (layer i of 3 reads t = i / 2; the
    tensors outside the blocks read 0), on float32 copies of the family so that both tools
    compute in float32: mergekit's architecture definitions and evomerge's block detection must
    give every tensor the same t."""
    pytest.importorskip("mergekit")
    from test_vs_mergekit import ATOL, RTOL, mergekit_merge

    base, s0, s1 = (str(cast_model(p, tmp_path / p.name, torch.float32))
                    for p in families(family))
    config = {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
              "models": [{"model": s0, "parameters": {"weight": [0.1, 0.9]}},
                         {"model": s1, "parameters": {"weight": [0.7, -0.2, 0.4]}}]}
    recipe = MergeRecipe.from_dict(config)
    ev = Merger.for_recipe(recipe).build(recipe)
    mk = mergekit_merge(config, tmp_path / "mergekit-out")
    assert set(ev) == set(mk)
    far = [n for n, t in ev.items()
           if not torch.allclose(t.double(), mk[n].double(), atol=ATOL, rtol=RTOL)]
    assert not far, f"{family}: tensors merged with another t than mergekit's: {far}"


# --------------------------------------------------------------------------------------------
# evomerge run: a per-layer search, its export
# --------------------------------------------------------------------------------------------

LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    """A 6-item multiple-choice suite in the toy vocabulary (search and held-out)."""
    root = tmp_path_factory.mktemp("suite")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        letters = list(rng.choice(list(LETTERS), size=4, replace=False))
        task = ("copy", "reverse", "sort")[i % 3]
        right = {"copy": letters, "reverse": letters[::-1], "sort": sorted(letters)}[task]
        choices = [" ".join(right), " ".join(letters[1:] + letters[:1]),
                   " ".join(sorted(letters, reverse=True))]
        rows.append({"id": f"m{i}", "prompt": f"{task} {' '.join(letters)} =",
                     "choices": choices, "gold": 0})
    data = root / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = {"tasks": [{"name": "mc", "kind": "multiple_choice", "search": str(data),
                      "heldout": str(data)}],
           "objectives": [{"name": "acc", "tasks": "all"}]}
    path = root / "suite.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def experiment(family: str, paths: list[Path], run_dir: Path, suite: Path) -> dict:
    base, s0, s1 = paths
    return {
        "name": f"arch_{family}",
        "models": {"base": str(base), "sources": {"s0": str(s0), "s1": str(s1)}},
        "space": {"method": "ties", "params": [
            {"name": "weight", "per": "layer", "bounds": [0.0, 1.0]},
            {"name": "density", "per": "layer", "bounds": [0.1, 1.0]}]},
        "fitness": {"name": "lm", "suite": str(suite), "batch_size": 8},
        "strategy": {"name": "cmaes", "popsize": 4, "sigma0": 0.3},
        "budget": 4,
        "seed": 0,
        "executor": {"kind": "local", "device": "cpu", "threads": 1},
        "run_dir": str(run_dir),
        "export": True,
    }


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_search_exports_the_candidate_it_scored(family, families, suite, tmp_path):
    from evomerge.execution.evaluator import Evaluator
    from evomerge.experiment import Experiment
    from evomerge.report import BEST_MODEL, BEST_RECIPE

    paths = families(family)
    run_dir = tmp_path / "run"
    summary = run_experiment(Experiment.from_dict(experiment(family, paths, run_dir, suite)),
                             progress=False)
    assert summary["n_trials"] == 4 and summary["n_failed"] == 0, summary
    out = run_dir / BEST_MODEL
    assert stored_names(out) == stored_names(paths[0])  # the sources' names, not the class's
    with safetensors.safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(n).get_dtype() for n in f.keys()}  # noqa: SIM118
    assert dtypes <= {"BF16", "BOOL"} and "BF16" in dtypes
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert exported.dtype == torch.bfloat16

    # the candidate as the search builds it: the recipe written into the fitness's model
    recipe = MergeRecipe.from_yaml((run_dir / BEST_RECIPE).read_text())
    evaluator = Evaluator([str(p) for p in paths], "lm", {"suite": str(suite)}, str(paths[0]))
    candidate = evaluator.build(recipe).eval()
    theirs = exported.state_dict()
    assert all(torch.equal(t, theirs[n]) for n, t in candidate.state_dict().items())
    tok = transformers.AutoTokenizer.from_pretrained(out)
    # scoring a source copies all of it in (GPT-NeoX's head included)
    source = transformers.AutoModelForCausalLM.from_pretrained(paths[1]).eval()
    scored = Evaluator([str(p) for p in paths], "lm", {"suite": str(suite)}, str(paths[0]))
    scored.evaluate_source(str(paths[1]))
    theirs = source.state_dict()
    assert all(torch.equal(t, theirs[n]) for n, t in scored.model.state_dict().items())

    # buffers too: rotary frequencies stay float32 in both, as from_pretrained keeps them
    assert not buffers_cast(candidate, exported)
    assert torch.equal(logits(exported, tok), logits(candidate, tok))
    assert torch.equal(logits(scored.model, tok), logits(source, tok))


def buffers_cast(model: torch.nn.Module, reference: torch.nn.Module) -> list[str]:
    """Buffers (rotary frequencies) whose dtype differs between two models of one class."""
    theirs = dict(reference.named_buffers())
    return [n for n, b in model.named_buffers() if n in theirs and b.dtype != theirs[n].dtype]
