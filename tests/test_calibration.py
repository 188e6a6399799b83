"""calibration.py: output-aware fits, seed choice, input statistics, bad calibration input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hf_freqcompress import compress, from_pretrained, get_reports, save_pretrained
from hf_freqcompress.calibration import InputStats, calibration_data, refine
from hf_freqcompress.layers import find_layer_kind
from hf_freqcompress.methods import HashedNetsConfig, compressed_weights
from hf_freqcompress.models import build_model


def _anisotropic_batches(count: int = 3, features: int = 64, generator_seed: int = 0) -> list[tuple]:
    """Inputs concentrated in a few directions, as trained features are: the output error is not the weight error."""
    generator = torch.Generator().manual_seed(generator_seed)
    basis = torch.randn(6, features, generator=generator)
    batches = []
    for _ in range(count):
        x = torch.randn(32, 6, generator=generator) @ basis + 0.05 * torch.randn(32, features, generator=generator)
        batches.append((x, torch.randint(0, 10, (32,), generator=generator)))
    return batches


def _output_errors(model: nn.Module) -> list[float]:
    return [layer.output_error for layer in get_reports(model)[-1].layers]


@pytest.mark.parametrize("method, at_most", [
    ("hashednets", 0.8), ("freqreg", 0.8), ({"method": "funhash", "reconstruction": "linear"}, 0.8),
    ("pq", 0.99),  # only the codebooks are refitted: the codes stay k-means' choice on the weights
])
def test_output_aware_fit_beats_the_weight_projection_on_the_outputs(mlp, method, at_most):
    batches = _anisotropic_batches()
    plain, calibrated = copy.deepcopy(mlp), copy.deepcopy(mlp)
    compress(plain, budget="1/8", method=method, exclude=[], seed=1)
    compress(calibrated, budget="1/8", method=method, exclude=[], seed=1, calibration=batches)
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        dense_out, plain_out, calibrated_out = mlp(x), plain(x), calibrated(x)
    assert (calibrated_out - dense_out).norm() < at_most * (plain_out - dense_out).norm()
    assert all(0 <= error < 1 for error in _output_errors(calibrated))


def test_refine_is_the_weighted_least_squares_solution():
    torch.manual_seed(0)
    layer = nn.Linear(12, 5).double()
    compress(nn.Sequential(layer), budget=20, exclude=[], method=HashedNetsConfig(cache_indices=True))
    parametrization = layer.parametrizations.weight[0]
    dense = torch.randn(5, 12, dtype=torch.float64)
    x = torch.randn(40, 3, dtype=torch.float64) @ torch.randn(3, 12, dtype=torch.float64)  # rank 3: H is singular
    stats = InputStats()
    stats.add(x.unsqueeze(0))
    solved = refine(parametrization, parametrization.project(dense), dense, stats, iterations=200)
    basis = torch.stack([parametrization.reconstruct(torch.eye(20, dtype=torch.float64)[k]).reshape(-1)
                         for k in range(20)], 1)  # (60, 20): W = A v
    design = torch.kron(torch.eye(5, dtype=torch.float64), x) @ basis  # X applied to every output row
    target = (x @ dense.T).T.reshape(-1)
    best = torch.linalg.lstsq(design, target.unsqueeze(1)).solution.squeeze(1)
    assert torch.allclose(design @ solved, design @ best, atol=1e-8)


def test_input_rows_reproduce_every_supported_layer_output():
    torch.manual_seed(0)
    cases = [(nn.Conv2d(6, 8, 3, padding=1, stride=2, groups=2), torch.randn(2, 6, 9, 7)),
             (nn.Conv1d(4, 6, 5, padding=2, dilation=2, groups=2), torch.randn(3, 4, 11)),
             (nn.Linear(5, 3), torch.randn(2, 4, 5))]
    for module, x in cases:
        module, x = module.double(), x.double()
        rows = find_layer_kind(module).calibration_rows(module, x)
        groups, out = rows.shape[0], module.weight.shape[0]
        product = torch.einsum("gnf,gof->ngo", rows, module.weight.reshape(groups, out // groups, -1)).reshape(-1, out)
        y = module(x) - (module.bias.view(-1, *[1] * (x.dim() - 2)) if isinstance(module, nn.Conv2d | nn.Conv1d) else module.bias)
        expected = (y.movedim(1, -1) if isinstance(module, nn.Conv2d | nn.Conv1d) else y).reshape(-1, out)
        assert torch.allclose(product, expected, atol=1e-10)
    assert find_layer_kind(nn.MultiheadAttention(8, 2)).calibration_rows is None


def test_large_fan_ins_keep_sampled_rows_with_the_same_output_energy(monkeypatch):
    from hf_freqcompress import calibration

    rows = torch.randn(1, 50, 20, dtype=torch.float64)
    delta = torch.randn(1, 3, 20, dtype=torch.float64)
    gram = InputStats()
    gram.add(rows)
    monkeypatch.setattr(calibration, "MAX_GRAM_FEATURES", 10)
    sampled = InputStats()
    sampled.add(rows)
    assert gram.gram is not None and sampled.gram is None
    assert gram.energy(delta) == pytest.approx(sampled.energy(delta), rel=1e-12)


def test_seed_trials_choose_per_layer_and_reload_exactly(tmp_path):
    model = build_model("timm:mnist_lenet").eval()
    batches = [(torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(i)), torch.randint(0, 10, (8,)))
               for i in range(2)]
    single = [copy.deepcopy(model) for _ in range(3)]
    for trial_seed, copy_model in enumerate(single):
        compress(copy_model, budget="1/16", exclude=[], seed=10 + trial_seed, calibration=batches)
    report = compress(model, budget="1/16", exclude=[], seed=10, calibration=batches, seed_trials=3)
    assert report.calibration["seed_trials"] == 3
    for i, layer in enumerate(report.layers):
        candidates = [get_reports(m)[0].layers[i].output_error for m in single]
        assert layer.seed in (10, 11, 12) and layer.output_error == pytest.approx(min(candidates))
    x = batches[0][0]
    loaded = from_pretrained(save_pretrained(model, tmp_path / "ckpt"))
    assert [layer.seed for layer in get_reports(loaded)[0].layers] == [layer.seed for layer in report.layers]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def _untouched(model: nn.Module, before: dict) -> bool:
    return not compressed_weights(model) and all(p is before[name] for name, p in model.named_parameters())


@pytest.mark.parametrize("options, message", [
    ({"strategy": "sensitivity"}, "calibration="),
    ({"seed_trials": 3}, "calibration="),
    ({"seed_trials": 0, "calibration": [(torch.randn(2, 64), torch.zeros(2, dtype=torch.long))]}, "seed_trials"),
    ({"calibration": []}, "empty"),
    ({"calibration": torch.randn(4, 64)}, "iterable"),
    ({"calibration": [torch.randn(2, 64)]}, "pairs"),
    ({"calibration": [(torch.randn(2, 13), torch.zeros(2, dtype=torch.long))]}, "does not fit the model"),
    ({"calibration": [(torch.randn(2, 64), torch.zeros(2, dtype=torch.long))],
      "loss_fn": lambda out, y: out.sum() * float("nan")}, "non-finite"),
    ({"calibration": [(torch.randn(2, 64), torch.zeros(2, dtype=torch.long))], "loss_fn": 3}, "callable"),
])
def test_bad_calibration_input_is_a_clear_error_and_the_model_is_unchanged(mlp, options, message):
    before = dict(mlp.named_parameters())
    with pytest.raises((ValueError, TypeError), match=message):
        compress(mlp, budget="1/8", exclude=[], **options)
    assert _untouched(mlp, before)


def test_inputs_alone_with_a_loss_and_keyword_inputs():
    from conftest import tiny_gpt2

    model = tiny_gpt2().eval()
    batches = [{"input_ids": torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i))} for i in range(2)]
    data = calibration_data(batches, loss_fn=lambda out, _: out.logits.float().pow(2).mean())
    assert data.count == 2 and data.batches[0][1] is None
    report = compress(model, budget="1/8", calibration=[(b, b["input_ids"]) for b in batches])
    assert report.calibration["batches"] == 2
    assert any(layer.output_error is not None for layer in report.layers)


@pytest.mark.parametrize("method", ["freshnets", "hashednets"])
def test_output_aware_fit_of_convolutions(method):
    model = build_model("timm:mnist_lenet").eval()
    generator = torch.Generator().manual_seed(0)
    smooth = nn.functional.avg_pool2d(torch.randn(16, 1, 32, 32, generator=generator), 5, stride=1)  # 28 x 28
    batches = [(smooth[:8], torch.zeros(8, dtype=torch.long)), (smooth[8:], torch.zeros(8, dtype=torch.long))]
    plain, calibrated = copy.deepcopy(model), copy.deepcopy(model)
    compress(plain, budget="1/8", method=method, exclude=[], seed=2)
    compress(calibrated, budget="1/8", method=method, exclude=[], seed=2, calibration=batches)
    with torch.no_grad():
        dense, a, b = model(smooth), plain(smooth), calibrated(smooth)
    assert (b - dense).norm() < 0.8 * (a - dense).norm()
