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


def test_plan_by_cost_funds_the_steepest_savings_first_with_an_exact_total():
    from hf_freqcompress.budget import plan_by_cost

    layers = [LayerDemand("a", 1000, 10, 1000), LayerDemand("b", 1000, 10, 1000), LayerDemand("c", 100, 10, 100)]
    curves = [[(10, 5.0), (50, 1.0), (200, 0.5)], [(10, 0.5), (50, 0.4), (200, 0.3)], [(10, 2.0), (100, 0.0)]]
    assert plan_by_cost(layers, 30, curves) == [10, 10, 10]
    assert plan_by_cost(layers, 100, curves) == [50, 10, 40]  # a's first segment saves most per value, then c's
    allocation = plan_by_cost(layers, 2000, curves)  # beyond every measured point: proportional up to the maxima
    assert sum(allocation) == 2000 and allocation[2] == 100
    for total in (37, 255, 1111):
        allocation = plan_by_cost(layers, total, curves)
        assert sum(allocation) == total and all(d.min_values <= a <= d.max_values for d, a in zip(layers, allocation))


def test_plan_by_cost_ignores_noise_that_makes_more_values_look_worse():
    from hf_freqcompress.budget import plan_by_cost

    layers = [LayerDemand("a", 100, 1, 100), LayerDemand("b", 100, 1, 100)]
    noisy = [[(10, 1.0), (20, 1.2), (40, 0.1)], [(10, 0.5), (40, 0.4)]]  # a's middle point is noise
    assert plan_by_cost(layers, 50, noisy) == [40, 10]
