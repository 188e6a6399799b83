from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_freqcompress import HashedNetsConfig, compress
from hf_freqcompress.hashing import bucket_of, hash32, layer_key, sign_bit


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


@pytest.mark.parametrize("layer", [nn.Linear(20, 12), nn.Conv2d(4, 6, (3, 2), groups=2)])
def test_matches_naive_reference(layer):
    model = nn.Sequential(layer)
    compress(model, budget=37, exclude=[])
    parametrization = model[0].parametrizations.weight
    values = parametrization.original
    expected = naive_hashednets(values.detach(), values.new_empty(0).new_zeros(layer.weight.shape).shape, "0.weight", 0)
    assert values.numel() == 37
    assert torch.equal(layer.weight.detach(), expected)


def test_right_inverse_is_least_squares_projection():
    layer = nn.Linear(30, 20)
    dense = layer.weight.detach().clone()
    model = nn.Sequential(layer)
    compress(model, budget=50, exclude=[])
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
    compress(nn.Sequential(cached), budget=100, exclude=[])
    report = compress(nn.Sequential(uncached), budget=100, exclude=[], method=HashedNetsConfig(cache_indices=False))
    assert torch.equal(cached.weight, uncached.weight)
    assert report.cache_bytes == 0
    assert list(uncached.buffers()) == []


def test_cache_is_int32_non_persistent_and_reported():
    model = nn.Sequential(nn.Linear(40, 30))
    report = compress(model, budget=100, exclude=[])
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
