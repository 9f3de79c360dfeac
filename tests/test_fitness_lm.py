"""The lm fitness and its scorers, checked against naive one-sequence-at-a-time references.

The model is a random tiny Llama (initialised with a large spread so that its greedy choices are
far from ties, and with a boosted eos row so that some generations end at eos); the references
run one unpadded sequence at a time, without a KV cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evomerge.fitness import make_fitness
from evomerge.fitness.lm import LMFitness
from evomerge.fitness.suite import SuiteError, load_suite
from evomerge.models.causal_lm import choice_loglikelihoods, encode_pair, greedy_generate
from evomerge.zoo.toy import VOCAB, make_tokenizer

PROMPTS = [
    "copy a b c =", "sort 3 1 =", "reverse x y z w v =", "copy 1 =", "sort a =",
    "reverse 1 2 3 4 5 6 7 8 =", "copy q =", "sort z y x =", "reverse 0 0 =",
]
CHOICES = [["a", "b c", "d e f"], ["1 3", "3 1"], ["v w z y x", "x", "y", "z"]] * 3


def tiny_llama(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] *= 3
    return model


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(tok)


def naive_generate(model, tok, prompt: str, max_new_tokens: int, stop: list[str]) -> str:
    """Greedy decoding one prompt at a time, recomputing the whole sequence every step."""
    ids = tok.encode(prompt)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
            if any(s in tok.decode(new, skip_special_tokens=True) for s in stop):
                break
    text = tok.decode(new, skip_special_tokens=True)
    for s in stop:
        text = text.split(s)[0]
    return text


def naive_loglikelihood(model, prompt_ids: list[int], cont_ids: list[int]) -> float:
    """``sum log_softmax`` of the continuation tokens, one unpadded sequence."""
    seq = torch.tensor([prompt_ids + cont_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(seq).logits[0].double(), dim=-1)
    start = len(prompt_ids)
    return float(sum(logp[t - 1, seq[0, t]] for t in range(start, seq.shape[1])))


def word_ids(tok, text: str) -> list[int]:
    """Ids of a whitespace-separated text in the word-level toy vocabulary (no specials)."""
    return [VOCAB.index(w) for w in text.split()]


# --------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------


def test_choice_loglikelihoods_equal_naive_sum_of_log_softmax(tok, model):
    got = choice_loglikelihoods(model, tok, PROMPTS, [[" " + c for c in cs] for cs in CHOICES],
                                batch_size=4)
    for prompt, choices, row in zip(PROMPTS, CHOICES, got):
        bos_prompt = [tok.bos_token_id, *word_ids(tok, prompt)]
        want = [naive_loglikelihood(model, bos_prompt, word_ids(tok, c)) for c in choices]
        np.testing.assert_allclose(row, want, rtol=0, atol=1e-4)


def test_batching_and_padding_do_not_change_loglikelihoods(tok, model):
    choices = [[" " + c for c in cs] for cs in CHOICES]
    one = choice_loglikelihoods(model, tok, PROMPTS, choices, batch_size=1)
    seven = choice_loglikelihoods(model, tok, PROMPTS, choices, batch_size=7)
    np.testing.assert_allclose(np.concatenate(one), np.concatenate(seven), rtol=0, atol=1e-5)


@pytest.mark.parametrize("stop", [[], ["c"], ["c", "0"]])
def test_greedy_generate_equals_naive_argmax_loop(tok, model, stop):
    want = [naive_generate(model, tok, p, 8, stop) for p in PROMPTS]
    assert greedy_generate(model, tok, PROMPTS, 8, stop=stop, batch_size=1) == want
    assert greedy_generate(model, tok, PROMPTS, 8, stop=stop, batch_size=7) == want
    if not stop:  # the fixture's model really exercises eos and full-length rows
        lengths = {len(w.split()) for w in want}
        assert 8 in lengths and min(lengths) < 8


def test_encode_pair_moves_trailing_space_and_takes_the_suffix(tok):
    ctx, cont = encode_pair(tok, "sort b a = ", "a b")
    assert ctx == [tok.bos_token_id, *word_ids(tok, "sort b a =")]
    assert cont == word_ids(tok, "a b")


def bpe_tokenizer():
    """A byte-level BPE whose merges cross the prompt/answer boundary (``= 1`` -> one token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = [f"add {a} {b} = {a + b}\n" for a in range(30) for b in range(30)]
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(corpus, trainer)
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", core.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


@pytest.mark.slow
def test_scores_equal_lm_eval_harness_on_the_same_requests(tmp_path, monkeypatch):
    """lm-eval's HFLM is the reference of the tokenization boundary and of greedy stopping."""
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tok = bpe_tokenizer()
    model = tiny_llama(tok, seed=1)
    prompts = ["add 3 4 =", "add 12 7 = ", "add 29 1 =", "add 5 5 =", "add 10 20 ="]
    conts = [" 7", "19", " 30", " 10\n", " 3"]
    harness = HFLM(pretrained=model, tokenizer=tok, batch_size=3)
    want_ll = [ll for ll, _ in harness.loglikelihood([
        Instance("loglikelihood", {}, (p, c), i) for i, (p, c) in enumerate(zip(prompts, conts))])]
    got_ll = choice_loglikelihoods(model, tok, prompts, [[c] for c in conts], batch_size=2)
    np.testing.assert_allclose([row[0] for row in got_ll], want_ll, rtol=0, atol=1e-4)

    stop = ["\n", "1"]
    want_gen = harness.generate_until([
        Instance("generate_until", {}, (p, {"until": stop, "max_gen_toks": 6, "do_sample": False}),
                 i) for i, p in enumerate(prompts)])
    assert greedy_generate(model, tok, prompts, 6, stop=stop, batch_size=2) == want_gen


# --------------------------------------------------------------------------------------------
# The suite fitness
# --------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path.name


def write_suite(root: Path, tasks: list[dict], objectives: list[dict] | None = None) -> Path:
    doc: dict = {"description": "test suite", "tasks": tasks}
    if objectives is not None:
        doc["objectives"] = objectives
    path = root / "suite.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def crafted(tmp_path_factory, tok, model):
    """A base dir (the fixture model + tokenizer) and a suite whose right answers are known.

    Generation answers are the naive greedy outputs on even items and a wrong text on odd ones;
    multiple-choice gold is the naive argmax on items 0, 1 (mod 3) and another choice on the rest.
    """
    root = tmp_path_factory.mktemp("lm_suite")
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    gen_rows, gen_truth = [], []
    for i, prompt in enumerate(PROMPTS):
        pred = naive_generate(model, tok, prompt, 6, ["="])
        right = i % 2 == 0
        gen_rows.append({"id": f"g{i}", "prompt": prompt,
                         "answer": f" {pred} " if right else pred + " x"})
        gen_truth.append(float(right))
    mc_rows, mc_truth = [], []
    bos = [tok.bos_token_id]
    for i, (prompt, choices) in enumerate(zip(PROMPTS, CHOICES)):
        lls = [naive_loglikelihood(model, bos + word_ids(tok, prompt), word_ids(tok, c))
               for c in choices]
        best = int(np.argmax(lls))
        right = i % 3 != 2
        mc_rows.append({"id": f"m{i}", "prompt": prompt, "choices": choices,
                        "gold": best if right else (best + 1) % len(choices)})
        mc_truth.append(float(right))
    tasks = [
        {"name": "gen", "kind": "generate", "max_new_tokens": 6, "stop": ["="],
         "search": write_jsonl(root / "gen_s.jsonl", gen_rows),
         "heldout": write_jsonl(root / "gen_h.jsonl", gen_rows[:4])},
        {"name": "mc", "kind": "multiple_choice",
         "search": write_jsonl(root / "mc_s.jsonl", mc_rows),
         "heldout": write_jsonl(root / "mc_h.jsonl", mc_rows[:5])},
    ]
    suite = write_suite(root, tasks, [{"name": "mean_acc", "tasks": "all"},
                                      {"name": "gen_acc", "tasks": ["gen"]}])
    return {"root": root, "base": root / "base", "suite": suite, "tasks": tasks,
            "gen": np.array(gen_truth), "mc": np.array(mc_truth)}


@pytest.fixture(scope="module")
def fitness(crafted):
    return LMFitness(base_model=crafted["base"], suite=crafted["suite"], batch_size=4)


def test_item_scores_are_the_known_right_answers(crafted, fitness, model):
    result = fitness.evaluate(model)
    np.testing.assert_array_equal(result.item_scores["gen"], crafted["gen"])
    np.testing.assert_array_equal(result.item_scores["mc"], crafted["mc"])
    gen_acc, mc_acc = crafted["gen"].mean(), crafted["mc"].mean()
    assert result.objectives == pytest.approx({"mean_acc": (gen_acc + mc_acc) / 2,
                                               "gen_acc": gen_acc})


def test_heldout_split_and_item_bookkeeping(crafted, fitness, model):
    assert fitness.num_items("search") == {"gen": 9, "mc": 9}
    assert fitness.num_items("heldout") == {"gen": 4, "mc": 5}
    assert fitness.item_ids("heldout")["mc"] == ["m0", "m1", "m2", "m3", "m4"]
    result = fitness.evaluate(model, "heldout")
    np.testing.assert_array_equal(result.item_scores["gen"], crafted["gen"][:4])
    np.testing.assert_array_equal(result.item_scores["mc"], crafted["mc"][:5])
    with pytest.raises(ValueError, match="unknown split 'test'"):
        fitness.evaluate(model, "test")


def test_search_items_cut_the_search_split_only(crafted, model):
    fit = LMFitness(base_model=crafted["base"], suite=crafted["suite"], batch_size=4,
                    search_items=3)
    assert fit.num_items("search") == {"gen": 3, "mc": 3}
    assert fit.num_items("heldout") == {"gen": 4, "mc": 5}
    result = fit.evaluate(model)
    np.testing.assert_array_equal(result.item_scores["gen"], crafted["gen"][:3])
    both = LMFitness(base_model=crafted["base"], suite=crafted["suite"], max_items=2,
                     search_items=3)
    assert both.num_items("search") == both.num_items("heldout") == {"gen": 2, "mc": 2}
    with pytest.raises(ValueError, match="search_items: expected an integer >= 1"):
        LMFitness(base_model=crafted["base"], suite=crafted["suite"], search_items=0)


def test_items_subset_scores_exactly_those_items_in_order(crafted, fitness, model):
    pick = {"gen": [3, 0, 3, 8], "mc": np.array([2, 1])}
    result = fitness.evaluate(model, items=pick)
    want_gen, want_mc = crafted["gen"][[3, 0, 3, 8]], crafted["mc"][[2, 1]]
    np.testing.assert_array_equal(result.item_scores["gen"], want_gen)
    np.testing.assert_array_equal(result.item_scores["mc"], want_mc)
    assert result.objectives["mean_acc"] == pytest.approx((want_gen.mean() + want_mc.mean()) / 2)
    only_mc = fitness.evaluate(model, items={"mc": [4]})  # unnamed tasks are scored in full
    np.testing.assert_array_equal(only_mc.item_scores["gen"], crafted["gen"])
    assert only_mc.item_scores["mc"].tolist() == [crafted["mc"][4]]


@pytest.mark.parametrize("items, match", [
    ({"nope": [0]}, "unknown task 'nope'"),
    ({"gen": [9]}, "index 9 out of range; the task has 9 items"),
    ({"gen": [0.5]}, "integer indices"),
    ({"gen": []}, "objective 'mean_acc' needs task"),
])
def test_bad_items_are_refused_before_compute(fitness, model, items, match):
    with pytest.raises(ValueError, match=match):
        fitness.evaluate(model, items=items)


def test_objectives_option_overrides_the_suite(crafted, model):
    fit = LMFitness(base_model=crafted["base"], suite=crafted["suite"], max_items=6,
                    objectives=[{"name": "mc_only", "tasks": ["mc"], "direction": "maximize"},
                                {"name": "both", "tasks": ["mc", "gen"]}])
    assert [o.name for o in fit.objectives] == ["mc_only", "both"]
    result = fit.evaluate(model)
    gen_acc, mc_acc = crafted["gen"][:6].mean(), crafted["mc"][:6].mean()
    assert result.objectives == pytest.approx({"mc_only": mc_acc, "both": (gen_acc + mc_acc) / 2})
    with pytest.raises(ValueError, match="objective 'both' needs task"):
        fit.evaluate(model, items={"gen": []})


def test_default_objectives_are_one_per_task(crafted, model):
    path = write_suite(crafted["root"], crafted["tasks"])
    fit = make_fitness("lm", base_model=str(crafted["base"]), suite=str(path), max_items=3)
    assert [o.name for o in fit.objectives] == ["gen", "mc"]
    result = fit.evaluate(model)
    assert result.objectives == pytest.approx({"gen": crafted["gen"][:3].mean(),
                                               "mc": crafted["mc"][:3].mean()})


def test_new_model_takes_the_base_weights(crafted, fitness, model):
    fresh = fitness.new_model()
    assert not fresh.training
    with torch.no_grad():
        for name, tensor in fresh.state_dict().items():
            tensor.copy_(model.state_dict()[name])
    np.testing.assert_array_equal(fitness.evaluate(fresh).item_scores["gen"], crafted["gen"])


def test_dtype_auto_is_the_base_configs_and_an_explicit_dtype_wins(crafted, tok, tmp_path):
    half = tmp_path / "bf16"
    tiny_llama(tok).to(torch.bfloat16).save_pretrained(half)
    tok.save_pretrained(half)
    fit = LMFitness(base_model=half, suite=crafted["suite"], max_items=2)
    assert fit.dtype == torch.bfloat16 and fit.new_model().dtype == torch.bfloat16
    assert LMFitness(base_model=crafted["base"], suite=crafted["suite"],
                     max_items=2).new_model().dtype == torch.float32
    assert LMFitness(base_model=half, suite=crafted["suite"], max_items=2,
                     dtype="float32").new_model().dtype == torch.float32
    assert LMFitness(base_model=half, suite=crafted["suite"], max_items=2,
                     dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="dtype: expected auto or one of float32"):
        LMFitness(base_model=crafted["base"], suite=crafted["suite"], dtype="float8")


def test_tokenizer_without_pad_uses_eos(crafted, tok, model, tmp_path):
    base = tmp_path / "nopad"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    fit = LMFitness(base_model=base, suite=crafted["suite"])
    assert fit.tokenizer.pad_token == "</s>"
    np.testing.assert_array_equal(fit.evaluate(model).item_scores["mc"], crafted["mc"])


# --------------------------------------------------------------------------------------------
# Suite errors
# --------------------------------------------------------------------------------------------


def gen_task(**over) -> dict:
    return {"name": "t", "kind": "generate", "search": "d.jsonl", "heldout": "d.jsonl"} | over


@pytest.mark.parametrize("tasks, objectives, match", [
    ([], None, r"tasks: .*empty; a suite needs at least one task"),
    ([gen_task(kind="cloze")], None, r"tasks\[0\]\.kind"),
    ([gen_task(search="missing.jsonl")], None, r"tasks\[0\]\.search: no such file 'missing"),
    ([gen_task(), gen_task()], None, "duplicate task name"),
    ([gen_task(kind="multiple_choice", max_new_tokens=3)], None,
     "max_new_tokens: not used by kind: multiple_choice"),
    ([gen_task()], [{"name": "x", "tasks": ["t", "u"]}], r"objectives\[0\]\.tasks: unknown task"),
    ([gen_task(max_new_tokens=0)], None, "max_new_tokens"),
])
def test_suite_errors_name_the_file_and_field(tmp_path, tasks, objectives, match):
    write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "prompt": "copy a =", "answer": "a"}])
    path = write_suite(tmp_path, tasks, objectives)
    with pytest.raises(SuiteError, match=match) as err:
        load_suite(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("row, match", [
    ({"id": "a", "prompt": "p", "choices": ["x", "y"], "gold": 2}, "gold: 2 is not an index"),
    ({"id": "a", "prompt": "p", "choices": ["x"], "gold": True}, "gold: True"),
    ({"id": "a", "prompt": "p", "choices": [], "gold": 0}, "choices: expected a non-empty"),
    ({"id": "a", "prompt": "p", "gold": 0}, "missing field"),
    ({"id": 3, "prompt": "p", "choices": ["x"], "gold": 0}, "id: expected a string"),
])
def test_bad_items_name_file_and_line(crafted, tmp_path, row, match):
    good = {"id": "ok", "prompt": "copy a =", "choices": ["a"], "gold": 0}
    write_jsonl(tmp_path / "d.jsonl", [good, row])
    path = write_suite(tmp_path, [gen_task(kind="multiple_choice")])
    with pytest.raises(SuiteError, match=match) as err:
        LMFitness(base_model=crafted["base"], suite=path)
    assert f"{tmp_path / 'd.jsonl'}:2" in str(err.value)


def test_suite_found_by_catalog_name(tmp_path, monkeypatch):
    import evomerge.fitness.suite as suite_mod

    write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "prompt": "copy a =", "answer": "a"}])
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({"tasks": [gen_task()]}))
    monkeypatch.setattr(suite_mod, "CATALOG_DIR", tmp_path)
    assert load_suite("mine").task_names == ["t"]
    with pytest.raises(SuiteError, match="not in the catalog; catalog: mine"):
        load_suite("other")


