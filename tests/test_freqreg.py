"""Frequency Regularization: zigzag prefix storage, least squares, the drop schedule, finalize and resume."""

from __future__ import annotations

import math

import pytest
import scipy.fft
import timm
import torch
from torch import nn

import hf_freqcompress as hf
from hf_freqcompress import FreqRegConfig, compress
from hf_freqcompress.dct import dct_corner, idct_corner, zigzag_order
from hf_freqcompress.methods import compressed_weights
from hf_freqcompress.methods.freqreg import (
    PAPER_CONV_FLOOR,
    PAPER_LINEAR_FLOOR,
    draw_coefficients,
    drop_rate_reaching,
    zigzag_prefix,
)

from conftest import tiny_hf_vit
from test_model_zoo import without_zero_init


def global_positions(shape, count) -> torch.Tensor:
    """zigzag_prefix's box-local positions mapped back to flat indices of the whole tensor."""
    box, local = zigzag_prefix(shape, count)
    index = torch.unravel_index(local.long(), box)
    flat = torch.zeros_like(index[0])
    for i, n in zip(index, shape):
        flat = flat * n + i
    return flat


@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (1, 40), (4, 5, 3), (5, 4, 3, 3), (8, 1, 5, 5), (3, 2, 4, 1, 2)])
def test_prefix_is_the_zigzag_order_prefix(shape):
    # zigzag_order itself is checked against a brute-force sort in test_dct.py
    numel = math.prod(shape)
    for count in sorted({1, 2, 3, 7, numel // 3, numel - 1, numel} - {0}):
        assert torch.equal(global_positions(shape, count), zigzag_order(shape)[:count])


def test_prefix_box_is_the_tight_low_frequency_corner():
    box, positions = zigzag_prefix((4096, 4096), 300)
    assert box == (24, 24) and positions.dtype == torch.int32  # 24 * 25 / 2 = 300 positions with sum <= 23
    box, _ = zigzag_prefix((128, 8, 5, 5), 128)
    assert max(box) <= 6  # 126 positions have index sum <= 5


@pytest.mark.parametrize("shape", [(5, 7, 3, 3), (9, 2, 1, 4), (12, 20), (3, 8, 5)])
def test_corner_transforms_match_scipy(shape):
    x = torch.randn(shape, dtype=torch.float64)
    corner = tuple(max(1, n // 2) for n in shape)
    spectrum = scipy.fft.dctn(x.numpy(), norm="ortho")
    crop = tuple(slice(0, b) for b in corner)
    torch.testing.assert_close(dct_corner(x, corner), torch.from_numpy(spectrum[crop]), rtol=0, atol=1e-12)
    padded = torch.zeros(shape, dtype=torch.float64)
    padded[crop] = dct_corner(x, corner)
    expected = torch.from_numpy(scipy.fft.idctn(padded.numpy(), norm="ortho"))
    torch.testing.assert_close(idct_corner(dct_corner(x, corner), shape), expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="does not fit"):
        idct_corner(x, tuple(n - 1 for n in shape))


def compressed(layer: nn.Module, budget, **config) -> nn.Parameter:
    model = nn.Sequential(layer)
    compress(model, budget=budget, method=FreqRegConfig(**config), exclude=[])
    return model[0].parametrizations.weight.original


@pytest.mark.parametrize("layer", [nn.Linear(20, 12), nn.Conv2d(6, 8, (3, 2), groups=2), nn.Conv1d(3, 5, 4)])
def test_prefix_only_tensor_round_trips_exactly(layer):
    layer = layer.double()
    shape, count = tuple(layer.weight.shape), 23
    spectrum = torch.zeros(math.prod(shape), dtype=torch.float64)
    values = torch.randn(count, dtype=torch.float64)
    spectrum[zigzag_order(shape)[:count]] = values
    weight = torch.from_numpy(scipy.fft.idctn(spectrum.view(shape).numpy(), norm="ortho"))
    with torch.no_grad():
        layer.weight.copy_(weight)
    original = compressed(layer, count)
    assert original.numel() == count
    torch.testing.assert_close(original.detach(), values, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.weight.detach(), weight, rtol=0, atol=1e-12)


def test_projection_is_the_least_squares_truncation():
    layer = nn.Conv2d(4, 6, 3).double()
    dense = layer.weight.detach().clone()
    original = compressed(layer, 40)
    spectrum = torch.from_numpy(scipy.fft.dctn(dense.numpy(), norm="ortho")).reshape(-1)
    torch.testing.assert_close(original.detach(), spectrum[zigzag_order(dense.shape)[:40]], rtol=0, atol=1e-12)
    # orthonormal basis: the residual is exactly the energy of the dropped coefficients
    residual = (layer.weight.detach() - dense).norm() ** 2
    torch.testing.assert_close(residual, spectrum.norm() ** 2 - original.detach().norm() ** 2, rtol=1e-9, atol=1e-12)


def test_gradients_reach_every_coefficient_and_dtype_is_kept():
    layer = nn.Linear(30, 16).half()
    original = compressed(layer, 50)
    assert original.dtype == torch.float16 and layer.weight.dtype == torch.float16
    layer.float()
    layer(torch.randn(4, 30)).square().sum().backward()
    assert original.grad is not None and bool((original.grad != 0).all())


def test_planner_floors_and_the_lenet5_budget():
    lenet = nn.Sequential(nn.Conv2d(1, 8, 5), nn.Conv2d(8, 128, 5), nn.Flatten(), nn.Linear(2048, 196), nn.Linear(196, 10))
    paper = FreqRegConfig(conv_floor=PAPER_CONV_FLOOR, linear_floor=PAPER_LINEAR_FLOOR)
    report = compress(lenet, budget=776, method=paper, exclude=[], storage_dtype="float16")
    assert [layer.stored_values for layer in report.layers] == [128, 128, 264, 256]
    assert report.stored_values == 776 and report.stored_bytes == 776 * 2
    small = nn.Sequential(nn.Conv2d(1, 8, 5), nn.Linear(196, 10))
    with pytest.raises(ValueError, match="smallest feasible budget is 384"):
        compress(small, budget=300, method=paper, exclude=[])
    with pytest.raises(ValueError, match="drop_rate"):
        FreqRegConfig(drop_rate=1.0)


def test_draw_coefficients_is_the_from_scratch_init():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    dense_norm = float(model[0].weight.detach().norm())
    compress(model, budget=600, method="freqreg", targets=["0"], exclude=[])
    head, bias = model[2].weight.detach().clone(), model[0].bias.detach().clone()
    projected = model[0].parametrizations.weight.original.detach().clone()
    assert draw_coefficients(model, std=0.1, seed=3) == 600
    drawn = model[0].parametrizations.weight.original.detach()
    assert drawn.shape == projected.shape and 0.09 < float(drawn.std()) < 0.11
    assert float(projected.norm()) < 0.2 * dense_norm  # compress() keeps ~sqrt(600 / 32768) of the init's norm
    assert torch.equal(model[2].weight, head) and torch.equal(model[0].bias, bias)  # other layers, biases untouched
    draw_coefficients(model, std=0.1, seed=3)
    assert torch.equal(model[0].parametrizations.weight.original, drawn)  # the seed fixes the draw
    with pytest.raises(ValueError, match="std > 0"):
        draw_coefficients(model, std=0.0)
    with pytest.raises(ValueError, match="no freqreg layer"):
        draw_coefficients(nn.Sequential(nn.Linear(4, 4)))


def scheduled_mlp(steps: int) -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 10))
    gap = 32 * 24  # the largest start - final gap is below this
    report = compress(model, budget=120, method=FreqRegConfig(drop_rate=drop_rate_reaching(gap, steps)), exclude=[])
    return model, report


def layers_of(model):
    return [model[0].parametrizations.weight, model[2].parametrizations.weight]


def train(model, steps: range, x, y) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in steps:
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        hf.on_train_step(model, step)


def test_schedule_reaches_the_budget_then_finalize_shrinks_storage():
    model, report = scheduled_mlp(steps=40)
    stored = [chain.original for chain in layers_of(model)]
    finals = [layer.stored_values for layer in report.layers]
    assert sum(finals) == 120 and report.stored_values == 120  # the report counts the final prefix
    assert [p.numel() for p in stored] == [32 * 24, 10 * 32]  # the schedule starts from the whole tensor
    x, y = torch.randn(16, 24), torch.randint(0, 10, (16,))
    history = []
    for step in range(1, 41):
        train(model, range(step, step + 1), x, y)
        history.append([int(chain[0].kept) for chain in layers_of(model)])
    for layer, final in enumerate(finals):
        counts = [row[layer] for row in history]
        assert counts == sorted(counts, reverse=True) and counts[0] > final and counts[-1] == final
        parametrization = layers_of(model)[layer][0]
        assert counts[9] == final + math.floor((parametrization.start - final) * (1 - model_rate(model)) ** 10)
    assert history[-2][0] > finals[0]  # the largest layer needs all 40 steps
    # the scatter layout followed `kept` down (the corner IDCT shrinks), storage did not
    assert layers_of(model)[0][0].positions.numel() < 32 * 24 and stored[0].numel() == 32 * 24
    reference = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 10))
    reference.load_state_dict(materialized_state(model))
    torch.testing.assert_close(reference(x), model(x), rtol=0, atol=1e-6)
    # coefficients past `kept` take no part: zero gradient
    model.zero_grad()
    model(x).sum().backward()
    assert all(bool((p.grad[final:] == 0).all()) for p, final in zip(stored, finals))
    before = model(x).detach()
    hf.finalize(model)
    assert [p.numel() for p in stored] == finals and all(p.grad is None for p in stored)
    assert [model.state_dict()[f"{i}.parametrizations.weight.original"].numel() for i in (0, 2)] == finals
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)


