"""`evomerge merge CONFIG.yaml --out DIR`: a mergekit-format config in, a loadable HF directory out.

Driven through typer's CliRunner on ``evomerge.cli.app`` (and once through the installed
``evomerge`` console script in a subprocess). A good merge must load with
``AutoModelForCausalLM.from_pretrained``, hold exactly the tensors ``Merger.build`` makes of the
same recipe, and carry a ``recipe.yaml`` that parses back to the same recipe. A bad input must
exit with code 2 and one error that names the offending field, before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.execution.driver import run_experiment
from evomerge.merge.engine import Merger
from evomerge.merge.methods import METHODS
from evomerge.recipe import MergeRecipe

try:
    from helpers import Family, cast_model, load_weights, make_family
except ImportError:  # tests/ imported as a package
    from tests.helpers import Family, cast_model, load_weights, make_family

# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Family:
    """``<tmp>/zoo/{base,s0,s1,s2}``: hidden 32, 3 layers, fp32 (~125 KB per model)."""
    return make_family(tmp_path_factory.mktemp("cli") / "zoo", n_sources=3)


@pytest.fixture(scope="module")
def wider(tmp_path_factory) -> Family:
    """Same architecture but hidden size 48: cannot be merged with ``zoo``."""
    return make_family(tmp_path_factory.mktemp("wider") / "zoo", n_sources=1, hidden=48)


def ties_config(base: str, sources: list[str]) -> dict:
    """A TIES config with a density gradient, a filter conditional and a global int8_mask."""
    params = [
        {"weight": [{"filter": "self_attn", "value": 0.2}, {"value": 0.8}], "density": [0.3, 0.9]},
        {"weight": 0.5, "density": 0.5},
        {"weight": 1.0, "density": 0.7},
    ]
    return {
        "merge_method": "ties",
        "base_model": base,
        "dtype": "float32",
        "parameters": {"int8_mask": True},
        "models": [{"model": m, "parameters": p} for m, p in zip(sources, params)],
    }


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    """Rich wraps at 80 columns under CliRunner: compare with whitespace runs collapsed."""
    return " ".join(text.split())


def assert_one_error(result, *needles: str) -> str:
    """Exit code 2, exactly one ``error:`` on stderr, naming every needle; returns the message."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    message = flat(result.stderr)
    assert message.count("error:") == 1, message
    assert "Traceback" not in result.output, result.output
    squeezed = "".join(message.split())  # rich also folds words longer than a line (paths)
    for needle in needles:
        assert needle in message or "".join(needle.split()) in squeezed, (
            f"{needle!r} not in {message!r}")
    return message


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]
    assert not leftovers, leftovers


def assert_merge_matches(out: Path, recipe: MergeRecipe) -> None:
    """``out`` loads as an HF model whose tensors are exactly ``Merger.build(recipe)``."""
    expected = Merger.for_recipe(recipe).build(recipe)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    state = model.state_dict()
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype, name
        assert torch.equal(state[name], tensor), name
    on_disk = load_weights(out)
    assert set(on_disk) == set(expected)
    assert all(torch.equal(on_disk[n], t) for n, t in expected.items())
    # The merge is not a copy of one of its inputs.
    base = load_weights(Path(recipe.base_model))
    assert not all(torch.equal(on_disk[n], base[n]) for n in base)
    # recipe.yaml parses back to the very recipe that was merged.
    assert MergeRecipe.from_yaml(out / "recipe.yaml") == recipe
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert torch.isfinite(logits).all()


# --------------------------------------------------------------------------------------------
# Successful merges
# --------------------------------------------------------------------------------------------


def test_ties_merge_writes_a_loadable_model_equal_to_build(zoo, tmp_path):
    config = write_config(tmp_path / "ties.yaml",
                          ties_config(str(zoo.base), [str(s) for s in zoo.sources]))
    out = tmp_path / "merged"
    result = run_cli("merge", config, "--out", out)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "ties" in flat(result.stdout)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert_merge_matches(out, MergeRecipe.from_yaml(config))
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 32


