"""The toy zoo: a tiny Llama base and three real experts, trained here, offline, in seconds.

Layout written by :func:`build_toy_zoo` (each model directory is a normal Hugging Face checkpoint,
safetensors weights plus the tokenizer, loadable with ``AutoModelForCausalLM`` /
``AutoTokenizer``)::

    out_dir/
      zoo.json          manifest: seed, size, hyper-parameters, model directories (written last)
      base/             briefly trained on a mix of the three tasks
      expert_copy/      base + a few dozen Adam steps on ``copy``
      expert_reverse/   base + a few dozen Adam steps on ``reverse``
      expert_sort/      base + a few dozen Adam steps on ``sort``

The tasks are generated sequence-to-sequence problems over 36 symbols (``0-9a-z``), written as one
whitespace-separated line: ``<s> reverse a 7 c = c 7 a </s>``. The loss of a model on a task is the
mean next-token cross-entropy over the answer (everything after ``=``, including ``</s>``).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from evomerge.zoo._common import (
    MANIFEST,
    manifest_matches,
    progress_bar,
    quiet_hf,
    torch_threads,
    write_json_atomic,
)

__all__ = [
    "TASKS",
    "TOY_SIZES",
    "ToySize",
    "build_toy_zoo",
    "load_toy_model",
    "loss_table",
    "make_tokenizer",
    "task_example",
    "task_loss",
    "toy_zoo_is_built",
]

FORMAT_VERSION = 1

TASKS: tuple[str, ...] = ("copy", "reverse", "sort")
SYMBOLS: tuple[str, ...] = tuple("0123456789abcdefghijklmnopqrstuvwxyz")
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SEP = "="
VOCAB: tuple[str, ...] = (PAD, BOS, EOS, UNK, *TASKS, SEP, *SYMBOLS)

# Lengths of the symbol strings, shared by training and task_loss so that evaluation never asks a
# model about positions it was not trained on.
MIN_LEN, MAX_LEN = 2, 8

#: torch intra-op threads used while training. Pinned: with these tiny matrices more threads buy
#: nothing (and cost 2-3x when the cores are shared), and float reductions split differently
#: across threads, so the trained weights would otherwise depend on the machine's core count.
BUILD_THREADS = 1

#: Default seed of the evaluation sample in :func:`task_loss` (training draws from ``seed``).
EVAL_SEED = 1_000_003

Size = Literal["small", "tiny"]


@dataclass(frozen=True)
class ToySize:
    """Architecture and training budget of one zoo size."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    batch_size: int
    base_steps: int
    base_lr: float
    expert_steps: int
    expert_lr: float


TOY_SIZES: dict[str, ToySize] = {
    # 268k parameters; 30-60 s on 2 CPU cores (one torch thread), depending on load.
    "small": ToySize(
        hidden_size=64, num_layers=4, num_heads=4, intermediate_size=256,
        batch_size=64, base_steps=400, base_lr=3e-3, expert_steps=48, expert_lr=1e-3,
    ),
    # 23k parameters; a few seconds. For tests.
    "tiny": ToySize(
        hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
        batch_size=32, base_steps=60, base_lr=3e-3, expert_steps=24, expert_lr=3e-3,
    ),
}


def expert_name(task: str) -> str:
    """Directory / manifest name of the expert fine-tuned on ``task``."""
    return f"expert_{task}"


# --------------------------------------------------------------------------------------------
# Tokenizer and data
# --------------------------------------------------------------------------------------------


def make_tokenizer():
    """A word-level tokenizer over the fixed toy vocabulary, as a ``PreTrainedTokenizerFast``.

    Encoding prepends ``<s>``; ``</s>`` ends every training sequence (added by the data code).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
        model_max_length=2 * MAX_LEN + 4,
    )


def _answer(task: str, symbols: list[str]) -> list[str]:
    if task == "copy":
        return list(symbols)
    if task == "reverse":
        return symbols[::-1]
    if task == "sort":
        return sorted(symbols)  # 0-9 before a-z, i.e. vocabulary order
    raise ValueError(f"unknown toy task {task!r}; expected one of {', '.join(TASKS)}")


def task_example(task: str, symbols: str | list[str]) -> tuple[str, str]:
    """``(prompt, answer)`` text of one example, e.g. ``("sort b a", "a b")``.

    The model sees ``<s> {prompt} = {answer} </s>``.
    """
    syms = list(symbols)
    return f"{task} {' '.join(syms)}", " ".join(_answer(task, syms))


def _sample_batch(
    tokenizer, tasks: tuple[str, ...], n: int, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """``n`` examples (tasks drawn uniformly) as right-padded ids with answer-only labels."""
    sep_id = tokenizer.convert_tokens_to_ids(SEP)
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id
    task_idx = torch.randint(len(tasks), (n,), generator=gen).tolist()
    lengths = torch.randint(MIN_LEN, MAX_LEN + 1, (n,), generator=gen).tolist()
    texts = []
    for t, length in zip(task_idx, lengths):
        picks = torch.randint(len(SYMBOLS), (length,), generator=gen).tolist()
        prompt, answer = task_example(tasks[t], [SYMBOLS[i] for i in picks])
        texts.append(f"{prompt} {SEP} {answer}")
    rows = [ids + [eos_id] for ids in tokenizer(texts)["input_ids"]]
    width = max(len(r) for r in rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        start = row.index(sep_id) + 1  # the answer, and </s>, are the supervised tokens
        labels[i, start : len(row)] = input_ids[i, start : len(row)]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def task_loss(model, tokenizer, task: str, n: int = 64, seed: int = EVAL_SEED) -> float:
    """Mean cross-entropy (nats per answer token) of ``model`` on ``n`` fresh ``task`` examples.

    The sample depends only on ``(task, n, seed)``, so every model is scored on the same items.
    Lower is better; ``log(len(VOCAB)) ~ 3.78`` is chance.
    """
    if task not in TASKS:
        raise ValueError(f"unknown toy task {task!r}; expected one of {', '.join(TASKS)}")
    gen = torch.Generator().manual_seed(seed)
    batch = _sample_batch(tokenizer, (task,), n, gen)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return float(model(**batch).loss)
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _new_model(size: ToySize, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(VOCAB),
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


def _train(model, tokenizer, tasks, *, steps, lr, batch_size, gen, progress, label) -> float:
    """``steps`` Adam steps on batches from ``tasks``; returns the mean loss of the last 10."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    recent: list[float] = []
    job = progress.add_task(label, total=steps, loss=float("nan"))
    for _ in range(steps):
        batch = _sample_batch(tokenizer, tasks, batch_size, gen)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recent = (recent + [loss.item()])[-10:]
        progress.update(job, advance=1, loss=sum(recent) / len(recent))
    model.eval()
    return sum(recent) / max(len(recent), 1)


