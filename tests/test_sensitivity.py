"""sensitivity.py: per-layer loss curves, and the budget split they lead to."""

from __future__ import annotations

import copy

import torch
from torch import nn

from hf_freqcompress import compress, get_reports
from hf_freqcompress.budget import LayerDemand, plan_proportional
from hf_freqcompress.sensitivity import candidate_budgets


class TwoPaths(nn.Module):
    """Two equally large layers side by side; the second's output is scaled down, so it barely matters."""

    def __init__(self) -> None:
        super().__init__()
        self.main, self.side, self.head = nn.Linear(32, 64), nn.Linear(32, 64), nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.main(x)) + 0.01 * torch.relu(self.side(x)))


def _two_paths() -> tuple[nn.Module, list[tuple]]:
    torch.manual_seed(0)
    model = TwoPaths()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(96, 32, generator=generator)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, [(x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)]


def test_candidates_span_a_sixteenth_to_the_whole_layer_within_bounds():
    demand = LayerDemand("w", dense_values=4096, min_values=10, max_values=4096)
    assert candidate_budgets(demand, 256) == [16, 64, 256, 1024, 4096]
    assert candidate_budgets(LayerDemand("w", 100, 40, 100), 50) == [40, 50, 100]


def test_sensitivity_gives_the_sensitive_layer_more_and_loses_less():
    model, batches = _two_paths()
    proportional, sensitive = copy.deepcopy(model), copy.deepcopy(model)
    compress(proportional, budget="1/16", exclude=["head"], calibration=batches)
    report = compress(sensitive, budget="1/16", exclude=["head"], calibration=batches, strategy="sensitivity")
    shares = {layer.name: layer.stored_values for layer in report.layers}
    planned = {layer.name: layer.stored_values for layer in get_reports(proportional)[0].layers}
    assert shares["side.weight"] < planned["side.weight"] and shares["main.weight"] > planned["main.weight"]
    assert sum(shares.values()) == sum(planned.values())  # the exact same total
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(m(x), y) for m in (proportional, sensitive)]
    assert losses[1] < losses[0]
    assert report.calibration["strategy"] == "sensitivity" and report.calibration["seconds"] > 0


def test_sensitivity_is_deterministic_and_leaves_no_trace_when_it_fails():
    model, batches = _two_paths()
    runs = [compress(copy.deepcopy(model), budget="1/16", exclude=[], calibration=batches, strategy="sensitivity")
            for _ in range(2)]
    assert [layer.stored_values for layer in runs[0].layers] == [layer.stored_values for layer in runs[1].layers]
    before = {name: p for name, p in model.named_parameters()}
    calls = []

    def loss_fn(outputs, targets):  # fine for the dense pass, then fails inside the probes
        calls.append(1)
        if len(calls) > len(batches) * 2:
            return outputs.sum() * float("inf")
        return nn.functional.cross_entropy(outputs, targets)

    try:
        compress(model, budget="1/16", exclude=[], calibration=batches, strategy="sensitivity", loss_fn=loss_fn)
    except ValueError as error:
        assert "non-finite" in str(error)
    else:
        raise AssertionError("expected the probe's non-finite loss to be an error")
    assert {name: p for name, p in model.named_parameters()} == before
    assert all(p is before[name] for name, p in model.named_parameters())
    assert not hasattr(model, "hf_freqcompress_reports")


def test_plan_proportional_is_the_probes_centre():
    demands = [LayerDemand("a", 1000, 1, 1000), LayerDemand("b", 3000, 1, 3000)]
    assert plan_proportional(demands, 400) == [100, 300]
