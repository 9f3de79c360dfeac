"""The tiny-LM zoo: a small Llama base and four task experts on generated text tasks, offline.

This is the zoo the language-model experiments merge. Every model directory is a normal Hugging
Face checkpoint (``LlamaForCausalLM``, safetensors, plus a byte-level BPE tokenizer trained here),
loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer`` and by lm-eval's ``HFLM``::

    out_dir/
      zoo.json            manifest: seed, size, hyper-parameters, models, held-out exact match
      base/               briefly trained on a mix of all four tasks: weak, not useless
      expert_add/         base fine-tuned on ``add``, keeping the base's behaviour on the others
      expert_reverse/     ... on ``reverse``
      expert_sort/        ... on ``sort``
      expert_translate/   ... on ``translate`` (the second-language task)

The experts are built to be mergeable, like real fine-tunes that keep their general ability.
A quarter of each expert batch is replay: problems of the other three tasks trained towards the
frozen base's own predictions (distillation, :func:`distill_loss`), at a modest learning rate.
Each expert then masters its task while staying close to the base elsewhere, its task vector is
small and mostly its own, and a plain task-arithmetic merge of the four keeps several skills at
once, beating every expert (and the base) on the multi-task mean. Experts fine-tuned on their
task alone (the first recipe) forgot the rest and drifted so far that every standard merge was
near zero.

The tasks. Every item is a prompt ending in ``=`` and a short answer ending the line; the model
reads ``<s>{prompt}{answer}\\n</s>`` and is trained on the answer, the newline and ``</s>``:

* ``add``: ``add 345+78=`` -> ``423`` (operands of 1-3 digits);
* ``reverse``: ``reverse k q a m=`` -> ``m a q k`` (3-7 letters);
* ``sort``: ``sort k q a m=`` -> ``a k m q``;
* ``translate``: digit strings to and from a made-up second language, Vellan, whose ten words
  (:data:`LEXICON`) name the digits: ``translate 307=`` -> ``ti nu ze`` and
  ``translate ti nu ze=`` -> ``307`` (2-5 digits).

Why ``translate``: the seed papers' headline merges transfer a skill across languages (a Japanese
LM merged with an English math model solves Japanese math). Here ``expert_translate`` holds the
"language" (Vellan's vocabulary, new BPE tokens learnt from the corpus) and the others hold the
"skills"; a good merge keeps both, which no single expert does, so it can beat every expert on
the multi-task average.

Tokenization. Digits are split one per token and letters are written space-separated, so every
symbol of a problem is its own token (reversal and sorting act on tokens, not on merged letter
pairs); BPE merges only the task keywords and the Vellan words. Prompts end in ``=`` and answers
start without a space, so the tokens of ``prompt`` are a prefix of the tokens of
``prompt + answer``: generation and log-likelihood scoring see exactly the training boundary
(lm-eval: use ``target_delimiter: ""`` for the multiple-choice task). The tokenizer prepends
``<s>`` itself (``add_special_tokens=True``, which lm-eval's ``HFLM`` follows by default).

Data. Each problem (task + prompt) falls by a stable hash into ``search`` (10 %), ``heldout``
(10 %) or ``train`` (80 %); training samples only ``train`` problems, so the shipped evaluation
files (:func:`write_task_data`, ``fitness/data/tinylm/``) are disjoint from each other and from
anything the zoo was trained on, by construction. Generation items are
``{"id", "prompt", "answer"}`` (stop string ``"\\n"``); the multiple-choice variant ``sort_mc``
is ``{"id", "prompt", "choices", "gold"}``: the sorted answer and three near misses.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from evomerge.models.causal_lm import greedy_generate
from evomerge.zoo._common import (
    MANIFEST,
    PORTABLE_ENV,
    kernel_facts,
    manifest_matches,
    portable_kernels_active,
    progress_bar,
    quiet_hf,
    run_portable,
    torch_threads,
    write_json_atomic,
)

__all__ = [
    "DATA_DIR",
    "LEXICON",
    "MC_TASKS",
    "TASKS",
    "TINYLM_SIZES",
    "TinyLMSize",
    "build_tinylm_zoo",
    "distill_loss",
    "exact_match_table",
    "load_items",
    "make_tokenizer",
    "problem_split",
    "task_items",
    "tinylm_zoo_is_built",
    "write_task_data",
]

#: 2: trained on portable kernels (:data:`evomerge.zoo._common.PORTABLE_ENV`); a format-1 zoo
#: (native kernels, machine-dependent weights) is rebuilt.
FORMAT_VERSION = 2
KIND = "tiny-lm"

TASKS: tuple[str, ...] = ("add", "reverse", "sort", "translate")
MC_TASKS: tuple[str, ...] = ("sort_mc",)
SPLITS: tuple[str, ...] = ("search", "heldout")
STOP = "\n"

#: Vellan, the second language: the word for each digit 0-9.
LEXICON: tuple[str, ...] = ("nu", "ek", "do", "ti", "ka", "pe", "so", "ze", "ak", "ri")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
ADD_DIGITS = (1, 3)
LETTER_LEN = (3, 7)
TRANSLATE_LEN = (2, 5)

#: Share (percent) of the problem space in each evaluation split; the rest is training data.
SPLIT_PERCENT = {"search": 10, "heldout": 10}

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"

#: Where the shipped evaluation items live (``<task>_search.jsonl`` / ``<task>_heldout.jsonl``).
DATA_DIR = Path(__file__).resolve().parents[2] / "fitness" / "data" / "tinylm"
#: Items per task per split in the shipped files.
ITEMS_PER_SPLIT = 300
#: Seeds of the shipped data and of the tokenizer's corpus: fixed, so every zoo seed shares them.
DATA_SEED = 20_240_501
TOKENIZER_SEED = 7
TOKENIZER_CORPUS = 4_000

#: torch intra-op threads while training (see :func:`evomerge.zoo._common.torch_threads`).
BUILD_THREADS = 1
#: Longest answer in tokens the exact-match table lets a model generate (the longest answer,
#: ``reverse`` of 7 letters, is 7 tokens plus the newline).
MAX_NEW_TOKENS = 12


@dataclass(frozen=True)
class TinyLMSize:
    """Architecture and training budget of one zoo size (AdamW; every run warms up linearly
    then decays by a cosine, so each model ends on small, settled steps)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    batch_size: int
    base_steps: int
    base_lr: float
    expert_steps: int
    expert_lr: float
    #: Share of each expert batch drawn from the *other* tasks and trained towards the base's own
    #: predictions (distillation, not the true answers): the expert keeps the base's behaviour
    #: there instead of forgetting it, without getting better at it either. That is what makes
    #: the experts mergeable (small, non-conflicting task vectors) while each one stays the
    #: best at its own task only.
    replay: float
    #: Held-out items per task (the first ones of each shipped file) in the manifest's table.
    table_items: int


