from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import json

from hf_freqcompress import FreshNetsConfig, HashedNetsConfig, compress, from_pretrained, save_pretrained
from hf_freqcompress.hashing import bucket_of, chunk_slices, hash32, layer_key, sign_bit
from hf_freqcompress.methods import resolve_config
from hf_freqcompress.methods.hashednets import AUTO_LOCALITY, LOCAL_ABOVE_BUCKETS
from hf_freqcompress.models import build_model


def folded_index(layer: nn.Module) -> torch.Tensor:
    """The folded index of every hashed unit of a compressed layer, cached or hashed now."""
    return layer.parametrizations.weight[0].index_source().materialize(None)


def naive_hashednets(values: torch.Tensor, shape, name: str, seed: int) -> torch.Tensor:
    """The paper's formula, one weight at a time: W[i] = sign(i) * v[h(i)]."""
    buckets = values.numel()
    index_key, sign_key = layer_key(seed, name, "index"), layer_key(seed, name, "sign")
    flat = torch.empty(int(torch.tensor(shape).prod()))
    for i in range(flat.numel()):
        position = torch.tensor([i])
        bucket = int(bucket_of(hash32(position, index_key), buckets))
        sign = -1.0 if int(sign_bit(hash32(position, sign_key))) else 1.0
        flat[i] = sign * values[bucket]
    return flat.view(shape)


