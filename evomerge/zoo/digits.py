"""The digits zoo: a small MLP base and two class-subset experts, trained here, offline, in seconds.

Data: scikit-learn's bundled ``load_digits`` (1,797 8x8 images, no download). Pixels are scaled
to ``[0, 1]`` (divided by 16) and flattened to 64 float32 features; labels are int64 ``0-9``.
:func:`digits_splits` cuts them, stratified by class with a fixed seed (:data:`SPLIT_SEED`), into

* ``train`` (60 %, 1,078 images): the only data the zoo is trained on;
* ``search`` (20 %, 359 images): what a merge search scores candidates on;
* ``heldout`` (20 %, 360 images): final scores, never seen by training or search.

The split does not depend on the zoo's seed, so every zoo (and every fitness) agrees on which
images are held out.

Layout written by :func:`build_digits_zoo` (each model directory holds ``config.json`` plus
``model.safetensors`` and loads with :meth:`DigitsMLP.from_pretrained` or the merge engine)::

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

import functools
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evomerge.merge.io import CheckpointError, export_model, load_state_dict, weight_files
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
    "DigitsMLP",
    "EXPERTS",
    "SPLITS",
    "SPLIT_SEED",
    "accuracy_table",
    "build_digits_zoo",
    "digits_config",
    "digits_splits",
    "digits_zoo_is_built",
]

FORMAT_VERSION = 1
ARCHITECTURE = "DigitsMLP"
MODEL_TYPE = "evomerge-digits-mlp"
NUM_FEATURES = 64
NUM_CLASSES = 10

#: Seed of the stratified train / search / heldout split (independent of the zoo's seed).
SPLIT_SEED = 0
#: Fractions of the 1,797 images in each split.
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.6, "search": 0.2, "heldout": 0.2}
SPLITS: tuple[str, ...] = tuple(SPLIT_FRACTIONS)

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


#: 26,122 parameters. The base sees ~1.8 epochs of all ten classes (~0.75-0.85 held-out
#: accuracy); each expert then takes 200 steps on its five classes (~0.98 there, ~0 elsewhere).
DIGITS_HP = DigitsHyper(
    layer_sizes=(NUM_FEATURES, 128, 128, NUM_CLASSES),
    batch_size=64,
    base_steps=30,
    base_lr=1e-3,
    expert_steps=200,
    expert_lr=1e-3,
)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def digits_config(layer_sizes: Sequence[int] = DIGITS_HP.layer_sizes) -> dict[str, Any]:
    """The ``config.json`` of a :class:`DigitsMLP` with these layer sizes."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "layer_sizes": [int(s) for s in layer_sizes],
    }


def _check_layer_sizes(sizes: Any, where: str) -> tuple[int, ...]:
    if (
        not isinstance(sizes, (list, tuple))
        or len(sizes) < 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes)
    ):
        raise ValueError(
            f"{where}: layer_sizes must be a list of at least two positive ints "
            f"(inputs, hidden..., classes), got {sizes!r}"
        )
    return tuple(sizes)


class DigitsMLP(nn.Module):
    """``layer_sizes[0] -> ... -> layer_sizes[-1]`` fully connected, ReLU between layers.

    Tensor names are ``layers.{i}.weight`` / ``layers.{i}.bias``, so the merge engine puts each
    Linear in its own layer group ``layers.{i}``. ``forward`` returns logits.

    ``init=True`` initialises the weights as ``nn.Linear`` does (from torch's global RNG);
    ``init=False`` zero-fills them without touching any RNG, for models whose weights are about
    to be overwritten (loading, merge targets).
    """

    def __init__(self, layer_sizes: Sequence[int] = DIGITS_HP.layer_sizes, *,
                 init: bool = True) -> None:
        super().__init__()
        sizes = _check_layer_sizes(list(layer_sizes), "DigitsMLP")
        self.layer_sizes = sizes
        device = None if init else "meta"  # meta: no RNG draws, no memory
        self.layers = nn.ModuleList(
            nn.Linear(a, b, device=device) for a, b in zip(sizes[:-1], sizes[1:])
        )
        if not init:
            self.to_empty(device="cpu")
            with torch.no_grad():
                for p in self.parameters():
                    p.zero_()

    @property
    def config(self) -> dict[str, Any]:
        return digits_config(self.layer_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = torch.relu(x)
        return x

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, init: bool = True) -> "DigitsMLP":
        """A new model from a config dict (see :func:`digits_config`); ``init`` as in the
        constructor."""
        if not isinstance(config, Mapping):
            raise ValueError(f"config: expected a mapping, got {type(config).__name__}")
        archs = config.get("architectures")
        if config.get("model_type") != MODEL_TYPE and not (
            isinstance(archs, list) and ARCHITECTURE in archs
        ):
            raise ValueError(
                f"config: model_type {config.get('model_type')!r} / architectures {archs!r} is "
                f"not a digits MLP (expected model_type {MODEL_TYPE!r})"
            )
        return cls(_check_layer_sizes(config.get("layer_sizes"), "config"), init=init)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, device: str | torch.device = "cpu"
    ) -> "DigitsMLP":
        """Load a model directory (``config.json`` + safetensors), in eval mode.

        Only safetensors weights are accepted; a pickle checkpoint raises CheckpointError.
        """
        root = Path(path)
        cfg_file = root / "config.json"
        try:
            config = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{cfg_file}: cannot read the model config ({exc})") from exc
        files = weight_files(root)
        unsafe = [f.name for f in files if f.suffix != ".safetensors"]
        if unsafe:
            raise CheckpointError(
                f"{root}: {', '.join(unsafe)} is not safetensors; digits models load from "
                "safetensors only"
            )
        model = cls.from_config(config, init=False)
        model.load_state_dict(load_state_dict(root), strict=True)
        return model.to(device).eval()

    def save_pretrained(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``config.json`` + ``model.safetensors`` to ``path``, atomically (via
        :func:`evomerge.merge.io.export_model`)."""
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        with tempfile.TemporaryDirectory(prefix="evomerge-digits-config-") as cfg_dir:
            (Path(cfg_dir) / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
            return export_model(state, path, base_dir=cfg_dir, overwrite=overwrite)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _splits(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    index = np.arange(len(y))
    rest_fraction = SPLIT_FRACTIONS["search"] + SPLIT_FRACTIONS["heldout"]
    train, rest = train_test_split(index, test_size=rest_fraction, stratify=y, random_state=seed)
    search, heldout = train_test_split(
        rest,
        test_size=SPLIT_FRACTIONS["heldout"] / rest_fraction,
        stratify=y[rest],
        random_state=seed,
    )
    out = {}
    for name, idx in (("train", train), ("search", search), ("heldout", heldout)):
        xs, ys = x[idx], y[idx]
        xs.setflags(write=False)
        ys.setflags(write=False)
        out[name] = (xs, ys)
    return out


def digits_splits(seed: int = SPLIT_SEED) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train" | "search" | "heldout": (X, y)}``: X float32 ``(n, 64)`` in ``[0, 1]``, y int64.

    Stratified 60 / 20 / 20 split of ``load_digits`` with ``seed`` (default :data:`SPLIT_SEED`,
    the split the zoo is trained on and the digits fitness scores on); 1,078 / 359 / 360 images.
    Deterministic; the arrays are read-only and shared between calls.
    """
    return dict(_splits(int(seed)))


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