def test_relative_model_paths_resolve_from_the_current_directory(zoo, tmp_path, monkeypatch):
    """``zoo/base`` has exactly one '/', like a hub id: it must still be read as a local path."""
    monkeypatch.chdir(zoo.base.parent.parent)
    config = write_config(tmp_path / "relative.yaml",
                          ties_config("zoo/base", ["zoo/s0", "./zoo/s1", "zoo/s2/"]))
    out = Path("merged") / "relative"
    result = run_cli("merge", config, "--out", out)
    assert result.exit_code == 0, (result.output, result.exception)
    recipe = MergeRecipe.from_yaml(config)
    assert recipe.base_model == "zoo/base"
    assert_merge_matches(out, recipe)
    # Same tensors as the same recipe written with absolute paths.
    absolute = recipe.with_models({m: str(Path(m).absolute()) for m in recipe.model_paths()})
    expected = Merger.for_recipe(absolute).build(absolute)
    written = load_weights(out)
    assert all(torch.equal(written[n], t) for n, t in expected.items())
    shutil.rmtree("merged")


def test_shard_size_splits_the_weights_into_several_shards(zoo, tmp_path):
    config = write_config(tmp_path / "ties.yaml",
                          ties_config(str(zoo.base), [str(s) for s in zoo.sources]))
    out = tmp_path / "sharded"
    result = run_cli("merge", config, "--out", out, "--shard-size", "20KB")
    assert result.exit_code == 0, (result.output, result.exception)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 3, [s.name for s in shards]
    assert all(s.stat().st_size <= 20_000 for s in shards), [s.stat().st_size for s in shards]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert_merge_matches(out, MergeRecipe.from_yaml(config))


def test_overwrite_replaces_an_existing_output(zoo, tmp_path):
    config = write_config(tmp_path / "ties.yaml",
                          ties_config(str(zoo.base), [str(s) for s in zoo.sources]))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    result = run_cli("merge", config, "--out", out, "--overwrite")
    assert result.exit_code == 0, (result.output, result.exception)
    assert not (out / "stale.txt").exists()
    assert_merge_matches(out, MergeRecipe.from_yaml(config))


