from __future__ import annotations

import pytest

from hf_freqcompress.budget import (
    BudgetTooSmallError,
    LayerDemand,
    parse_budget,
    plan_budget,
    plan_proportional,
)


@pytest.mark.parametrize(
    "text,kind,amount",
    [
        ("1/64", "fraction", 1 / 64),
        (0.05, "fraction", 0.05),
        ("0.25", "fraction", 0.25),
        (1.0, "fraction", 1.0),
        (12000, "values", 12000),
        ("12000", "values", 12000),
        ("2MB", "bytes", 2_000_000),
        ("512KiB", "bytes", 524_288),
        ("1.5 GB", "bytes", 1.5e9),
    ],
)
def test_parse_budget(text, kind, amount):
    budget = parse_budget(text)
    assert budget.kind == kind
    assert budget.amount == pytest.approx(amount)


@pytest.mark.parametrize("bad,match", [(0, ">= 1"), (-3, ">= 1"), (0.0, r"\(0, 1\]"), (1.5, r"\(0, 1\]"),
                                       ("3/2", r"\(0, 1\]"), ("1/0", "zero"), ("lots", "cannot read"),
                                       ("-0.1", r"\(0, 1\]")])
def test_parse_budget_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_budget(bad)


def test_parse_budget_type_errors():
    with pytest.raises(TypeError):
        parse_budget(True)
    with pytest.raises(TypeError):
        parse_budget([1])


def test_total_values_per_kind():
    assert parse_budget("1/64").total_values(6400, 32) == 100
    assert parse_budget(77).total_values(6400, 32) == 77
    assert parse_budget("4KB").total_values(10**6, 32) == 1000
    assert parse_budget("4KB").total_values(10**6, 16) == 2000


def demands(*sizes, minimum=1):
    return [LayerDemand(f"l{i}", size, minimum, size) for i, size in enumerate(sizes)]


def test_proportional_plan_sums_exactly_and_is_proportional():
    layers = demands(1000, 3000, 6000, 7)
    plan = plan_budget(layers, 1001)
    assert sum(plan) == 1001
    assert plan[3] == 1  # pinned at its minimum
    assert plan[2] == pytest.approx(2 * plan[1], abs=1)
    assert plan[1] == pytest.approx(3 * plan[0], abs=1)


def test_plan_respects_floors_and_maxima():
    layers = [LayerDemand("small", 10, 5, 10), LayerDemand("big", 10_000, 20, 10_000)]
    plan = plan_proportional(layers, 40)
    assert plan == [5, 35]
    capped = plan_proportional([LayerDemand("a", 10, 1, 10), LayerDemand("b", 100, 1, 100)], 105)
    assert capped == [10, 95]


def test_plan_too_small_names_smallest_feasible():
    with pytest.raises(BudgetTooSmallError) as info:
        plan_budget(demands(100, 100, 100, minimum=4), 11)
    assert info.value.smallest == 12


def test_custom_strategy_is_validated():
    layers = demands(100, 100)
    assert plan_budget(layers, 10, strategy=lambda ls, total: [3, 7]) == [3, 7]
    with pytest.raises(ValueError, match="over the budget"):
        plan_budget(layers, 10, strategy=lambda ls, total: [6, 7])
    with pytest.raises(ValueError, match="outside its range"):
        plan_budget(layers, 10, strategy=lambda ls, total: [0, 7])
    with pytest.raises(ValueError, match="unknown plan strategy"):
        plan_budget(layers, 10, strategy="magic")
