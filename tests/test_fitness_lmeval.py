"""The lm-eval fitness: lm-evaluation-harness scores of the in-memory model, item by item.

The main specification: on the same JSON-lines items, the harness (through this adapter) and
evomerge's own ``lm`` fitness give identical per-item scores, for greedy generation and for
multiple choice, on a briefly trained tiny Llama that gets some items right and some wrong.
"""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evomerge.fitness.base import make_fitness
from evomerge.fitness.lmeval import (
    DEFAULT_INCLUDE_PATH,
    LmEvalFitness,
    resolve_data_files,
    scores_from_samples,
)

pytest.importorskip("lm_eval")

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
N_ITEMS = 24
TRAIN_STEPS = 130  # partly trained: some items right, some wrong (checked in the tests)
MAX_NEW = 6


def _problem(rng: random.Random) -> tuple[str, str]:
    """``say 37=`` -> ``three seven``: two digits spelled out."""
    a, b = rng.randrange(10), rng.randrange(10)
    return f"say {a}{b}=", f"{WORDS[a]} {WORDS[b]}"


def _tokenizer(corpus: list[str]):
    """A byte-level BPE trained on ``corpus`` (the GPT-2 pre-tokenizer keeps ``=`` apart)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    core.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                        special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def _train(tok, steps: int):
    """A tiny Llama trained ``steps`` AdamW steps on ``<s>prompt answer\\n</s>`` lines."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        rng = random.Random(0)
        for _ in range(steps):
            enc = tok([p + a + "\n" for p, a in (_problem(rng) for _ in range(32))],
                      padding=True, return_tensors="pt")
            ids = torch.cat([enc.input_ids, torch.zeros(32, 1, dtype=torch.long)], 1)
            lengths = enc.attention_mask.sum(1)
            ids[torch.arange(32), lengths] = tok.eos_token_id
            mask = torch.arange(ids.shape[1])[None] <= lengths[:, None]
            loss = model(input_ids=ids, attention_mask=mask.long(),
                         labels=ids.masked_fill(~mask, -100)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _items(split: str) -> tuple[list[dict], list[dict]]:
    """Generation and multiple-choice items of ``split`` (distinct seeds per split)."""
    rng = random.Random({"search": 101, "heldout": 202}[split])
    gen, mc = [], []
    for i in range(N_ITEMS):
        prompt, answer = _problem(rng)
        gen.append({"id": f"say-{split[0]}-{i:02d}", "prompt": prompt, "answer": answer})
        a, b = answer.split()
        other = WORDS[(WORDS.index(b) + 1) % 10]
        choices = [answer, f"{b} {a}", f"{a} {other}"]
        rng.shuffle(choices)
        # Every other item's gold is a near miss, so a model that spells well still gets a mix
        # of right and wrong items (an all-equal score vector would prove nothing).
        gold = choices.index(answer if i % 2 == 0 else f"{a} {other}")
        mc.append({"id": f"saymc-{split[0]}-{i:02d}", "prompt": prompt, "choices": choices,
                   "gold": gold})
    return gen, mc


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """``base/`` (trained tiny Llama + tokenizer), ``untrained/``, data, task YAMLs, a suite."""
    root = tmp_path_factory.mktemp("lmeval")
    corpus = [p + a + "\n" for p, a in (_problem(random.Random(i)) for i in range(500))]
    tok = _tokenizer(corpus)
    model = _train(tok, TRAIN_STEPS)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    _train(tok, 0).save_pretrained(root / "untrained")
    data = root / "data"
    data.mkdir()
    for split in ("search", "heldout"):
        gen, mc = _items(split)
        _write_jsonl(data / f"say_{split}.jsonl", gen)
        _write_jsonl(data / f"saymc_{split}.jsonl", mc)
    tasks = root / "tasks"
    tasks.mkdir()
    gen_cfg = yaml.safe_load((DEFAULT_INCLUDE_PATH / "_tinylm_generate.yaml").read_text())
    gen_cfg["generation_kwargs"]["max_gen_toks"] = MAX_NEW
    (tasks / "_gen.yaml").write_text(yaml.safe_dump(gen_cfg))
    for split in ("search", "heldout"):
        for name, template in (("say", "_gen.yaml"),
                               ("saymc", str(DEFAULT_INCLUDE_PATH / "_tinylm_multiple_choice.yaml"))):
            (tasks / f"{name}_{split}.yaml").write_text(yaml.safe_dump({
                "include": template, "task": f"{name}_{split}", "tag": [f"say_all_{split}"],
                "dataset_kwargs": {"data_files": {"test": f"../data/{name}_{split}.jsonl"}}}))
    suite = {"description": "say", "tasks": [
        {"name": "say", "kind": "generate", "search": "data/say_search.jsonl",
         "heldout": "data/say_heldout.jsonl", "max_new_tokens": MAX_NEW, "stop": ["\n"]},
        {"name": "saymc", "kind": "multiple_choice", "search": "data/saymc_search.jsonl",
         "heldout": "data/saymc_heldout.jsonl", "target_delimiter": ""}]}
    (root / "suite.yaml").write_text(yaml.safe_dump(suite))
    return root


@pytest.fixture(scope="module", autouse=True)
def hf_sandbox(tmp_path_factory):
    """HF caches in a temp dir; the process-wide offline flags the fitness sets are restored."""
    import datasets.config
    import huggingface_hub.constants

    home = tmp_path_factory.mktemp("hf")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(home))
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            mp.setenv(var, "0")
            mp.setattr(datasets.config, var, getattr(datasets.config, var))
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE",
                   huggingface_hub.constants.HF_HUB_OFFLINE)
        yield home


