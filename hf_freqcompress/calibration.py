"""Calibration-aware one-shot compression: fit stored values to what each layer computes on real inputs.

``compress(model, ..., calibration=batches)`` runs the dense model on a few
batches first and records, for every targeted layer whose kind exposes them
(:attr:`~hf_freqcompress.layers.LayerKind.calibration_rows`), the input rows
X its canonical weight multiplies, as the Gram matrix H = X^T X per group
(or the rows themselves when the fan-in is too large for a Gram matrix).
Three uses follow:

- Output-aware projection. What a layer must keep is its output, so the
  stored values v minimise ||X (W - A v)^T||^2 = tr((W - A v) H (W - A v)^T)
  instead of ||W - A v||^2, where A v is the method's reconstruction (the
  objective of GPTQ / AWQ's layer-wise fits). For methods whose
  reconstruction is linear in ``original`` (``CompressedWeight.linear_in_original``)
  this is a least-squares problem in v, solved by conjugate gradients on the
  normal equations A^T H A v = A^T H W, started from the weight projection;
  A and A^T are the method's own reconstruction and its autograd vector-Jacobian
  product, so no method needs code of its own. Other methods keep the weight
  projection.
- Hash-seed choice (``seed_trials``): each layer is projected under several
  seeds and keeps the one with the smallest output error.
- Sensitivity: the loss on the calibration batches with one layer
  compressed at a few budgets, which :func:`~hf_freqcompress.budget.plan_by_cost`
  turns into a budget split.

Everything here is deterministic: batches in their given order, float64
accumulation, a fixed number of iterations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from .methods import CompressedWeight, MethodConfig
from .plan import build_parametrizations
from .surgery import StoredTensors, Target

__all__ = [
    "CalibrationData", "InputStats", "FittedLayers", "calibration_data", "collect_input_stats", "calibration_loss",
    "fit", "fit_layers", "output_error",
]

LossFn = Callable[[Any, Any], torch.Tensor]

MAX_GRAM_FEATURES = 4096
"""Fan-ins above this keep sampled input rows instead of an F x F Gram matrix (memory grows as F^2)."""
MAX_ROWS = 4096
"""Rows kept per group for layers over :data:`MAX_GRAM_FEATURES`, taken at a fixed stride over every batch."""
REFINE_ITERATIONS = 30
"""Conjugate-gradient iterations of the output-aware fit (from the weight projection; fixed, for determinism)."""


@dataclass
class CalibrationData:
    """Validated calibration batches: ``(inputs, targets)`` pairs (targets None with a custom loss) and the loss."""

    batches: list[tuple[Any, Any]]
    loss_fn: LossFn
    seconds: float = 0.0

    @property
    def count(self) -> int:
        return len(self.batches)


def _logits(outputs: Any) -> torch.Tensor:
    """The tensor a loss reads: the model output itself, or ``.logits`` of a transformers output."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise ValueError(
        f"calibration: the model returned a {type(outputs).__name__} without a logits tensor; pass loss_fn=... "
        "that computes the loss from the model's outputs"
    )


