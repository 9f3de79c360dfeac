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
from evomerge.merge.engine import Merger
from evomerge.merge.methods import METHODS
from evomerge.recipe import MergeRecipe

try:
    from helpers import Family, load_weights, make_family
except ImportError:  # tests/ imported as a package
    from tests.helpers import Family, load_weights, make_family

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
