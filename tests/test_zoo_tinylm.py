"""The tiny-LM zoo: generated tasks, shipped evaluation data, tokenizer, deterministic cached build,
and experts that beat the base on their own task."""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.zoo._common import MANIFEST
from evomerge.zoo.tinylm import (
    DATA_DIR,
    LEXICON,
    MC_TASKS,
    SPLITS,
    TASKS,
    _draw_in,
    build_tinylm_zoo,
    exact_match,
    exact_match_table,
    load_items,
    make_tokenizer,
    problem_split,
    task_items,
    tinylm_zoo_is_built,
    write_task_data,
)

MODEL_NAMES = ["base", *(f"expert_{t}" for t in TASKS)]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory) -> tuple[dict[str, Path], float]:
    out = tmp_path_factory.mktemp("tinylm") / "zoo"
    started = time.perf_counter()
    paths = build_tinylm_zoo(out, seed=0, size="tiny", progress=False)
    return paths, time.perf_counter() - started


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _expected_answer(task: str, prompt: str) -> str:
    """The answer of a prompt, worked out independently of the generator."""
    body = prompt[len(task) + 1 : -1]
    if task == "add":
        a, b = body.split("+")
        return str(int(a) + int(b))
    if task == "reverse":
        return " ".join(reversed(body.split(" ")))
    if task == "sort":
        return " ".join(sorted(body.split(" ")))
    if body.isdigit():  # translate, digits -> Vellan
        return " ".join(LEXICON[int(d)] for d in body)
    return "".join(str(LEXICON.index(w)) for w in body.split(" "))


# ---- the data -------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_shipped_items_are_correct_and_well_formed(task):
    for split in SPLITS:
        items = load_items(task, split)
        assert len(items) == 300
        assert [it["id"] for it in items] == [f"{task}-{split[0]}-{i:04d}" for i in range(300)]
        for it in items:
            assert set(it) == {"id", "prompt", "answer"}
            assert it["prompt"].startswith(f"{task} ") and it["prompt"].endswith("=")
            assert it["answer"] == _expected_answer(task, it["prompt"])
            assert "\n" not in it["answer"] and it["answer"] == it["answer"].strip()


def test_task_formats_match_the_documented_examples():
    assert _expected_answer("add", "add 345+78=") == "423"
    items = {t: load_items(t, "search") for t in TASKS}
    translate = items["translate"]
    # both directions occur, and the Vellan side uses only lexicon words
    assert any(it["prompt"][10:-1].isdigit() for it in translate)
    assert any(it["answer"].isdigit() for it in translate)
    words = {w for it in translate for w in it["answer"].split() if not it["answer"].isdigit()}
    assert words <= set(LEXICON)
    assert {len(it["prompt"].split()) - 1 for it in items["reverse"]} == set(range(3, 8))


def test_sort_mc_has_one_sorted_choice_and_three_near_misses():
    for split in SPLITS:
        sort_prompts = {it["prompt"] for it in load_items("sort", split)}
        items = load_items("sort_mc", split)
        assert len(items) == 300
        for it in items:
            assert set(it) == {"id", "prompt", "choices", "gold"}
            assert it["prompt"] not in sort_prompts  # disjoint from the generation items
            assert problem_split("sort", it["prompt"]) == split
            letters = it["prompt"][len("sort ") : -1].split(" ")
            right = " ".join(sorted(letters))
            assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
            assert it["choices"][it["gold"]] == right
            for choice in it["choices"]:
                # a near miss: the input's letters in a wrong order, or one letter off the answer
                got = choice.split(" ")
                assert len(got) == len(letters)
                misplaced = sorted(got) == sorted(letters) and got != sorted(letters)
                one_off = got == sorted(got) and sum((Counter(got) - Counter(letters)).values()) == 1
                assert (choice == right) or misplaced or one_off, (it["id"], choice)


def test_shipped_files_equal_the_generator(tmp_path):
    written = write_task_data(tmp_path)
    assert len(written) == 2 * len(TASKS + MC_TASKS)
    for path in written:
        assert path.read_bytes() == (DATA_DIR / path.name).read_bytes(), path.name


def test_search_heldout_and_training_are_disjoint():
    for task in TASKS:
        seen: dict[str, set[str]] = {}
        for split in SPLITS:
            prompts = [it["prompt"] for it in load_items(task, split)]
            assert len(set(prompts)) == len(prompts)
            assert all(problem_split(task, p) == split for p in prompts)
            seen[split] = set(prompts)
        assert not seen["search"] & seen["heldout"]
        rng = random.Random(123)
        train = {_draw_in(task, "train", rng)[0] for _ in range(3000)}
        assert not train & (seen["search"] | seen["heldout"])


