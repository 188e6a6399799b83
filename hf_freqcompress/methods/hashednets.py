"""HashedNets (Chen et al., ICML 2015): W[i] = sign(i) * v[h(i)].

Every virtual weight of a layer reads one of K shared bucket values through
an index hash h and a sign hash, both pure functions of (seed, weight name,
flat index). The sign hash makes collisions unbiased: two weights sharing a
bucket with opposite signs cancel in expectation instead of adding up.

Reconstruction is one gather from ``cat([v, -v])`` with a folded int32 index
``h(i) + K * [sign(i) < 0]`` (see :func:`~hf_freqcompress.hashing.signed_buckets`),
so the backward pass is a single scatter-add. The index is cached as a
non-persistent int32 buffer by default (4 bytes per virtual weight, reported
by ``cache_bytes``); ``cache_indices=False`` recomputes it every forward and
holds no cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hashing import layer_key, signed_buckets_range
from .base import CompressedWeight, MethodConfig
from .registry import register_method

__all__ = ["HashedNetsConfig", "HashedNetsWeight", "gather_signed", "signed_bucket_means"]


def gather_signed(values: torch.Tensor, signed_index: torch.Tensor) -> torch.Tensor:
    """``sign * values[bucket]`` for a folded index in [0, 2K): one gather, differentiable."""
    return torch.cat([values, -values]).index_select(0, signed_index)


def signed_bucket_means(weight: torch.Tensor, signed_index: torch.Tensor, buckets: int) -> torch.Tensor:
    """Least-squares bucket values for flat ``weight`` under a folded index.

    Minimising sum_i (w_i - s_i v_{h(i)})^2 decouples per bucket and gives
    v_k = mean of s_i w_i over the weights in bucket k (0 for empty buckets).
    Accumulates in float64 so large buckets do not lose precision.
    """
    flat = weight.reshape(-1).to(torch.float64)
    index = signed_index.long()
    sums = torch.zeros(2 * buckets, dtype=torch.float64, device=weight.device).index_add_(0, index, flat)
    counts = torch.bincount(index, minlength=2 * buckets).to(torch.float64)
    signed_sum = sums[:buckets] - sums[buckets:]
    count = counts[:buckets] + counts[buckets:]
    return (signed_sum / count.clamp(min=1)).to(weight.dtype)


@dataclass
class HashedNetsConfig(MethodConfig):
    """Options of ``hashednets``.

    cache_indices: keep the folded hash index as an int32 buffer (fast, 4 B
    per virtual weight) instead of rehashing on every forward.
    """

    method = "hashednets"
    cache_indices: bool = True


@register_method
class HashedNetsWeight(CompressedWeight):
    config_class = HashedNetsConfig

    def __init__(self, spec, layer_kind, config, stored_values, seed, device=None) -> None:
        super().__init__(spec, layer_kind, config, stored_values, seed, device)
        self.buckets = self.planned_values
        self._index_key = layer_key(seed, spec.name, "index")
        self._sign_key = layer_key(seed, spec.name, "sign")
        cached = self._compute_index(device) if config.cache_indices else None
        self.register_buffer("signed_index", cached, persistent=False)

    def _compute_index(self, device: torch.device | None) -> torch.Tensor:
        return signed_buckets_range(self.spec.numel, self.buckets, self._index_key, self._sign_key, device=device)

    def rebuild_caches(self, device: torch.device) -> None:
        if self.config.cache_indices:
            self.signed_index = self._compute_index(device)

    def _index(self, device: torch.device) -> torch.Tensor:
        return self.signed_index if self.signed_index is not None else self._compute_index(device)

    def reconstruct(self, original: torch.Tensor) -> torch.Tensor:
        return gather_signed(original, self._index(original.device)).view(self.spec.shape)

    def project(self, weight: torch.Tensor) -> torch.Tensor:
        return signed_bucket_means(weight, self._index(weight.device), self.buckets)
