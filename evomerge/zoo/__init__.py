"""Offline model zoos: small real experts, trained here, for experiments and tests.

``build_toy_zoo`` trains a tiny Llama base and three task experts (copy / reverse / sort).
``build_digits_zoo`` trains a small MLP base on scikit-learn's digits and two experts on the
class halves 0-4 and 5-9 (the model and its data: :mod:`evomerge.models.digits`; ``import
evomerge.zoo.digits_hf`` registers its model type with transformers' ``AutoConfig`` /
``AutoModel``, so exported digits models load with ``AutoModel``).
``build_tinylm_zoo`` trains a small Llama base (BPE tokenizer) and four experts on generated text
tasks (add / reverse / sort / translate), the zoo language-model experiments merge.
"""

from evomerge.zoo.digits import accuracy_table, build_digits_zoo, digits_zoo_is_built
from evomerge.zoo.tinylm import (
    TINYLM_SIZES,
    build_tinylm_zoo,
    exact_match_table,
    tinylm_zoo_is_built,
    write_task_data,
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
    "TASKS",
    "TINYLM_SIZES",
    "TOY_SIZES",
    "accuracy_table",
    "build_digits_zoo",
    "build_tinylm_zoo",
    "build_toy_zoo",
    "digits_zoo_is_built",
    "exact_match_table",
    "load_toy_model",
    "loss_table",
    "task_loss",
    "tinylm_zoo_is_built",
    "toy_zoo_is_built",
    "write_task_data",
]