TINYLM_SIZES: dict[str, TinyLMSize] = {
    # 1.08M parameters. 250 mixed steps leave the base partial on sort / translate / reverse and
    # near zero on add (held-out exact match 0.72 / 0.38 / 0.13 / 0.00); 500 steps per expert at
    # lr 5e-4 with 25 % distilled replay reach 0.16 (add) and 1.00 (the others) on its task and
    # stay within a few points of the base elsewhere. Task arithmetic of the four at weight 0.7
    # scores 0.556 on the held-out mean (every expert <= 0.504, base 0.307); at lr 1e-3 without
    # replay the experts forgot everything else and that merge scored 0.003. Portable kernels
    # (format 2) cost about 1.6x native ones per step: about 8 min on an idle core (native: 314 s
    # measured), 19 min measured with the 2 cores shared by about six other processes. The
    # native-kernel zoo of format 1 differed per CPU (Intel Xeon: add expert 0.39, TA 0.634).
    "small": TinyLMSize(
        hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
        batch_size=64, base_steps=250, base_lr=2e-3, expert_steps=500, expert_lr=5e-4,
        replay=0.25, table_items=ITEMS_PER_SPLIT,
    ),
    # About a minute; for the tests that compare scores (a merge against its sources, an
    # exported model against the evaluated one), which "tiny" cannot: there every model scores
    # 0.0 on every task. Held-out exact match (40 items, seed 0): base 0.00 / 0.30 / 0.40 / 0.12
    # on add / reverse / sort / translate; expert_reverse and expert_translate 1.00 on their
    # task, expert_sort 0.82, expert_add 0.00 (add does not learn at this size), each within a
    # few points of the base elsewhere. 57 s measured with the 2 cores shared.
    "mini": TinyLMSize(
        hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256,
        batch_size=64, base_steps=300, base_lr=4e-3, expert_steps=150, expert_lr=2e-3,
        replay=0.25, table_items=40,
    ),
    # Seconds; for tests of the plumbing. Too small to learn (every model scores 0.0 on every
    # task), big enough that experts differ from the base.
    "tiny": TinyLMSize(
        hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
        batch_size=32, base_steps=40, base_lr=3e-3, expert_steps=20, expert_lr=3e-3,
        replay=0.25, table_items=40,
    ),
}


