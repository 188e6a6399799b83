"""binary_stack (SLBF): storage formula, packing, both forward paths, STE gradients, freezing, model zoo."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from hf_freqcompress import BinaryStackConfig, compress, finalize, on_train_step
from hf_freqcompress.methods.binary_stack import BinaryStackWeight, bank_sizes
from hf_freqcompress.methods.binary_stack_forward import binary_stack_conv2d, choose_conv_forward, split_forward_layers
from hf_freqcompress.packing import pack_bits, unpack_bits
from hf_freqcompress.methods import compressed_weights


def parametrization(module: nn.Module) -> BinaryStackWeight:
    return module.parametrizations.weight[0]


def compressed_conv(conv: nn.Module, budget="1/8", **options) -> tuple[nn.Sequential, BinaryStackWeight]:
    model = nn.Sequential(conv)
    compress(model, budget=budget, method=BinaryStackConfig(**options), targets=["0"])
    return model, parametrization(model[0])


# -- packing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,count", [(1, 13), (3, 7), (6, 100), (8, 5), (11, 9), (32, 3), (5, 0)])
def test_pack_bits_round_trip_and_exact_size(bits, count):
    values = torch.randint(0, 2**bits, (count,), dtype=torch.int64)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, count), values)


def test_pack_bits_layout_is_lsb_first():
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).tolist() == [0b1101, 1]
    assert pack_bits(torch.tensor([5, 3]), 3).tolist() == [5 | 3 << 3]


def test_pack_bits_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        pack_bits(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="truncated"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 3, 8)
    with pytest.raises(TypeError):
        pack_bits(torch.tensor([0.5]), 3)


# -- planning and storage --------------------------------------------------------------------


def test_stored_bits_match_the_formula_and_the_packed_bytes():
    model = nn.Sequential(nn.Conv2d(32, 64, 3), nn.Conv2d(64, 48, 3))
    report = compress(model, budget="1/40", method=BinaryStackConfig(bank_size=64, depth=8), targets=["0", "1"])
    total_bytes = 0
    for row, conv in zip(report.layers, model):
        p = parametrization(conv)
        n, c, kh, kw = row.shape
        m, d = p.layout.bank_size, p.layout.depth
        assert d == 8 and m in (32, 64)
        expected = m * d * kh * kw + n * (c // d) * math.ceil(math.log2(m)) + n * 32
        assert row.stored_bits == expected
        assert row.stored_values == m * d * kh * kw + n * (c // d) + n
        assert row.stored_values <= row.dense_values / 40 * 32  # the allocation counts float32 values of 32 bits
        packed = p.pack(conv.parametrizations.weight.original, torch.float32)
        layer_bytes = sum(t.numel() * t.element_size() for t in packed.values())
        assert layer_bytes == math.ceil(expected / 8)
        total_bytes += layer_bytes
    assert report.stored_bytes == total_bytes
    # the budget in bits is respected: planned values * storage bits
    assert sum(r.stored_bits for r in report.layers) <= (report.dense_values // 40) * 32


def test_bank_size_is_the_largest_power_of_two_that_fits():
    _, p = compressed_conv(nn.Conv2d(64, 64, 3), budget="1/16", bank_size=1000)
    layout = p.layout
    assert layout.bank_size & (layout.bank_size - 1) == 0
    bigger = type(layout)(**{**layout.__dict__, "bank_size": layout.bank_size * 2})
    assert bigger.planned_values > 64 * 64 * 9 // 16 >= layout.planned_values


def test_bank_is_capped_by_slices_and_patterns():
    spec_conv = nn.Conv2d(4, 8, 1)  # D = 4: only 16 binary patterns, 8 slices
    _, p = compressed_conv(spec_conv, budget=1.0, bank_size=256, depth=4)
    assert p.layout.bank_size == 8
    assert bank_sizes(p.spec, p.config) == [2, 4, 8]


@pytest.mark.parametrize("channels,depth,expected", [(1, 8, 1), (3, 8, 3), (12, 8, 6), (7, 4, 1), (64, 8, 8)])
def test_depth_falls_back_to_the_largest_divisor(channels, depth, expected):
    _, p = compressed_conv(nn.Conv2d(channels, 16, 3), budget=1.0, depth=depth)
    assert p.layout.depth == expected and p.layout.slices * expected == channels


def test_infeasible_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="smallest feasible budget"):
        compressed_conv(nn.Conv2d(64, 64, 3), budget=10)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="scale"):
        BinaryStackConfig(scale="channel")
    with pytest.raises(ValueError, match="bank_size"):
        BinaryStackConfig(bank_size=1)


# -- projection, reconstruction, gradients -------------------------------------------------------


def test_projection_recovers_an_exactly_representable_weight():
    bank = torch.randint(0, 2, (2, 4, 3, 3)).float() * 2 - 1
    choice = torch.randint(0, 2, (16, 2))
    scales = torch.rand(16, 1, 1) + 0.5
    weight = (bank[choice] * scales[..., None, None]).reshape(16, 8, 3, 3)
    conv = nn.Conv2d(8, 16, 3, bias=False)
    conv.weight.data.copy_(weight)
    report = compress(nn.Sequential(conv), budget=1.0, method=BinaryStackConfig(bank_size=4, depth=4), targets=["0"])
    assert report.layers[0].rel_error < 1e-6


@pytest.mark.parametrize("scale", ["filter", "layer", "slice"])
def test_weight_is_scaled_stack_of_selected_bank_filters(scale):
    model, p = compressed_conv(nn.Conv2d(16, 8, 3), scale=scale, bank_size=8)
    original = model[0].parametrizations.weight.original
    bank = torch.where(original >= 0, 1.0, -1.0)
    expected = bank[p.selection()] * p.slice_scales()[..., None, None, None]
    assert torch.equal(model[0].weight, expected.reshape(8, 16, 3, 3))
    assert set(original.sign().unique().tolist()) <= {-1.0, 1.0}


def test_straight_through_gradients_reach_bank_scales_and_logits():
    model, p = compressed_conv(nn.Conv2d(16, 32, 3, padding=1), bank_size=16)
    original = model[0].parametrizations.weight.original
    model(torch.randn(2, 16, 8, 8)).square().mean().backward()
    for tensor in (original, p.scale, p.logits):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0
    # the logits' gradient is the softmax-weighted correlation with every bank filter, not just the chosen one
    assert (p.logits.grad != 0).float().mean() > 0.5


def test_training_forward_equals_hard_forward():
    model, p = compressed_conv(nn.Conv2d(16, 32, 3), bank_size=16)
    with torch.no_grad():
        p.logits.normal_()
    trained = model[0].weight  # grad enabled: straight-through path
    with torch.no_grad():
        hard = model[0].weight  # gather path
    assert torch.equal(trained, hard)


# -- freezing, schedule, state dict ------------------------------------------------------------


def test_finalize_freezes_the_selection_into_indices():
    model, p = compressed_conv(nn.Conv2d(16, 32, 3), bank_size=16)
    report = compress(nn.Sequential(nn.Conv2d(16, 32, 3)), budget="1/8", method="binary_stack", targets=["0"])
    assert report.training_values == report.layers[0].training_values > 0
    assert "training-only" in str(report)
    with torch.no_grad():
        p.logits.normal_()
        before = model[0].weight.clone()
    finalize(model)
    state = model.state_dict()
    assert not any("logits" in key for key in state)
    assert not any(name.endswith("logits") for name, _ in model.named_parameters())
    assert p.frozen and p.indices is None  # packed: decoded from the stream on every use, never kept
    assert "0.parametrizations.weight.0.indices" not in state
    assert torch.equal(model[0].weight, before)
    assert p.training_values() == 0


def test_finalized_state_holds_exactly_the_packed_stream_and_scales():
    model, p = compressed_conv(nn.Conv2d(16, 32, 3), bank_size=16)
    before = model[0].weight.detach().clone()
    finalize(model)
    state = model.state_dict()
    prefix = "0.parametrizations.weight."
    assert state[prefix + "original"].numel() == 0
    assert state[prefix + "0.packed"].dtype == torch.uint8
    assert state[prefix + "0.packed"].numel() == -(-p.layout.stream_bits // 8)
    stored = {k: v for k, v in state.items() if k.startswith(prefix)}
    stored_bits = sum(v.numel() * v.element_size() * 8 for v in stored.values())
    assert stored_bits - p.layout.stored_bits() < 8  # the stream rounds up to whole bytes
    assert torch.equal(model[0].weight, before)


def test_frozen_state_dict_loads_into_a_fresh_compressed_model():
    model, p = compressed_conv(nn.Conv2d(16, 32, 3), bank_size=16)
    p.freeze()  # frozen, not yet packed: the state holds indices and the latent bank
    fresh, fresh_p = compressed_conv(nn.Conv2d(16, 32, 3), bank_size=16)
    assert not fresh_p.frozen
    fresh.load_state_dict(model.state_dict())
    assert fresh_p.frozen and torch.equal(fresh[0].weight, model[0].weight)


def test_packed_state_dict_loads_into_a_finalized_model():
    model, _ = compressed_conv(nn.Conv2d(16, 32, 3), bank_size=16)
    finalize(model)
    fresh, fresh_p = compressed_conv(nn.Conv2d(16, 32, 3), bank_size=16)
    finalize(fresh)
    assert not torch.equal(fresh[0].weight, model[0].weight)
    fresh.load_state_dict(model.state_dict())
    assert fresh_p.is_packed and torch.equal(fresh[0].weight, model[0].weight)


def test_temperature_anneals_and_selection_freezes_on_schedule():
    model, p = compressed_conv(nn.Conv2d(16, 32, 3), temperature=1.0, final_temperature=0.01, anneal_steps=10, freeze_step=20)
    on_train_step(model, 5)
    assert p.temperature == pytest.approx(0.1)
    on_train_step(model, 19)
    assert p.temperature == pytest.approx(0.01) and not p.frozen
    on_train_step(model, 20)
    assert p.frozen


def test_packed_format_round_trips():
    model, p = compressed_conv(nn.Conv2d(24, 32, 3), bank_size=16, scale="slice", depth=8)
    with torch.no_grad():
        p.logits.normal_()
        p.scale.normal_()
    packed = p.pack(model[0].parametrizations.weight.original)
    fresh, fresh_p = compressed_conv(nn.Conv2d(24, 32, 3), bank_size=16, scale="slice", depth=8)
    with torch.no_grad():
        fresh[0].parametrizations.weight.original.copy_(fresh_p.unpack(packed))
    assert torch.equal(fresh[0].weight, model[0].weight)
    corrupt = {**packed, "bits": packed["bits"][:-1]}
    with pytest.raises(ValueError, match="truncated"):
        fresh_p.unpack(corrupt)


# -- path (b): split-transform-merge ------------------------------------------------------------------

CONVS = {
    "plain": lambda: nn.Conv2d(16, 24, 3, padding=1),
    "strided_dilated": lambda: nn.Conv2d(16, 24, 3, stride=2, padding=2, dilation=2, bias=False),
    "grouped": lambda: nn.Conv2d(16, 24, 3, padding=1, groups=2),
    "depthwise": lambda: nn.Conv2d(16, 16, 3, padding=1, groups=16),
    "pointwise": lambda: nn.Conv2d(16, 24, 1),
    "reflect_rect": lambda: nn.Conv2d(12, 8, (3, 5), padding=(1, 2), padding_mode="reflect"),
    "same": lambda: nn.Conv2d(16, 8, 3, padding="same"),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_split_transform_merge_equals_materialized_forward(name):
    model, p = compressed_conv(CONVS[name](), budget=0.5, bank_size=8, depth=4, scale="slice")
    p.freeze()  # selections frozen, bank still a trainable latent
    x = torch.randn(3, model[0].in_channels, 9, 10)
    expected = model(x)
    got = binary_stack_conv2d(x, p, model[0])
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    got.square().sum().backward()  # path (b) trains the bank and scales too
    assert model[0].parametrizations.weight.original.grad.abs().sum() > 0 and p.scale.grad.abs().sum() > 0
    finalize(model)  # the packed form decodes the same bank
    with torch.no_grad():
        torch.testing.assert_close(binary_stack_conv2d(x, p, model[0]), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_choose_conv_forward_installs_and_removes_the_split_path():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    compress(model, budget="1/4", method=BinaryStackConfig(bank_size=8), targets=["0", "2"])
    x = torch.randn(2, 8, 6, 6)
    with pytest.raises(ValueError, match="finalize"):
        choose_conv_forward(model, x, mode="autotune")
    finalize(model)
    expected = model(x)
    choices = choose_conv_forward(model, x, mode="split")
    assert [c.chosen for c in choices] == ["split", "split"]
    assert split_forward_layers(model) == ["0", "2"]
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    auto = choose_conv_forward(model, x, mode="autotune")
    assert all(c.chosen == ("split" if c.split_ms < c.materialize_ms else "materialize") for c in auto)
    choose_conv_forward(model, x, mode="materialize")
    assert split_forward_layers(model) == []


def test_split_path_refuses_custom_conv_forwards():
    from timm.layers import Conv2dSame

    model, p = compressed_conv(Conv2dSame(8, 8, 3), budget=1.0, bank_size=4)
    finalize(model)
    with pytest.raises(ValueError, match="Conv2dSame"):
        binary_stack_conv2d(torch.randn(1, 8, 5, 5), p, model[0])
    assert choose_conv_forward(model, torch.randn(1, 8, 5, 5), mode="autotune") == []


# -- model zoo: every conv layer of timm vgg16 and resnet18 -----------------------------------------------

ZOO = {
    # mlp_ratio shrinks the 7x7 and 1x1 pre-logits convs (102M weights at full size) to keep the test on CPU fast
    "vgg16": lambda: timm.create_model("vgg16", pretrained=False, num_classes=10, mlp_ratio=1 / 64),
    "resnet18": lambda: timm.create_model("resnet18", pretrained=False, num_classes=10, zero_init_last=False),  # zero-init blocks gradients at step 0
}


@pytest.mark.parametrize("name", list(ZOO))
def test_compresses_every_conv_of_timm_models(name):
    model = ZOO[name]()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    report = compress(model, budget="1/100", method=BinaryStackConfig(bank_size=16), targets=convs)
    assert len(report.layers) == len(convs) == len(compressed_weights(model))
    assert report.dense_values * 32 / sum(r.stored_bits for r in report.layers) >= 100
    x = torch.randn(2, 3, 32, 32)
    model(x).square().mean().backward()
    for _, module, _, p in compressed_weights(model):
        assert module.parametrizations.weight.original.grad.abs().sum() > 0
        assert p.logits.grad is not None
    finalize(model)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        choose_conv_forward(model, x, mode="split", repeats=1)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
