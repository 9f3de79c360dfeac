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
    parse_gen_kwargs,
    resolve_data_files,
    scores_from_samples,
)
from evomerge.fitness.reduced import check_reducible

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


def _fitness(zoo: Path, base: Path | None = None, **options) -> LmEvalFitness:
    options = {"split_tasks": _split_tasks(), "batch_size": 8,
               "include_path": str(zoo / "tasks"), **options}
    return make_fitness("lm-eval", base_model=str(base or zoo / "base"), **options)


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

    from evomerge.models.causal_lm import choice_loglikelihoods

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
# lm-eval options per task entry (num_fewshot, chat template, gen_kwargs, batch_size, limit)
# --------------------------------------------------------------------------------------------

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _reference(zoo: Path, model, tok, tasks: list[str], monkeypatch, **kwargs) -> dict:
    """lm-eval's own ``simple_evaluate`` on the in-memory model (HFLM): its logged samples."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with monkeypatch.context() as mp:
        mp.chdir(zoo / "tasks")  # lm-eval resolves the YAMLs' data_files against the cwd
        out = simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tok, batch_size=8), tasks=tasks,
            task_manager=TaskManager(include_path=str(zoo / "tasks"), include_defaults=False),
            log_samples=True, bootstrap_iters=0, **kwargs)
    return out["samples"]


def _requests(fit: LmEvalFitness, split: str, key: str,
              items: list[int] | None = None) -> dict[int, list[tuple]]:
    """The request arguments ``(context, ...)`` of the last evaluation, by document index."""
    task = fit.task(split, key)
    docs = sorted(items) if items is not None else range(fit.num_items(split)[key])
    out: dict[int, list[tuple]] = {}
    for inst in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
        out.setdefault(docs[inst.doc_id], []).append(inst.args)
    return out


def _reference_requests(samples: list[dict]) -> dict[int, list[tuple]]:
    first = samples[0]["filter"]
    return {s["doc_id"]: [tuple(a) for a in s["arguments"]] for s in samples
            if s["filter"] == first}


def test_num_fewshot_gives_lm_evals_own_contexts_and_item_scores(zoo, monkeypatch):
    fit = _fitness(zoo, num_fewshot=2, limit=12)
    model = _model(fit, zoo / "base")
    result = fit.evaluate(model, "search")
    samples = _reference(zoo, model, fit.tokenizer, ["say_search", "saymc_search"], monkeypatch,
                         num_fewshot=2, limit=12)
    gen, _ = _items("search")
    for key in ("say", "saymc"):
        expected, _ = scores_from_samples(samples[f"{key}_search"])
        assert sorted(expected) == list(range(12))
        np.testing.assert_array_equal(result.item_scores[key], [expected[i] for i in range(12)])
        assert _requests(fit, "search", key) == _reference_requests(samples[f"{key}_search"])
    for doc, ((context, _),) in _requests(fit, "search", "say").items():
        shots = context.split("\n\n")  # the tasks' fewshot_delimiter
        assert len(shots) == 3 and shots[-1] == gen[doc]["prompt"]
        for shot in shots[:2]:  # each few-shot example is an item's prompt and its answer
            assert any(shot == f"{g['prompt']} {g['answer']}" for g in gen), shot
    zero = _fitness(zoo, limit=12)
    zero.evaluate(_model(zero, zoo / "base"), "search")
    assert {d: c for d, ((c, _),) in _requests(zero, "search", "say").items()} == {
        i: gen[i]["prompt"] for i in range(12)}
    assert fit.options("search")["say"]["num_fewshot"] == 2
    assert zero.options("search")["say"]["num_fewshot"] == 0


def test_few_shot_examples_of_an_item_do_not_depend_on_which_items_are_scored(zoo):
    """lm-eval draws few-shot examples from one seeded generator, document after document, so
    scoring a subset would give its items other examples than the full run (and IRT anchors
    other scores than those the IRT model was fitted on); the fitness pins each document's."""
    fit = _fitness(zoo, num_fewshot=3)
    model = _model(fit, zoo / "base")
    full = fit.evaluate(model, "search")
    full_requests = _requests(fit, "search", "saymc")
    order = [17, 2, 9]
    part = fit.evaluate(model, "search", items={"saymc": order})
    assert _requests(fit, "search", "saymc", order) == {i: full_requests[i] for i in order}
    np.testing.assert_array_equal(part.item_scores["saymc"], full.item_scores["saymc"][order])
    again = fit.evaluate(model, "search")  # and the next candidate gets the same contexts
    assert _requests(fit, "search", "saymc") == full_requests
    np.testing.assert_array_equal(again.item_scores["say"], full.item_scores["say"])


