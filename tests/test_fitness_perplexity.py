"""The perplexity fitness against transformers' own loss.

The truth for an item is ``-model(ids, labels=ids).loss`` on the item's encoded ids, one unpadded
sequence at a time: the mean log-likelihood of every token after the first. The fitness batches
items of different lengths with left padding, so agreement also shows padding changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.execution.driver import run_experiment
from evomerge.fitness import make_fitness
from evomerge.fitness.perplexity import PerplexityFitness, TextDataError
from evomerge.zoo.toy import VOCAB, make_tokenizer

WORDS = VOCAB[4:]  # the toy vocabulary without its special tokens
LENGTHS = [1, 3, 7, 12, 2, 30, 5, 9, 16, 4, 22, 1]  # words per item: 2-31 tokens with <s>


def tiny_llama(tok, seed: int = 0, max_positions: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=max_positions, initializer_range=0.2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(config).eval()


def texts(lengths, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=n)) for n in lengths]


def hf_score(model, tok, text: str, max_length: int | None = None) -> float:
    """transformers' own mean next-token log-likelihood of one unpadded item."""
    ids = torch.tensor([tok.encode(text)[:max_length]])
    with torch.no_grad():
        return -float(model(ids, labels=ids).loss)


def hf_tokens(tok, text: str, max_length: int | None = None) -> int:
    """How many tokens of ``text`` are scored: all but the first."""
    return len(tok.encode(text)[:max_length]) - 1


def write_txt(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tok():
    tok = make_tokenizer()
    tok.model_max_length = 4096  # the toy zoo's 20 is about its own tasks, not about this text
    return tok


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(tok)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok, model) -> Path:
    root = tmp_path_factory.mktemp("ppl") / "base"
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("corpus")
    search, held = texts(LENGTHS, seed=0), texts([4, 11, 2, 25], seed=1)
    return {"search": search, "heldout": held,
            "txt": write_txt(root / "search.txt", search),
            "heldout_txt": write_txt(root / "heldout.txt", held),
            "jsonl": write_jsonl(root / "search.jsonl", [{"text": t, "id": i}
                                                         for i, t in enumerate(search)])}


def token_weighted(model, tok, items: list[str], max_length: int | None = None) -> float:
    """sum over items of (mean log-likelihood x scored tokens) / scored tokens: -log(ppl)."""
    n = np.array([hf_tokens(tok, t, max_length) for t in items], dtype=float)
    s = np.array([hf_score(model, tok, t, max_length) for t in items])
    return float((s * n).sum() / n.sum())


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def test_item_scores_equal_transformers_loss_with_padding(base, corpus, tok, model):
    fit = PerplexityFitness(base_model=base, data=corpus["txt"], heldout=corpus["heldout_txt"],
                            batch_size=5)
    result = fit.evaluate(model)
    want = [hf_score(model, tok, t) for t in corpus["search"]]
    np.testing.assert_allclose(result.item_scores["text"], want, rtol=0, atol=1e-5)
    assert list(result.item_scores) == ["text"]
    assert result.objectives == pytest.approx(
        {"neg_log_ppl": token_weighted(model, tok, corpus["search"])}, abs=1e-5)
    # token-weighted, not the mean of the item scores (the items have different lengths)
    assert abs(result.objectives["neg_log_ppl"] - np.mean(want)) > 1e-3
    one = PerplexityFitness(base_model=base, data=corpus["txt"], heldout=corpus["heldout_txt"],
                            batch_size=1).evaluate(model)
    np.testing.assert_allclose(one.item_scores["text"], result.item_scores["text"],
                               rtol=0, atol=1e-5)


def test_loss_objective_is_minimised_and_the_negative(base, corpus, tok, model):
    fit = make_fitness("perplexity", base_model=str(base), data=corpus["txt"],
                       heldout=corpus["heldout_txt"], objective="loss")
    assert [(o.name, o.direction) for o in fit.objectives] == [("loss", "minimize")]
    got = fit.evaluate(model).objectives["loss"]
    assert got == pytest.approx(-token_weighted(model, tok, corpus["search"]), abs=1e-5)
    assert got > 0 and np.isfinite(np.exp(got))  # exp(loss) is the perplexity