def test_split_shares_follow_the_hash_partition():
    rng = random.Random(5)
    from evomerge.zoo.tinylm import draw_problem

    counts = {"search": 0, "heldout": 0, "train": 0}
    for _ in range(20_000):
        counts[problem_split("add", draw_problem("add", rng)[0])] += 1
    assert 0.08 < counts["search"] / 20_000 < 0.12
    assert 0.08 < counts["heldout"] / 20_000 < 0.12


def test_bad_task_split_and_size_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="task"):
        task_items("multiply", "search")
    with pytest.raises(ValueError, match="split"):
        task_items("add", "train")
    with pytest.raises(ValueError, match="size"):
        build_tinylm_zoo(tmp_path, size="huge")
    with pytest.raises(FileNotFoundError, match="write_task_data"):
        load_items("add", "search", tmp_path)


# ---- the tokenizer ----------------------------------------------------------------------------


def test_tokenizer_round_trips_and_splits_symbols(tokenizer):
    text = "reverse k q a m=m a q k\n"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    toks = tokenizer.convert_ids_to_tokens(tokenizer("add 345+78=423")["input_ids"])
    assert toks == ["<s>", "add", "Ġ", "3", "4", "5", "+", "7", "8", "=", "4", "2", "3"]
    # the Vellan words are whole tokens, learnt by BPE
    assert all(f"Ġ{w}" in tokenizer.get_vocab() for w in LEXICON)
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == (
        "<pad>", "<s>", "</s>"
    )


def test_prompt_tokens_are_a_prefix_of_prompt_plus_answer(tokenizer):
    """Scoring and generation see the boundary training used: no token straddles ``=``."""
    for task in TASKS:
        for it in load_items(task, "heldout"):
            p = tokenizer(it["prompt"])["input_ids"]
            full = tokenizer(it["prompt"] + it["answer"])["input_ids"]
            assert full[: len(p)] == p
            assert tokenizer.decode(full[len(p) :]) == it["answer"]


def test_tokenizer_reloads_identically_after_save(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    texts = ["add 9+92=101\n", "translate ti nu ze=307", "sort b a c=a b c", "xyz QQ é"]
    for text in texts:
        assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert again.get_vocab() == tokenizer.get_vocab()
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    )


def test_tokenizer_is_deterministic(tokenizer):
    assert make_tokenizer().backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


# ---- the build --------------------------------------------------------------------------------


