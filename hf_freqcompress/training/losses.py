"""The training loss: task loss, distillation from the dense teacher, compression penalties.

Every term is reported separately (``terms``), so metrics show what the
compression penalties and the teacher contribute. Method-specific terms come
from the methods themselves (``CompressedWeight.regularization``, summed by
:func:`hf_freqcompress.regularization`) and model-level penalties from the
``hf_freqcompress.regularizers`` registry; the loss never names a method.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..api import regularization

__all__ = ["distillation_loss", "NamedPenalty", "TrainingLoss"]


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch (Hinton et al., 2015).

    The T^2 factor keeps the gradient scale independent of T, so ``alpha``
    means the same thing at any temperature.
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


@dataclass
class NamedPenalty:
    """A model-level penalty ``fn(model) -> scalar`` from a recipe, with its coefficient."""

    name: str
    weight: float
    fn: Callable[[nn.Module], torch.Tensor | None]


@dataclass
class TrainingLoss:
    """loss = (1 - alpha) CE + alpha KD + compression_weight * sum(method terms) + sum(w * penalty).

    CE smooths its targets by ``label_smoothing`` (the KD term is already soft).

    ``teacher`` is the dense model before ``compress()``; it runs under
    ``no_grad`` with frozen parameters, so it never receives gradients and
    never enters the optimizer. ``alpha`` is 0 without a teacher.
    """

    teacher: nn.Module | None = None
    alpha: float = 0.0
    temperature: float = 1.0
    compression_weight: float = 1.0
    label_smoothing: float = 0.0
    penalties: list[NamedPenalty] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.teacher is not None:
            self.teacher.eval().requires_grad_(False)

    def __call__(
        self,
        model: nn.Module,
        bare_model: nn.Module,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        autocast: Callable[[], object] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, detached terms) for one batch.

        ``model`` is what runs the forward (possibly DDP-wrapped);
        ``bare_model`` is the same module unwrapped, where penalties read the
        stored tensors. ``autocast`` is the context the teacher runs under
        (accelerate's mixed precision).
        """
        logits = model(inputs)
        task = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        terms = {"loss_task": task.detach()}
        loss = task
        if self.teacher is not None and self.alpha > 0:
            with torch.no_grad(), (autocast() if autocast else nullcontext()):
                teacher_logits = self.teacher(inputs)
            kd = distillation_loss(logits, teacher_logits, self.temperature)
            loss = (1.0 - self.alpha) * task + self.alpha * kd
            terms["loss_distill"] = kd.detach()
        method_term = regularization(bare_model)
        if method_term is not None and self.compression_weight:
            loss = loss + self.compression_weight * method_term
            terms["loss_compression"] = method_term.detach()
        for penalty in self.penalties:
            value = penalty.fn(bare_model)
            if value is not None and penalty.weight:
                loss = loss + penalty.weight * value
                terms[f"loss_{penalty.name}"] = value.detach()
        terms["loss"] = loss.detach()
        return loss, terms

