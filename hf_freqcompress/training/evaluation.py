"""Classification accuracy and loss over a whole evaluation set, in any number of processes."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader

from .loaders import unpack_batch

__all__ = ["evaluate"]


def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict[str, float]:
    """``eval_accuracy`` (%), ``eval_error_pct``, ``eval_loss`` and ``eval_examples`` over every example once.

    ``gather_for_metrics`` drops the samples accelerate repeats to even out
    the last batch across processes, so every process returns the same
    numbers for exactly the dataset. Weights are rebuilt once for the whole
    pass (``parametrize.cached``), not once per batch.
    """
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = 0
    with torch.no_grad(), parametrize.cached():
        for batch in loader:
            inputs, labels = unpack_batch(batch)
            logits = model(inputs)
            logits, labels = accelerator.gather_for_metrics((logits, labels))
            correct += (logits.argmax(dim=-1) == labels).sum()
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
            count += labels.numel()
    model.train(was_training)
    accuracy = 100.0 * float(correct) / max(count, 1)
    return {
        "eval_accuracy": accuracy,
        "eval_error_pct": 100.0 - accuracy,
        "eval_loss": float(loss_sum) / max(count, 1),
        "eval_examples": count,
    }