def expert_name(task: str) -> str:
    """Directory / manifest name of the expert fine-tuned on ``task``."""
    return f"expert_{task}"


def _check_task(task: str, allowed: Sequence[str] = TASKS) -> None:
    if task not in allowed:
        raise ValueError(f"unknown tiny-lm task {task!r}; expected one of {', '.join(allowed)}")


def _check_size(size: str) -> None:
    if size not in TINYLM_SIZES:
        raise ValueError(
            f"unknown tiny-lm zoo size {size!r}; expected one of {', '.join(TINYLM_SIZES)}"
        )


# --------------------------------------------------------------------------------------------
# Problems and the split of the problem space
# --------------------------------------------------------------------------------------------


def _letters(rng: random.Random) -> list[str]:
    return [rng.choice(LETTERS) for _ in range(rng.randint(*LETTER_LEN))]


def _number(rng: random.Random) -> int:
    digits = rng.randint(*ADD_DIGITS)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def draw_problem(task: str, rng: random.Random) -> tuple[str, str]:
    """One random ``(prompt, answer)`` of ``task`` from the whole problem space (any split)."""
    if task == "add":
        a, b = _number(rng), _number(rng)
        return f"add {a}+{b}=", str(a + b)
    if task in ("reverse", "sort"):
        s = _letters(rng)
        answer = s[::-1] if task == "reverse" else sorted(s)
        return f"{task} {' '.join(s)}=", " ".join(answer)
    if task == "translate":
        digits = [rng.randrange(10) for _ in range(rng.randint(*TRANSLATE_LEN))]
        number = "".join(map(str, digits))
        words = " ".join(LEXICON[d] for d in digits)
        return (f"translate {number}=", words) if rng.random() < 0.5 else (
            f"translate {words}=", number
        )
    _check_task(task)
    raise AssertionError("unreachable")


def problem_split(task: str, prompt: str) -> str:
    """``"search"``, ``"heldout"`` or ``"train"``: the fixed part of the problem space a problem
    belongs to, from a stable hash of ``task`` and ``prompt`` (the same on every machine)."""
    digest = hashlib.blake2b(f"{task}|{prompt}".encode(), digest_size=8).digest()
    bucket = int.from_bytes(digest, "big") % 100
    if bucket < SPLIT_PERCENT["search"]:
        return "search"
    if bucket < SPLIT_PERCENT["search"] + SPLIT_PERCENT["heldout"]:
        return "heldout"
    return "train"


def _draw_in(task: str, split: str, rng: random.Random) -> tuple[str, str]:
    while True:
        prompt, answer = draw_problem(task, rng)
        if problem_split(task, prompt) == split:
            return prompt, answer


def _unique(task: str, split: str, n: int, rng: random.Random, exclude: set[str]):
    """``n`` distinct problems of ``split`` whose prompts are not in ``exclude`` (which grows)."""
    out = []
    while len(out) < n:
        prompt, answer = _draw_in(task, split, rng)
        if prompt not in exclude:
            exclude.add(prompt)
            out.append((prompt, answer))
    return out


def _sort_distractors(letters: list[str], gold: str, rng: random.Random) -> list[str]:
    """Three near misses of a sorted answer: an adjacent swap, a one-letter change, the input
    order, the descending order (more one-letter changes if those coincide with the answer)."""
    ordered = sorted(letters)
    swaps = [i for i in range(len(ordered) - 1) if ordered[i] != ordered[i + 1]]
    candidates = []
    if swaps:
        i = rng.choice(swaps)
        swapped = ordered[:i] + [ordered[i + 1], ordered[i]] + ordered[i + 2 :]
        candidates.append(" ".join(swapped))
    candidates += [" ".join(letters), " ".join(ordered[::-1])]
    out: list[str] = []
    while len(out) < 3:
        choice = candidates.pop(0) if candidates else None
        if choice is None:  # one letter nudged to a neighbour of the alphabet
            changed = list(ordered)
            i = rng.randrange(len(changed))
            j = LETTERS.index(changed[i]) + rng.choice((-1, 1))
            changed[i] = LETTERS[j if 0 <= j < len(LETTERS) else 2 * LETTERS.index(changed[i]) - j]
            choice = " ".join(sorted(changed))
        if choice != gold and choice not in out:
            out.append(choice)
    return out