def materialized_state(model) -> dict:
    """Dense weights from the naive formula: zigzag prefix of `kept` into a full spectrum, scipy IDCT."""
    state = {}
    for i, chain in zip((0, 2), layers_of(model)):
        shape, kept = chain[0].spec.shape, int(chain[0].kept)
        spectrum = torch.zeros(math.prod(shape), dtype=torch.float64)
        spectrum[zigzag_order(shape)[:kept]] = chain.original.detach()[:kept].double()
        state[f"{i}.weight"] = torch.from_numpy(scipy.fft.idctn(spectrum.view(shape).numpy(), norm="ortho")).float()
        state[f"{i}.bias"] = model[i].bias.detach()
    return state


def model_rate(model) -> float:
    return layers_of(model)[0][0].config.drop_rate


def test_resume_mid_schedule_continues_exactly():
    x, y = torch.randn(16, 24), torch.randint(0, 10, (16,))
    model, _ = scheduled_mlp(steps=30)
    train(model, range(1, 11), x, y)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    resumed, _ = scheduled_mlp(steps=30)
    resumed.load_state_dict(state)
    assert [int(c[0].kept) for c in layers_of(resumed)] == [int(c[0].kept) for c in layers_of(model)]
    torch.testing.assert_close(resumed(x), model(x), rtol=0, atol=0)
    train(model, range(11, 31), x, y)
    train(resumed, range(11, 31), x, y)
    torch.testing.assert_close(resumed(x), model(x), rtol=0, atol=0)
    # stepping an older step never regrows the kept count
    hf.on_train_step(resumed, 0)
    assert [int(c[0].kept) for c in layers_of(resumed)] == [int(c[0].kept) for c in layers_of(model)]


