"""FreshNets: per-band hashed DCT coefficients, checked against the paper's formula one element at a time."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
import scipy.fft
import torch
from torch import nn
from torch.nn import functional as F

from hf_freqcompress import FreshNetsConfig, compress
from hf_freqcompress.hashing import bucket_of, hash32, layer_key, sign_bit
from hf_freqcompress.methods.base import LayerSpec
from hf_freqcompress.methods import freshnets
from hf_freqcompress.methods.freshnets import allocate_buckets, band_rates, band_sizes
from hf_freqcompress.methods.gather import gather_transform


def folded_index(layer: nn.Module) -> torch.Tensor:
    """The folded index of every hashed position of a compressed layer, cached or hashed now."""
    return layer.parametrizations.weight[0].index_source().materialize(None)


def parametrization_of(layer: nn.Module):
    return layer.parametrizations.weight[0]


def naive_freshnets(values: torch.Tensor, band_buckets, shape, name: str, seed: int, locality: int = 0) -> torch.Tensor:
    """The paper's formula, one coefficient at a time, then scipy's IDCT over the kernel dims.

    C[o, c, j] = s_g(i) v_g[h_g(i)] with g = sum(j), i the flat position and
    v_g the g-th slice of the concatenated bucket tables. With ``locality``,
    filter f's chunk [s, e) of max(ceil(L / kernel), ceil(F / K_g)) filters
    hashes into buckets [s K_g // F, e K_g // F) of v_g (F filters in all).
    """
    offsets = np.cumsum([0, *band_buckets])
    kernel = int(np.prod(shape[2:]))
    filters = int(np.prod(shape)) // kernel
    coefficients = np.empty(shape)
    for i, position in enumerate(itertools.product(*map(range, shape))):
        g = sum(position[2:])
        flat = torch.tensor([i])
        first, count = 0, band_buckets[g]
        if locality:
            chunk = max(-(-locality // kernel), -(-filters // band_buckets[g]))
            start = i // kernel // chunk * chunk
            first = start * band_buckets[g] // filters
            count = min(start + chunk, filters) * band_buckets[g] // filters - first
        bucket = first + int(bucket_of(hash32(flat, layer_key(seed, name, f"index{g}")), count))
        sign = -1.0 if int(sign_bit(hash32(flat, layer_key(seed, name, f"sign{g}")))) else 1.0
        coefficients[position] = sign * float(values[offsets[g] + bucket])
    kernel_axes = tuple(range(2, len(shape)))
    return torch.from_numpy(scipy.fft.idctn(coefficients, type=2, norm="ortho", axes=kernel_axes))


@pytest.mark.parametrize(
    "layer,budget",
    [
        (nn.Conv2d(3, 5, 5), 60),
        (nn.Conv2d(4, 6, (3, 2), groups=2), 11),
        (nn.Conv1d(3, 4, 4), 9),
        (nn.Conv3d(2, 3, (2, 3, 2)), 20),
    ],
)
def test_matches_naive_reference(layer, budget):
    compress(nn.Sequential(layer), budget=budget, method="freshnets", exclude=[], seed=3)
    parametrization = parametrization_of(layer)
    values = layer.parametrizations.weight.original.detach()
    expected = naive_freshnets(values, parametrization.band_buckets, tuple(layer.weight.shape), "0.weight", 3)
    assert values.numel() == budget == sum(parametrization.band_buckets)
    torch.testing.assert_close(layer.weight.detach().double(), expected, atol=1e-6, rtol=1e-5)


def test_kernels_rebuild_through_the_fused_chunked_gather_with_the_same_result(monkeypatch):
    layer = nn.Conv2d(6, 8, 3).double()
    compress(nn.Sequential(layer), budget=30, method="freshnets", exclude=[])
    calls = []
    monkeypatch.setattr(freshnets, "gather_transform", lambda *args: calls.append(1) or gather_transform(*args))
    upstream = torch.randn(8, 6, 3, 3, dtype=torch.float64)

    def weight_and_grad() -> tuple[torch.Tensor, torch.Tensor]:
        original = layer.parametrizations.weight.original
        original.grad = None
        weight = layer.weight
        weight.backward(upstream)
        return weight.detach(), original.grad.clone()

    fused_weight, fused_grad = weight_and_grad()
    monkeypatch.setattr(freshnets, "trailing_idct_matrix", lambda *args: None)  # the unfused idct(gather) path
    plain_weight, plain_grad = weight_and_grad()
    assert len(calls) == 1
    torch.testing.assert_close(fused_weight, plain_weight, atol=1e-12, rtol=0)
    torch.testing.assert_close(fused_grad, plain_grad, atol=1e-12, rtol=0)


# Conv2d(6, 8, 3): 48 filters of 9; L = 40 gives chunks of 5 filters (a partial last one of 3),
# and bands with fewer buckets than chunks get longer ones; L = 10**6 is one chunk (global)
@pytest.mark.parametrize("locality", [1, 40, 200, 10**6])
def test_locality_matches_naive_reference(locality):
    layer = nn.Conv2d(6, 8, 3)
    compress(nn.Sequential(layer), budget=60, method=FreshNetsConfig(locality=locality), exclude=[], seed=3)
    parametrization = parametrization_of(layer)
    values = layer.parametrizations.weight.original.detach()
    expected = naive_freshnets(values, parametrization.band_buckets, (8, 6, 3, 3), "0.weight", 3, locality)
    torch.testing.assert_close(layer.weight.detach().double(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("locality", [0, 10**6])
def test_locality_zero_or_one_chunk_is_global_hashing_bit_for_bit(locality):
    plain, local = nn.Conv2d(6, 8, 5), nn.Conv2d(6, 8, 5)
    local.load_state_dict(plain.state_dict())
    compress(nn.Sequential(plain), budget=120, method="freshnets", exclude=[])
    compress(nn.Sequential(local), budget=120, method=FreshNetsConfig(locality=locality), exclude=[])
    assert torch.equal(folded_index(plain), folded_index(local))
    assert torch.equal(plain.weight, local.weight)


def test_locality_keeps_the_budget_least_squares_and_trains_every_bucket():
    # 512 filters in chunks of 32 (288 / 9): a few buckets of each band per chunk, all of them used
    layer = nn.Conv2d(16, 32, 3).double()
    dense = layer.weight.detach().clone()
    compress(nn.Sequential(layer), budget=72, method=FreshNetsConfig(locality=288), exclude=[])
    parametrization = parametrization_of(layer)
    original = layer.parametrizations.weight.original
    assert original.numel() == 72 == sum(parametrization.band_buckets)
    assert torch.equal(torch.unique(folded_index(layer).long() % 72), torch.arange(72))
    basis = torch.stack([parametrization.reconstruct(torch.eye(72, dtype=torch.float64)[k]).reshape(-1)
                         for k in range(72)], dim=1)
    expected = torch.linalg.lstsq(basis, dense.reshape(-1, 1)).solution.squeeze(1)
    torch.testing.assert_close(original.detach(), expected, atol=1e-9, rtol=1e-7)
    layer(torch.randn(2, 16, 6, 6, dtype=torch.float64)).pow(2).sum().backward()
    assert bool((original.grad != 0).all())


def _hf_conv1d():
    from transformers.pytorch_utils import Conv1D

    return Conv1D(24, 16)


@pytest.mark.parametrize("make", [lambda: nn.Linear(20, 12), lambda: nn.Conv2d(8, 6, 1), _hf_conv1d])
def test_single_kernel_position_layers_are_hashednets_bit_for_bit(make):
    fresh, hashed = make(), make()
    hashed.load_state_dict(fresh.state_dict())
    compress(nn.Sequential(fresh), budget=37, method="freshnets", exclude=[])
    compress(nn.Sequential(hashed), budget=37, method="hashednets", exclude=[])
    assert torch.equal(folded_index(fresh), folded_index(hashed))
    assert torch.equal(fresh.parametrizations.weight.original, hashed.parametrizations.weight.original)
    assert torch.equal(fresh.weight, hashed.weight)


def test_allocation_follows_beta_density_and_sums_exactly():
    spec = LayerSpec("conv.weight", "conv2d", (64, 32, 5, 5))
    sizes = band_sizes(spec)
    assert sizes == [2048 * n for n in (1, 2, 3, 4, 5, 4, 3, 2, 1)]
    config = FreshNetsConfig(alpha=1.0, beta=2.0)
    assert band_rates(9, config) == pytest.approx([1 - (g + 0.5) / 9 for g in range(9)])
    buckets = allocate_buckets(sizes, 3200, config)
    assert sum(buckets) == 3200
    # no band is at a bound here, so each K_g is its exact share rounded: |K_g - K N_g f_g / sum| < 1
    shares = [n * r for n, r in zip(sizes, band_rates(9, config))]
    ideal = [3200 * s / sum(shares) for s in shares]
    assert all(abs(k - x) < 1 for k, x in zip(buckets, ideal))


@pytest.mark.parametrize("alpha,beta", [(1.0, 3.0), (0.5, 2.0), (0.25, 1.0)])
def test_allocation_is_bounded_and_handles_infinite_densities(alpha, beta):
    config = FreshNetsConfig(alpha=alpha, beta=beta)
    sizes = band_sizes(LayerSpec("w", "conv2d", (8, 4, 3, 3)))
    for budget in (5, 17, 100, 287, sum(sizes)):
        buckets = allocate_buckets(sizes, budget, config)
        assert sum(buckets) == budget
        assert all(1 <= k <= n for k, n in zip(buckets, sizes))


@pytest.mark.parametrize(
    "shape", [(32, 1, 5, 5), (64, 32, 5, 5), (64, 64, 3, 3), (512, 512, 3, 3), (192, 3, 16, 16), (16, 16, 7, 3)]
)
@pytest.mark.parametrize("fraction", [1 / 4, 1 / 16, 1 / 64, 1 / 256])
def test_default_rates_are_non_increasing_in_frequency(shape, fraction):
    spec = LayerSpec("w", "conv2d", shape)
    sizes = band_sizes(spec)
    # from 8 buckets per band on average; below that rounding to whole buckets can break the order
    budget = max(8 * len(sizes), int(spec.numel * fraction))
    buckets = allocate_buckets(sizes, budget, FreshNetsConfig())
    rates = [k / n for k, n in zip(buckets, sizes)]
    # the one-bucket floor is the only exception, and it only ever holds a high-frequency tail
    floored = [k == 1 for k in buckets]
    tail = floored.index(True) if any(floored) else len(buckets)
    assert all(floored[tail:])
    assert all(a >= b for a, b in zip(rates[:tail], rates[1:tail]))
    assert rates[0] >= max(rates)


def test_uniform_allocation_gives_every_band_the_same_rate():
    sizes = band_sizes(LayerSpec("w", "conv2d", (16, 8, 3, 3)))
    buckets = allocate_buckets(sizes, sum(sizes) // 8, FreshNetsConfig(allocation="uniform"))
    assert buckets == [n // 8 for n in sizes]


def test_budget_below_one_bucket_per_band_is_a_clear_error():
    layer = nn.Conv2d(2, 4, 5)  # 9 bands
    with pytest.raises(ValueError, match="smallest feasible budget is 9"):
        compress(nn.Sequential(layer), budget=8, method="freshnets", exclude=[])
    assert not hasattr(layer, "parametrizations")
    compress(nn.Sequential(layer), budget=9, method="freshnets", exclude=[])
    assert parametrization_of(layer).band_buckets == (1,) * 9


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="alpha"):
        FreshNetsConfig(alpha=0)
    with pytest.raises(ValueError, match="allocation"):
        FreshNetsConfig(allocation="linear")
    with pytest.raises(ValueError, match="block_size must be 1.*hashednets"):
        FreshNetsConfig(block_size=8)
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        FreshNetsConfig(block_size=0)
    with pytest.raises(ValueError, match="freshnets locality must be \"auto\" or an int >= 0"):
        FreshNetsConfig(locality=-1)
    assert FreshNetsConfig.from_dict(FreshNetsConfig(beta=4.0).to_dict()) == FreshNetsConfig(beta=4.0)


def test_right_inverse_is_least_squares_projection():
    layer = nn.Conv2d(3, 4, 3)
    dense = layer.weight.detach().clone()
    compress(nn.Sequential(layer), budget=30, method="freshnets", exclude=[])
    parametrization = parametrization_of(layer)
    values = layer.parametrizations.weight.original.detach()
    basis = torch.stack([parametrization.reconstruct(torch.eye(30)[k]).reshape(-1) for k in range(30)], dim=1)
    expected = torch.linalg.lstsq(basis.double(), dense.reshape(-1, 1).double()).solution.squeeze(1)
    torch.testing.assert_close(values.double(), expected, atol=1e-6, rtol=1e-5)


def test_gradients_reach_every_bucket():
    model = nn.Sequential(nn.Conv2d(8, 16, 3))
    compress(model, budget=72, method="freshnets", exclude=[])
    model(torch.randn(2, 8, 6, 6)).pow(2).sum().backward()
    grad = model[0].parametrizations.weight.original.grad
    assert grad.shape == (72,)
    assert bool((grad != 0).all())


def test_uncached_indices_and_small_chunks_give_identical_weights(monkeypatch):
    from hf_freqcompress.methods import index

    cached, uncached = nn.Conv2d(6, 8, 5), nn.Conv2d(6, 8, 5)
    uncached.load_state_dict(cached.state_dict())
    report = compress(nn.Sequential(cached), budget=120, method=FreshNetsConfig(cache_indices=True), exclude=[])
    assert report.cache_bytes == 4 * cached.weight.numel()
    monkeypatch.setattr(index, "_CHUNK_UNITS", 50)  # 2 filters of 25 positions per eager chunk
    monkeypatch.setenv(index.KERNELS_VARIABLE, "eager")
    report = compress(nn.Sequential(uncached), budget=120, method="freshnets", exclude=[])
    assert torch.equal(cached.weight, uncached.weight)
    assert report.cache_bytes == 0 and list(uncached.buffers()) == []
    assert not any("index" in key for key in nn.Sequential(cached).state_dict())


def test_identical_in_a_fresh_process():
    code = (
        "import torch; from torch import nn; from hf_freqcompress import compress;"
        "torch.manual_seed(5); layer = nn.Conv2d(3, 4, (5, 3));"
        "compress(nn.Sequential(layer), budget=40, method='freshnets', exclude=[], seed=11);"
        "print(layer.parametrizations.weight[0].index_source().materialize(None).tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    torch.manual_seed(5)
    layer = nn.Conv2d(3, 4, (5, 3))
    compress(nn.Sequential(layer), budget=40, method="freshnets", exclude=[], seed=11)
    assert out.strip() == str(folded_index(layer).tolist())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_are_preserved(dtype):
    model = nn.Sequential(nn.Conv2d(4, 8, 3)).to(dtype)
    compress(model, budget="1/4", method="freshnets", exclude=[])
    assert model[0].weight.dtype == dtype
    assert model(torch.randn(1, 4, 5, 5, dtype=dtype)).dtype == dtype


@pytest.fixture(scope="module")
def trained_cnn():
    """A small CNN really trained on MNIST (4,000 digits, 150 Adam steps, a few seconds): smooth-ish filters."""
    from hf_freqcompress.data import mnist_dataset

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x, y = mnist_dataset("train").tensors
    model = nn.Sequential(
        nn.Conv2d(1, 8, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(256, 10),
    )  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        batch = torch.randint(0, 4000, (64,), generator=generator)
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@pytest.mark.parametrize("budget", ["1/4", "1/8"])
def test_projection_of_trained_filters_beats_hashednets(trained_cnn, budget):
    """Trained filters keep their energy at low frequencies, where FreshNets puts its buckets."""
    import copy

    errors = {}
    for method in ("freshnets", "hashednets"):
        report = compress(copy.deepcopy(trained_cnn), budget=budget, method=method, targets=["0", "3"])
        errors[method] = [layer.rel_error for layer in report.layers]
    assert all(f < h - 0.02 for f, h in zip(errors["freshnets"], errors["hashednets"])), errors


@pytest.mark.parametrize(
    "name,kwargs",
    [("resnet18", {}), ("vgg11", {"mlp_ratio": 1 / 64}), ("vit_tiny_patch16_224", {"img_size": 32})],
)
def test_timm_models_train_with_dct_on_kernels_and_hashednets_elsewhere(name, kwargs):
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    report = compress(model, budget="1/64", method="freshnets")
    assert report.stored_values <= report.dense_values // 64
    modules = dict(model.named_modules())
    for layer in report.layers:
        parametrization = parametrization_of(modules[layer.name.removesuffix(".weight")])
        has_kernel = len(layer.shape) > 2 and np.prod(layer.shape[2:]) > 1
        assert bool(parametrization.kernel_dims) == has_kernel, layer.name
    if name.startswith("vit"):
        assert parametrization_of(model.patch_embed.proj).kernel_dims == (2, 3)
    model(torch.randn(2, 3, 32, 32)).logsumexp(1).sum().backward()
    stored = [p for n, p in model.named_parameters() if n.endswith("original")]
    assert len(stored) == len(report.layers) and all(p.grad is not None for p in stored)