def task_items(task: str, split: str, n: int = ITEMS_PER_SPLIT, seed: int = DATA_SEED) -> list[dict]:
    """The evaluation items of ``task`` (one of :data:`TASKS` or :data:`MC_TASKS`) in ``split``.

    Generation: ``{"id": "add-s-0000", "prompt": ..., "answer": ...}``, distinct prompts.
    ``sort_mc``: ``{"id", "prompt", "choices" (4), "gold"}``, prompts distinct from each other
    and from the ``sort`` items of the same split. A pure function of its arguments.
    """
    _check_task(task, TASKS + MC_TASKS)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    tag = split[0]
    if task in TASKS:
        rng = random.Random(f"{seed}|{task}|{split}")
        problems = _unique(task, split, n, rng, set())
        return [
            {"id": f"{task}-{tag}-{i:04d}", "prompt": p, "answer": a}
            for i, (p, a) in enumerate(problems)
        ]
    used = {item["prompt"] for item in task_items("sort", split, n, seed)}
    rng = random.Random(f"{seed}|{task}|{split}")
    items = []
    for i, (prompt, gold) in enumerate(_unique("sort", split, n, rng, used)):
        letters = prompt[len("sort ") : -1].split(" ")
        choices = [gold, *_sort_distractors(letters, gold, rng)]
        rng.shuffle(choices)
        items.append(
            {"id": f"{task}-{tag}-{i:04d}", "prompt": prompt, "choices": choices,
             "gold": choices.index(gold)}
        )
    return items


def write_task_data(
    out_dir: str | os.PathLike = DATA_DIR, n: int = ITEMS_PER_SPLIT, seed: int = DATA_SEED
) -> list[Path]:
    """Write ``<task>_<split>.jsonl`` for every task (and ``sort_mc``) and split into ``out_dir``;
    returns the files written. The shipped ``fitness/data/tinylm/`` is this with the defaults."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task in TASKS + MC_TASKS:
        for split in SPLITS:
            path = out / f"{task}_{split}.jsonl"
            lines = [json.dumps(item, ensure_ascii=False) for item in task_items(task, split, n, seed)]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
            os.replace(tmp, path)
            written.append(path)
    return written


def load_items(task: str, split: str, data_dir: str | os.PathLike = DATA_DIR) -> list[dict]:
    """The items of ``data_dir/<task>_<split>.jsonl`` (the shipped files by default)."""
    path = Path(data_dir) / f"{task}_{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no tiny-lm data for task {task!r}, split {split!r}; "
            "regenerate it with evomerge.zoo.tinylm.write_task_data()"
        )
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def _tokenizer_corpus() -> list[str]:
    rng = random.Random(TOKENIZER_SEED)
    lines = []
    for i in range(TOKENIZER_CORPUS):
        task = TASKS[i % len(TASKS)]
        prompt, answer = _draw_in(task, "train", rng)
        lines.append(f"{prompt}{answer}{STOP}")
    return lines


def make_tokenizer():
    """The zoo's byte-level BPE tokenizer, trained here on a fixed corpus of training problems
    (deterministic; the same for every zoo seed), as a ``PreTrainedTokenizerFast``.

    Digits are pre-split one per token; encoding prepends ``<s>``; ``<pad>``, ``</s>`` and
    ``<unk>`` are special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, min_frequency=2, special_tokens=[PAD, BOS, EOS, UNK], show_progress=False
    )
    core.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, core.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
        model_max_length=64,
    )


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _sample_batch(tokenizer, tasks: Sequence[str], n: int, rng: random.Random):
    """``n`` training problems (tasks drawn uniformly) as right-padded ids; only the answer, the
    newline and ``</s>`` are supervised."""
    problems = [_draw_in(rng.choice(tasks), "train", rng) for _ in range(n)]
    prompt_lens = [len(ids) for ids in tokenizer([p for p, _ in problems])["input_ids"]]
    full = tokenizer([f"{p}{a}{STOP}" for p, a in problems])["input_ids"]
    rows = [ids + [tokenizer.eos_token_id] for ids in full]
    width = max(map(len, rows))
    input_ids = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for i, (row, start) in enumerate(zip(rows, prompt_lens)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        labels[i, start : len(row)] = input_ids[i, start : len(row)]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _new_model(size: TinyLMSize, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_heads,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    return LlamaForCausalLM(config)


def _lr_factor(step: int, steps: int) -> float:
    """Multiplier of the peak learning rate at ``step``: 5 % linear warm-up, then cosine decay
    to 10 %: ``0.1 + 0.45 (1 + cos(pi t))`` with ``t`` the post-warm-up fraction done."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def distill_loss(student_logits, teacher_logits, labels):
    """Mean over supervised positions of KL(teacher || student) of the next-token distributions.

    ``labels`` marks the supervised tokens as in a causal-LM batch (-100 elsewhere); position
    ``i`` predicts token ``i + 1``, so the logits compared are those before each labelled token.
    """
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != -100
    student = student_logits[predicts].log_softmax(-1)
    teacher = teacher_logits[predicts].log_softmax(-1)
    return torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")


def _train(model, tokenizer, tasks, *, steps, lr, batch_size, rng, bar, label,
           teacher=None, replay_tasks: Sequence[str] = (), replay_rows: int = 0) -> float:
    """``steps`` AdamW steps on batches from ``tasks``; returns the mean loss of the last 10.

    With a ``teacher``, ``replay_rows`` of each batch's ``batch_size`` rows are problems of
    ``replay_tasks`` whose loss is :func:`distill_loss` towards the teacher (the rest keeps the
    cross-entropy on the true answers).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps))
    model.train()
    recent: list[float] = []
    job = bar.add_task(label, total=steps, loss=float("nan"))
    replay_rows = replay_rows if teacher is not None else 0
    for _ in range(steps):
        loss = model(**_sample_batch(tokenizer, tasks, batch_size - replay_rows, rng)).loss
        if replay_rows:
            batch = _sample_batch(tokenizer, replay_tasks, replay_rows, rng)
            labels = batch.pop("labels")
            with torch.no_grad():
                target = teacher(**batch).logits
            loss = loss + distill_loss(model(**batch).logits, target, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-10:]
        bar.update(job, advance=1, loss=sum(recent) / len(recent))
    model.eval()
    return sum(recent) / max(len(recent), 1)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def exact_match(model, tokenizer, items: Sequence[Mapping], batch_size: int = 64) -> list[bool]:
    """Whether the greedy continuation of each generation item (up to the newline) equals its
    answer, both stripped: the ``lm`` fitness's scorer,
    :func:`evomerge.models.causal_lm.greedy_generate`.
    """
    outputs = greedy_generate(model, tokenizer, [it["prompt"] for it in items],
                              max_new_tokens=MAX_NEW_TOKENS, stop=(STOP,), batch_size=batch_size)
    return [o.strip() == it["answer"].strip() for o, it in zip(outputs, items)]


