from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hf_freqcompress import PQConfig, compress, materialize
from hf_freqcompress.kmeans import kmeans
from hf_freqcompress.methods.base import LayerSpec
from hf_freqcompress.methods.pq import PQLayout, PQWeight, choose_layout
from hf_freqcompress.regularizers import PQCentroidPenalty, available_regularizers, get_regularizer
from hf_freqcompress.methods import compressed_weights

from conftest import tiny_gpt2


def lenet() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(6, 16, 3), nn.ReLU(), nn.Conv2d(16, 12, (3, 1), groups=2), nn.Flatten())


def parametrizations(model: nn.Module) -> list[PQWeight]:
    return [p for _, _, _, p in compressed_weights(model)]


def gathered(parametrization: PQWeight, codebooks: torch.Tensor) -> torch.Tensor:
    """The weight rebuilt by hand: every sub-vector replaced by its codebook row, padding dropped."""
    layout = parametrization.layout
    grid = parametrization.codes()
    group = torch.arange(layout.columns) // (layout.columns // layout.codebooks)
    vectors = codebooks[group[None, :].expand_as(grid), grid]  # (rows, columns, d)
    matrix = vectors.reshape(layout.rows, -1)[:, : layout.features]
    out, *kernel = (layout.shape[0], *layout.shape[2:])
    return matrix.reshape(out, *kernel, layout.features).movedim(-1, 1)


@pytest.mark.parametrize("factory", [lenet, small_cnn, tiny_gpt2])
def test_codes_and_codebooks_rebuild_exactly_what_kmeans_assigned(factory):
    model = factory()
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    config = PQConfig(subvector=2, k=4, codebooks=None if factory is small_cnn else 1)
    report = compress(model, "1/4", config, exclude=[] if factory is not tiny_gpt2 else None)
    assert report.layers
    for module_name, module, param_name, parametrization in compressed_weights(model):
        codebooks = module.parametrizations[param_name].original
        kind, layout = parametrization.layer_kind, parametrization.layout
        canonical = kind.to_canonical(dense[module_name])
        generator = torch.Generator().manual_seed(parametrization._kmeans_key)
        centroids, codes = kmeans(layout.subvectors(canonical), layout.k, generator=generator,
                                  iterations=parametrization.config.iterations)
        assert torch.equal(codebooks.detach(), centroids)
        assert torch.equal(parametrization.codes(), layout.codes_to_grid(codes))
        rebuilt = kind.to_canonical(getattr(module, param_name)).detach()
        assert torch.equal(rebuilt, gathered(parametrization, codebooks.detach()))


def test_subvectors_run_along_the_input_dim_of_conv_and_conv1d_layers():
    weight = torch.arange(2 * 5 * 3 * 1, dtype=torch.float32).view(2, 5, 3, 1)  # (out, in, kh, kw)
    layout = PQLayout.of((2, 5, 3, 1), 2, 2, 1)
    grid = layout.grid(weight)
    assert grid.shape == (6, 3, 2)  # rows = out * kh * kw, columns = ceil(5 / 2)
    torch.testing.assert_close(grid[1, 0], weight[0, 0:2, 1, 0])  # row 1 = (out 0, kh 1)
    torch.testing.assert_close(grid[1, 2], torch.stack([weight[0, 4, 1, 0], torch.tensor(0.0)]))  # zero pad
    torch.testing.assert_close(layout.rebuild(grid.reshape(-1, 2)), weight)


@pytest.mark.parametrize("storage_dtype", ["float32", "float16"])
@pytest.mark.parametrize("budget", ["1/64", "1/20", "1/6", 900])
def test_stored_bits_are_exact_and_within_each_layer_allocation(budget, storage_dtype):
    model = lenet()
    report = compress(model, budget, "pq", exclude=[], storage_dtype=storage_dtype)
    storage_bits = torch.finfo(getattr(torch, storage_dtype)).bits
    for row, parametrization in zip(report.layers, parametrizations(model)):
        layout = parametrization.layout
        expected = 8 * math.ceil(layout.codes * layout.code_bits / 8) + layout.codebook_values * storage_bits
        assert row.stored_bits == expected == layout.bits(storage_bits)
        assert row.stored_bits <= parametrization.planned_values * storage_bits
        assert row.stored_values == layout.codebook_values + layout.codes
        assert parametrization.packed_codes.numel() * 8 == expected - layout.codebook_values * storage_bits


def test_byte_budget_picks_valid_settings_within_it():
    model = lenet()
    report = compress(model, "1KB", "pq", exclude=[])
    assert report.stored_bytes <= 1000
    for parametrization in parametrizations(model):
        assert parametrization.layout.problem() is None
        assert 2 <= parametrization.layout.k <= 256


def test_budget_choice_prefers_more_code_bits_per_weight_then_longer_subvectors():
    spec = LayerSpec("w", "linear", (300, 784), storage_bits=32)
    layout = choose_layout(spec, PQConfig(), budget_bits=300 * 784)  # 1 bit per weight, minus codebook room
    assert layout.bits(32) <= 300 * 784
    assert layout.rate < 1
    others = [PQLayout.of(spec.shape, d, 1 << b, 1) for d in range(1, 17) for b in range(1, 9)]
    finer = [other for other in others if other.rate > layout.rate and other.bits(32) <= 300 * 784]
    assert finer == []
    ties = [other for other in others if other.rate == layout.rate and other.bits(32) <= 300 * 784]
    assert max(other.subvector for other in ties) == layout.subvector