def test_heldout_file_is_the_heldout_split(base, corpus, tok, model):
    fit = PerplexityFitness(base_model=base, data=corpus["txt"], heldout=corpus["heldout_txt"])
    assert fit.num_items("heldout") == {"text": 4}
    result = fit.evaluate(model, "heldout")
    np.testing.assert_allclose(result.item_scores["text"],
                               [hf_score(model, tok, t) for t in corpus["heldout"]],
                               rtol=0, atol=1e-5)
    assert result.objectives["neg_log_ppl"] == pytest.approx(
        token_weighted(model, tok, corpus["heldout"]), abs=1e-5)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        fit.evaluate(model, "test")


def test_without_heldout_every_fifth_item_is_held_out(base, corpus, tmp_path, tok, model):
    fit = PerplexityFitness(base_model=base, data=corpus["txt"])
    held = [4, 9]  # the 5th and 10th of 12 items
    lines = [i + 1 for i in range(len(LENGTHS))]
    assert fit.item_ids("heldout")["text"] == [f"{corpus['txt']}:{lines[i]}" for i in held]
    assert fit.num_items("search") == {"text": len(LENGTHS) - 2}
    np.testing.assert_allclose(fit.evaluate(model, "heldout").item_scores["text"],
                               [hf_score(model, tok, corpus["search"][i]) for i in held],
                               rtol=0, atol=1e-5)
    search = [t for i, t in enumerate(corpus["search"]) if i not in held]
    np.testing.assert_allclose(fit.evaluate(model).item_scores["text"],
                               [hf_score(model, tok, t) for t in search], rtol=0, atol=1e-5)
    few = PerplexityFitness(base_model=base, data=write_txt(tmp_path / "few.txt", ["a b", "c d",
                                                                                   "e f"]))
    assert few.num_items("search") == {"text": 2} and few.item_ids("heldout")["text"] == [
        f"{tmp_path / 'few.txt'}:3"]
    # max_items cuts each split after the split: the held-out items stay the same ones
    cut = PerplexityFitness(base_model=base, data=corpus["txt"], max_items=1)
    assert cut.item_ids("heldout")["text"] == fit.item_ids("heldout")["text"][:1]
    assert cut.item_ids("search")["text"] == fit.item_ids("search")["text"][:1]


def test_txt_and_jsonl_give_the_same_items(base, corpus, model):
    txt = PerplexityFitness(base_model=base, data=corpus["txt"], heldout=corpus["heldout_txt"])
    jsonl = PerplexityFitness(base_model=base, data=corpus["jsonl"],
                              heldout=corpus["heldout_txt"])
    np.testing.assert_array_equal(jsonl.evaluate(model).item_scores["text"],
                                  txt.evaluate(model).item_scores["text"])


def test_blank_lines_are_skipped_and_lines_are_named(base, tmp_path, tok, model):
    path = write_txt(tmp_path / "gaps.txt", ["", "a b c", "   ", "copy 1 2", "", "sort z y"])
    fit = PerplexityFitness(base_model=base, data=path, heldout=path)
    assert fit.item_ids()["text"] == [f"{path}:2", f"{path}:4", f"{path}:6"]
    np.testing.assert_allclose(fit.evaluate(model).item_scores["text"],
                               [hf_score(model, tok, t) for t in ("a b c", "copy 1 2",
                                                                  "sort z y")],
                               rtol=0, atol=1e-5)


def test_max_items_takes_the_first_items(base, corpus, tok, model):
    fit = PerplexityFitness(base_model=base, data=corpus["txt"], heldout=corpus["heldout_txt"],
                            max_items=3)
    assert fit.num_items("search") == fit.num_items("heldout") == {"text": 3}
    np.testing.assert_allclose(fit.evaluate(model).item_scores["text"],
                               [hf_score(model, tok, t) for t in corpus["search"][:3]],
                               rtol=0, atol=1e-5)