def test_finalized_checkpoint_loads_into_a_fresh_scheduled_model():
    x = torch.randn(4, 24)
    model, _ = scheduled_mlp(steps=5)
    hf.on_train_step(model, 5)
    hf.finalize(model)
    fresh, _ = scheduled_mlp(steps=5)
    hf.finalize(fresh)  # the same final layout, then the checkpoint fits
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    # a loader that adopts the checkpoint's storage shape (as save/load does) works too
    adopted, _ = scheduled_mlp(steps=5)
    for chain, source in zip(layers_of(adopted), layers_of(model)):
        chain.original.data = source.original.detach().clone()
        chain[0].kept.copy_(source[0].kept)
    torch.testing.assert_close(adopted(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="keeps"):
        layers_of(adopted)[0].original.data = torch.zeros(7)
        adopted(x)


def test_cache_is_int32_positions_non_persistent():
    layer = nn.Linear(64, 48)
    compressed(layer, 100)
    parametrization = layer.parametrizations.weight[0]
    assert parametrization.positions.dtype == torch.int32 and parametrization.cache_bytes() == 100 * 4
    assert set(nn.Sequential(layer).state_dict()) == {"0.bias", "0.parametrizations.weight.original", "0.parametrizations.weight.0.kept"}


# vgg11's pre_logits is a 102.8M-weight 7x7 conv: compress() alone takes ~20 s on one core (most of it the
# float64 error check), too slow for a unit test, so vgg11 is tested on its conv features.
ZOO = {
    "resnet18": lambda: timm.create_model("resnet18", pretrained=False, num_classes=10),
    "vgg11": lambda: timm.create_model("vgg11", pretrained=False, num_classes=10),
    "vit_tiny": lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32),
    "hf_vit": tiny_hf_vit,
}


@pytest.mark.parametrize("name", list(ZOO))
def test_model_zoo_forward_backward(name):
    model = without_zero_init(ZOO[name]())
    targets = "features" if name == "vgg11" else None
    report = compress(model, budget="1/256", method="freqreg", targets=targets)
    assert 0.99 * (report.dense_values // 256) <= report.stored_values <= report.dense_values // 256
    out = model(torch.randn(2, 3, 32, 32))
    out = out if isinstance(out, torch.Tensor) else out.logits
    out.square().mean().backward()
    stored = [module.parametrizations[param].original for _, module, param, _ in compressed_weights(model)]
    assert sum(p.numel() for p in stored) == report.stored_values
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in stored)