def load_tinylm_model(path: str | os.PathLike):
    """``(model, tokenizer)`` from a zoo directory, local files only, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_hf():
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def exact_match_table(
    paths: Mapping[str, str | os.PathLike], *, split: str = "heldout",
    n: int | None = None, data_dir: str | os.PathLike = DATA_DIR,
) -> dict[str, dict[str, float]]:
    """``{model name: {task: exact-match accuracy}}`` on the shipped items of ``split`` (the
    first ``n`` per task, or all)."""
    items = {task: load_items(task, split, data_dir)[:n] for task in TASKS}
    table = {}
    for name, path in paths.items():
        model, tokenizer = load_tinylm_model(path)
        table[name] = {
            task: sum(exact_match(model, tokenizer, its)) / len(its) for task, its in items.items()
        }
    return table


# --------------------------------------------------------------------------------------------
# The zoo
# --------------------------------------------------------------------------------------------


def _model_names() -> list[str]:
    return ["base", *(expert_name(t) for t in TASKS)]


def _expected_manifest(seed: int, size: str) -> dict:
    return {
        "format": FORMAT_VERSION,
        "kind": KIND,
        "seed": seed,
        "size": size,
        "hyperparameters": asdict(TINYLM_SIZES[size]),
        "torch_threads": BUILD_THREADS,
        "kernels": dict(PORTABLE_ENV),
        "tasks": list(TASKS),
        "models": {name: name for name in _model_names()},
        "experts": {task: expert_name(task) for task in TASKS},
    }


def _save(model, tokenizer, path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    with quiet_hf():
        model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def tinylm_zoo_is_built(out_dir: str | os.PathLike, *, seed: int = 0, size: str = "small") -> bool:
    """Whether ``out_dir`` already holds a complete tiny-lm zoo built with this seed and size."""
    _check_size(size)
    return manifest_matches(
        Path(out_dir), _expected_manifest(seed, size), ("model.safetensors", "tokenizer.json")
    )


def build_tinylm_zoo(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    size: str = "small",
    force: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Train the tiny-lm zoo into ``out_dir`` (or reuse it); returns ``{model name: directory}``.

    Names: ``base`` and ``expert_<task>`` for each of :data:`TASKS`. A pure function of
    ``(seed, size)`` for given torch / transformers / tokenizers versions: training and the
    held-out table run in a child process on portable kernels
    (:data:`evomerge.zoo._common.PORTABLE_ENV`: ATen's default capability, MKL's compatible
    code path, :data:`BUILD_THREADS` thread), so neither the thread count, the hash seed nor the
    CPU's instruction set or vendor selects other arithmetic (native kernels gave an Intel Xeon
    and an AMD EPYC different zoos: ``expert_add`` 0.393 against 0.220 on ``add``). Checked
    bit for bit across ATen instruction sets, MKL settings, threads and hash seeds on one CPU;
    ``tests/test_reproducible.py`` pins the tiny zoo's digests so a run elsewhere checks the
    cross-machine half (x86-64 with MKL; other architectures use other kernels). If
    ``out_dir/zoo.json`` records the same seed, size, hyper-parameters and kernels and every model
    directory is complete, nothing is retrained (unless ``force``). The manifest, with the
    held-out exact-match table, is written last and atomically, so an interrupted build is
    redone, never reused. The caller's torch RNG state and thread count are left untouched.
    Progress: a rich bar on a terminal, plain periodic lines when stderr is a file or a pipe.
    """
    _check_size(size)
    out = Path(out_dir)
    expected = _expected_manifest(seed, size)
    paths = {name: out / d for name, d in expected["models"].items()}
    if not force and tinylm_zoo_is_built(out, seed=seed, size=size):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the directory is incomplete until we finish
    if portable_kernels_active():
        _build(str(out), seed, size, progress)
    else:
        run_portable(__name__, "_build",
                     {"out": str(out), "seed": seed, "size": size, "progress": progress})
    if not tinylm_zoo_is_built(out, seed=seed, size=size):
        raise RuntimeError(f"{out}: the tiny-lm build ended without a complete zoo")
    return paths


