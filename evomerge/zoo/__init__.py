"""Offline model zoos: small real experts, trained here, for experiments and tests.

``build_toy_zoo`` trains a tiny Llama base and three task experts (copy / reverse / sort).
"""

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
    "TASKS",
    "TOY_SIZES",
    "build_toy_zoo",
    "load_toy_model",
    "loss_table",
    "task_loss",
    "toy_zoo_is_built",
]