def test_tiny_zoo_builds_in_seconds_into_hf_directories(tiny_zoo):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    paths, seconds = tiny_zoo
    assert list(paths) == MODEL_NAMES
    assert seconds < 120, f"tiny zoo took {seconds:.1f} s; it should take seconds"
    for path in paths.values():
        names = {p.name for p in path.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
        assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        assert isinstance(model, LlamaForCausalLM)
    manifest = json.loads((paths["base"].parent / MANIFEST).read_text())
    assert (manifest["seed"], manifest["size"], manifest["kind"]) == (0, "tiny", "tiny-lm")
    assert manifest["models"] == {name: name for name in MODEL_NAMES}
    assert set(manifest["heldout_exact_match"]) == set(MODEL_NAMES)
    assert all(set(row) == set(TASKS) for row in manifest["heldout_exact_match"].values())


def test_experts_differ_from_base_and_each_other(tiny_zoo):
    paths, _ = tiny_zoo
    tensors = {n: load_file(p / "model.safetensors") for n, p in paths.items()}
    name = "model.layers.0.self_attn.q_proj.weight"
    for a in MODEL_NAMES:
        for b in MODEL_NAMES:
            if a < b:
                assert not torch.equal(tensors[a][name], tensors[b][name]), (a, b)


def _same_weights(a: Path, b: Path) -> bool:
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_cache_is_reused_and_force_rebuilds_the_same_weights(tiny_zoo, tmp_path):
    paths, _ = tiny_zoo
    root = paths["base"].parent
    snapshot = tmp_path / "before"
    shutil.copytree(root, snapshot)
    before = _mtimes(root)
    assert tinylm_zoo_is_built(root, seed=0, size="tiny")
    assert not tinylm_zoo_is_built(root, seed=1, size="tiny")
    assert not tinylm_zoo_is_built(root, seed=0, size="small")
    build_tinylm_zoo(root, seed=0, size="tiny", progress=False)
    assert _mtimes(root) == before
    build_tinylm_zoo(root, seed=0, size="tiny", force=True, progress=False)
    after = _mtimes(root)
    assert after.keys() == before.keys()
    assert all(after[k] != before[k] for k in before if k.endswith("model.safetensors"))
    for name in MODEL_NAMES:  # deterministic: the rebuild is bit-identical
        assert _same_weights(root / name, snapshot / name), name
        assert (root / name / "tokenizer.json").read_bytes() == (
            snapshot / name / "tokenizer.json"
        ).read_bytes()


def test_interrupted_build_is_redone(tiny_zoo, tmp_path):
    """No manifest (a killed build never writes one) means not built, whatever the models."""
    paths, _ = tiny_zoo
    out = tmp_path / "zoo"
    shutil.copytree(paths["base"].parent, out)
    (out / MANIFEST).unlink()
    (out / "expert_sort" / "model.safetensors").unlink()
    assert not tinylm_zoo_is_built(out, seed=0, size="tiny")
    build_tinylm_zoo(out, seed=0, size="tiny", progress=False)
    assert tinylm_zoo_is_built(out, seed=0, size="tiny")
    assert _same_weights(out / "expert_sort", paths["expert_sort"])


def test_the_build_trains_on_portable_kernels_and_records_them(tiny_zoo, tmp_path):
    """Training runs in a child process on PORTABLE_ENV (so the weights do not depend on the
    CPU); the manifest says so and what it ran on, and a zoo of native kernels is not reused."""
    from evomerge.zoo._common import PORTABLE_ENV
    from evomerge.zoo.tinylm import _build

    paths, _ = tiny_zoo
    manifest = json.loads((paths["base"].parent / MANIFEST).read_text())
    assert manifest["kernels"] == PORTABLE_ENV
    assert manifest["built_on"]["cpu_capability"] == "DEFAULT"
    assert {"cpu", "torch", "transformers", "tokenizers"} <= set(manifest["built_on"])
    old = tmp_path / "old"
    shutil.copytree(paths["base"].parent, old)
    del manifest["kernels"]
    manifest["format"] = 1
    (old / MANIFEST).write_text(json.dumps(manifest))
    assert not tinylm_zoo_is_built(old, seed=0, size="tiny")
    with pytest.raises(RuntimeError, match="portable kernels"):
        _build(str(tmp_path / "native"), 0, "tiny", False)  # this process runs native kernels


def test_another_seed_gives_other_weights(tiny_zoo, tmp_path):
    paths, _ = tiny_zoo
    other = build_tinylm_zoo(tmp_path / "other", seed=1, size="tiny", progress=False)
    assert not any(_same_weights(paths[n], other[n]) for n in MODEL_NAMES)


def test_greedy_exact_match_equals_a_naive_argmax_loop(tiny_zoo):
    """Batched, left-padded, cached generation agrees with one prompt at a time, no cache."""
    from evomerge.zoo.tinylm import MAX_NEW_TOKENS, load_tinylm_model

    paths, _ = tiny_zoo
    model, tok = load_tinylm_model(paths["expert_sort"])
    items = load_items("sort", "search")[:12] + load_items("add", "search")[:12]
    newline = tok.convert_tokens_to_ids("Ċ")
    naive = []
    with torch.no_grad():
        for it in items:
            ids = tok(it["prompt"])["input_ids"]
            new: list[int] = []
            for _ in range(MAX_NEW_TOKENS):
                logits = model(torch.tensor([ids + new])).logits[0, -1]
                nxt = int(logits.argmax())
                if nxt in (newline, tok.eos_token_id):
                    break
                new.append(nxt)
            naive.append(tok.decode(new, skip_special_tokens=True).strip() == it["answer"])
    assert exact_match(model, tok, items) == naive


def test_cli_builds_tiny_zoo_and_prints_the_table(tmp_path):
    out = tmp_path / "cli-zoo"
    args = ["zoo", "build", "tiny-lm", "--size", "tiny", "--out", str(out)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "Built the tiny-lm zoo" in result.output
    assert "Held-out exact match" in result.output
    for name in [*MODEL_NAMES, *TASKS, "mean"]:
        assert name in result.output
    manifest = json.loads((out / MANIFEST).read_text())
    base_add = manifest["heldout_exact_match"]["base"]["add"]
    assert re.search(rf"base\s.*{base_add:.3f}", result.output)
    again = CliRunner().invoke(app, args, env={"COLUMNS": "160"})
    assert again.exit_code == 0 and "Reused the tiny-lm zoo" in again.output


# ---- the default size: experts beat the base ----------------------------------------------------


@pytest.fixture(scope="session")
def small_zoo(tmp_path_factory) -> dict[str, Path]:
    """The default zoo: models/tiny-lm when it holds seed 0 / small, else built once (~5-9 min)."""
    shipped = Path(__file__).resolve().parents[1] / "models" / "tiny-lm"
    if tinylm_zoo_is_built(shipped, seed=0, size="small"):
        return build_tinylm_zoo(shipped, seed=0, size="small", progress=False)
    return build_tinylm_zoo(tmp_path_factory.mktemp("tinylm-small"), seed=0, size="small",
                            progress=False)


@pytest.mark.slow
def test_each_expert_clearly_beats_the_base_on_its_task(small_zoo):
    table = exact_match_table(small_zoo, split="heldout")  # recomputed, not read from zoo.json
    for task in TASKS:
        base, expert = table["base"][task], table[f"expert_{task}"][task]
        assert expert >= base + 0.15, (task, base, expert)
    assert max(table["base"].values()) > 0.05  # the base is weak but not useless


MERGE_WEIGHTS = (0.3, 0.5, 0.7, 1.0)


@pytest.mark.slow
def test_a_simple_merge_of_the_experts_beats_every_expert_and_the_base(small_zoo):
    """Issue 5's acceptance: the experts are mergeable. Task arithmetic of all four task vectors
    with one shared weight from a small grid keeps several skills at once, so its held-out mean
    is clearly above every single expert's (each good at one task only) and the base's."""
    from evomerge.merge.engine import Merger
    from evomerge.recipe import MergeRecipe
    from evomerge.zoo.tinylm import load_tinylm_model

    table = exact_match_table(small_zoo, split="heldout")
    items = {task: load_items(task, "heldout") for task in TASKS}
    experts = [str(small_zoo[f"expert_{t}"]) for t in TASKS]
    merger = Merger([str(small_zoo["base"]), *experts])
    model, tok = load_tinylm_model(small_zoo["base"])
    merged = {}
    for weight in MERGE_WEIGHTS:
        recipe = MergeRecipe.from_dict({
            "merge_method": "task_arithmetic", "base_model": str(small_zoo["base"]),
            "models": [{"model": e, "parameters": {"weight": weight}} for e in experts]})
        merger.build(recipe, into=model)
        merged[weight] = sum(sum(exact_match(model, tok, its)) / len(its)
                             for its in items.values()) / len(TASKS)
    means = {name: sum(row.values()) / len(TASKS) for name, row in table.items()}
    best_expert = max(means[f"expert_{t}"] for t in TASKS)
    assert max(merged.values()) >= best_expert + 0.05, (merged, means)
    assert max(merged.values()) >= means["base"] + 0.15, (merged, means)


def test_distill_loss_equals_a_naive_kl_over_the_supervised_positions():
    from evomerge.zoo.tinylm import distill_loss

    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 6, 11, generator=gen), torch.randn(3, 6, 11, generator=gen)
    labels = torch.full((3, 6), -100)
    labels[0, 2:5] = 1  # position i predicts token i + 1: positions 1-3 of row 0
    labels[2, 4:] = 7   # positions 3-4 of row 2
    terms = []
    for row, pos in [(0, 1), (0, 2), (0, 3), (2, 3), (2, 4)]:
        p = teacher[row, pos].double().softmax(-1)
        q = student[row, pos].double().softmax(-1)
        terms.append(float((p * (p.log() - q.log())).sum()))
    assert distill_loss(student, teacher, labels).item() == pytest.approx(
        sum(terms) / len(terms), rel=1e-5)
    assert distill_loss(teacher, teacher, labels).item() == pytest.approx(0.0, abs=1e-6)


def test_learning_rate_warms_up_then_decays_by_a_cosine():
    from evomerge.zoo.tinylm import _lr_factor

    steps = 200  # warm-up: 10 steps
    assert _lr_factor(0, steps) == pytest.approx(0.1)
    assert _lr_factor(9, steps) == pytest.approx(1.0)
    assert _lr_factor(10, steps) == pytest.approx(1.0)  # cos(0): the peak
    assert _lr_factor(105, steps) == pytest.approx(0.55)  # halfway: 0.1 + 0.45
    assert _lr_factor(200, steps) == pytest.approx(0.1)  # cos(pi): the floor
