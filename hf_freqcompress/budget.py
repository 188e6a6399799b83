"""Parse a compression budget and split it across layers.

A budget covers the targeted layers as a whole. It may be a fraction of
their dense weights ("1/64", 0.05), an absolute number of stored values
(an int >= 1) or a size in bytes ("2MB", "512KiB", at the storage dtype).
The planner turns it into one allocation per layer; the planned total never
exceeds the budget, and a budget that cannot be met is a ValueError stating
the smallest feasible one, never a silent overshoot.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

__all__ = [
    "Budget",
    "BudgetTooSmallError",
    "parse_budget",
    "LayerDemand",
    "split_proportional",
    "plan_proportional",
    "plan_budget",
    "plan_by_cost",
    "CostCurve",
    "PLAN_STRATEGIES",
]

_BYTE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}
_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?i?b)\s*$", re.IGNORECASE)
_FRACTION_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Budget:
    """A parsed budget; ``kind`` is "fraction", "values" or "bytes"."""

    kind: str
    amount: float
    text: str

    def total_values(self, dense_values: int, bits_per_value: int) -> int:
        """Stored values this budget allows for ``dense_values`` targeted weights."""
        if self.kind == "fraction":
            return int(math.floor(self.amount * dense_values + 1e-9))
        if self.kind == "values":
            return int(self.amount)
        return int(self.amount * 8 // bits_per_value)

    def describe_values(self, values: int, dense_values: int, bits_per_value: int) -> str:
        """``values`` expressed in this budget's own unit, for error messages."""
        if self.kind == "fraction":
            return f"1/{max(dense_values // values, 1)} ({values} values)"
        if self.kind == "values":
            return str(values)
        return f"{math.ceil(values * bits_per_value / 8)} bytes ({values} values)"


def _fraction(value: float, text: str) -> Budget:
    if not 0 < value <= 1:
        raise ValueError(
            f"budget {text!r} is a fraction of the dense weights and must be in (0, 1]; "
            "pass an int for an absolute number of stored values or a size like '2MB'"
        )
    return Budget("fraction", float(value), text)


def parse_budget(budget: str | float | int | Budget) -> Budget:
    """Read "1/64", 0.05, 12000 or "2MB" into a :class:`Budget`."""
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, bool):
        raise TypeError("budget must be a fraction, an int count or a size string, not a bool")
    if isinstance(budget, int):
        if budget < 1:
            raise ValueError(f"budget {budget} stored values must be >= 1")
        return Budget("values", budget, str(budget))
    if isinstance(budget, float):
        return _fraction(budget, repr(budget))
    if not isinstance(budget, str):
        raise TypeError(f"budget must be a str, float or int, got {type(budget).__name__}")
    text = budget.strip()
    if match := _FRACTION_RE.match(text):
        numerator, denominator = int(match[1]), int(match[2])
        if denominator == 0:
            raise ValueError(f"budget {budget!r} divides by zero")
        return _fraction(numerator / denominator, budget)
    if match := _BYTES_RE.match(text):
        size = float(match[1]) * _BYTE_UNITS[match[2].lower()]
        if size < 1:
            raise ValueError(f"budget {budget!r} is less than one byte")
        return Budget("bytes", size, budget)
    if text.isdigit():
        return parse_budget(int(text))
    try:
        return _fraction(float(text), budget)
    except ValueError as error:
        if "fraction" in str(error):
            raise
    raise ValueError(
        f"cannot read budget {budget!r}; use a fraction ('1/64' or 0.05), "
        "a count of stored values (12000) or a size ('2MB', '512KiB')"
    )


class BudgetTooSmallError(ValueError):
    """The per-layer minima exceed the budget; ``smallest`` is the least feasible total."""

    def __init__(self, total: int, smallest: int) -> None:
        super().__init__(f"budget too small: {total} values < {smallest}, the minimum for these layers")
        self.total = total
        self.smallest = smallest


@dataclass(frozen=True)
class LayerDemand:
    """What the planner knows about one layer: its size and what it can take."""

    name: str
    dense_values: int
    min_values: int
    max_values: int


def split_proportional(
    weights: Sequence[float], total: int, lows: Sequence[int], highs: Sequence[int]
) -> list[int]:
    """Integers a_i in [lows[i], highs[i]] summing to ``total``, a_i proportional to weights[i] where free.

    Water-filling: entries whose share falls below their low bound (or above
    their high bound) are pinned there and the rest is re-split among the
    others; the final integer split uses largest remainders (ties to the
    lower index) so the total is exact whenever the bounds allow it, and
    below it only when every entry sits at its high bound.
    """
    allocation: dict[int, int] = {}
    active = list(range(len(weights)))
    remaining = total
    while active:
        weight = sum(weights[i] for i in active)
        ideal = {i: remaining * weights[i] / weight for i in active}
        pinned = {i: lows[i] for i in active if ideal[i] < lows[i]}
        if not pinned:
            pinned = {i: highs[i] for i in active if ideal[i] > highs[i]}
        if not pinned:
            floors = {i: int(math.floor(ideal[i])) for i in active}
            leftover = remaining - sum(floors.values())
            by_remainder = sorted(active, key=lambda i: (floors[i] - ideal[i], i))
            for i in by_remainder[:leftover]:
                floors[i] += 1
            allocation.update(floors)
            break
        allocation.update(pinned)
        remaining -= sum(pinned.values())
        active = [i for i in active if i not in pinned]
    return [allocation[i] for i in range(len(weights))]


