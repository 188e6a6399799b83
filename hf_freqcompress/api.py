"""The public entry points: ``compress`` a model in place, ``materialize`` it back."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .budget import Budget, BudgetTooSmallError, LayerDemand, parse_budget, plan_budget
from .dtypes import resolve_storage_dtype
from .methods import MethodConfig, compressed_weights, get_method, resolve_config
from .plan import build_parametrizations
from .report import CompressionReport, LayerReport
from .recompute import disable_weight_recompute
from .state import RECIPE_ATTRIBUTE, REPORT_ATTRIBUTE, SOURCE_ATTRIBUTE, add_reports, get_reports
from .surgery import MIN_LAYER_VALUES, Patterns, apply_parametrizations, select_targets

__all__ = ["compress", "materialize", "get_reports", "on_train_step", "finalize", "regularization"]

INITS = ("project", "preserve_norm")
"""What ``compress(init=...)`` accepts."""


def _plan(
    budget: Budget,
    demands: list[LayerDemand],
    bits_per_value: int,
    strategy: str | Callable[[Sequence[LayerDemand], int], list[int]],
) -> list[int]:
    dense = sum(d.dense_values for d in demands)
    total = budget.total_values(dense, bits_per_value)
    try:
        return plan_budget(demands, total, strategy)
    except BudgetTooSmallError as error:
        smallest = budget.describe_values(error.smallest, dense, bits_per_value)
        raise ValueError(
            f"budget {budget.text} allows {error.total} stored values for {len(demands)} layers "
            f"({dense:,} weights), but the smallest feasible budget is {smallest}; "
            "raise the budget or target fewer layers"
        ) from None


def compress(
    model: nn.Module,
    budget: str | float | int | Budget = "1/16",
    method: str | MethodConfig | dict[str, Any] = "hashednets",
    targets: Patterns = None,
    exclude: Patterns = None,
    seed: int = 0,
    storage_dtype: torch.dtype | str | None = None,
    strategy: str | Callable[[Sequence[LayerDemand], int], list[int]] = "proportional",
    min_layer_values: int = MIN_LAYER_VALUES,
    init: str = "project",
) -> CompressionReport:
    """Re-express the conv/linear weights of ``model`` with ``budget`` stored values, in place.

    The targeted weights become parametrizations whose stored tensors are the
    only trainable numbers left in those layers; the model keeps its class,
    forward and state_dict conventions. Everything is validated and built
    before the model is touched, so a failing call leaves it as it was.

    Args:
        budget: "1/64" or 0.05 (fraction of the targeted weights), an int
            (stored values), or "2MB" (bytes at ``storage_dtype``).
        method: a registered name (see ``available_methods()``), a config
            object such as ``HashedNetsConfig(...)``, or its dict form.
        targets / exclude: name patterns (exact, dotted suffix, glob or regex,
            like PEFT's ``target_modules``). By default every supported layer
            except the classifier head and layers under ``min_layer_values``
            weights; any explicit ``exclude`` (even ``[]``) drops those defaults.
        seed: keys every hash, so the same seed gives the same model anywhere.
        storage_dtype: dtype of stored values in a checkpoint (default: the
            weights' dtype); it sets ``stored_bytes`` and byte budgets.
        strategy: how the budget is split per layer ("proportional" or a callable).
        init: "project" (least-squares projection of the current weights: what
            a trained model needs to keep its accuracy) or "preserve_norm"
            (the projection rescaled so each rebuilt weight has the dense
            weight's norm: for a freshly initialised model trained from
            scratch, whose projected random weights would otherwise shrink by
            about sqrt(budget) per layer and stall training).
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; use one of {list(INITS)}")
    config = resolve_config(method)
    parametrization_class = get_method(config.method)
    parsed = parse_budget(budget)
    chosen = select_targets(model, targets, exclude, min_layer_values)
    dtype = resolve_storage_dtype(storage_dtype, chosen[0].weight.dtype)
    bits = torch.finfo(dtype).bits
    specs = [target.spec(bits) for target in chosen]
    demands = [
        LayerDemand(
            spec.name,
            spec.numel,
            parametrization_class.min_values(spec, config),
            parametrization_class.max_values(spec, config),
        )
        for spec in specs
    ]
    allocation = _plan(parsed, demands, bits, strategy)
    parametrizations = build_parametrizations(chosen, config, allocation, seed, bits)
    errors = apply_parametrizations(list(zip(chosen, parametrizations)), preserve_norm=init == "preserve_norm")
    rows = []
    for spec, target, parametrization, error in zip(specs, chosen, parametrizations, errors):
        original = target.module.parametrizations[target.param_name].original
        rows.append(
            LayerReport(
                name=spec.name,
                kind=spec.kind,
                method=config.method,
                shape=spec.shape,
                dense_values=spec.numel,
                stored_values=parametrization.stored_values(original),
                stored_bits=parametrization.stored_bits(original, dtype),
                cache_bytes=parametrization.cache_bytes(),
                training_values=parametrization.training_values(),
                rel_error=error,
            )
        )
    report = CompressionReport(config.method, parsed.text, int(seed), str(dtype).removeprefix("torch."), rows)
    add_reports(model, [report])
    return report


def materialize(model: nn.Module) -> nn.Module:
    """Bake the dense weights back in and remove every compression parametrization.

    The result is a plain timm/transformers model (original classes, plain
    Parameters, no attribute of this library) for ``torch.export``,
    ``save_pretrained`` or any other tool. Works in place and returns ``model``.
    """
    disable_weight_recompute(model)
    for _, module, param_name, _ in compressed_weights(model):
        if parametrize.is_parametrized(module, param_name):
            module.parametrizations[param_name].original.grad = None  # a stored-shape gradient on the dense weight
            parametrize.remove_parametrizations(module, param_name, leave_parametrized=True)
    for attribute in (REPORT_ATTRIBUTE, RECIPE_ATTRIBUTE, SOURCE_ATTRIBUTE):
        if hasattr(model, attribute):
            delattr(model, attribute)
    return model


def on_train_step(model: nn.Module, step: int) -> None:
    """Let every compressed layer advance its training schedule; call after each optimizer step."""
    for _, _, _, parametrization in compressed_weights(model):
        parametrization.on_train_step(step)


def finalize(model: nn.Module) -> None:
    """Close every training schedule so storage and optimizer view reach their final size.

    Storage a method shrinks (``finalize_storage``) is swapped into the same
    Parameter object in place, so the model's structure and parameter names
    stay; an optimizer built before still lists it, but its per-parameter
    state (momentum, Adam moments) no longer fits: build a new optimizer to
    keep training.
    """
    for _, module, param_name, parametrization in compressed_weights(model):
        parametrization.finalize()
        original = module.parametrizations[param_name].original
        final = parametrization.finalize_storage(original)
        if final is not None:
            original.data = final
            original.grad = None


def regularization(model: nn.Module) -> torch.Tensor | None:
    """Sum of every compressed layer's training penalty (``CompressedWeight.regularization``); None if none has one."""
    total = None
    for _, module, param_name, parametrization in compressed_weights(model):
        term = parametrization.regularization(module.parametrizations[param_name].original)
        if term is not None:
            total = term if total is None else total + term
    return total