def test_long_items_are_truncated_to_max_length(base, corpus, tok, model):
    fit = PerplexityFitness(base_model=base, data=corpus["txt"], heldout=corpus["heldout_txt"],
                            max_length=6, batch_size=4)
    long = sum(len(tok.encode(t)) > 6 for t in corpus["search"])
    assert fit.truncated == {"search": long,
                             "heldout": sum(len(tok.encode(t)) > 6 for t in corpus["heldout"])}
    result = fit.evaluate(model)
    np.testing.assert_allclose(result.item_scores["text"],
                               [hf_score(model, tok, t, 6) for t in corpus["search"]],
                               rtol=0, atol=1e-5)
    assert result.objectives["neg_log_ppl"] == pytest.approx(
        token_weighted(model, tok, corpus["search"], 6), abs=1e-5)


def test_default_max_length_is_the_models_positions_capped(base, corpus, tmp_path, tok):
    fit = PerplexityFitness(base_model=base, data=corpus["txt"], heldout=corpus["heldout_txt"])
    assert fit.max_length == 64  # the fixture's max_position_embeddings
    big = tmp_path / "big"
    tiny_llama(tok, max_positions=4096).save_pretrained(big)
    tok.save_pretrained(big)
    assert PerplexityFitness(base_model=big, data=corpus["txt"]).max_length == 1024
    with pytest.raises(ValueError, match="max_length: 65 exceeds the model's "
                                         "max_position_embeddings=64"):
        PerplexityFitness(base_model=base, data=corpus["txt"], max_length=65)