def test_console_script_in_a_subprocess(zoo, tmp_path):
    script = Path(sys.executable).parent / "evomerge"
    if not script.exists():
        script = Path(shutil.which("evomerge") or "evomerge")
    config = write_config(tmp_path / "ties.yaml",
                          ties_config(str(zoo.base), [str(s) for s in zoo.sources]))
    out = tmp_path / "merged-by-script"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(script), "merge", str(config), "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_merge_matches(out, MergeRecipe.from_yaml(config))
    # A bad input through the real script: exit status 2, one error on stderr, nothing written.
    bad = write_config(tmp_path / "bad.yaml", {**ties_config(str(zoo.base), [str(zoo.sources[0])]),
                                               "merge_method": "tiez"})
    proc = subprocess.run([str(script), "merge", str(bad), "--out", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert flat(proc.stderr).count("error:") == 1 and "merge_method" in proc.stderr
    assert not (tmp_path / "nope").exists()


def test_help_lists_every_method():
    result = run_cli("merge", "--help")
    assert result.exit_code == 0
    text = flat(result.stdout)
    missing = [m for m in METHODS if m not in text]
    assert not missing, f"merge --help does not mention {missing}"
    assert "--shard-size" in text and "--overwrite" in text


# --------------------------------------------------------------------------------------------
# Bad inputs: exit code 2, one error naming the field, nothing written
# --------------------------------------------------------------------------------------------


def test_unknown_method(zoo, tmp_path):
    cfg = ties_config(str(zoo.base), [str(s) for s in zoo.sources])
    config = write_config(tmp_path / "bad.yaml", {**cfg, "merge_method": "tie"})
    out = tmp_path / "out"
    message = assert_one_error(run_cli("merge", config, "--out", out), "merge_method", "'tie'",
                               "ties")
    assert "dare_ties" in message  # the known methods are listed
    assert_nothing_written(out)


def test_misspelt_parameter(zoo, tmp_path):
    cfg = ties_config(str(zoo.base), [str(s) for s in zoo.sources])
    cfg["models"][1]["parameters"] = {"weight": 0.5, "densty": 0.5}
    config = write_config(tmp_path / "bad.yaml", cfg)
    out = tmp_path / "out"
    message = assert_one_error(run_cli("merge", config, "--out", out),
                               "models[1].parameters.densty", "density")
    assert "models[0]" not in message and "models[2]" not in message
    assert_nothing_written(out)


def test_misspelt_global_parameter(zoo, tmp_path):
    cfg = ties_config(str(zoo.base), [str(s) for s in zoo.sources])
    cfg["parameters"] = {"int8mask": True}
    config = write_config(tmp_path / "bad.yaml", cfg)
    out = tmp_path / "out"
    assert_one_error(run_cli("merge", config, "--out", out), "parameters.int8mask", "int8_mask")
    assert_nothing_written(out)


def test_missing_model_directory(zoo, tmp_path):
    missing = tmp_path / "models" / "not-downloaded"
    cfg = ties_config(str(zoo.base), [str(zoo.sources[0]), str(missing), str(zoo.sources[2])])
    config = write_config(tmp_path / "bad.yaml", cfg)
    out = tmp_path / "out"
    message = assert_one_error(run_cli("merge", config, "--out", out), "models[1].model",
                               "not-downloaded")
    assert "models[0]" not in message and "models[2]" not in message
    assert_nothing_written(out)


def test_missing_relative_model_directory(zoo, tmp_path, monkeypatch):
    monkeypatch.chdir(zoo.base.parent.parent)
    config = write_config(tmp_path / "bad.yaml", ties_config("zoo/base", ["zoo/s0", "zoo/s9"]))
    out = tmp_path / "out"
    assert_one_error(run_cli("merge", config, "--out", out), "models[1].model", "zoo/s9")
    assert_nothing_written(out)


def test_incompatible_models_name_the_tensor_and_shapes(zoo, wider, tmp_path):
    cfg = ties_config(str(zoo.base), [str(zoo.sources[0]), str(wider.sources[0])])
    config = write_config(tmp_path / "bad.yaml", cfg)
    out = tmp_path / "out"
    message = assert_one_error(run_cli("merge", config, "--out", out),
                               "model.embed_tokens.weight", "(64, 48)", "(64, 32)")
    assert "shape" in message
    assert_nothing_written(out)


def test_existing_output_without_overwrite_is_left_untouched(zoo, tmp_path):
    config = write_config(tmp_path / "ties.yaml",
                          ties_config(str(zoo.base), [str(s) for s in zoo.sources]))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert_one_error(run_cli("merge", config, "--out", out), "--overwrite", "already exists")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert (out / "keep.txt").read_text() == "precious"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.tmp")]


def test_missing_config_file(tmp_path):
    out = tmp_path / "out"
    assert_one_error(run_cli("merge", tmp_path / "nope.yaml", "--out", out), "nope.yaml",
                     "no such recipe file")
    assert_nothing_written(out)


def test_bad_shard_size(zoo, tmp_path):
    config = write_config(tmp_path / "ties.yaml",
                          ties_config(str(zoo.base), [str(s) for s in zoo.sources]))
    out = tmp_path / "out"
    assert_one_error(run_cli("merge", config, "--out", out, "--shard-size", "lots"),
                     "max_shard_size", "'lots'")
    assert_nothing_written(out)


# --------------------------------------------------------------------------------------------
# Output dtype: out_dtype, else dtype, else the sources' (bf16 in, bf16 out)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16(tmp_path_factory) -> Family:
    """``zoo``'s shape stored in bfloat16 (config.json says ``dtype: bfloat16``)."""
    return make_family(tmp_path_factory.mktemp("bf16") / "zoo", n_sources=2,
                       dtype=torch.bfloat16)


def ta_config(fam: Family, **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(fam.base),
            "models": [{"model": str(s), "parameters": {"weight": w}}
                       for s, w in zip(fam.sources, (0.7, [0.2, 0.9]))], **extra}


def written_dtypes(out: Path) -> tuple[set[torch.dtype], str]:
    """The dtypes of every tensor on disk, and what config.json says they are."""
    config = json.loads((out / "config.json").read_text())
    assert "torch_dtype" not in config or config["torch_dtype"] == config.get("dtype"), config
    return {t.dtype for t in load_weights(out).values()}, config["dtype"]


def test_bf16_sources_merge_to_bf16_shards_and_a_bf16_config(bf16, tmp_path):
    config = write_config(tmp_path / "ta.yaml", ta_config(bf16))
    out = tmp_path / "merged"
    result = run_cli("merge", config, "--out", out, "--shard-size", "20KB")
    assert result.exit_code == 0, (result.output, result.exception)
    assert len(list(out.glob("*.safetensors"))) > 1
    assert written_dtypes(out) == ({torch.bfloat16}, "bfloat16")
    recipe = MergeRecipe.from_yaml(config)
    expected = Merger.for_recipe(recipe).build(recipe)
    on_disk = load_weights(out)
    assert all(torch.equal(on_disk[n], t.to(torch.bfloat16)) for n, t in expected.items())
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("extra, dtype, name", [
    ({"out_dtype": "float16"}, torch.float16, "float16"),
    ({"dtype": "float32", "out_dtype": "float16"}, torch.float16, "float16"),
    ({"dtype": "float32"}, torch.float32, "float32"),  # no out_dtype: the merge's dtype
])
def test_out_dtype_then_dtype_decide_what_is_written(bf16, tmp_path, extra, dtype, name):
    config = write_config(tmp_path / "ta.yaml", ta_config(bf16, **extra))
    out = tmp_path / "merged"
    result = run_cli("merge", config, "--out", out)
    assert result.exit_code == 0, (result.output, result.exception)
    assert written_dtypes(out) == ({dtype}, name)
    # the values are the merge (to the precision of the narrower of bf16 inputs and output)
    recipe = MergeRecipe.from_yaml(config)
    expected = Merger.for_recipe(recipe.model_copy(update={"dtype": "float32"})).build(recipe)
    on_disk = load_weights(out)
    for n, t in expected.items():
        torch.testing.assert_close(on_disk[n].float(), t, atol=1e-3, rtol=1e-2)


def test_bf16_layer_stack_exports_bf16(bf16, tmp_path):
    stack = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(bf16.sources[0]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(bf16.sources[1]), "layer_range": [1, 3]}]}]}
    config = write_config(tmp_path / "stack.yaml", stack)
    out = tmp_path / "stacked"
    result = run_cli("merge", config, "--out", out)
    assert result.exit_code == 0, (result.output, result.exception)
    assert written_dtypes(out) == ({torch.bfloat16}, "bfloat16")
    source = load_weights(bf16.sources[1])
    assert torch.equal(load_weights(out)["model.layers.3.mlp.up_proj.weight"],
                       source["model.layers.2.mlp.up_proj.weight"])


