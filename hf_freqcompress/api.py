"""The public entry points: ``compress`` a model in place, ``materialize`` it back."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import integrations
from .budget import Budget, BudgetTooSmallError, LayerDemand, parse_budget, plan_budget, plan_by_cost
from .calibration import CalibrationData, FittedLayers, calibration_data, collect_input_stats, fit_layers
from .dtypes import resolve_storage_dtype
from .methods import CompressedWeight, MethodConfig, compressed_weights, get_method, resolve_config
from .plan import build_parametrizations
from .report import CompressionReport, LayerReport
from .sensitivity import sensitivity_curves
from .recompute import disable_weight_recompute
from .state import RECIPE_ATTRIBUTE, REPORT_ATTRIBUTE, SOURCE_ATTRIBUTE, add_reports, get_reports
from .surgery import MIN_LAYER_VALUES, Patterns, Target, apply_parametrizations, select_targets

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
    calibration: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    seed_trials: int = 1,
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
        strategy: how the budget is split per layer: "proportional" (to each
            layer's size), "sensitivity" (to minimise the calibration loss
            measured with each layer compressed alone; needs ``calibration``)
            or a callable ``(demands, total) -> allocation``.
        init: "project" (least-squares projection of the current weights: what
            a trained model needs to keep its accuracy) or "preserve_norm"
            (the projection rescaled so each rebuilt weight has the dense
            weight's norm: for a freshly initialised model trained from
            scratch, whose projected random weights would otherwise shrink by
            about sqrt(budget) per layer and stall training).
        calibration: an iterable of ``(inputs, targets)`` batches (inputs a
            tensor, a tuple of positional inputs or a dict of keyword inputs),
            or of inputs alone with ``loss_fn``. Each layer's stored values are
            then fitted to the layer's output on these inputs instead of to its
            weight (see :mod:`hf_freqcompress.calibration`).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` for ``strategy="sensitivity"``
            (default: cross-entropy on the logits).
        seed_trials: with calibration, each layer tries this many hash seeds
            and keeps the one with the smallest output error; the seeds are
            recorded and saved.
    """
    config, parametrization_class = _method(method)
    _check_options(init, strategy, calibration, seed_trials, parametrization_class.links_layers(config))
    parsed = parse_budget(budget)
    chosen = select_targets(model, targets, exclude, min_layer_values)
    dtype = resolve_storage_dtype(storage_dtype, chosen[0].weight.dtype)
    bits = torch.finfo(dtype).bits
    specs = [target.spec(bits) for target in chosen]
    demands = [
        LayerDemand(spec.name, spec.numel, parametrization_class.min_values(spec, config),
                    parametrization_class.max_values(spec, config))
        for spec in specs
    ]
    job = _Job(model, chosen, config, demands, parsed, bits, seed)
    if calibration is None:
        allocation = _plan(parsed, demands, bits, strategy)
        fitted = FittedLayers(build_parametrizations(chosen, config, allocation, [seed] * len(chosen), bits),
                              [None] * len(chosen), [None] * len(chosen), [None] * len(chosen))
        calibrated = None
    else:
        fitted, calibrated = _calibrated(job, strategy, calibration_data(calibration, loss_fn), seed_trials)
    pairs = list(zip(chosen, fitted.parametrizations))
    errors = apply_parametrizations(pairs, preserve_norm=init == "preserve_norm", stored=fitted.stored)
    rows = [_layer_report(spec, target, p, config, dtype, error, layer_seed, output_error)
            for spec, (target, p), error, layer_seed, output_error
            in zip(specs, pairs, errors, fitted.seeds, fitted.output_errors)]
    report = CompressionReport(config.method, parsed.text, int(seed), str(dtype).removeprefix("torch."), rows, calibrated)
    add_reports(model, [report])
    integrations.attach(model)
    return report


@dataclass(frozen=True)
class _Job:
    """What one compress() call works on, for the steps that need all of it."""

    model: nn.Module
    targets: list[Target]
    config: MethodConfig
    demands: list[LayerDemand]
    budget: Budget
    bits: int
    seed: int


def _calibrated(job: _Job, strategy: Any, data: CalibrationData, seed_trials: int) -> tuple[FittedLayers, dict]:
    """Allocate (by measured sensitivity if asked) and fit every layer to its calibration inputs."""
    start, strategy_name = time.perf_counter(), strategy if isinstance(strategy, str) else "custom"
    stats = collect_input_stats(job.model, job.targets, data)
    if strategy == "sensitivity":
        total = job.budget.total_values(sum(d.dense_values for d in job.demands), job.bits)
        curves = sensitivity_curves(job.model, job.targets, job.config, job.demands, total, job.seed, job.bits, stats, data)
        strategy = functools.partial(plan_by_cost, curves=curves)
    allocation = _plan(job.budget, job.demands, job.bits, strategy)
    fitted = fit_layers(job.targets, job.config, allocation, job.seed, seed_trials, job.bits, stats)
    seconds = round(time.perf_counter() - start, 3)
    return fitted, {"batches": data.count, "seconds": seconds, "strategy": strategy_name, "seed_trials": seed_trials}


def _method(method: str | MethodConfig | dict[str, Any]) -> tuple[MethodConfig, type[CompressedWeight]]:
    config = resolve_config(method)
    return config, get_method(config.method)


def _check_options(init: str, strategy: Any, calibration: Any, seed_trials: Any, links_layers: bool) -> None:
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; use one of {list(INITS)}")
    if isinstance(seed_trials, bool) or not isinstance(seed_trials, int) or seed_trials < 1:
        raise ValueError(f"seed_trials must be an int >= 1, got {seed_trials!r}")
    if calibration is None and (strategy == "sensitivity" or seed_trials > 1):
        needs = "strategy='sensitivity'" if strategy == "sensitivity" else f"seed_trials={seed_trials}"
        raise ValueError(f"{needs} measures the model on real inputs: pass calibration=<(inputs, targets) batches>")
    if seed_trials > 1 and links_layers:
        raise ValueError("seed_trials chooses a seed per layer, but this method's layers share their stored numbers; "
                         "use seed_trials=1 (or layers that do not share, e.g. funhash shared_space=False)")


def _layer_report(spec, target, parametrization, config, dtype, error, seed, output_error) -> LayerReport:
    original = target.module.parametrizations[target.param_name].original
    return LayerReport(
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
        seed=seed,
        output_error=output_error,
    )


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
    integrations.detach(model)
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