def naive_local(values: torch.Tensor, shape, locality: int, name: str, seed: int) -> torch.Tensor:
    """Cache-local hashing one weight at a time, in Python ints: chunk c = i // L owns buckets
    [c L K // N, min((c + 1) L, N) K // N), and i hashes into that slice with the paper's hashes."""
    buckets = values.numel()
    numel = int(torch.tensor(shape).prod())
    chunk = max(locality, -(-numel // buckets))
    index_key, sign_key = layer_key(seed, name, "index"), layer_key(seed, name, "sign")
    flat = torch.empty(numel)
    for i in range(numel):
        start = i // chunk * chunk
        first, last = start * buckets // numel, min(start + chunk, numel) * buckets // numel
        hashed = int(hash32(torch.tensor([i]), index_key))
        sign = -1.0 if int(sign_bit(hash32(torch.tensor([i]), sign_key))) else 1.0
        flat[i] = sign * values[first + (hashed * (last - first) >> 32)]
    return flat.view(shape)


def naive_tiled(values: torch.Tensor, shape, block: int, name: str, seed: int, patterns: int = 1) -> torch.Tensor:
    """ROAST's layout one weight at a time: W[jB + t] = sign(j) * v[(h(j) B + t) mod K], R = ceil(K / B) rows;
    with P > 1 sign patterns also times r_p(j)[t], block j's pattern p(j) and its hashed sign at position t."""
    buckets = values.numel()
    rows = -(-buckets // block)
    index_key, sign_key = layer_key(seed, name, "index"), layer_key(seed, name, "sign")
    pattern_key, pattern_sign_key = layer_key(seed, name, "pattern"), layer_key(seed, name, "pattern_sign")
    flat = torch.empty(int(torch.tensor(shape).prod()))
    for i in range(flat.numel()):
        position = torch.tensor([i // block])
        row = int(bucket_of(hash32(position, index_key), rows))
        sign = -1.0 if int(sign_bit(hash32(position, sign_key))) else 1.0
        if patterns > 1:
            pattern = int(bucket_of(hash32(position, pattern_key), patterns))
            sign *= -1.0 if int(sign_bit(hash32(torch.tensor([pattern * block + i % block]), pattern_sign_key))) else 1.0
        flat[i] = sign * values[(row * block + i % block) % buckets]
    return flat.view(shape)


@pytest.mark.parametrize("layer", [nn.Linear(20, 12), nn.Conv2d(4, 6, (3, 2), groups=2)])
def test_matches_naive_reference(layer):
    model = nn.Sequential(layer)
    compress(model, budget=37, exclude=[])
    parametrization = model[0].parametrizations.weight
    values = parametrization.original
    expected = naive_hashednets(values.detach(), values.new_empty(0).new_zeros(layer.weight.shape).shape, "0.weight", 0)
    assert values.numel() == 37
    assert torch.equal(layer.weight.detach(), expected)


# budget 37 with blocks of 8: 5 rows, the last wrapping to v[0:3]; 240 weights = 30 blocks;
# (13, 7) = 91 weights ends in a partial block
@pytest.mark.parametrize("shape, block", [((12, 20), 8), ((13, 7), 8), ((12, 20), 64)])
def test_tiled_matches_naive_reference_and_keeps_the_budget(shape, block):
    layer = nn.Linear(shape[1], shape[0])
    report = compress(nn.Sequential(layer), budget=37, exclude=[], method=HashedNetsConfig(block_size=block))
    parametrization = layer.parametrizations.weight
    assert parametrization.original.numel() == report.stored_values == 37
    assert parametrization[0].index_source().units == -(-layer.weight.numel() // block)
    expected = naive_tiled(parametrization.original.detach(), shape, block, "0.weight", 0)
    assert torch.equal(layer.weight.detach(), expected)


@pytest.mark.parametrize("shape, block, patterns", [((12, 20), 8, 3), ((13, 7), 8, 4), ((12, 20), 64, 2)])
def test_sign_patterns_match_naive_reference(shape, block, patterns):
    layer = nn.Linear(shape[1], shape[0])
    config = HashedNetsConfig(block_size=block, sign_patterns=patterns)
    report = compress(nn.Sequential(layer), budget=37, exclude=[], method=config)
    parametrization = layer.parametrizations.weight
    assert parametrization.original.numel() == report.stored_values == 37  # patterns are hashed, not stored
    expected = naive_tiled(parametrization.original.detach(), shape, block, "0.weight", 0, patterns)
    assert torch.equal(layer.weight.detach(), expected)
    variants = {}
    for name, options in {"one_sign": {}, "uncached": {"sign_patterns": patterns, "cache_indices": False}}.items():
        variants[name] = nn.Linear(shape[1], shape[0])
        compress(nn.Sequential(variants[name]), budget=37, exclude=[], method=HashedNetsConfig(block_size=block, **options))
        with torch.no_grad():
            variants[name].parametrizations.weight.original.copy_(parametrization.original)
    assert torch.equal(variants["uncached"].weight, layer.weight)  # rehashing every forward gives the cached layout
    flips = (layer.weight / variants["one_sign"].weight).reshape(-1)  # r_p(j)[t] times +-1: same rows, same v
    flips = flips[: flips.numel() // block * block].view(-1, block)
    assert set(flips.unique().tolist()) == {-1.0, 1.0}
    assert (flips != flips[:, :1]).any()  # some block's signs vary inside it, which one sign per block cannot do


# (12, 20) = 240 weights, 37 buckets: L = 64 gives chunks of 64 with a partial last one of 48;
# L = 3 is below N / K, so chunks grow to ceil(240 / 37) = 7; L = 240 and more is one chunk
@pytest.mark.parametrize("locality", [3, 64, 100, 240, 10**6])
def test_locality_matches_naive_reference(locality):
    layer = nn.Linear(20, 12)
    compress(nn.Sequential(layer), budget=37, exclude=[], method=HashedNetsConfig(locality=locality))
    values = layer.parametrizations.weight.original.detach()
    assert torch.equal(layer.weight.detach(), naive_local(values, (12, 20), locality, "0.weight", 0))


@pytest.mark.parametrize("locality", [0, 1200, 5000])
def test_locality_zero_or_one_chunk_is_global_hashing_bit_for_bit(locality):
    plain, local = nn.Linear(40, 30), nn.Linear(40, 30)
    local.load_state_dict(plain.state_dict())
    compress(nn.Sequential(plain), budget=100, exclude=[])
    compress(nn.Sequential(local), budget=100, exclude=[], method=HashedNetsConfig(locality=locality))
    assert torch.equal(folded_index(plain), folded_index(local))
    assert torch.equal(plain.weight, local.weight)
    values = plain.parametrizations.weight.original.detach()
    assert torch.equal(plain.weight.detach(), naive_hashednets(values, (30, 40), "0.weight", 0))


@pytest.mark.parametrize("config_class, layer", [
    (HashedNetsConfig, lambda: nn.Linear(1000, 600)),
    (FreshNetsConfig, lambda: nn.Conv2d(256, 256, 3)),
])
def test_auto_locality_chunks_only_layers_whose_table_outgrows_the_cache(config_class, layer):
    def signed_index(budget: int, config) -> torch.Tensor:
        module = layer()
        compress(nn.Sequential(module), budget=budget, exclude=[], method=config)
        return folded_index(module)

    above = LOCAL_ABOVE_BUCKETS + 1
    auto_above = signed_index(above, config_class())
    assert torch.equal(auto_above, signed_index(above, config_class(locality=AUTO_LOCALITY)))
    assert not torch.equal(auto_above, signed_index(above, config_class(locality=0)))
    below = LOCAL_ABOVE_BUCKETS
    assert torch.equal(signed_index(below, config_class()), signed_index(below, config_class(locality=0)))
    assert HashedNetsConfig(block_size=8).locality_for(2**30) == 0  # the tiled layout reads rows already


@pytest.mark.parametrize("numel, buckets, locality", [(240, 37, 64), (240, 37, 3), (1000, 1000, 7), (97, 5, 10), (10, 1, 4)])
def test_chunk_slices_tile_the_buckets_proportionally(numel, buckets, locality):
    first, count = chunk_slices(torch.arange(numel), numel, buckets, locality)
    starts = torch.unique_consecutive(first)
    ends = torch.unique_consecutive(first + count)
    assert starts[0] == 0 and ends[-1] == buckets and torch.equal(starts[1:], ends[:-1])  # contiguous, exact
    assert (count >= 1).all()
    chunk_sizes = torch.bincount(torch.unique_consecutive(first, return_inverse=True)[1])
    share = chunk_sizes * buckets / numel  # proportional: off by less than one bucket
    assert (ends - starts - share).abs().lt(1).all()


def test_chunk_slices_take_one_bucket_count_per_column():
    counts = torch.tensor([37, 5, 240])
    first, count = chunk_slices(torch.arange(240).unsqueeze(1), 240, counts, 64)
    for column, buckets in enumerate(counts.tolist()):
        expected = chunk_slices(torch.arange(240), 240, buckets, 64)
        assert torch.equal(first[:, column], expected[0]) and torch.equal(count[:, column], expected[1])


def test_locality_keeps_the_budget_and_trains_every_bucket():
    model = nn.Sequential(nn.Linear(40, 30)).double()
    report = compress(model, budget=100, exclude=[], method=HashedNetsConfig(locality=64))
    weight = model[0].parametrizations.weight
    assert weight.original.numel() == report.stored_values == 100
    assert torch.equal(torch.unique(folded_index(model[0]).long() % 100), torch.arange(100))
    model(torch.randn(8, 40, dtype=torch.float64)).pow(2).sum().backward()
    assert (weight.original.grad != 0).all()


@pytest.mark.parametrize("backward", ["scatter", "sorted"])
def test_locality_gradients_match_autograd_of_the_naive_reference(backward):
    layer = nn.Linear(20, 12).double()
    config = HashedNetsConfig(locality=64, backward=backward, cache_indices=backward == "sorted")
    compress(nn.Sequential(layer), budget=37, exclude=[], method=config)
    values = layer.parametrizations.weight.original
    upstream = torch.randn(12, 20, dtype=torch.float64)
    (layer.weight * upstream).sum().backward()
    basis = torch.stack([naive_local(torch.eye(37)[k], (12, 20), 64, "0.weight", 0).reshape(-1) for k in range(37)], 1)
    assert torch.allclose(values.grad, basis.double().T @ upstream.reshape(-1), atol=1e-12)


@pytest.mark.parametrize("config, name, shape", [
    (HashedNetsConfig(locality=4096), "timm:mnist_mlp", (4, 784)),
    (FreshNetsConfig(locality=600), "timm:mnist_lenet", (4, 1, 28, 28)),
])
def test_locality_config_round_trips_through_json_and_a_checkpoint(tmp_path, config, name, shape):
    assert resolve_config(json.loads(json.dumps(config.to_dict()))) == config
    model = build_model(name).eval()
    compress(model, budget="1/16", exclude=[], method=config)
    loaded = from_pretrained(save_pretrained(model, tmp_path / "ckpt")).eval()
    x = torch.randn(*shape)
    assert torch.equal(loaded(x), model(x))


def test_block_size_one_is_per_weight_hashing():
    plain, tiled = nn.Linear(20, 12), nn.Linear(20, 12)
    tiled.load_state_dict(plain.state_dict())
    compress(nn.Sequential(plain), budget=37, exclude=[])
    compress(nn.Sequential(tiled), budget=37, exclude=[], method=HashedNetsConfig(block_size=1, backward="sorted", cache_indices=True))
    assert torch.equal(plain.weight, tiled.weight)


@pytest.mark.parametrize("config", [HashedNetsConfig(block_size=block) for block in (1, 4, 7)] + [
    HashedNetsConfig(locality=64), HashedNetsConfig(locality=5), HashedNetsConfig(block_size=4, sign_patterns=3)])
def test_right_inverse_is_least_squares_projection(config):
    layer = nn.Linear(30, 20)
    dense = layer.weight.detach().clone()
    model = nn.Sequential(layer)
    compress(model, budget=50, exclude=[], method=config)
    values = model[0].parametrizations.weight.original.detach()
    # the reconstruction is linear in v: W_hat = A v; least squares v* = argmin ||A v - w||
    basis = torch.stack([model[0].parametrizations.weight[0].reconstruct(torch.eye(50)[k]).reshape(-1)
                         for k in range(50)], dim=1)
    expected = torch.linalg.lstsq(basis.double(), dense.reshape(-1, 1).double()).solution.squeeze(1)
    assert torch.allclose(values.double(), expected, atol=1e-6)


def test_right_inverse_recovers_a_hashed_weight_exactly():
    layer = nn.Linear(16, 16)
    compress(nn.Sequential(layer), budget=20, exclude=[])
    hashed = layer.weight.detach().clone()
    other = nn.Linear(16, 16)
    with torch.no_grad():
        other.weight.copy_(hashed)
    compress(nn.Sequential(other), budget=20, exclude=[])
    assert torch.allclose(other.weight, hashed, atol=1e-6)


@pytest.mark.parametrize("block, patterns", [(1, 1), (16, 1), (16, 4)])
def test_sorted_and_scatter_backward_give_the_same_gradients(block, patterns):
    grads = {}
    for backward in ("scatter", "sorted"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)).double()
        config = HashedNetsConfig(block_size=block, backward=backward, sign_patterns=patterns, cache_indices=backward == "sorted")
        compress(model, budget=300, exclude=[], method=config)
        model(torch.randn(8, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))).pow(2).sum().backward()
        grads[backward] = [p.grad for p in model.parameters()]
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(grads["scatter"], grads["sorted"]))


def test_sorted_plan_is_cached_and_reported():
    model = nn.Sequential(nn.Linear(40, 30))
    report = compress(model, budget=100, exclude=[], method=HashedNetsConfig(block_size=8, cache_indices=True))
    weight = model[0].parametrizations.weight[0]
    # 150 blocks: index and sorted order 150 int32 each, row starts 2 * 13 + 1 int32
    assert weight.sorted_order.numel() == 150 and weight.row_starts.numel() == 27
    assert report.cache_bytes == 4 * (150 + 150 + 27)
    assert list(model.state_dict()) == ["0.bias", "0.parametrizations.weight.original"]


@pytest.mark.parametrize("options, match", [
    ({"block_size": 0}, "block_size must be an int >= 1"),
    ({"block_size": -4}, "block_size must be an int >= 1"),
    ({"block_size": 2.5}, "block_size must be an int >= 1"),
    ({"block_size": True}, "block_size must be an int >= 1"),
    ({"backward": "atomic"}, "unknown hashednets backward 'atomic'"),
    ({"locality": -1}, 'locality must be "auto" or an int >= 0'),
    ({"locality": 2.5}, 'locality must be "auto" or an int >= 0'),
    ({"locality": "4096"}, 'locality must be "auto" or an int >= 0'),
    ({"locality": True}, 'locality must be "auto" or an int >= 0'),
    ({"locality": 64, "block_size": 8}, "locality needs block_size=1"),
    ({"backward": "sorted", "cache_indices": False}, "needs cache_indices=True"),
    ({"block_size": 8, "sign_patterns": 0}, "sign_patterns must be an int >= 1"),
    ({"block_size": 8, "sign_patterns": 2.0}, "sign_patterns must be an int >= 1"),
    ({"block_size": 8, "sign_patterns": True}, "sign_patterns must be an int >= 1"),
    ({"sign_patterns": 4}, "sign_patterns=4 needs block_size > 1"),
])
def test_bad_options_are_clear_errors(options, match):
    with pytest.raises(ValueError, match=match):
        HashedNetsConfig(**options)


@pytest.mark.parametrize("patterns", [1, 4])
def test_tiled_layout_round_trips_through_a_checkpoint(tmp_path, patterns):
    model = build_model("timm:mnist_mlp").eval()
    compress(model, budget="1/64", exclude=[], method=HashedNetsConfig(block_size=16, sign_patterns=patterns))
    x = torch.randn(4, 784)
    loaded = from_pretrained(save_pretrained(model, tmp_path / "ckpt")).eval()
    layers = [m for m in loaded.modules() if parametrize.is_parametrized(m)]
    assert layers and all(m.parametrizations.weight[0].block_size == 16 for m in layers)
    assert all(m.parametrizations.weight[0].sign_patterns == patterns for m in layers)
    assert torch.equal(loaded(x), model(x))


def test_gradients_reach_every_used_bucket():
    model = nn.Sequential(nn.Linear(32, 32))
    compress(model, budget=64, exclude=[])
    model(torch.randn(4, 32)).pow(2).sum().backward()
    grad = model[0].parametrizations.weight.original.grad
    assert grad is not None and grad.shape == (64,)
    assert (grad != 0).float().mean() > 0.9


def test_uncached_indices_give_identical_weights():
    cached, uncached = nn.Linear(40, 30), nn.Linear(40, 30)
    uncached.load_state_dict(cached.state_dict())
    compress(nn.Sequential(cached), budget=100, exclude=[], method=HashedNetsConfig(cache_indices=True))
    report = compress(nn.Sequential(uncached), budget=100, exclude=[])
    assert torch.equal(cached.weight, uncached.weight)
    assert report.cache_bytes == 0
    assert list(uncached.buffers()) == []


def test_cache_is_int32_non_persistent_and_reported():
    model = nn.Sequential(nn.Linear(40, 30))
    report = compress(model, budget=100, exclude=[], method=HashedNetsConfig(cache_indices=True))
    (buffer,) = list(model.buffers())
    assert buffer.dtype == torch.int32 and buffer.numel() == 1200
    assert report.cache_bytes == 4800
    assert not any("signed_index" in key for key in model.state_dict())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_are_preserved(dtype):
    model = nn.Sequential(nn.Linear(64, 32)).to(dtype)
    compress(model, budget="1/4", exclude=[])
    assert model[0].weight.dtype == dtype
    assert model(torch.randn(2, 64, dtype=dtype)).dtype == dtype


@pytest.mark.parametrize("config", [HashedNetsConfig(block_size=16), HashedNetsConfig(backward="sorted", cache_indices=True),
                                    HashedNetsConfig(block_size=16, sign_patterns=4)])
def test_sorted_backward_traces_under_torch_compile(config):
    # aot_eager traces forward and backward as inductor would, without a slow C++ build
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    compress(model, budget=300, exclude=[], method=config)
    x = torch.randn(4, 64)
    model(x).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.compile(model, backend="aot_eager")(x).sum().backward()
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(model.parameters(), expected))