# --------------------------------------------------------------------------------------------
# The zoo
# --------------------------------------------------------------------------------------------


def _model_names() -> list[str]:
    return ["base", *(expert_name(t) for t in TASKS)]


def _expected_manifest(seed: int, size: str) -> dict:
    return {
        "format": FORMAT_VERSION,
        "kind": "toy",
        "seed": seed,
        "size": size,
        "hyperparameters": asdict(TOY_SIZES[size]),
        "torch_threads": BUILD_THREADS,
        "tasks": list(TASKS),
        "models": {name: name for name in _model_names()},
        "experts": {task: expert_name(task) for task in TASKS},
    }


def _cached(out_dir: Path, expected: dict) -> bool:
    return manifest_matches(out_dir, expected, ("model.safetensors", "tokenizer.json"))


def _save(model, tokenizer, path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    with quiet_hf():
        model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def toy_zoo_is_built(out_dir: str | os.PathLike, *, seed: int = 0, size: Size = "small") -> bool:
    """Whether ``out_dir`` already holds a complete toy zoo built with this seed and size."""
    if size not in TOY_SIZES:
        raise ValueError(f"unknown toy zoo size {size!r}; expected one of {', '.join(TOY_SIZES)}")
    return _cached(Path(out_dir), _expected_manifest(seed, size))


def build_toy_zoo(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    size: Size = "small",
    force: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Train the toy zoo into ``out_dir`` (or reuse it) and return ``{model name: directory}``.

    Names: ``base``, ``expert_copy``, ``expert_reverse``, ``expert_sort``. The build is a pure
    function of ``(seed, size)`` for a given torch build (training runs on ``BUILD_THREADS``
    threads whatever the machine): the same arguments give bit-identical tensors. If
    ``out_dir/zoo.json`` records the same seed, size and hyper-parameters and every model
    directory is complete, nothing is retrained (unless ``force``). The manifest is written last,
    so an interrupted build is redone, not reused. The caller's global torch RNG state and thread
    count are left untouched.
    """
    if size not in TOY_SIZES:
        raise ValueError(f"unknown toy zoo size {size!r}; expected one of {', '.join(TOY_SIZES)}")
    out = Path(out_dir)
    expected = _expected_manifest(seed, size)
    paths = {name: out / d for name, d in expected["models"].items()}
    if not force and _cached(out, expected):
        return paths

    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the directory is incomplete until we finish
    hp = TOY_SIZES[size]
    tokenizer = make_tokenizer()
    started = time.perf_counter()
    train_loss: dict[str, float] = {}
    with (
        torch.random.fork_rng(devices=[]),
        torch_threads(BUILD_THREADS),
        progress_bar(progress) as bar,
    ):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        base = _new_model(hp, tokenizer)
        train_loss["base"] = _train(
            base, tokenizer, TASKS, steps=hp.base_steps, lr=hp.base_lr,
            batch_size=hp.batch_size, gen=gen, progress=bar, label="base (all tasks)",
        )
        _save(base, tokenizer, paths["base"])
        base_state = {k: v.clone() for k, v in base.state_dict().items()}
        for i, task in enumerate(TASKS):
            name = expert_name(task)
            base.load_state_dict(base_state)
            # Each expert gets its own stream, so its data does not depend on the other experts.
            expert_gen = torch.Generator().manual_seed(seed * 1_000 + 101 + i)
            train_loss[name] = _train(
                base, tokenizer, (task,), steps=hp.expert_steps, lr=hp.expert_lr,
                batch_size=hp.batch_size, gen=expert_gen, progress=bar, label=name,
            )
            _save(base, tokenizer, paths[name])

    manifest = {
        **expected,
        "train_loss": train_loss,
        "build_seconds": round(time.perf_counter() - started, 2),
        "torch": torch.__version__,
    }
    write_json_atomic(out / MANIFEST, manifest)
    return paths


def load_toy_model(path: str | os.PathLike):
    """``(model, tokenizer)`` from a zoo directory, local files only, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_hf():
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def loss_table(
    paths: dict[str, Path], *, n: int = 256, seed: int = EVAL_SEED
) -> dict[str, dict[str, float]]:
    """``{model name: {task: task_loss}}`` for every model directory in ``paths``."""
    table = {}
    for name, path in paths.items():
        model, tokenizer = load_toy_model(path)
        table[name] = {task: task_loss(model, tokenizer, task, n=n, seed=seed) for task in TASKS}
    return table