def test_fixed_settings_make_a_fixed_cost_and_a_clear_error_when_it_does_not_fit():
    config = PQConfig(subvector=4, k=16)
    spec = LayerSpec("w", "linear", (64, 96), storage_bits=32)
    cost = PQLayout.of(spec.shape, 4, 16, 1).bits(32)
    assert PQWeight.min_values(spec, config) == PQWeight.max_values(spec, config) == math.ceil(cost / 32)
    model = lenet()
    with pytest.raises(ValueError, match="smallest feasible budget"):
        compress(model, 50, config, exclude=[])
    assert not parametrizations(model)  # nothing half-applied


def test_invalid_settings_name_the_layer():
    with pytest.raises(ValueError, match=r"'1\.weight'.*codebooks"):
        compress(lenet(), "1/4", PQConfig(subvector=4, k=4, codebooks=5), exclude=[])
    with pytest.raises(ValueError, match=r"k=256 exceeds"):
        compress(lenet(), "1/2", PQConfig(subvector=8, k=256, codebooks=None), exclude=[])
    with pytest.raises(ValueError, match=r"k must be in \[2, 65536\]"):
        PQConfig(k=1)


def test_codebooks_train_while_codes_stay_fixed():
    model = lenet()
    compress(model, "1/8", PQConfig(subvector=2), exclude=[])
    codes_before = [p.packed_codes.clone() for p in parametrizations(model)]
    codebooks = [m.parametrizations.weight.original for m in model if hasattr(m, "parametrizations")]
    assert all(c.requires_grad for c in codebooks)
    before = [c.detach().clone() for c in codebooks]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(torch.randn(16, 96)), torch.randint(0, 10, (16,)))
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(b, c.detach()) for b, c in zip(before, codebooks))
    assert all(torch.equal(a, p.packed_codes) for a, p in zip(codes_before, parametrizations(model)))
    for parametrization, codebook in zip(parametrizations(model), codebooks):  # still a pure gather
        weight = parametrization.reconstruct(codebook).detach()
        assert torch.equal(weight, gathered(parametrization, codebook.detach()))


def test_state_dict_holds_packed_codes_and_codebooks_only_and_reloads():
    model = lenet()
    compress(model, "1/8", "pq", exclude=[], seed=1)
    state = model.state_dict()
    assert not [k for k in state if k.endswith(".weight") or "code_index" in k]
    packed = [k for k in state if k.endswith("packed_codes")]
    assert len(packed) == 3 and all(state[k].dtype == torch.uint8 for k in packed)
    fresh = lenet()
    compress(fresh, "1/8", "pq", exclude=[], seed=2)  # different codes until loaded
    fresh.load_state_dict(state)
    x = torch.randn(4, 96)
    assert torch.equal(fresh(x), model(x))


def test_compress_is_deterministic_per_seed():
    base = lenet()
    first, second, other = lenet(), lenet(), lenet()
    for model in (first, second, other):
        model.load_state_dict(base.state_dict())
    compress(first, "1/16", "pq", exclude=[], seed=3)
    compress(second, "1/16", "pq", exclude=[], seed=3)
    compress(other, "1/16", "pq", exclude=[], seed=4)
    s1, s2, s3 = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert any(not torch.equal(s1[k], s3[k]) for k in s1)


# -- regularizer ---------------------------------------------------------------
def test_regularizer_registry():
    assert "pq_centroid" in available_regularizers()
    assert isinstance(get_regularizer("pq_centroid", k=4), PQCentroidPenalty)
    with pytest.raises(ValueError, match="unknown regularizer 'nope'"):
        get_regularizer("nope")


def test_penalty_is_sum_of_squared_distances_to_nearest_centroid_with_that_gradient():
    model = lenet()
    penalty = PQCentroidPenalty(subvector=4, k=8, exclude=[], recluster_every=3)
    value = penalty(model)
    value.backward()
    expected = 0.0
    for (target, layout, centroids), module in zip(penalty._layers, [model[1], model[3], model[5]]):
        points = layout.subvectors(module.weight.detach())
        distances = torch.cdist(points.double(), centroids.double()).pow(2)
        expected += float(distances.min(-1).values.sum())
        nearest = centroids[0][distances[0].argmin(-1)]
        grad_grid = layout.subvectors(module.weight.grad)
        torch.testing.assert_close(grad_grid[0], 2 * (points[0] - nearest))
    assert float(value.detach()) == pytest.approx(expected, rel=1e-4)


def test_penalty_reclusters_on_schedule_and_vanishes_on_quantized_weights():
    model = lenet()
    penalty = PQCentroidPenalty(subvector=4, k=8, exclude=[], recluster_every=2)
    penalty(model)
    first = [c.clone() for _, _, c in penalty._layers]
    with torch.no_grad():
        model[1].weight.mul_(2)
    penalty(model)
    assert all(torch.equal(a, c) for a, (_, _, c) in zip(first, penalty._layers))  # call 2: no re-fit
    penalty(model)
    assert not torch.equal(first[0], penalty._layers[0][2])  # call 3: re-fitted
    compress(model, "1/2", PQConfig(subvector=4, k=8), exclude=[])
    materialize(model)  # weights now lie exactly on 8 centroids per layer
    assert float(PQCentroidPenalty(subvector=4, k=8, exclude=[])(model).detach()) < 1e-8