def plan_proportional(layers: Sequence[LayerDemand], total: int) -> list[int]:
    """Split ``total`` proportionally to dense size, within each layer's [min, max] (:func:`split_proportional`)."""
    return split_proportional(
        [layer.dense_values for layer in layers],
        total,
        [layer.min_values for layer in layers],
        [layer.max_values for layer in layers],
    )


CostCurve = Sequence[tuple[int, float]]
"""Measured (stored values, predicted loss increase) points of one layer, any order."""


def _lower_hull(points: CostCurve) -> list[tuple[int, float]]:
    """The lower convex hull of a layer's points, left to right, made non-increasing (more values never cost more)."""
    hull: list[tuple[int, float]] = []
    for values, cost in sorted(points):
        if hull and values == hull[-1][0]:
            continue
        cost = min(cost, hull[-1][1]) if hull else cost
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (y1 - y0) * (values - x0) >= (cost - y0) * (x1 - x0):  # the middle point is not below the chord
                hull.pop()
            else:
                break
        hull.append((values, cost))
    return hull


def plan_by_cost(layers: Sequence[LayerDemand], total: int, curves: Sequence[CostCurve]) -> list[int]:
    """Split ``total`` to minimise the summed predicted cost, each layer on its measured curve.

    Each curve's lower convex hull (cost non-increasing in values) is
    interpolated linearly between its points. Every layer starts at its
    first point (or its minimum); the hull segments of all layers are then
    funded in order of cost saved per value, steepest first, the last one in
    part: the greedy optimum of a convex separable problem. Budget left once
    every layer reaches its last point is split proportionally up to each
    layer's maximum. Integers by largest remainder; exact total, per-layer
    bounds respected, deterministic (ties to the lower index).
    """
    hulls = [_lower_hull([(min(max(v, layer.min_values), layer.max_values), c) for v, c in curve])
             for layer, curve in zip(layers, curves, strict=True)]
    amounts = [float(hull[0][0]) if hull else float(layer.min_values) for layer, hull in zip(layers, hulls)]
    if sum(amounts) > total:  # the curves start above the budget: fall back to the sizes alone
        return plan_proportional(layers, total)
    remaining = total - sum(amounts)
    segments = sorted(
        ((y1 - y0) / (x1 - x0), i, x1 - x0) for i, hull in enumerate(hulls)
        for (x0, y0), (x1, y1) in zip(hull, hull[1:])
    )
    for slope, i, width in segments:
        if remaining <= 0 or slope >= 0:
            break
        step = min(width, remaining)
        amounts[i] += step
        remaining -= step
    floors = [int(math.floor(a + 1e-9)) for a in amounts]
    highs = [layer.max_values for layer in layers]
    if remaining > 0:  # every layer is at its last measured point
        return split_proportional([layer.dense_values for layer in layers], total, floors, highs)
    by_fraction = sorted(range(len(floors)), key=lambda i: (floors[i] - amounts[i], i))
    for i in by_fraction[: total - sum(floors)]:
        floors[i] += 1
    return floors


PLAN_STRATEGIES: dict[str, Callable[[Sequence[LayerDemand], int], list[int]]] = {
    "proportional": plan_proportional,
}


def plan_budget(
    layers: Sequence[LayerDemand],
    total: int,
    strategy: str | Callable[[Sequence[LayerDemand], int], list[int]] = "proportional",
) -> list[int]:
    """Allocate ``total`` stored values over ``layers`` and check the result.

    Raises :class:`BudgetTooSmallError` naming the smallest feasible total when the per-layer
    minima alone exceed it; a custom strategy's output is validated the same
    way as the built-in one's.
    """
    if not layers:
        raise ValueError("no layers to plan a budget for")
    smallest = sum(layer.min_values for layer in layers)
    if total < smallest:
        raise BudgetTooSmallError(total, smallest)
    if isinstance(strategy, str):
        if strategy not in PLAN_STRATEGIES:
            raise ValueError(f"unknown plan strategy {strategy!r}; available: {sorted(PLAN_STRATEGIES)}")
        strategy = PLAN_STRATEGIES[strategy]
    allocation = [int(a) for a in strategy(layers, total)]
    if len(allocation) != len(layers):
        raise ValueError(f"plan strategy returned {len(allocation)} allocations for {len(layers)} layers")
    for layer, values in zip(layers, allocation):
        if not layer.min_values <= values <= layer.max_values:
            raise ValueError(
                f"plan strategy gave layer {layer.name!r} {values} values, "
                f"outside its range [{layer.min_values}, {layer.max_values}]"
            )
    if sum(allocation) > total:
        raise ValueError(f"plan strategy allocated {sum(allocation)} values, over the budget of {total}")
    return allocation