def _build(out: str, seed: int, size: str, progress: bool) -> None:
    """Train every model and write the manifest (the body of :func:`build_tinylm_zoo`, run on
    portable kernels)."""
    if not portable_kernels_active():
        raise RuntimeError("the tiny-lm zoo trains on portable kernels only: call "
                           "build_tinylm_zoo, which starts a process with PORTABLE_ENV")
    root = Path(out)
    expected = _expected_manifest(seed, size)
    paths = {name: root / d for name, d in expected["models"].items()}
    hp = TINYLM_SIZES[size]
    tokenizer = make_tokenizer()
    started = time.perf_counter()
    train_loss: dict[str, float] = {}
    with (
        torch.random.fork_rng(devices=[]),
        torch_threads(BUILD_THREADS),
        progress_bar(progress) as bar,
    ):
        torch.manual_seed(seed)
        model = _new_model(hp, tokenizer)
        train_loss["base"] = _train(
            model, tokenizer, TASKS, steps=hp.base_steps, lr=hp.base_lr,
            batch_size=hp.batch_size, rng=random.Random(f"{seed}|base"),
            bar=bar, label="base (all tasks)",
        )
        _save(model, tokenizer, paths["base"])
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        teacher = copy.deepcopy(model).eval()  # the frozen base the replay rows distil from
        for task in TASKS:
            name = expert_name(task)
            model.load_state_dict(base_state)
            # Each expert has its own data stream, independent of the other experts.
            train_loss[name] = _train(
                model, tokenizer, (task,), steps=hp.expert_steps, lr=hp.expert_lr,
                batch_size=hp.batch_size, rng=random.Random(f"{seed}|{name}"),
                bar=bar, label=name, teacher=teacher,
                replay_tasks=tuple(t for t in TASKS if t != task),
                replay_rows=round(hp.batch_size * hp.replay),
            )
            _save(model, tokenizer, paths[name])
        train_seconds = time.perf_counter() - started
        table = exact_match_table(paths, split="heldout", n=hp.table_items)

    manifest = {
        **expected,
        "train_loss": train_loss,
        "heldout_exact_match": table,
        "train_seconds": round(train_seconds, 2),
        "build_seconds": round(time.perf_counter() - started, 2),
        "built_on": kernel_facts(),
        "torch": torch.__version__,
    }
    write_json_atomic(root / MANIFEST, manifest)