def _split_tasks() -> dict[str, dict[str, str]]:
    return {s: {"say": f"say_{s}", "saymc": f"saymc_{s}"} for s in ("search", "heldout")}


def _fitness(zoo: Path, **options) -> LmEvalFitness:
    options = {"split_tasks": _split_tasks(), "batch_size": 8,
               "include_path": str(zoo / "tasks"), **options}
    return make_fitness("lm-eval", base_model=str(zoo / "base"), **options)


def _model(fit: LmEvalFitness, path: Path) -> torch.nn.Module:
    """``fit.new_model()`` with the weights of ``path`` written into it (as the merge engine does)."""
    from transformers import AutoModelForCausalLM

    model = fit.new_model()
    model.load_state_dict(AutoModelForCausalLM.from_pretrained(path).state_dict())
    return model


@pytest.fixture(scope="module")
def fitted(zoo):
    """One adapter over the two tasks and the trained model written into its model object."""
    fit = _fitness(zoo)
    return fit, _model(fit, zoo / "base")


# --------------------------------------------------------------------------------------------
# The harness agrees with our own evaluator and with naive references
# --------------------------------------------------------------------------------------------


def test_same_item_scores_as_the_lm_fitness_for_generation_and_choice(zoo, fitted):
    fit, model = fitted
    ours = make_fitness("lm", base_model=str(zoo / "base"), suite=str(zoo / "suite.yaml"),
                        batch_size=8)
    for split in ("search", "heldout"):
        harness = fit.evaluate(model, split)
        own = ours.evaluate(model, split)
        for task in ("say", "saymc"):
            scores = harness.item_scores[task]
            assert 0 < scores.sum() < len(scores), f"{task}/{split}: all items score the same"
            np.testing.assert_array_equal(scores, own.item_scores[task], err_msg=f"{task}/{split}")
        assert harness.objectives == pytest.approx(own.objectives)
        assert fit.item_ids(split) == ours.item_ids(split)


def _naive_generate(model, tok, prompt: str, max_new: int) -> str:
    """Greedy decoding one token at a time, no cache, no padding; text before the newline."""
    ids = tok.encode(prompt)
    new: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True).split("\n")[0]


def _naive_loglikelihood(model, tok, prompt: str, choice: str) -> float:
    """sum log p(choice tokens | prompt), the choice tokens being ``encode(prompt + choice)``
    beyond ``len(encode(prompt))``."""
    whole, ctx = tok.encode(prompt + choice), tok.encode(prompt)
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return float(sum(logp[t - 1, whole[t]] for t in range(len(ctx), len(whole))))