def test_bad_options_are_refused(crafted):
    with pytest.raises(ValueError, match="batch_size"):
        LMFitness(base_model=crafted["base"], suite=crafted["suite"], batch_size=0)
    with pytest.raises(ValueError, match="base_model: cannot read"):
        LMFitness(base_model=crafted["root"], suite=crafted["suite"])
    with pytest.raises(SuiteError, match="unknown task"):
        LMFitness(base_model=crafted["base"], suite=crafted["suite"],
                  objectives=[{"name": "x", "tasks": ["zzz"]}])


def test_shipped_tinylm_suite_loads_by_name_and_its_items_parse():
    from evomerge.fitness.suite import load_items

    suite = load_suite("tinylm")
    assert suite.task_names == ["add", "reverse", "sort", "translate", "sort_mc"]
    for task in suite.tasks:
        for split in ("search", "heldout"):
            items = load_items(suite.data_file(task, split), task.kind)
            assert len(items) == 300, (task.name, split)
    assert {o.name for o in suite.objectives} >= {"mean_acc", *suite.task_names}


def test_tasks_option_restricts_the_suite_and_its_objectives():
    from evomerge.fitness.suite import SuiteError, load_suite

    suite = load_suite("tinylm").select(["add", "sort"])
    assert suite.task_names == ["add", "sort"]
    # mean_acc needs reverse and translate too: dropped; the single-task ones stay
    assert [o.name for o in suite.objectives] == ["add", "sort"]
    assert load_suite("tinylm").select(["sort_mc"]).task_names == ["sort_mc"]
    with pytest.raises(SuiteError, match=r"tasks: 'nope' not in .*tinylm.yaml; its tasks: add"):
        load_suite("tinylm").select(["add", "nope"])
    with pytest.raises(SuiteError, match="non-empty list"):
        load_suite("tinylm").select([])
