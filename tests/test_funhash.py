from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hf_freqcompress import FunHashConfig, compress, materialize
from hf_freqcompress.layers import find_layer_kind
from hf_freqcompress.methods.base import LayerSpec
from hf_freqcompress.methods.funhash import FunHashWeight
from hf_freqcompress.methods.hashednets import HashedNetsConfig, HashedNetsWeight


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def parametrization(model: nn.Module, index: int) -> FunHashWeight:
    return model[index].parametrizations.weight[0]


def build(shape: tuple[int, ...], values: int, config: FunHashConfig, module: nn.Module | None = None):
    module = module or nn.Linear(shape[1], shape[0], bias=False)
    spec = LayerSpec("layer.weight", "linear", shape)
    return FunHashWeight(spec, find_layer_kind(module), config, values, seed=3)


def test_one_hash_with_sum_is_hashednets_bit_for_bit():
    hashed, funhash = mlp(), mlp()
    report_h = compress(hashed, "1/8", "hashednets", exclude=[], seed=5)
    report_f = compress(funhash, "1/8", FunHashConfig(num_hashes=1, reconstruction="sum"), exclude=[], seed=5)
    assert report_f.stored_values == report_h.stored_values
    for i in (0, 2, 4):
        funhash_index = parametrization(funhash, i)._source(0).materialize(None)
        assert torch.equal(funhash_index, hashed[i].parametrizations.weight[0].index_source().materialize(None))
        assert torch.equal(funhash[i].parametrizations.weight.original, hashed[i].parametrizations.weight.original)
        assert torch.equal(funhash[i].weight, hashed[i].weight)
    x = torch.randn(7, 64)
    assert torch.equal(funhash(x), hashed(x))


def test_one_hash_linear_g_starts_as_hashednets_with_the_same_buckets():
    shape, buckets = (40, 30), 97
    funhash = build(shape, buckets + 1, FunHashConfig(num_hashes=1, reconstruction="linear"))  # + g's one weight
    spec = LayerSpec("layer.weight", "linear", shape)
    hashed = HashedNetsWeight(spec, find_layer_kind(nn.Linear(30, 40)), HashedNetsConfig(), buckets, seed=3)
    weight = torch.randn(shape)
    assert funhash.space_size == hashed.buckets
    assert torch.equal(funhash.project(weight), hashed.project(weight))
    values = torch.randn(buckets)
    assert torch.equal(funhash.reconstruct(values), hashed.reconstruct(values))


def test_hashes_differ_and_g_sees_them_in_order():
    layer = build((50, 40), 300, FunHashConfig(num_hashes=3, reconstruction="linear"))
    index = torch.stack([layer._source(u).materialize(None) for u in range(3)])
    assert index.shape == (3, 2000) and index.dtype == torch.int32
    assert (index[0] != index[1]).float().mean() > 0.9 and (index[1] != index[2]).float().mean() > 0.9
    values = torch.randn(layer.space_size)
    with torch.no_grad():
        layer.g.weight.copy_(torch.tensor([1.0, 0.0, 0.0]))
        first = layer.reconstruct(values)
        layer.g.weight.copy_(torch.tensor([0.0, 0.0, 1.0]))
        last = layer.reconstruct(values)
    signed = torch.cat([values, -values])
    assert torch.equal(first.reshape(-1), signed[index[0].long()])
    assert torch.equal(last.reshape(-1), signed[index[2].long()])


@pytest.mark.parametrize("reconstruction", ["mlp", "linear"])
def test_gradients_reach_the_values_and_every_parameter_of_g(reconstruction):
    model = mlp()
    compress(model, "1/8", FunHashConfig(reconstruction=reconstruction), exclude=[])
    model(torch.randn(5, 64)).pow(2).sum().backward()
    for i in (0, 2, 4):
        assert model[i].parametrizations.weight.original.grad.abs().sum() > 0
        for name, param in parametrization(model, i).g.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_compress_is_deterministic_and_seeded():
    states = []
    for seed in (0, 0, 1):
        model = mlp()
        compress(model, "1/16", FunHashConfig(), exclude=[], seed=seed)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    key = "0.parametrizations.weight.0.g.hidden"
    assert not torch.equal(states[0][key], states[2][key])


def test_every_stored_number_counts_and_the_budget_holds():
    model = mlp()
    dense = sum(model[i].weight.numel() for i in (0, 2, 4))
    report = compress(model, "1/16", FunHashConfig(), exclude=[])
    added = sum(t.numel() for name, t in model.state_dict().items() if "parametrizations" in name)
    g_values = FunHashConfig().g_values
    assert g_values == 4 * 2 + 2  # W1 (2x4) and w2 (2)
    assert report.stored_values == added <= dense // 16
    assert all(row.stored_values == parametrization(model, i).space_size + g_values
               for row, i in zip(report.layers, (0, 2, 4)))
    with pytest.raises(ValueError, match="smallest feasible"):
        compress(mlp(), 3 * g_values, FunHashConfig(), exclude=[])


def test_projection_recovers_a_weight_the_space_can_represent():
    layer = build((60, 50), 400, FunHashConfig(num_hashes=4, reconstruction="linear"))
    target = layer.reconstruct(torch.randn(layer.space_size)).detach()
    rebuilt = layer.reconstruct(layer.project(target))
    assert torch.linalg.vector_norm(rebuilt - target) / torch.linalg.vector_norm(target) < 1e-4


