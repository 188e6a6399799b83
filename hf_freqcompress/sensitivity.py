"""How much each layer's compression costs the model: loss curves for the budget split.

For every targeted layer and a few candidate budgets around its proportional
share (from a sixteenth of it to the whole layer), the layer alone is
compressed (fitted as ``compress()`` would fit it) and the mean calibration
loss measured; the increase over the dense loss is that layer's cost at that
budget. :func:`~hf_freqcompress.budget.plan_by_cost` then splits the total to
minimise the summed cost. Layers are probed one at a time, so interactions
between layers are not modelled: the split is a first-order one, as in
mixed-precision quantization searches.
"""

from __future__ import annotations

from collections.abc import Sequence

from .budget import CostCurve, LayerDemand, plan_proportional
from .calibration import CalibrationData, InputStats, calibration_loss, fit
from .methods import MethodConfig
from .plan import build_parametrizations
from .surgery import Target, trial_parametrization

__all__ = ["CANDIDATE_FACTORS", "candidate_budgets", "sensitivity_curves"]

CANDIDATE_FACTORS = (1 / 16, 1 / 4, 1, 4, 16)
"""Budgets probed per layer, as multiples of its proportional share (plus the whole layer)."""


def candidate_budgets(demand: LayerDemand, share: int) -> list[int]:
    """The distinct budgets probed for one layer, within its [min, max]."""
    points = {round(share * factor) for factor in CANDIDATE_FACTORS} | {demand.max_values}
    return sorted({min(max(p, demand.min_values), demand.max_values) for p in points})


def sensitivity_curves(
    model,
    targets: Sequence[Target],
    config: MethodConfig,
    demands: Sequence[LayerDemand],
    total: int,
    seed: int,
    storage_bits: int,
    stats: Sequence[InputStats | None],
    data: CalibrationData,
) -> list[CostCurve]:
    """(values, loss increase) points per layer, each layer compressed alone; the model is left as it was."""
    dense_loss = calibration_loss(model, data)
    curves = []
    for target, demand, share, layer_stats in zip(targets, demands, plan_proportional(demands, total), stats):
        points = []
        for values in candidate_budgets(demand, share):
            (parametrization,) = build_parametrizations([target], config, [values], [seed], storage_bits)
            stored = fit(parametrization, target.weight, layer_stats)
            with trial_parametrization(target, parametrization, stored):
                points.append((values, calibration_loss(model, data) - dense_loss))
        curves.append(points)
    return curves