def test_search_run_exports_its_best_in_the_sources_dtype(tmp_path):
    """The best model is materialised from the fitness model (float32); over bf16 sources the
    export is bf16 all the same, and its files are 0644 / 0755 under umask 022."""
    from evomerge.experiment import Experiment
    from evomerge.zoo.digits import build_digits_zoo

    zoo = build_digits_zoo(tmp_path / "digits", seed=0, progress=False)
    models = {k: cast_model(zoo[k], tmp_path / "bf16" / k, torch.bfloat16)
              for k in ("base", "expert_0_4", "expert_5_9")}
    data = {
        "name": "bf16", "seed": 0, "budget": 4, "run_dir": str(tmp_path / "run"),
        "models": {"base": str(models["base"]),
                   "sources": {"a": str(models["expert_0_4"]), "b": str(models["expert_5_9"])}},
        "space": {"method": "task_arithmetic",
                  "params": [{"name": "weight", "per": "layer", "bounds": [0.0, 1.5]}]},
        "fitness": {"name": "digits"},
        "strategy": {"name": "random", "popsize": 4},
    }
    old = os.umask(0o022)
    try:
        run_experiment(Experiment.from_dict(data), progress=False)
    finally:
        os.umask(old)
    best = tmp_path / "run" / "best_model"
    assert written_dtypes(best) == ({torch.bfloat16}, "bfloat16")
    modes = {p.name: p.stat().st_mode & 0o777 for p in [best, *best.iterdir()]}
    assert modes == {"best_model": 0o755, "config.json": 0o644, "model.safetensors": 0o644,
                     "recipe.yaml": 0o644}, modes
    for name in ("summary.json", "best_recipe.yaml", "experiment.yaml", "provenance.json"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o644, name


# --------------------------------------------------------------------------------------------
# --cache and --chunk
# --------------------------------------------------------------------------------------------


def test_cache_and_chunk_reach_the_merger_and_do_not_change_the_result(zoo, tmp_path,
                                                                      monkeypatch):
    """Passed as the engine's keywords (spied on), and the written model is the same whatever
    they are."""
    from evomerge.merge import engine, from_config

    seen: list[dict] = []

    class Spy(engine.Merger):
        def __init__(self, models, **kwargs):
            seen.append({k: kwargs.get(k) for k in ("cache", "chunk")})
            super().__init__(models, **kwargs)

    monkeypatch.setattr(from_config, "Merger", Spy)
    config = write_config(tmp_path / "ties.yaml",
                          ties_config(str(zoo.base), [str(s) for s in zoo.sources]))
    runs = [((), {"cache": "off", "chunk": None}),
            (("--cache", "auto"), {"cache": "auto", "chunk": None}),
            (("--cache", "2GB", "--chunk", "4096"), {"cache": "2gb", "chunk": 4096}),
            (("--cache", "ON", "--chunk", "7"), {"cache": "on", "chunk": 7})]
    written = []
    for i, (args, want) in enumerate(runs):
        out = tmp_path / f"out{i}"
        result = run_cli("merge", config, "--out", out, *args)
        assert result.exit_code == 0, (args, result.output, result.exception)
        assert seen[-1] == want, args
        written.append(load_weights(out))
    assert len(seen) == len(runs)
    for other in written[1:]:
        assert all(torch.equal(other[n], t) for n, t in written[0].items())


def test_cache_and_chunk_work_with_the_real_engine(zoo, tmp_path):
    config = write_config(tmp_path / "ties.yaml",
                          ties_config(str(zoo.base), [str(s) for s in zoo.sources]))
    out = tmp_path / "out"
    result = run_cli("merge", config, "--out", out, "--cache", "1GiB", "--chunk", "1000")
    assert result.exit_code == 0, (result.output, result.exception)
    assert_merge_matches(out, MergeRecipe.from_yaml(config))


@pytest.mark.parametrize("args, needle", [
    (("--cache", "sometimes"), "--cache"),
    (("--cache", "0"), "--cache"),
    (("--chunk", "0"), "--chunk"),
])
def test_bad_cache_or_chunk(zoo, tmp_path, args, needle):
    config = write_config(tmp_path / "ties.yaml",
                          ties_config(str(zoo.base), [str(s) for s in zoo.sources]))
    out = tmp_path / "out"
    result = run_cli("merge", config, "--out", out, *args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert needle in flat(result.output) + flat(result.stderr or "")
    assert_nothing_written(out)


def test_help_shows_cache_and_chunk():
    text = flat(run_cli("merge", "--help").stdout)
    assert "--cache" in text and "--chunk" in text
