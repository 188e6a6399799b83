"""Batched, seeded k-means in torch (for product quantization and its regularizer).

``kmeans(data, k, generator=...)`` clusters ``g`` independent point sets of
the same size at once (``data`` is ``(g, n, d)``: one set per PQ codebook)
and returns ``(centroids (g, k, d), codes (g, n))``. Everything random comes
from the given ``torch.Generator``, so a seed derived from (seed, layer name)
makes the result a pure function of the inputs on a given device.

Algorithm (the faiss recipe, in plain torch):

1. **Sample.** Lloyd iterations run on at most ``max_points_per_centroid * k``
   points per set (a seeded random subset): centroids are means, and a few
   hundred points per centroid pin them down as well as millions do.
2. **k-means++ init** (Arthur & Vassilvitskii, 2007): the first centre is a
   uniform draw, each next one is drawn with probability proportional to
   D(x)^2, the squared distance to the nearest centre so far. To keep the
   number of sequential steps bounded for large k, centres are drawn in at
   most ``init_rounds`` rounds of ``ceil((k - 1) / init_rounds)`` points
   each (distinct draws without replacement from the same D^2
   distribution): exact
   k-means++ for k <= init_rounds + 1, a batched variant (as in k-means||)
   beyond.
3. **Lloyd** for a fixed number of ``iterations``: assign each point to its
   nearest centroid, move each centroid to the mean of its points (an empty
   cluster keeps its centroid, deterministically).
4. **Final pass on all points:** assign every point, then set each centroid
   to the mean of its members -- the least-squares codebook for those codes.

Distances use ||x||^2 - 2 x.c + ||c||^2 with one batched matmul per chunk of
points, chunked so the (g, chunk, k) distance block stays near
``chunk_elements`` floats; ties go to the lowest centroid index.
"""

from __future__ import annotations

import math

import torch

__all__ = ["kmeans", "nearest_centroids", "kmeans_plus_plus"]

_CHUNK_ELEMENTS = 1 << 19  # distance block of (g, chunk, k) floats: 2 MiB stays in cache
_MAX_SAMPLE = 1 << 24  # bounds the Lloyd sample (and its float64 CDF during seeding)


def _chunk_size(groups: int, k: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(groups * k, 1))


def nearest_centroids(
    points: torch.Tensor, centroids: torch.Tensor, chunk_elements: int = _CHUNK_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance to, and index of, the nearest centroid for every point.

    ``points`` (g, n, d), ``centroids`` (g, k, d) -> ``(sqdist (g, n), index (g, n) int64)``.
    """
    groups, count, _ = points.shape
    k = centroids.shape[1]
    centroid_norms = centroids.pow(2).sum(-1)[:, None, :]
    partial = torch.empty(groups, count, dtype=points.dtype, device=points.device)
    index = torch.empty(groups, count, dtype=torch.int64, device=points.device)
    step = _chunk_size(groups, k, chunk_elements)
    for start in range(0, count, step):
        block = torch.baddbmm(centroid_norms, points[:, start : start + step], centroids.transpose(1, 2), alpha=-2)
        torch.min(block, -1, out=(partial[:, start : start + step], index[:, start : start + step]))
    sqdist = partial.add_(torch.linalg.vector_norm(points, dim=-1).square_()).clamp_min_(0)
    return sqdist, index


def _draw_proportional(weights: torch.Tensor, draw: int, generator: torch.Generator) -> torch.Tensor:
    """``draw`` distinct indices per row, drawn without replacement with probability ~ weight.

    Efraimidis-Spirakis: give each index the key E / weight with E ~ Exp(1)
    and keep the ``draw`` smallest keys. Already chosen centres have weight 0
    (key +inf) and come last; a row whose weights are all 0 (every point
    sits on a centre) draws uniformly.
    """
    total = weights.sum(-1, keepdim=True)
    weights = torch.where(total > 0, weights, torch.ones_like(weights))
    uniform = torch.rand(weights.shape, generator=generator, dtype=weights.dtype, device=weights.device)
    keys = uniform.clamp_min_(torch.finfo(weights.dtype).tiny).log_().neg_().div_(weights)
    return torch.topk(keys, draw, dim=-1, largest=False, sorted=True).indices


def kmeans_plus_plus(
    points: torch.Tensor,
    k: int,
    generator: torch.Generator,
    init_rounds: int = 256,
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> torch.Tensor:
    """D^2-weighted seeding of ``k`` centroids per set, in at most ``init_rounds`` rounds."""
    groups, count, dim = points.shape
    rows = torch.arange(groups, device=points.device)[:, None]
    first = torch.randint(count, (groups, 1), generator=generator, device=points.device)
    centroids = points.new_empty(groups, k, dim)
    centroids[:, :1] = points[rows, first]
    best, _ = nearest_centroids(points, centroids[:, :1], chunk_elements)
    per_round = max(1, math.ceil((k - 1) / max(init_rounds, 1)))
    chosen = 1
    while chosen < k:
        draw = min(per_round, k - chosen)
        picks = _draw_proportional(best, draw, generator)
        new = points[rows, picks]
        centroids[:, chosen : chosen + draw] = new
        distance, _ = nearest_centroids(points, new, chunk_elements)
        best = torch.minimum(best, distance)
        chosen += draw
    return centroids


def _centroid_means(points: torch.Tensor, codes: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Mean of each cluster's points; clusters with no point keep ``previous``."""
    groups, k, dim = previous.shape
    sums = torch.zeros_like(previous).scatter_add_(1, codes[..., None].expand(-1, -1, dim), points)
    counts = torch.zeros(groups, k, dtype=points.dtype, device=points.device)
    counts.scatter_add_(1, codes, torch.ones_like(codes, dtype=points.dtype))
    return torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], previous)


def kmeans(
    data: torch.Tensor,
    k: int,
    *,
    generator: torch.Generator,
    iterations: int = 20,
    max_points_per_centroid: int = 256,
    init_rounds: int = 256,
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster each of the ``g`` point sets in ``data`` (g, n, d) into ``k`` clusters.

    Returns ``(centroids, codes)``: ``centroids`` (g, k, d) in ``data``'s
    dtype and ``codes`` (g, n) int64 with ``codes[i, j]`` the centroid of
    point j of set i. Computation is in float32 (float64 inputs stay float64).
    ``generator`` must live on ``data``'s device.
    """
    if data.dim() != 3:
        raise ValueError(f"kmeans expects data of shape (groups, points, dim), got {tuple(data.shape)}")
    groups, count, _ = data.shape
    if not 1 <= k <= count:
        raise ValueError(f"cannot make k={k} clusters from {count} points per set; use 1 <= k <= {count}")
    work_dtype = torch.float64 if data.dtype == torch.float64 else torch.float32
    points = data.detach().to(work_dtype)
    sample_size = min(count, max(k, min(max_points_per_centroid * k, _MAX_SAMPLE)))
    if sample_size < count:
        subset = torch.randperm(count, generator=generator, device=points.device)[:sample_size]
        sample = points[:, subset]
    else:
        sample = points
    centroids = kmeans_plus_plus(sample, k, generator, init_rounds, chunk_elements)
    for _ in range(iterations):
        _, codes = nearest_centroids(sample, centroids, chunk_elements)
        centroids = _centroid_means(sample, codes, centroids)
    _, codes = nearest_centroids(points, centroids, chunk_elements)
    centroids = _centroid_means(points, codes, centroids)
    return centroids.to(data.dtype), codes