def test_a_tokenizer_without_bos_leaves_the_first_word_unscored(tmp_path, tok, model):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(VOCAB)},
                                      unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    plain = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                    pad_token="<pad>", unk_token="<unk>")
    assert plain.encode("a b") == [VOCAB.index("a"), VOCAB.index("b")]
    model.save_pretrained(tmp_path / "base")
    plain.save_pretrained(tmp_path / "base")
    items = texts([2, 9, 4, 17], seed=3)
    data = write_txt(tmp_path / "d.txt", items)
    got = PerplexityFitness(base_model=tmp_path / "base", data=data, heldout=data,
                            batch_size=3).evaluate(model)
    np.testing.assert_allclose(got.item_scores["text"], [hf_score(model, plain, t) for t in items],
                               rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# dtype and the model
# --------------------------------------------------------------------------------------------


def test_bfloat16_model_is_close_to_float32(base, corpus, model):
    fit = PerplexityFitness(base_model=base, data=corpus["txt"], heldout=corpus["heldout_txt"],
                            dtype="bfloat16", batch_size=4)
    half = fit.new_model()
    assert half.dtype == torch.bfloat16 and not half.training
    half.load_state_dict(model.state_dict())
    got = fit.evaluate(half)
    want = PerplexityFitness(base_model=base, data=corpus["txt"],
                             heldout=corpus["heldout_txt"]).evaluate(model)
    np.testing.assert_allclose(got.item_scores["text"], want.item_scores["text"], rtol=0,
                               atol=0.1)
    assert got.objectives["neg_log_ppl"] == pytest.approx(want.objectives["neg_log_ppl"],
                                                          abs=0.03)


def test_dtype_auto_is_the_checkpoints(tmp_path, corpus, tok, model):
    half = tmp_path / "bf16"
    tiny_llama(tok).to(torch.bfloat16).save_pretrained(half)
    tok.save_pretrained(half)
    fit = PerplexityFitness(base_model=half, data=corpus["txt"])
    assert fit.dtype == torch.bfloat16 and fit.new_model().dtype == torch.bfloat16
    assert PerplexityFitness(base_model=half, data=corpus["txt"],
                             dtype="float32").new_model().dtype == torch.float32
    assert PerplexityFitness(base_model=half, data=corpus["txt"],
                             dtype=torch.float16).dtype == torch.float16


def test_new_model_takes_the_base_weights(base, corpus, model):
    fit = PerplexityFitness(base_model=base, data=corpus["txt"], heldout=corpus["heldout_txt"])
    fresh = fit.new_model()
    assert fresh.dtype == torch.float32 and not fresh.training
    fresh.load_state_dict(model.state_dict())
    np.testing.assert_array_equal(fit.evaluate(fresh).item_scores["text"],
                                  fit.evaluate(model).item_scores["text"])


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, content, match", [
    ("missing.txt", None, "data: no such file {path}"),
    ("notes.csv", "a b\n", r"data: {path}: expected a \.txt or \.jsonl file"),
    ("empty.txt", "", r"data: {path}: no items \(every line is empty\)"),
    ("blank.txt", "\n  \n\n", r"data: {path}: no items"),
    ("empty.jsonl", "\n", r"data: {path}: no items"),
    ("bad.jsonl", '{"text": "a b"}\n{"text": "a\n', "{path}:2: not valid JSON"),
    ("list.jsonl", '{"text": "a b"}\n\n["a b"]\n', "{path}:3: expected an object with a 'text'"),
    ("field.jsonl", '{"txt": "a b"}\n', "{path}:1: expected an object with a 'text' field"),
    ("type.jsonl", '{"text": "a b"}\n{"text": 3}\n', "{path}:2: text: expected a string, got 3"),
    ("short.jsonl", '{"text": "a b"}\n{"text": ""}\n',
     r"{path}:2: the text encodes to 1 token\(s\); an item needs at least 2"),
    ("one.txt", "a b\n", r"data: {path}: has 1 item; without a heldout file it needs at least 2"),
])
def test_bad_data_is_refused_at_construction_naming_file_and_line(base, tmp_path, name, content,
                                                                  match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(TextDataError, match=match.format(path=path)):
        PerplexityFitness(base_model=base, data=path)


def test_bad_heldout_file_is_named_as_heldout(base, corpus, tmp_path):
    with pytest.raises(TextDataError, match=f"heldout: no such file {tmp_path / 'x.txt'}"):
        PerplexityFitness(base_model=base, data=corpus["txt"], heldout=tmp_path / "x.txt")
    path = write_jsonl(tmp_path / "h.jsonl", [{"text": "a b"}, {"text": "a"}, {"text": ""}])
    with pytest.raises(TextDataError, match=f"{path}:3: the text encodes to 1 token"):
        PerplexityFitness(base_model=base, data=corpus["txt"], heldout=path)


@pytest.mark.parametrize("options, match", [
    ({"objective": "ppl"}, "objective: expected one of neg_log_ppl, loss, got 'ppl'"),
    ({"batch_size": 0}, "batch_size: expected an integer >= 1, got 0"),
    ({"batch_size": None}, "batch_size: expected an integer >= 1, got None"),
    ({"max_items": 0}, "max_items: expected an integer >= 1 or null"),
    ({"max_items": True}, "max_items: expected an integer >= 1 or null"),
    ({"max_length": 1}, "max_length: expected an integer >= 2 or null"),
    ({"dtype": "float8"}, "dtype: expected auto or one of"),
])
def test_bad_options_are_refused(base, corpus, options, match):
    with pytest.raises(ValueError, match=match):
        PerplexityFitness(base_model=base, data=corpus["txt"], **options)


def test_base_without_config_is_refused(tmp_path, corpus):
    with pytest.raises(ValueError, match="base_model: cannot read a config and tokenizer"):
        PerplexityFitness(base_model=tmp_path, data=corpus["txt"])


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def toy_lines(task: str, n: int, seed: int) -> list[str]:
    """``n`` lines of one toy task as plain text: ``copy a 7 c = a 7 c``."""
    from evomerge.zoo.toy import SYMBOLS, task_example

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt, answer = task_example(task, list(rng.choice(SYMBOLS, size=rng.integers(2, 7))))
        out.append(f"{prompt} = {answer}")
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict:
    """The toy zoo (a trained tiny Llama base and task experts, a few seconds) and a corpus that
    mixes two tasks' text, so neither expert alone models all of it."""
    from evomerge.zoo.toy import build_toy_zoo

    root = tmp_path_factory.mktemp("zoo")
    out = dict(build_toy_zoo(root / "toy", seed=0, size="tiny", progress=False))
    mix = [x for pair in zip(toy_lines("copy", 15, 1), toy_lines("reverse", 15, 2)) for x in pair]
    out["corpus"] = write_txt(root / "mix.txt", mix)
    return out


def run_data(zoo, tmp_path, **fitness) -> dict:
    return {
        "name": "ppl",
        "models": {"base": str(zoo["base"]),
                   "sources": {k: str(zoo[k]) for k in ("expert_copy", "expert_reverse")}},
        "space": {"method": "linear", "fixed": {"normalize": True},
                  "params": [{"name": "weight", "per": "source", "bounds": [0.0, 1.0]}]},
        "fitness": {"name": "perplexity", "data": zoo["corpus"], **fitness},
        "strategy": {"name": "cmaes", "popsize": 4, "sigma0": 0.3},
        "budget": 8,
        "seed": 0,
        "run_dir": str(tmp_path / "run"),
    }


@pytest.mark.slow
def test_a_search_maximises_neg_log_ppl_and_its_winner_rescores_the_same(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    from evomerge.experiment import Experiment

    summary = run_experiment(Experiment.from_dict(run_data(zoo, tmp_path)), progress=False)
    assert summary["n_trials"] == 8 and summary["n_failed"] == 0
    assert summary["objectives"] == [{"name": "neg_log_ppl", "direction": "maximize"}]
    best = summary["best"]["objectives"]["neg_log_ppl"]
    assert best < 0 and np.isfinite(best)  # -log(perplexity): the perplexity exp(-best) > 1
    fit = PerplexityFitness(base_model=zoo["base"], data=zoo["corpus"])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "best_model")
    assert fit.evaluate(exported).objectives["neg_log_ppl"] == pytest.approx(best, abs=1e-5)
    assert fit.evaluate(exported, "heldout").objectives["neg_log_ppl"] == pytest.approx(
        summary["final"]["best"]["neg_log_ppl"], abs=1e-5)
    for name in ("expert_copy", "expert_reverse"):
        source = AutoModelForCausalLM.from_pretrained(zoo[name])
        assert summary["sources"][name]["neg_log_ppl"] == pytest.approx(
            fit.evaluate(source).objectives["neg_log_ppl"], abs=1e-5)
    # the search's best is the best of its trials, and each trial's item scores are stored
    import optuna

    study = optuna.load_study(study_name="ppl", storage=f"sqlite:///{tmp_path / 'run/study.db'}")
    assert best == pytest.approx(study.best_value)
    stored = study.best_trial.user_attrs["result"]["item_scores"]["text"]
    np.testing.assert_allclose(stored["values"], fit.evaluate(exported).item_scores["text"],
                               rtol=0, atol=1e-5)


@pytest.mark.slow
def test_reduced_is_refused_before_any_compute(zoo, tmp_path, monkeypatch):
    from evomerge.experiment import Experiment, ExperimentError
    from evomerge.fitness.lm import LMFitness
    from evomerge.fitness.reduced import check_reducible

    def no_compute(*args, **kwargs):
        raise AssertionError("scored a model")

    monkeypatch.setattr(PerplexityFitness, "evaluate", no_compute)
    data = run_data(zoo, tmp_path, reduced={"anchors": 2, "design": 2})
    with pytest.raises(ExperimentError, match="fitness.reduced: the 'perplexity' fitness cannot "
                                              "be IRT-reduced: its item scores are continuous"):
        run_experiment(Experiment.from_dict(data), progress=False)
    assert not (tmp_path / "run").exists()  # refused at plan time: no run directory, no study
    check_reducible(LMFitness)  # the suite fitness can be reduced
    with pytest.raises(ValueError, match="cannot be IRT-reduced: it has no num_items"):
        check_reducible(object())


@pytest.mark.slow
def test_shipped_example_text_loads_with_the_tinylm_tokenizer(tmp_path):
    from evomerge.zoo.tinylm import make_tokenizer as tinylm_tokenizer

    repo = Path(__file__).resolve().parents[1] / "experiments" / "data"
    tok = tinylm_tokenizer()
    tiny_llama(tok).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    fit = PerplexityFitness(base_model=tmp_path / "base", data=repo / "tinylm_text_search.txt",
                            heldout=repo / "tinylm_text_heldout.jsonl")
    assert fit.num_items("search") == fit.num_items("heldout") == {"text": 200}
    assert fit.truncated == {"search": 0, "heldout": 0}
