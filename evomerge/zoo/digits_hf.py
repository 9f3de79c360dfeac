"""The digits MLP as a transformers model: importing this module registers it with the Auto classes.

Digits model directories (the zoo's, and every exported digits merge: ``best_model/``) hold a
``config.json`` with ``model_type: evomerge-digits-mlp`` and a ``model.safetensors``. transformers
does not know that model type, so ``AutoModel.from_pretrained(path)`` fails with "unrecognized
model" until this module is imported::

    import evomerge.zoo.digits_hf  # noqa: F401  (registers the model type)
    from transformers import AutoModel

    model = AutoModel.from_pretrained("runs/digits_cmaes/best_model")  # a DigitsMLPModel
    logits = model(pixels)   # pixels: float (n, 64) in [0, 1], as models.digits.digits_splits

Without transformers, :meth:`evomerge.models.digits.DigitsMLP.from_pretrained` loads the same
directory. The two give identical logits (same tensor names, same layers). This lives apart from
:mod:`evomerge.models.digits` so that the digits zoo and fitness do not import transformers (seconds
of start-up).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from evomerge.models.digits import ARCHITECTURE, LAYER_SIZES, MODEL_TYPE, DigitsMLP

__all__ = ["DigitsMLPConfig", "DigitsMLPModel"]


class DigitsMLPConfig(PretrainedConfig):
    """``config.json`` of a digits MLP: ``layer_sizes`` (inputs, hidden..., classes)."""

    model_type = MODEL_TYPE

    def __init__(self, layer_sizes: Sequence[int] = LAYER_SIZES, **kwargs) -> None:
        self.layer_sizes = [int(s) for s in layer_sizes]
        kwargs.setdefault("architectures", [ARCHITECTURE])
        super().__init__(**kwargs)


class DigitsMLPModel(PreTrainedModel):
    """:class:`~evomerge.models.digits.DigitsMLP` as a ``PreTrainedModel``: the same layers under
    the same names (``layers.{i}.weight`` / ``.bias``); ``forward(x)`` returns the logits."""

    config_class = DigitsMLPConfig
    base_model_prefix = "digits"
    main_input_name = "x"

    def __init__(self, config: DigitsMLPConfig) -> None:
        super().__init__(config)
        sizes = DigitsMLP(config.layer_sizes, init=False).layer_sizes  # validates the sizes
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(sizes))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            module.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DigitsMLP.forward(self, x)  # type: ignore[arg-type]


AutoConfig.register(MODEL_TYPE, DigitsMLPConfig, exist_ok=True)
AutoModel.register(DigitsMLPConfig, DigitsMLPModel, exist_ok=True)