def test_limit_per_task_entry_keeps_the_first_items(zoo, monkeypatch):
    split_tasks = {s: {"say": {"task": f"say_{s}", "limit": 5},
                       "saymc": {"task": f"saymc_{s}", "limit": 0.25}} for s in ("search", "heldout")}
    fit = _fitness(zoo, split_tasks=split_tasks, limit=10)
    gen, mc = _items("heldout")
    assert fit.num_items("heldout") == {"say": 5, "saymc": 6}  # 0.25 of 24, as lm-eval rounds
    assert fit.item_ids("heldout") == {"say": [g["id"] for g in gen[:5]],
                                       "saymc": [m["id"] for m in mc[:6]]}
    model = _model(fit, zoo / "base")
    result = fit.evaluate(model, "heldout")
    samples = _reference(zoo, model, fit.tokenizer, ["say_heldout"], monkeypatch, limit=5)
    expected, _ = scores_from_samples(samples["say_heldout"])
    np.testing.assert_array_equal(result.item_scores["say"], [expected[i] for i in range(5)])
    assert len(result.item_scores["saymc"]) == 6
    with pytest.raises(ValueError, match=r"index 5 out of range 0\.\.4"):  # items index the limit
        fit.evaluate(model, "heldout", items={"say": [5]})


def test_gen_kwargs_change_generation_as_in_lm_eval(zoo, monkeypatch):
    fit = _fitness(zoo, limit=8, gen_kwargs={"max_gen_toks": 1, "temperature": 0})
    model = _model(fit, zoo / "base")
    result = fit.evaluate(model, "search")
    requests = _requests(fit, "search", "say")
    assert all(kw == {"until": ["\n"], "do_sample": False, "max_gen_toks": 1, "temperature": 0}
               for ((_, kw),) in requests.values())  # merged into the YAML's generation_kwargs
    responses = [inst.resps[0] for inst in fit.task("search", "say").instances]
    assert all(len(fit.tokenizer.encode(r, add_special_tokens=False)) <= 1 for r in responses)
    assert result.item_scores["say"].sum() == 0  # no two-word answer fits in one token
    assert _fitness(zoo, limit=8).evaluate(model, "search").item_scores["say"].sum() > 0
    samples = _reference(zoo, model, fit.tokenizer, ["say_search"], monkeypatch, limit=8,
                         gen_kwargs={"max_gen_toks": 1, "temperature": 0})
    assert [s["resps"][0][0] for s in sorted(samples["say_search"], key=lambda s: s["doc_id"])] \
        == responses
    assert _requests(fit, "search", "say") == _reference_requests(samples["say_search"])


def _chat_base(zoo: Path, tmp_path: Path) -> Path:
    """The trained base with a tokenizer that has a chat template."""
    from transformers import AutoTokenizer

    base = tmp_path / "chat"
    tok = AutoTokenizer.from_pretrained(zoo / "base")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(base)
    for f in (zoo / "base").iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            (base / f.name).write_bytes(f.read_bytes())
    return base


def test_apply_chat_template_puts_the_templates_markers_in_the_context(zoo, tmp_path, monkeypatch):
    base = _chat_base(zoo, tmp_path)
    split_tasks = {s: {"say": {"task": f"say_{s}", "apply_chat_template": True, "num_fewshot": 1},
                       "saymc": f"saymc_{s}"} for s in ("search", "heldout")}
    fit = _fitness(zoo, base, split_tasks=split_tasks, limit=4)
    model = _model(fit, zoo / "base")
    fit.evaluate(model, "search")
    gen, _ = _items("search")
    say = _requests(fit, "search", "say")
    for doc, ((context, _),) in say.items():  # few-shot example as a turn of its own
        assert context.startswith("<|user|>") and context.endswith(
            f"<|user|>{gen[doc]['prompt']}<|end|><|assistant|>")
        assert context.count("<|user|>") == 2 and context.count("<|assistant|>") == 2
    assert all("<|" not in args[0] for reqs in _requests(fit, "search", "saymc").values()
               for args in reqs)  # the other entry has no chat template
    samples = _reference(zoo, model, fit.tokenizer, ["say_search"], monkeypatch, limit=4,
                         num_fewshot=1, apply_chat_template=True, fewshot_as_multiturn=True)
    assert say == _reference_requests(samples["say_search"])
    single = _fitness(zoo, base, split_tasks=split_tasks, limit=4, fewshot_as_multiturn=False)
    single.evaluate(model, "search")
    for (context, _), in _requests(single, "search", "say").values():  # one user turn
        assert context.count("<|user|>") == 1 and context.count("<|assistant|>") == 1