def _cross_entropy(outputs: Any, targets: Any) -> torch.Tensor:
    logits = _logits(outputs)
    if not isinstance(targets, torch.Tensor):
        raise ValueError("calibration: batches must be (inputs, targets) pairs for the default cross-entropy loss; "
                         "pass loss_fn=... for inputs alone")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def calibration_data(batches: Iterable[Any], loss_fn: LossFn | None) -> CalibrationData:
    """Read ``batches`` once: ``(inputs, targets)`` pairs, or inputs alone when ``loss_fn(outputs, None)`` is given.

    A 2-tuple batch is always ``(inputs, targets)``; inputs are a tensor, a
    tuple of positional inputs or a dict of keyword inputs.
    """
    if isinstance(batches, (torch.Tensor, str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(
            f"calibration must be an iterable of (inputs, targets) batches (a DataLoader, a list), "
            f"got {type(batches).__name__}"
        )
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable(outputs, targets) -> loss, got {type(loss_fn).__name__}")
    pairs = []
    for batch in batches:
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            pairs.append(tuple(batch))
        elif loss_fn is None:
            raise ValueError("calibration batches must be (inputs, targets) pairs; pass loss_fn=... for inputs alone")
        else:
            pairs.append((batch, None))
    if not pairs:
        raise ValueError("calibration is empty: give at least one batch")
    return CalibrationData(pairs, loss_fn or _cross_entropy)


def _run(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for the duration (batch-norm statistics and dropout left alone), mode restored."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes:
            module.training = mode


def calibration_loss(model: nn.Module, data: CalibrationData) -> float:
    """Mean loss over the calibration batches (eval mode); a clear error if the model cannot take them."""
    total = 0.0
    with _evaluating(model):
        for i, (inputs, targets) in enumerate(data.batches):
            try:
                loss = data.loss_fn(_run(model, inputs), targets)
            except (RuntimeError, TypeError, IndexError) as error:
                raise ValueError(f"calibration batch {i} does not fit the model: {error}") from error
            value = float(loss)
            if not math.isfinite(value):
                raise ValueError(f"calibration batch {i} gives a non-finite loss ({value}); check the data and loss_fn")
            total += value
    return total / data.count


class InputStats:
    """What one layer's canonical weight multiplies on the calibration batches, per group.

    ``gram`` (groups, F, F) = X^T X in float64, or for fan-ins over
    :data:`MAX_GRAM_FEATURES` the sampled ``rows`` (groups, n, F) themselves.
    """

    def __init__(self) -> None:
        self.gram: torch.Tensor | None = None
        self.rows: list[torch.Tensor] = []
        self.sampled = 0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().double()
        if rows.shape[-1] <= MAX_GRAM_FEATURES:
            gram = rows.transpose(1, 2) @ rows
            self.gram = gram if self.gram is None else self.gram + gram
            return
        stride = max(1, -(-rows.shape[1] // MAX_ROWS))
        room = MAX_ROWS - self.sampled
        if room > 0:
            taken = rows[:, ::stride][:, :room]
            self.rows.append(taken)
            self.sampled += taken.shape[1]

    @property
    def groups(self) -> int:
        return self.gram.shape[0] if self.gram is not None else self.rows[0].shape[0]

    def weigh(self, delta: torch.Tensor) -> torch.Tensor:
        """delta H for delta (groups, out_per_group, F)."""
        if self.gram is not None:
            return delta @ self.gram
        rows = torch.cat(self.rows, dim=1)
        return (delta @ rows.transpose(1, 2)) @ rows

    def energy(self, delta: torch.Tensor) -> float:
        """tr(delta H delta^T): the summed squared output error of ``delta`` on the calibration rows."""
        return float((self.weigh(delta) * delta).sum())


def collect_input_stats(model: nn.Module, targets: Sequence[Target], data: CalibrationData) -> list[InputStats | None]:
    """Run the (dense) model over the batches and record each target's input rows; None where the kind has none."""
    stats: list[InputStats | None] = [None] * len(targets)
    handles = []
    for i, target in enumerate(targets):
        rows_of = target.kind.calibration_rows
        if rows_of is None:
            continue
        stats[i] = InputStats()

        def record(module: nn.Module, args: tuple, i: int = i, rows_of=rows_of) -> None:
            rows = rows_of(module, args[0]) if args and isinstance(args[0], torch.Tensor) else None
            if rows is None:
                stats[i] = None
            elif stats[i] is not None:
                stats[i].add(rows)

        handles.append(target.module.register_forward_pre_hook(record))
    try:
        calibration_loss(model, data)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _grouped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Canonical (out, in / groups, *kernel) -> (groups, out / groups, fan_in)."""
    return weight.reshape(groups, weight.shape[0] // groups, -1)


def output_error(parametrization: CompressedWeight, stored: torch.Tensor, dense: torch.Tensor,
                 stats: InputStats | None) -> float:
    """Relative error of the layer's output on the calibration rows (of its weight where it has no rows)."""
    with torch.no_grad():
        delta = (parametrization.reconstruct(stored) - dense).double()
        if stats is None:
            return float(delta.norm() / dense.double().norm().clamp_min(1e-300))
        reference = stats.energy(_grouped(dense.double(), stats.groups))
        return math.sqrt(stats.energy(_grouped(delta, stats.groups)) / max(reference, 1e-300))


def refine(parametrization: CompressedWeight, stored: torch.Tensor, dense: torch.Tensor, stats: InputStats,
           iterations: int = REFINE_ITERATIONS) -> torch.Tensor:
    """Output-aware least squares A^T H A v = A^T H W by conjugate gradients, from ``stored`` (the weight fit).

    A v is ``parametrization.reconstruct`` (linear in v), A^T its vector-Jacobian product; float64 throughout.
    """
    groups = stats.groups
    target = _grouped(dense.detach().double(), groups)
    start = stored.detach().double().requires_grad_(True)
    rebuilt = _grouped(parametrization.reconstruct(start), groups)

    def adjoint(weighted: torch.Tensor) -> torch.Tensor:
        (vector,) = torch.autograd.grad(rebuilt, start, weighted, retain_graph=True)
        return vector

    def normal(vector: torch.Tensor) -> torch.Tensor:  # A^T H A p; A is linear, so A p = d(rebuild)/dv . p
        with torch.no_grad():
            product = _grouped(parametrization.reconstruct(vector), groups)
        return adjoint(stats.weigh(product))

    def dot(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a * b).sum())

    solution = start.detach().clone()
    residual = adjoint(stats.weigh(target - rebuilt.detach()))
    direction, energy = residual.clone(), dot(residual, residual)
    floor = 1e-24 * max(energy, 1e-300)
    for _ in range(iterations):
        if energy <= floor:
            break
        product = normal(direction)
        curvature = dot(direction, product)
        if curvature <= 0:
            break
        step = energy / curvature
        solution += step * direction
        residual -= step * product
        energy, previous = dot(residual, residual), energy
        direction = residual + (energy / previous) * direction
    return solution.to(stored.dtype)


def fit(parametrization: CompressedWeight, weight: torch.Tensor, stats: InputStats | None) -> StoredTensors:
    """The stored values for dense ``weight`` (native layout): the weight projection, refined output-aware
    where the method is linear in its single stored tensor and the layer has calibration rows."""
    with torch.no_grad():
        stored = parametrization.right_inverse(weight)
    if stats is None or not isinstance(stored, torch.Tensor) or not parametrization.linear_in_original:
        return stored
    with ExitStack() as stack:  # the fit rebuilds the weight dozens of times: hash the index once
        for source in parametrization.index_sources():
            stack.enter_context(source.pinned(weight.device))
        return refine(parametrization, stored, parametrization.layer_kind.to_canonical(weight), stats)



@dataclass
class FittedLayers:
    """Parametrizations chosen and fitted with calibration data, ready to register."""

    parametrizations: list[CompressedWeight]
    stored: list[StoredTensors]
    seeds: list[int | None]
    output_errors: list[float | None]


def _fit_one(parametrization: CompressedWeight, target: Target, stats: InputStats | None) -> tuple[StoredTensors, float]:
    """The fit and its score: the output error (the weight error for a layer without calibration rows)."""
    stored = fit(parametrization, target.weight, stats)
    if not isinstance(stored, torch.Tensor) or stored.numel() == 0:  # several or shared tensors: nothing to score
        return stored, math.nan
    return stored, output_error(parametrization, stored, target.kind.to_canonical(target.weight), stats)


def _reported(error: float, stats: InputStats | None) -> float | None:
    """What the report shows as output error: only a measured one."""
    return None if stats is None or math.isnan(error) else error


def fit_layers(
    targets: Sequence[Target],
    config: MethodConfig,
    allocation: Sequence[int],
    seed: int,
    seed_trials: int,
    storage_bits: int,
    stats: Sequence[InputStats | None],
) -> FittedLayers:
    """Fit every layer to its calibration rows; with ``seed_trials`` > 1 each layer tries seeds
    ``seed .. seed + seed_trials - 1`` and keeps the one with the smallest output error."""
    if seed_trials == 1:
        parametrizations = build_parametrizations(targets, config, allocation, [seed] * len(targets), storage_bits)
        fitted = [_fit_one(p, t, s) for p, t, s in zip(parametrizations, targets, stats)]
        errors = [_reported(error, s) for (_, error), s in zip(fitted, stats)]
        return FittedLayers(parametrizations, [f[0] for f in fitted], [None] * len(targets), errors)
    result = FittedLayers([], [], [], [])
    for target, values, layer_stats in zip(targets, allocation, stats):
        trials = []
        for trial_seed in range(seed, seed + seed_trials):
            (parametrization,) = build_parametrizations([target], config, [values], [trial_seed], storage_bits)
            stored, error = _fit_one(parametrization, target, layer_stats)
            trials.append((math.inf if math.isnan(error) else error, trial_seed, parametrization, stored))
        error, best_seed, parametrization, stored = min(trials, key=lambda trial: trial[:2])
        result.parametrizations.append(parametrization)
        result.stored.append(stored)
        result.seeds.append(best_seed)
        result.output_errors.append(_reported(error if math.isfinite(error) else math.nan, layer_stats))
    return result
