"""The toy zoo: a real, deterministic, cached, offline-loadable base + three task experts."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.zoo import TASKS, build_toy_zoo, task_loss, toy_zoo_is_built
from evomerge.zoo.toy import MANIFEST, VOCAB, make_tokenizer, task_example

MODEL_NAMES = ["base", "expert_copy", "expert_reverse", "expert_sort"]


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory) -> tuple[dict[str, Path], float]:
    out = tmp_path_factory.mktemp("toy") / "zoo"
    started = time.perf_counter()
    paths = build_toy_zoo(out, seed=0, size="tiny", progress=False)
    return paths, time.perf_counter() - started


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


# ---- the data -------------------------------------------------------------------------------


def test_task_examples_state_the_three_tasks():
    assert task_example("copy", "b1a") == ("copy b 1 a", "b 1 a")
    assert task_example("reverse", "b1a") == ("reverse b 1 a", "a 1 b")
    assert task_example("sort", "b1a") == ("sort b 1 a", "1 a b")  # digits sort before letters


def test_tokenizer_is_word_level_with_bos_and_special_tokens():
    tok = make_tokenizer()
    ids = tok("sort b 1 a = 1 a b")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "sort", "b", "1", "a", "=", "1", "a", "b"]
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert len(tok) == len(VOCAB)


def test_unknown_size_and_task_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="size"):
        build_toy_zoo(tmp_path, size="huge")
    with pytest.raises(ValueError, match="task"):
        task_loss(None, make_tokenizer(), "add")


# ---- the build --------------------------------------------------------------------------------


def test_tiny_zoo_builds_in_seconds_into_hf_directories(tiny_zoo):
    paths, seconds = tiny_zoo
    assert list(paths) == MODEL_NAMES
    assert seconds < 60, f"tiny zoo took {seconds:.1f} s; it should take a few seconds"
    for path in paths.values():
        names = {p.name for p in path.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
        assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)  # safetensors only
    manifest = json.loads((paths["base"].parent / MANIFEST).read_text())
    assert (manifest["seed"], manifest["size"]) == (0, "tiny")
    assert manifest["models"] == {name: name for name in MODEL_NAMES}


def test_saved_directories_load_offline_with_auto_classes(tiny_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    paths, _ = tiny_zoo
    for path in paths.values():
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        assert isinstance(model, LlamaForCausalLM)
        assert model.config.tie_word_embeddings is False
        assert model.config.vocab_size == len(tok) == len(VOCAB)
        assert tok.pad_token_id is not None and tok.eos_token_id is not None
        batch = tok(["copy a b = a b", "sort c"], return_tensors="pt", padding=True)
        logits = model(**batch).logits
        assert logits.shape == (2, batch["input_ids"].shape[1], len(VOCAB))
        assert torch.isfinite(logits).all()


def test_each_expert_beats_the_base_on_its_own_task(tiny_zoo):
    from evomerge.zoo import load_toy_model

    paths, _ = tiny_zoo
    base, tok = load_toy_model(paths["base"])
    for task in TASKS:
        expert, _ = load_toy_model(paths[f"expert_{task}"])
        base_loss = task_loss(base, tok, task, n=128)
        expert_loss = task_loss(expert, tok, task, n=128)
        assert expert_loss < base_loss - 0.05, (task, expert_loss, base_loss)


def test_experts_are_fine_tunes_of_the_base_not_fresh_models(tiny_zoo):
    paths, _ = tiny_zoo
    base = _tensors(paths["base"])
    for task in TASKS:
        expert = _tensors(paths[f"expert_{task}"])
        assert expert.keys() == base.keys()
        drift = sum((expert[k] - base[k]).norm() ** 2 for k in base) ** 0.5
        scale = sum(base[k].norm() ** 2 for k in base) ** 0.5
        assert 0 < drift < 0.5 * scale, (task, float(drift), float(scale))


def test_second_build_with_same_seed_and_size_reuses_the_files(tiny_zoo):
    paths, _ = tiny_zoo
    root = paths["base"].parent
    before = _mtimes(root)
    started = time.perf_counter()
    again = build_toy_zoo(root, seed=0, size="tiny", progress=False)
    assert again == paths
    assert _mtimes(root) == before
    assert time.perf_counter() - started < 2.0


def test_incomplete_directory_is_not_taken_for_a_built_zoo(tiny_zoo, tmp_path):
    paths, _ = tiny_zoo
    copy = tmp_path / "zoo"
    shutil.copytree(paths["base"].parent, copy)
    assert toy_zoo_is_built(copy, seed=0, size="tiny")
    assert not toy_zoo_is_built(copy, seed=1, size="tiny")
    assert not toy_zoo_is_built(copy, seed=0, size="small")
    (copy / "expert_sort" / "model.safetensors").unlink()
    assert not toy_zoo_is_built(copy, seed=0, size="tiny")
    shutil.copytree(paths["base"].parent, copy, dirs_exist_ok=True)
    (copy / MANIFEST).unlink()  # an interrupted build never wrote its manifest
    assert not toy_zoo_is_built(copy, seed=0, size="tiny")


@pytest.mark.slow
def test_same_seed_gives_bit_identical_tensors_and_force_rebuilds(tiny_zoo, tmp_path):
    paths, _ = tiny_zoo
    rng_before, threads_before = torch.get_rng_state(), torch.get_num_threads()
    other = build_toy_zoo(tmp_path / "zoo", seed=0, size="tiny", progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
    assert torch.get_num_threads() == threads_before  # and so is its thread count
    for name in MODEL_NAMES:
        a, b = _tensors(paths[name]), _tensors(other[name])
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name

    before = _mtimes(tmp_path / "zoo")
    rebuilt = build_toy_zoo(tmp_path / "zoo", seed=0, size="tiny", force=True, progress=False)
    after = _mtimes(tmp_path / "zoo")
    assert after.keys() == before.keys()
    assert all(after[f] != before[f] for f in before)  # every file was rewritten
    for name in MODEL_NAMES:
        a, b = _tensors(paths[name]), _tensors(rebuilt[name])
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_different_seed_gives_different_tensors(tiny_zoo, tmp_path):
    paths, _ = tiny_zoo
    other = build_toy_zoo(tmp_path / "zoo", seed=1, size="tiny", progress=False)
    for name in MODEL_NAMES:
        a, b = _tensors(paths[name]), _tensors(other[name])
        assert all(not torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((tmp_path / "zoo" / MANIFEST).read_text())["seed"] == 1