def test_a_chat_template_without_one_in_the_tokenizer_is_an_error(zoo):
    with pytest.raises(ValueError, match=r"apply_chat_template: the tokenizer of .*base has no "
                                         r"chat template"):
        _fitness(zoo, apply_chat_template=True)


def test_task_entry_options_override_the_fitness_defaults(zoo, monkeypatch):
    import lm_eval.evaluator

    calls: list[tuple] = []
    real = lm_eval.evaluator.evaluate

    def spy(lm, task_dict, **kwargs):
        calls.append((sorted(task_dict["tasks"]), lm.batch_size))
        return real(lm, task_dict, **kwargs)

    split_tasks = {s: {"say": {"task": f"say_{s}", "num_fewshot": 0, "batch_size": 3,
                               "gen_kwargs": {"until": [" "]}},
                       "say2": f"say_{s}",  # the same lm-eval task, the defaults' options
                       "saymc": f"saymc_{s}"} for s in ("search", "heldout")}
    fit = _fitness(zoo, split_tasks=split_tasks, num_fewshot=2, limit=4, batch_size=5,
                   gen_kwargs={"max_gen_toks": 4})
    options = fit.options("search")
    assert {k: (o["num_fewshot"], o["batch_size"]) for k, o in options.items()} == {
        "say": (0, 3), "say2": (2, 5), "saymc": (2, 5)}
    assert options["say"]["gen_kwargs"] == {"until": [" "], "do_sample": False, "max_gen_toks": 4}
    assert options["say2"]["gen_kwargs"] == {"until": ["\n"], "do_sample": False,
                                             "max_gen_toks": 4}
    monkeypatch.setattr(lm_eval.evaluator, "evaluate", spy)
    result = fit.evaluate(_model(fit, zoo / "base"), "search")
    assert sorted(calls) == [(["say_search"], 3), (["say_search", "saymc_search"], 5)]
    assert list(result.item_scores) == ["say", "say2", "saymc"]
    gen, _ = _items("search")
    assert {d: c for d, ((c, _),) in _requests(fit, "search", "say").items()} == {
        i: gen[i]["prompt"] for i in range(4)}
    assert all(c.count("\n\n") == 2 for ((c, _),) in _requests(fit, "search", "say2").values())
    assert result.item_scores["say"].sum() == 0  # generation stops at the first space


def test_options_of_a_tasks_entry_apply_to_every_task_it_expands_to(zoo):
    fit = _fitness(zoo, split_tasks=None, tasks=[
        {"task": "say_all_search", "num_fewshot": 1, "limit": 3},  # a tag: say_ and saymc_search
        "say_heldout"], limit=5)
    options = fit.options("heldout")
    assert {k: (o["num_fewshot"], o["limit"]) for k, o in options.items()} == {
        "say_search": (1, 3), "saymc_search": (1, 3), "say_heldout": (0, 5)}
    assert fit.num_items("search") == {"say_search": 3, "saymc_search": 3, "say_heldout": 5}
    with pytest.raises(ValueError, match=r"tasks\[1\]: task 'say_search' is also part of "
                                         r"tasks\[0\]; list each task once"):
        _fitness(zoo, split_tasks=None, tasks=["say_all_search", {"task": "say_search"}])


def test_bad_task_options_are_all_reported_in_one_error(zoo):
    split_tasks = {s: {"say": {"task": f"say_{s}", "num_shots": 2, "num_fewshot": -1,
                               "gen_kwargs": {"max_gen_toks": 0, "temprature": 0}},
                       "saymc": {"task": f"saymc_{s}", "batch_size": 0, "limit": -3,
                                 "apply_chat_template": "yes"}}
                   for s in ("search", "heldout")}
    with pytest.raises(ValueError) as info:
        _fitness(zoo, split_tasks=split_tasks, fewshot_as_multiturn=True, num_fewshot="2",
                 dtype="float8")
    message = str(info.value)
    for expected in ("split_tasks.search.say: unknown key(s) 'num_shots'",
                     "split_tasks.heldout.say.num_fewshot: expected an integer >= 0",
                     "split_tasks.search.say.gen_kwargs.max_gen_toks: expected a positive integer",
                     "split_tasks.search.say.gen_kwargs.temprature: unknown generation option",
                     "split_tasks.search.saymc.batch_size: expected a positive integer",
                     "split_tasks.search.saymc.limit: expected a positive integer",
                     "split_tasks.search.saymc.apply_chat_template: expected true or false",
                     "num_fewshot: expected an integer >= 0 or null, got '2'",
                     "dtype: expected auto or one of"):
        assert expected in message, (expected, message)
    assert message.startswith("lm-eval fitness: 16 problems:")
    with pytest.raises(ValueError, match="fewshot_as_multiturn is true but apply_chat_template "
                                         "is false"):
        _fitness(zoo, fewshot_as_multiturn=True)


