from __future__ import annotations

import pytest
import torch

from hf_freqcompress.kmeans import kmeans, kmeans_plus_plus, nearest_centroids


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_nearest_centroids_matches_brute_force_over_groups_and_chunks():
    points, centroids = torch.randn(3, 257, 5), torch.randn(3, 11, 5)
    sqdist, index = nearest_centroids(points, centroids, chunk_elements=64)
    brute = torch.cdist(points.double(), centroids.double()).pow(2)
    assert torch.equal(index, brute.argmin(-1))
    torch.testing.assert_close(sqdist.double(), brute.min(-1).values, atol=1e-4, rtol=1e-4)


def test_kmeans_is_deterministic_for_a_seed():
    data = torch.randn(2, 3000, 4)
    first = kmeans(data, 16, generator=_gen(7), iterations=5, max_points_per_centroid=64)
    second = kmeans(data, 16, generator=_gen(7), iterations=5, max_points_per_centroid=64)
    other = kmeans(data, 16, generator=_gen(8), iterations=5, max_points_per_centroid=64)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])


def test_kmeans_recovers_separated_clusters_and_returns_least_squares_centroids():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    labels = torch.arange(400) % 4
    data = (centres[labels] + 0.1 * torch.randn(400, 2))[None]
    centroids, codes = kmeans(data, 4, generator=_gen(), iterations=10)
    # each true cluster maps to exactly one code, and codes are a bijection
    mapping = {int(label): int(codes[0, labels == label].unique().item()) for label in range(4)}
    assert sorted(mapping.values()) == [0, 1, 2, 3]
    for code in range(4):
        torch.testing.assert_close(centroids[0, code], data[0, codes[0] == code].mean(0))


def test_batched_seeding_for_large_k_gives_distinct_centroids():
    data = torch.randn(1, 2000, 3)
    centroids = kmeans_plus_plus(data, 300, _gen(), init_rounds=8)
    assert centroids.shape == (1, 300, 3)
    assert torch.unique(centroids[0], dim=0).shape[0] == 300


def test_duplicate_points_do_not_break_seeding():
    data = torch.zeros(1, 50, 2)
    centroids, codes = kmeans(data, 4, generator=_gen(), iterations=3)
    assert torch.equal(centroids, torch.zeros(1, 4, 2))
    assert codes.shape == (1, 50)


def test_kmeans_rejects_more_clusters_than_points():
    with pytest.raises(ValueError, match="k=9"):
        kmeans(torch.randn(1, 8, 2), 9, generator=_gen())
