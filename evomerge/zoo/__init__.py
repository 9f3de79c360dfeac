"""Offline model zoos: small real experts, trained here, for experiments and tests.

``build_toy_zoo`` trains a tiny Llama base and three task experts (copy / reverse / sort).
``build_digits_zoo`` trains a small MLP base on scikit-learn's digits and two experts on the
class halves 0-4 and 5-9.
"""

from evomerge.zoo.digits import (
    DigitsMLP,
    accuracy_table,
    build_digits_zoo,
    digits_splits,
    digits_zoo_is_built,
)
from evomerge.zoo.toy import (
    TASKS,
    TOY_SIZES,
    build_toy_zoo,
    load_toy_model,
    loss_table,
    task_loss,
    toy_zoo_is_built,
)

__all__ = [
    "DigitsMLP",
    "TASKS",
    "TOY_SIZES",
    "accuracy_table",
    "build_digits_zoo",
    "build_toy_zoo",
    "digits_splits",
    "digits_zoo_is_built",
    "load_toy_model",
    "loss_table",
    "task_loss",
    "toy_zoo_is_built",
]