def test_options_that_do_not_fit_the_tasks_are_reported_before_compute(zoo):
    split_tasks = {s: {"say": f"say_{s}",
                       "saymc": {"task": f"saymc_{s}", "gen_kwargs": {"max_gen_toks": 3}}}
                   for s in ("search", "heldout")}
    with pytest.raises(ValueError) as info:
        _fitness(zoo, split_tasks=split_tasks, gen_kwargs={"max_gen_toks": 64})
    message = str(info.value)
    for expected in (
        # an entry's own gen_kwargs on a loglikelihood task (a default is skipped, as lm-eval does)
        ("split_tasks.search.saymc.gen_kwargs: saymc_search is a multiple_choice task; "
         "gen_kwargs apply to generate_until tasks only"),
        ("split_tasks.search.say: say_search generates up to 64 tokens, not less than the "
         "model's context length 64"),
    ):
        assert expected in message, (expected, message)


def test_too_many_shots_for_the_documents_is_an_error_before_compute(zoo):
    with pytest.raises(ValueError, match=r"say_search: cannot draw 30 few-shot examples"):
        _fitness(zoo, num_fewshot=30)


def test_gen_kwargs_accept_lm_evals_command_line_string():
    assert parse_gen_kwargs("max_gen_toks=5,temperature=0", "g") == (
        {"max_gen_toks": 5, "temperature": 0}, [])
    assert parse_gen_kwargs({"top_p": 1.5}, "g")[1] == ["g.top_p: expected a number in (0, 1], got 1.5"]


def test_the_fitness_can_be_irt_reduced(fitted):
    fit, model = fitted
    check_reducible(fit, "lm-eval")
    result = fit.evaluate(model, "search")
    task_scores = {k: float(v.mean()) for k, v in result.item_scores.items()}
    assert fit.objectives_from_task_scores(task_scores) == pytest.approx(result.objectives)


# --------------------------------------------------------------------------------------------
# dtype
# --------------------------------------------------------------------------------------------


def test_new_model_is_allocated_in_the_checkpoints_dtype_and_bf16_scores_close_to_fp32(zoo,
                                                                                        tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base16 = tmp_path / "bf16"  # a bf16 checkpoint: auto means bf16
    AutoModelForCausalLM.from_pretrained(zoo / "base", dtype=torch.bfloat16).save_pretrained(base16)
    AutoTokenizer.from_pretrained(zoo / "base").save_pretrained(base16)
    auto16 = _fitness(zoo, base16)
    assert auto16.dtype == torch.bfloat16
    model16 = auto16.new_model()
    assert {p.dtype for p in model16.parameters()} == {torch.bfloat16}
    fp32 = _fitness(zoo)  # the fp32 checkpoint: auto means fp32; an explicit dtype wins
    assert fp32.dtype == torch.float32 and _fitness(zoo, dtype="bfloat16").dtype == torch.bfloat16
    assert {p.dtype for p in fp32.new_model().parameters()} == {torch.float32}

    weights = AutoModelForCausalLM.from_pretrained(zoo / "base").state_dict()
    model16.load_state_dict(weights)  # cast to bf16 as the merge engine writes it
    model32 = fp32.new_model()
    model32.load_state_dict(weights)
    r16, r32 = auto16.evaluate(model16, "search"), fp32.evaluate(model32, "search")
    assert {p.dtype for p in model16.parameters()} == {torch.bfloat16}  # evaluated as bf16
    for key in ("say", "saymc"):
        agree = np.mean(r16.item_scores[key] == r32.item_scores[key])
        assert agree >= 0.9, (key, agree)  # an item whose best two choices are close may flip
        assert abs(r16.objectives[key] - r32.objectives[key]) <= 0.1
    lm16 = auto16._wrap(model16)  # the log-likelihoods themselves: bf16 rounding only
    lm32 = fp32._wrap(model32)
    from lm_eval.api.instance import Instance

    _, mc = _items("search")
    reqs = [Instance("loglikelihood", {}, (it["prompt"], c), i)
            for i, it in enumerate(mc[:6]) for c in it["choices"]]
    ll16 = np.array([ll for ll, _ in lm16.loglikelihood(reqs)])
    ll32 = np.array([ll for ll, _ in lm32.loglikelihood(reqs)])
    np.testing.assert_allclose(ll16, ll32, rtol=0.01, atol=0.02)


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
