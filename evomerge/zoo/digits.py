"""The digits zoo: a small MLP base and two class-subset experts, trained here, offline, in seconds.

The model and its data (scikit-learn's ``load_digits``, split 60 / 20 / 20 into ``train``,
``search`` and ``heldout``: the zoo trains on ``train`` only) are :mod:`evomerge.models.digits`,
shared with the digits fitness.

Layout written by :func:`build_digits_zoo` (each model directory holds ``config.json`` plus
``model.safetensors`` and loads with
:meth:`~evomerge.models.digits.DigitsMLP.from_pretrained` or the merge engine)::

    out_dir/
      zoo.json       manifest: seed, hyper-parameters, split, models, accuracies (written last)
      base/          briefly trained on all ten classes: a shared, moderately good start
      expert_0_4/    base fine-tuned on classes 0-4 only (forgets 5-9)
      expert_5_9/    base fine-tuned on classes 5-9 only (forgets 0-4)

The experts are trained long enough on their half of the classes that they forget the other
half (their accuracy there falls to about 0), while the base is only moderately good on all ten.
Task arithmetic over the two experts (``base + w * (tau_0_4 + tau_5_9)``, ``w`` about 0.3-0.5)
recovers both halves and beats every source on all-digit accuracy; that gap is what a merge
search has to find.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from evomerge.models.digits import (LAYER_SIZES, NUM_CLASSES, SPLIT_FRACTIONS, SPLIT_SEED, SPLITS,
                                    DigitsMLP, digits_splits)
from evomerge.zoo._common import (
    MANIFEST,
    manifest_matches,
    progress_bar,
    torch_threads,
    write_json_atomic,
)

__all__ = [
    "CLASS_SUBSETS",
    "DIGITS_HP",
    "DigitsHyper",
    "EXPERTS",
    "accuracy_table",
    "build_digits_zoo",
    "digits_zoo_is_built",
]

FORMAT_VERSION = 1

#: The experts and the classes each is fine-tuned on.
EXPERTS: dict[str, tuple[int, ...]] = {
    "expert_0_4": (0, 1, 2, 3, 4),
    "expert_5_9": (5, 6, 7, 8, 9),
}
#: Class subsets of the accuracy table (``all`` and the experts' halves).
CLASS_SUBSETS: dict[str, tuple[int, ...]] = {
    "all": tuple(range(NUM_CLASSES)),
    "0-4": EXPERTS["expert_0_4"],
    "5-9": EXPERTS["expert_5_9"],
}

#: torch intra-op threads used while training: pinned so the weights do not depend on the
#: machine's core count (float reductions split differently across threads), as in the toy zoo.
BUILD_THREADS = 1


@dataclass(frozen=True)
class DigitsHyper:
    """Architecture and training budget of the digits zoo (Adam, minibatches drawn with
    replacement from the training split)."""

    layer_sizes: tuple[int, ...]
    batch_size: int
    base_steps: int
    base_lr: float
    expert_steps: int
    expert_lr: float


#: 26,122 parameters (:data:`~evomerge.models.digits.LAYER_SIZES`). The base sees ~1.8 epochs of
#: all ten classes (~0.75-0.85 held-out accuracy); each expert then takes 200 steps on its five classes (~0.98 there, ~0 elsewhere).
DIGITS_HP = DigitsHyper(
    layer_sizes=LAYER_SIZES,
    batch_size=64,
    base_steps=30,
    base_lr=1e-3,
    expert_steps=200,
    expert_lr=1e-3,
)


def _accuracies(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    with torch.inference_mode():
        correct = (model(x).argmax(dim=1) == y).float()
    table = {}
    for name, classes in CLASS_SUBSETS.items():
        mask = torch.isin(y, torch.tensor(classes))
        table[name] = float(correct[mask].mean())
    return table


def accuracy_table(
    paths: Mapping[str, str | os.PathLike], *, split: str = "heldout"
) -> dict[str, dict[str, float]]:
    """``{model name: {"all" | "0-4" | "5-9": accuracy}}`` on one split, for model directories."""
    if split not in SPLITS:
        raise ValueError(f"split: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    xs, ys = digits_splits()[split]
    x, y = torch.from_numpy(np.array(xs)), torch.from_numpy(np.array(ys))
    return {name: _accuracies(DigitsMLP.from_pretrained(p), x, y) for name, p in paths.items()}


# --------------------------------------------------------------------------------------------
# Training and the zoo
# --------------------------------------------------------------------------------------------


def _train(model, x, y, *, steps, lr, batch_size, gen, progress, label) -> float:
    """``steps`` Adam steps on minibatches of ``(x, y)``; returns the mean loss of the last 10."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    recent: list[float] = []
    job = progress.add_task(label, total=steps, loss=float("nan"))
    for _ in range(steps):
        pick = torch.randint(len(y), (batch_size,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[pick]), y[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recent = (recent + [loss.item()])[-10:]
        progress.update(job, advance=1, loss=sum(recent) / len(recent))
    model.eval()
    return sum(recent) / max(len(recent), 1)


def _model_names() -> list[str]:
    return ["base", *EXPERTS]


def _expected_manifest(seed: int) -> dict:
    sizes = {name: len(digits_splits()[name][1]) for name in SPLITS}
    hp = asdict(DIGITS_HP)
    hp["layer_sizes"] = list(hp["layer_sizes"])
    return {
        "format": FORMAT_VERSION,
        "kind": "digits",
        "seed": seed,
        "hyperparameters": hp,
        "split": {"seed": SPLIT_SEED, "fractions": SPLIT_FRACTIONS, "sizes": sizes},
        "torch_threads": BUILD_THREADS,
        "models": {name: name for name in _model_names()},
        "experts": {name: list(classes) for name, classes in EXPERTS.items()},
    }


def _cached(out_dir: Path, expected: dict) -> bool:
    return manifest_matches(out_dir, expected, ("model.safetensors", "config.json"))


def digits_zoo_is_built(out_dir: str | os.PathLike, *, seed: int = 0) -> bool:
    """Whether ``out_dir`` already holds a complete digits zoo built with this seed."""
    return _cached(Path(out_dir), _expected_manifest(seed))


def build_digits_zoo(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Train the digits zoo into ``out_dir`` (or reuse it) and return ``{model name: directory}``.

    Names: ``base``, ``expert_0_4``, ``expert_5_9``. The build is a pure function of ``seed`` for
    a given torch build (training runs on ``BUILD_THREADS`` threads whatever the machine): the
    same seed gives bit-identical tensors. If ``out_dir/zoo.json`` records the same seed,
    hyper-parameters and split and every model directory is complete, nothing is retrained
    (unless ``force``). The manifest is written last, so an interrupted build is redone, not
    reused. The caller's global torch RNG state and thread count are left untouched. About 2 s
    on one CPU core.
    """
    out = Path(out_dir)
    expected = _expected_manifest(seed)
    paths = {name: out / d for name, d in expected["models"].items()}
    if not force and _cached(out, expected):
        return paths

    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the directory is incomplete until we finish
    hp = DIGITS_HP
    x_np, y_np = digits_splits()["train"]
    x, y = torch.from_numpy(np.array(x_np)), torch.from_numpy(np.array(y_np))
    started = time.perf_counter()
    train_loss: dict[str, float] = {}
    with (
        torch.random.fork_rng(devices=[]),
        torch_threads(BUILD_THREADS),
        progress_bar(progress) as bar,
    ):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = DigitsMLP(hp.layer_sizes)
        train_loss["base"] = _train(
            model, x, y, steps=hp.base_steps, lr=hp.base_lr, batch_size=hp.batch_size,
            gen=gen, progress=bar, label="base (0-9)",
        )
        model.save_pretrained(paths["base"], overwrite=True)
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        for i, (name, classes) in enumerate(EXPERTS.items()):
            model.load_state_dict(base_state)
            mask = torch.isin(y, torch.tensor(classes))
            # Each expert gets its own stream, so its data does not depend on the other experts.
            expert_gen = torch.Generator().manual_seed(seed * 1_000 + 101 + i)
            train_loss[name] = _train(
                model, x[mask], y[mask], steps=hp.expert_steps, lr=hp.expert_lr,
                batch_size=hp.batch_size, gen=expert_gen, progress=bar, label=name,
            )
            model.save_pretrained(paths[name], overwrite=True)
    build_seconds = time.perf_counter() - started

    manifest = {
        **expected,
        "train_loss": train_loss,
        "heldout_accuracy": accuracy_table(paths, split="heldout"),
        "build_seconds": round(build_seconds, 2),
        "torch": torch.__version__,
    }
    write_json_atomic(out / MANIFEST, manifest)
    return paths