def test_item_scores_equal_naive_greedy_and_loglikelihood_loops(zoo, fitted):
    fit, model = fitted
    tok = fit.tokenizer
    half = list(range(N_ITEMS // 2))
    result = fit.evaluate(model, "heldout", items={"say": half, "saymc": half})
    gen, mc = (items[: len(half)] for items in _items("heldout"))
    expected_gen = [float(_naive_generate(model, tok, it["prompt"], MAX_NEW).strip()
                          == it["answer"]) for it in gen]
    expected_mc = [float(np.argmax([_naive_loglikelihood(model, tok, it["prompt"], c)
                                    for c in it["choices"]]) == it["gold"]) for it in mc]
    np.testing.assert_array_equal(result.item_scores["say"], expected_gen)
    np.testing.assert_array_equal(result.item_scores["saymc"], expected_mc)
    assert result.objectives == pytest.approx(
        {"say": np.mean(expected_gen), "saymc": np.mean(expected_mc)})


def test_a_merge_across_the_prompt_boundary_is_scored_alike_by_both_evaluators():
    """lm-eval scores ``encode(prompt + choice)[len(encode(prompt)):]`` after the *prompt's*
    tokens: when BPE merges across the boundary, part of the choice is silently not scored. Our
    evaluator follows the same convention, so the two still agree (float noise only)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from evomerge.fitness.lm import choice_loglikelihoods

    corpus = [p + a + "\n" for p, a in (_problem(random.Random(i)) for i in range(500))]
    core = Tokenizer(models.BPE())  # no pre-tokenizer split: "=three" can become one token
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    core.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                        special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    prompt, choices = "say 37=", ["three seven", "seven three", "three"]
    ctx = tok.encode(prompt)
    merged = [c for c in choices if tok.encode(prompt + c)[: len(ctx)] != ctx]
    assert merged, "precondition: some choice merges with the prompt's last token"
    model = _train(tok, 0)
    ours = choice_loglikelihoods(model, tok, [prompt], [choices])[0]
    harness = [ll for ll, _ in HFLM(pretrained=model, tokenizer=tok, batch_size=4).loglikelihood(
        [Instance("loglikelihood", {}, (prompt, c), i) for i, c in enumerate(choices)])]
    expected = []
    for c in choices:  # naive: the suffix tokens, each predicted from everything before it
        seq = ctx + tok.encode(prompt + c)[len(ctx):]
        with torch.inference_mode():
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)
        expected.append(float(sum(logp[t - 1, seq[t]] for t in range(len(ctx), len(seq)))))
    np.testing.assert_allclose(harness, expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)


def test_shipped_tinylm_items_do_not_merge_across_the_prompt_boundary():
    """With the zoo's tokenizer every shipped prompt's tokens are a prefix of the tokens of
    prompt + answer (or + choice): both evaluators score exactly the continuation's text."""
    from evomerge.zoo.tinylm import make_tokenizer

    tok = make_tokenizer()
    files = sorted((DEFAULT_INCLUDE_PATH.parent / "data" / "tinylm").glob("*.jsonl"))
    assert files
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            item = json.loads(line)
            ctx = tok.encode(item["prompt"])
            for cont in item.get("choices", [item.get("answer", "") + "\n"]):
                assert tok.encode(item["prompt"] + cont)[: len(ctx)] == ctx, (path.name, item)


# --------------------------------------------------------------------------------------------
# Items, splits, objectives, the reused wrapper
# --------------------------------------------------------------------------------------------


def test_items_subset_comes_back_in_the_requested_order(fitted):
    fit, model = fitted
    full = fit.evaluate(model, "search")
    order = [7, 0, 19, 3]  # unsorted on purpose: lm-eval itself mislabels unsorted samples
    part = fit.evaluate(model, "search", items={"say": order})
    np.testing.assert_array_equal(part.item_scores["say"], full.item_scores["say"][order])
    np.testing.assert_array_equal(part.item_scores["saymc"], full.item_scores["saymc"])
    assert part.objectives["say"] == pytest.approx(full.item_scores["say"][order].mean())


@pytest.mark.parametrize(("items", "message"), [
    ({"say": []}, "empty"),
    ({"say": [0, 0]}, "repeated"),
    ({"say": [N_ITEMS]}, "out of range"),
    ({"nope": [0]}, "unknown task key"),
])
def test_bad_items_are_rejected_before_compute(fitted, items, message):
    fit, model = fitted
    with pytest.raises(ValueError, match=message):
        fit.evaluate(model, "search", items=items)


def test_splits_use_their_own_items_and_ids_follow_the_file(zoo, fitted):
    fit, _ = fitted
    for split in ("search", "heldout"):
        gen, mc = _items(split)
        assert fit.item_ids(split) == {"say": [g["id"] for g in gen],
                                       "saymc": [m["id"] for m in mc]}
        assert fit.num_items(split) == {"say": N_ITEMS, "saymc": N_ITEMS}
    with pytest.raises(ValueError, match="unknown split 'test'"):
        fit.num_items("test")


def test_objectives_are_macro_means_of_task_accuracies(zoo, fitted):
    fit, model = fitted
    per_task = fit.evaluate(model, "search").item_scores
    combined = _fitness(zoo, objectives=[{"name": "mean", "tasks": "all"},
                                         {"name": "mc", "tasks": ["saymc"],
                                          "direction": "minimize"}])
    assert [(o.name, o.direction) for o in combined.objectives] == [
        ("mean", "maximize"), ("mc", "minimize")]
    result = combined.evaluate(_model(combined, zoo / "base"), "search")
    assert result.objectives["mean"] == pytest.approx(
        (per_task["say"].mean() + per_task["saymc"].mean()) / 2)
    assert result.objectives["mc"] == pytest.approx(per_task["saymc"].mean())


def test_one_wrapper_scores_every_candidate_written_into_the_model(zoo):
    fit = _fitness(zoo, limit=10)
    model = _model(fit, zoo / "untrained")
    first = fit.evaluate(model, "search")
    wrapper = fit._lm
    trained = _model(fit, zoo / "base")
    with torch.no_grad():  # the merge engine writes the next candidate into the same tensors
        for name, tensor in model.state_dict().items():
            tensor.copy_(trained.state_dict()[name])
    second = fit.evaluate(model, "search")
    assert fit._lm is wrapper
    reference = _fitness(zoo, limit=10).evaluate(trained, "search")
    for task in ("say", "saymc"):
        np.testing.assert_array_equal(second.item_scores[task], reference.item_scores[task])
    assert first.item_scores["say"].sum() == 0  # the untrained model spells nothing right
    assert second.item_scores["say"].sum() > 0


def test_limit_keeps_the_first_items(zoo):
    fit = _fitness(zoo, limit=5)
    gen, _ = _items("search")
    assert fit.num_items("search") == {"say": 5, "saymc": 5}
    assert fit.item_ids("search")["say"] == [g["id"] for g in gen[:5]]
    result = fit.evaluate(_model(fit, zoo / "base"), "search")
    assert {k: len(v) for k, v in result.item_scores.items()} == {"say": 5, "saymc": 5}


def test_tasks_option_scores_the_same_tasks_on_both_splits(zoo):
    yaml_path = str(zoo / "tasks" / "saymc_search.yaml")  # a task YAML path works as a name
    fit = _fitness(zoo, split_tasks=None, tasks=["say_search", yaml_path], limit=3)
    assert fit.keys == ["say_search", "saymc_search"]
    assert fit.num_items("search") == fit.num_items("heldout") == {
        "say_search": 3, "saymc_search": 3}


def test_a_tag_expands_into_all_its_tasks(zoo):
    fit = _fitness(zoo, split_tasks=None, tasks=["say_all_heldout"], limit=2)
    assert sorted(fit.keys) == ["say_heldout", "saymc_heldout"]


# --------------------------------------------------------------------------------------------
# Offline, from any directory, with the shipped task catalog
# --------------------------------------------------------------------------------------------


def test_works_offline_from_any_directory_with_the_shipped_tinylm_tasks(zoo, tmp_path,
                                                                        monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.chdir(tmp_path)
    fit = make_fitness(
        "lm-eval", base_model=str(zoo / "base"), limit=4, batch_size=4,
        split_tasks={s: {t: f"tinylm_{t}_{s}" for t in ("add", "sort_mc")}
                     for s in ("search", "heldout")})
    result = fit.evaluate(_model(fit, zoo / "base"), "heldout")
    assert {k: len(v) for k, v in result.item_scores.items()} == {"add": 4, "sort_mc": 4}
    shipped = DEFAULT_INCLUDE_PATH.parent / "data" / "tinylm" / "add_heldout.jsonl"
    first_ids = [json.loads(line)["id"] for line in shipped.read_text().splitlines()[:4]]
    assert fit.item_ids("heldout")["add"] == first_ids


# --------------------------------------------------------------------------------------------
# Configuration errors, before any compute
# --------------------------------------------------------------------------------------------


def test_missing_data_file_names_the_yaml_and_the_path(zoo, tmp_path):
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({
        "include": str(DEFAULT_INCLUDE_PATH / "_tinylm_generate.yaml"), "task": "ghost",
        "dataset_kwargs": {"data_files": {"test": "missing.jsonl"}}}))
    with pytest.raises(FileNotFoundError, match=r"t\.yaml.*missing\.jsonl.*not found"):
        _fitness(zoo, split_tasks=None, tasks=[str(tmp_path / "t.yaml")])


@pytest.mark.parametrize(("options", "message"), [
    ({"split_tasks": None}, "exactly one of tasks"),
    ({"tasks": ["say_search"]}, "exactly one of tasks"),
    ({"split_tasks": {"search": {"say": "say_search"}}}, "keys search and heldout"),
    ({"split_tasks": {"search": {"a": "say_search"}, "heldout": {"b": "say_heldout"}}},
     "same keys"),
    ({"objectives": [{"name": "x", "tasks": ["nope"]}]}, "unknown task"),
    ({"objectives": [{"name": "x", "classes": "all"}]}, "unknown key"),
    ({"limit": 0}, "limit"),
    ({"batch_size": "big"}, "batch_size"),
    ({"metrics": {"nope": "acc"}}, "metrics: unknown task key"),
    ({"include_path": "/no/such/dir"}, "include_path"),
])
def test_bad_options_raise_one_clear_error(zoo, options, message):
    with pytest.raises(ValueError, match=message):
        _fitness(zoo, **options)


@pytest.mark.slow  # looking a name up among lm-eval's builtin tasks indexes ~15k YAMLs
def test_unknown_task_name_is_reported_with_where_it_was_looked_for(zoo):
    with pytest.raises(ValueError, match=r"split_tasks\.search\.say: unknown lm-eval task 'nope'"):
        _fitness(zoo, split_tasks={"search": {"say": "nope"}, "heldout": {"say": "nope"}})


def test_base_model_without_tokenizer_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="base_model"):
        LmEvalFitness(base_model=tmp_path, tasks=["x"])


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------


def test_resolve_data_files_makes_relative_paths_absolute_under_the_yaml_dir(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text("")
    spec = {"test": "d/a.jsonl", "more": ["d/*.jsonl", "hf://x/y"]}
    assert resolve_data_files(spec, tmp_path, "t.yaml") == {
        "test": str(tmp_path / "d" / "a.jsonl"),
        "more": [str(tmp_path / "d" / "*.jsonl"), "hf://x/y"]}


def test_scores_come_from_the_first_filter_and_the_accuracy_metric():
    samples = [
        {"doc_id": 1, "filter": "strip", "metrics": ["f1", "exact_match"], "exact_match": 1.0,
         "f1": 0.5},
        {"doc_id": 0, "filter": "strip", "metrics": ["f1", "exact_match"], "exact_match": 0.0,
         "f1": 0.2},
        {"doc_id": 1, "filter": "raw", "metrics": ["f1", "exact_match"], "exact_match": 0.0,
         "f1": 0.1},
    ]
    assert scores_from_samples(samples) == ({1: 1.0, 0: 0.0}, "exact_match")
    assert scores_from_samples(samples, "f1") == ({1: 0.5, 0: 0.2}, "f1")
    with pytest.raises(ValueError, match="'acc' is not reported"):
        scores_from_samples(samples, "acc")