def test_projection_is_least_squares():
    layer = build((60, 50), 400, FunHashConfig(num_hashes=4, reconstruction="linear"))
    weight = torch.randn(60, 50, dtype=torch.float64)
    layer.g.double()
    values = layer.project(weight).requires_grad_(True)
    loss = (layer.reconstruct(values) - weight).pow(2).sum()
    (gradient,) = torch.autograd.grad(loss, values)
    assert gradient.abs().max() < 1e-6 * weight.abs().max()


def test_recomputed_indices_match_the_cache():
    cached = build((30, 20), 100, FunHashConfig(cache_indices=True))
    fresh = build((30, 20), 100, FunHashConfig())
    assert fresh.signed_index is None and fresh.cache_bytes() == 0
    assert cached.cache_bytes() == 4 * 4 * 600
    values = torch.randn(cached.space_size)
    assert torch.equal(cached.reconstruct(values), fresh.reconstruct(values))


def test_backward_keeps_no_copy_per_hash():
    """Saved activations stay at (H + 1) weight-sized tensors, not U; no index is kept (it is hashed again)."""
    layer = build((100, 100), 500, FunHashConfig(num_hashes=8, reconstruction="mlp"))
    values = torch.randn(layer.space_size, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer.reconstruct(values)
    hidden = FunHashConfig(num_hashes=8).hidden_units
    assert sum(saved.values()) <= (hidden + 1) * 10_000 * 4 + 8 * 2 * 500 * 4


def test_frequency_domain_hashes_kernel_dct_coefficients():
    from hf_freqcompress.dct import idct

    conv = nn.Conv2d(8, 16, 3)
    spec = LayerSpec("conv.weight", "conv2d", (16, 8, 3, 3))
    kind = find_layer_kind(conv)
    plain = FunHashWeight(spec, kind, FunHashConfig(reconstruction="linear"), 200, seed=0)
    spectral = FunHashWeight(spec, kind, FunHashConfig(reconstruction="linear", frequency_domain=True), 200, seed=0)
    values = torch.randn(plain.space_size)
    assert torch.allclose(spectral.reconstruct(values), idct(plain.reconstruct(values), (2, 3)), atol=1e-6)
    target = spectral.reconstruct(values).detach()
    assert torch.allclose(spectral.reconstruct(spectral.project(target)), target, atol=1e-4)
    linear = build((20, 10), 50, FunHashConfig(frequency_domain=True))
    assert torch.equal(linear.reconstruct(values[:40]), build((20, 10), 50, FunHashConfig()).reconstruct(values[:40]))


def test_shared_space_is_one_parameter_stored_once():
    model = mlp()
    report = compress(model, "1/16", FunHashConfig(shared_space=True), exclude=[])
    space_keys = [k for k in model.state_dict() if k.endswith(".space")]
    assert space_keys == ["0.parametrizations.weight.0.space"]
    space = model.state_dict()[space_keys[0]]
    layers = [parametrization(model, i) for i in (0, 2, 4)]
    assert all(layer.space_size == space.numel() for layer in layers)
    added = sum(t.numel() for name, t in model.state_dict().items() if "parametrizations" in name)
    assert report.stored_values == added == space.numel() + 3 * FunHashConfig().g_values
    assert report.stored_values <= report.dense_values // 16
    model(torch.randn(3, 64)).sum().backward()
    assert layers[0].space.grad.abs().sum() > 0
    # every layer reads the one space: changing it moves all three weights
    before = [model[i].weight.detach().clone() for i in (0, 2, 4)]
    with torch.no_grad():
        layers[0].space.mul_(2)
    assert all(not torch.allclose(model[i].weight, w) for i, w in zip((0, 2, 4), before))


def test_shared_space_survives_copy_and_materialize_and_refuses_assignment():
    model = mlp()
    compress(model, "1/16", FunHashConfig(shared_space=True), exclude=[])
    x = torch.randn(4, 64)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        parametrization(clone, 0).space.zero_()
    assert not torch.equal(clone(x), model(x))  # the copy's layers follow the copy's space
    expected = model(x)
    with pytest.raises(ValueError, match="shared by every compressed layer"):
        model[2].weight = torch.randn(64, 128)
    assert torch.allclose(materialize(model)(x), expected)


def test_config_is_validated():
    with pytest.raises(ValueError, match="num_hashes"):
        FunHashConfig(num_hashes=0)
    with pytest.raises(ValueError, match="reconstruction"):
        FunHashConfig(reconstruction="relu")
    assert FunHashConfig.from_dict(FunHashConfig(num_hashes=2).to_dict()) == FunHashConfig(num_hashes=2)


def test_mlp_projection_puts_tanh_in_its_curved_range_and_refines_the_fit():
    import hf_freqcompress.methods.funhash as funhash

    weight = torch.randn(120, 80) * 0.05
    errors = {}
    for steps in (0, 1):
        funhash._GAUSS_NEWTON_STEPS, saved = steps, funhash._GAUSS_NEWTON_STEPS
        try:
            layer = build((120, 80), 2000, FunHashConfig())
            slope_at_init = layer.g.slope(weight)
            values = layer.project(weight)
        finally:
            funhash._GAUSS_NEWTON_STEPS = saved
        with torch.no_grad():
            rms = float(torch.stack(layer._columns(values)).pow(2).mean().sqrt())
            errors[steps] = float(torch.linalg.vector_norm(layer.reconstruct(values) - weight) / weight.norm())
        assert torch.allclose(layer.g.slope(weight), slope_at_init)  # normalising keeps g's slope at 0
        assert 0.5 < rms < 3.0
    assert errors[1] < errors[0] < 1
