"""The digits MLP and its data: what the digits zoo trains and the digits fitness scores.

Data: scikit-learn's bundled ``load_digits`` (1,797 8x8 images, no download). Pixels are scaled
to ``[0, 1]`` (divided by 16) and flattened to 64 float32 features; labels are int64 ``0-9``.
:func:`digits_splits` cuts them, stratified by class with a fixed seed (:data:`SPLIT_SEED`), into

* ``train`` (60 %, 1,078 images): the only data the zoo is trained on;
* ``search`` (20 %, 359 images): what a merge search scores candidates on;
* ``heldout`` (20 %, 360 images): final scores, never seen by training or search.

The split does not depend on the zoo's seed, so every zoo (and every fitness) agrees on which
images are held out. A model directory holds ``config.json`` plus ``model.safetensors`` and loads
with :meth:`DigitsMLP.from_pretrained` or the merge engine.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evomerge.merge.checkpoints import CheckpointError, load_state_dict, weight_files
from evomerge.merge.export import export_model

__all__ = [
    "ARCHITECTURE",
    "LAYER_SIZES",
    "MODEL_TYPE",
    "NUM_CLASSES",
    "NUM_FEATURES",
    "SPLITS",
    "SPLIT_SEED",
    "DigitsMLP",
    "digits_config",
    "digits_splits",
]

ARCHITECTURE = "DigitsMLP"
MODEL_TYPE = "evomerge-digits-mlp"
NUM_FEATURES = 64
NUM_CLASSES = 10

#: Seed of the stratified train / search / heldout split (independent of the zoo's seed).
SPLIT_SEED = 0
#: Fractions of the 1,797 images in each split.
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.6, "search": 0.2, "heldout": 0.2}
SPLITS: tuple[str, ...] = tuple(SPLIT_FRACTIONS)

#: The zoo's architecture: 26,122 parameters.
LAYER_SIZES: tuple[int, ...] = (NUM_FEATURES, 128, 128, NUM_CLASSES)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def digits_config(layer_sizes: Sequence[int] = LAYER_SIZES) -> dict[str, Any]:
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

    def __init__(self, layer_sizes: Sequence[int] = LAYER_SIZES, *,
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
        :func:`evomerge.merge.export.export_model`)."""
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
