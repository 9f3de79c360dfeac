"""Search with your own fitness function: no registration, no YAML edits.

    evomerge zoo build digits && python examples/custom_fitness.py

The function scores a candidate model (accuracy on the digits search images); evomerge builds
each candidate in place and calls it. Its objective (`acc`, maximized) is the one the
experiment file names.
"""

import numpy as np
import torch

import evomerge
import evomerge.zoo.digits_hf  # registers the digits MLP with transformers
from evomerge.models.digits import digits_splits

pixels, labels = (torch.from_numpy(np.array(a)) for a in digits_splits()["search"])


def accuracy(model: torch.nn.Module) -> evomerge.EvalResult:
    """Search accuracy, with each image's 0/1 score as the per-item scores."""
    with torch.inference_mode():
        correct = (model(pixels).argmax(dim=1) == labels).float().numpy()
    return evomerge.EvalResult({"acc": float(correct.mean())}, {"digits": correct})


if __name__ == "__main__":
    summary = evomerge.run("experiments/digits_cmaes.yaml", fitness=accuracy, budget=32,
                           run_dir="runs/custom_fitness")
    print(f"best acc {summary.best.objectives['acc']:.3f} (trial {summary.best.trial}), "
          f"recipe in {summary.best_recipe}")
