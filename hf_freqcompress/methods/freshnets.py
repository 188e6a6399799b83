"""FreshNets (Chen, Wilson, Tyree, Weinberger, Chen, KDD 2016): frequency-sensitive hashing.

A conv filter bank W (out, in/groups, k_1, ..., k_d) is stored in the
frequency domain. Its orthonormal DCT-II over the kernel dims,
C = DCT(W), is hashed like HashedNets, but per frequency band:

    g(j) = j_1 + ... + j_d                 band of coefficient (o, c, j), g in 0 .. G-1,
                                           G = sum_a (k_a - 1) + 1
    C[o, c, j] = s_g(i) * v_g[h_g(i)]      i = flat position of (o, c, j) in W,
                                           h_g, s_g: index/sign hashes keyed "index{g}"/"sign{g}"
    W = IDCT(C)                            (orthonormal DCT-III over the kernel dims)

Band g holds N_g = out * in/groups * #{j : g(j) = g} coefficients and gets
its own table of K_g buckets. Trained filters are smooth, so their energy
sits in the low bands; FreshNets spends the budget there (the paper's
frequency-sensitive rule). With x_g = (g + 1/2) / G the centre of band g on
[0, 1] and the Beta(alpha, beta) density f(x) ~ x^(alpha-1) (1-x)^(beta-1):

    K_g = r_g * N_g,   r_g = c * f(x_g),   sum_g K_g = K (the layer's planned budget),
    1 <= K_g <= N_g.

Band centres, not the end points g / (G-1), keep f finite when alpha < 1 or
beta < 1 (the density is infinite at 0 or 1 there), and the normalising
constant B(alpha, beta) cancels in c. The integers are exact: water-filling
pins bands at 1 or N_g and the rest is split by largest remainder
(:func:`~hf_freqcompress.budget.split_proportional`), so the K_g sum to K and
every band keeps at least one bucket (hence ``min_values`` = G). For the
default (alpha, beta) f decreases on (0, 1), so the rates r_g = K_g / N_g are
non-increasing in g, up to integer rounding (1/N_g) and the one-bucket
floor, which only bind at budgets of a few buckets per band.
``allocation="uniform"`` gives every band the same rate.

Least-squares projection (``right_inverse``). The map v -> W is linear and the
DCT orthonormal, so ||W - IDCT(C(v))|| = ||DCT(W) - C(v)||: projecting W
means taking signed bucket means of its DCT coefficients, per bucket
v_b = mean over {i : bucket(i) = b} of s(i) DCT(W)_i. A trained layer keeps
most of its accuracy before fine-tuning, and better than HashedNets at the
same budget because the low bands get the buckets.

Layout. All bands' tables are concatenated into one ``original`` vector
(band g at offset o_g = K_0 + ... + K_{g-1}), and the whole coefficient
tensor is addressed by one folded int32 index, as in HashedNets but folded
with the total K: index(i) = o_g + h_g(i) + K * [s_g(i) < 0]. Reconstruction
is one gather from cat([v, -v]) plus one IDCT over the kernel dims, fused
chunk by chunk when the kernel's IDCT is one small GEMM
(:func:`~hf_freqcompress.methods.gather.gather_transform`: the gathered
coefficients of a chunk are transformed while in cache, never written out;
kernels up to 8x8 in float32/float64, or on GPUs also half precision);
projection is one DCT plus one signed bucket mean. No loop over weights or
bands: the band of a position depends only on its kernel position, so the
per-band hash keys, bucket counts and offsets are broadcast from small
per-kernel-position tables. The index cache (``cache_indices``) and its
``cache_bytes`` behave as in HashedNets.

Cache-local hashing (``locality`` = L > 0, or ``"auto"``: both as in
HashedNets, "auto" judged on the layer's total bucket count). The filters
are cut into chunks of ceil(L / kernel_numel) whole filters, and each band's
table is split across the chunks in proportion to their sizes
(:func:`~hf_freqcompress.hashing.chunk_slices` over filter numbers, per band):
a chunk's coefficients of band g hash into their own contiguous slice of v_g
with the same hashes h_g, s_g. The band budgets K_g, and so the allocation
above, are unchanged; a band with fewer buckets than chunks gets longer chunks
(every slice keeps a bucket). Layers with a single kernel position use
HashedNets' locality directly.

Layers with a single kernel position (Linear, 1x1 convs, transformers'
Conv1D) have nothing to transform and fall back to HashedNets, bit for bit,
as in the paper. Conv1d and Conv3d use the 1-D and 3-D DCT of their kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..budget import split_proportional
from ..dct import dct, frequency_sum, idct, trailing_idct_matrix
from ..hashing import bucket_of, chunk_tables, floor_divide, hash_bits_mixed, layer_key, mixed_key, sign_bit
from .base import LayerSpec
from .gather import gather_transform
from .hashednets import HashedNetsConfig, HashedNetsWeight
from .index import HashedIndex
from .registry import register_method

__all__ = ["FreshNetsConfig", "FreshNetsWeight", "band_sizes", "band_rates", "allocate_buckets", "fold_bands", "fold_bands_local"]

ALLOCATIONS = ("beta", "uniform")


@dataclass
class FreshNetsConfig(HashedNetsConfig):
    """Options of ``freshnets`` (plus ``cache_indices``, ``backward`` and ``locality`` from HashedNets).

    alpha, beta: the Beta density that sets each frequency band's share of
    buckets per coefficient (module docstring). The defaults, alpha = 1 and
    beta = 5 (rate ~ (1 - x)^4), won a sweep over uniform, (1, 2), (1, 3),
    (1, 5), (0.5, 2), (0.5, 4) on the MNIST LeNet at 1/64
    (docs/results/mnist_cnn.md), and make the rates non-increasing in frequency.
    allocation: "beta", or "uniform" for the same rate in every band.
    """

    method = "freshnets"
    alpha: float = 1.0
    beta: float = 5.0
    allocation: str = "beta"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size != 1:
            raise ValueError(
                f"freshnets hashes each DCT coefficient within its frequency band, so block_size must be 1, "
                f"got {self.block_size}; use method='hashednets' for the tiled layout"
            )
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown freshnets allocation {self.allocation!r}; use one of {list(ALLOCATIONS)}")
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"freshnets {name} must be a finite number > 0 (a Beta parameter), got {value!r}")


def band_sizes(spec: LayerSpec) -> list[int]:
    """N_g: how many DCT coefficients of the layer lie in each band g = j_1 + ... + j_d."""
    kernel = spec.kernel_shape
    per_filter = torch.bincount(frequency_sum(kernel, range(len(kernel))).reshape(-1))
    return [int(n) * spec.shape[0] * spec.shape[1] for n in per_filter]


def band_rates(bands: int, config: FreshNetsConfig) -> list[float]:
    """Unnormalised rate of each band: the Beta(alpha, beta) density at the band centre (g + 1/2) / G."""
    if config.allocation == "uniform":
        return [1.0] * bands
    centres = [(g + 0.5) / bands for g in range(bands)]
    return [x ** (config.alpha - 1) * (1 - x) ** (config.beta - 1) for x in centres]


def allocate_buckets(sizes: Sequence[int], buckets: int, config: FreshNetsConfig, name: str = "layer") -> list[int]:
    """K_g: ``buckets`` split over bands in proportion to N_g f(x_g), each in [1, N_g], summing exactly."""
    if not len(sizes) <= buckets <= sum(sizes):
        raise ValueError(
            f"freshnets layer {name!r} has {len(sizes)} frequency bands and {sum(sizes)} coefficients, "
            f"so it needs between {len(sizes)} and {sum(sizes)} buckets, got {buckets}; change the budget"
        )
    rates = band_rates(len(sizes), config)
    return split_proportional([n * r for n, r in zip(sizes, rates)], buckets, [1] * len(sizes), list(sizes))


def fold_bands(
    unit: torch.Tensor, position: torch.Tensor, index_key: torch.Tensor, sign_key: torch.Tensor, buckets: torch.Tensor,
    offset: torch.Tensor, total: torch.Tensor,
) -> torch.Tensor:
    """o_g + h_g(i) + K [s_g(i) < 0] for positions (filters, kernel_numel); per-column band keys (mixed:
    :func:`~hf_freqcompress.hashing.mixed_key`), K_g and o_g."""
    hashed = bucket_of(hash_bits_mixed(position, index_key), buckets)
    return offset + hashed + total * sign_bit(hash_bits_mixed(position, sign_key))


def fold_bands_local(
    unit: torch.Tensor, position: torch.Tensor, index_key: torch.Tensor, sign_key: torch.Tensor, buckets: torch.Tensor,
    offset: torch.Tensor, total: torch.Tensor, chunk: torch.Tensor, reciprocal: torch.Tensor,
    table_offset: torch.Tensor, first: torch.Tensor, count: torch.Tensor,
) -> torch.Tensor:
    """:func:`fold_bands` with each band's hash mapped into the slice of its table owned by the filter's chunk.

    Unit u is filter u; band g (per column) cuts the filters into chunks of ``chunk`` and keeps chunk c's slice
    at ``first / count[table_offset + c]`` (:func:`~hf_freqcompress.hashing.chunk_tables` per band).
    """
    entry = table_offset + floor_divide(unit, chunk, reciprocal)
    hashed = first[entry] + bucket_of(hash_bits_mixed(position, index_key), count[entry])
    return offset + hashed + total * sign_bit(hash_bits_mixed(position, sign_key))


@register_method
class FreshNetsWeight(HashedNetsWeight):
    """Hashed DCT coefficients with one bucket table per frequency band (module docstring)."""

    config_class = FreshNetsConfig

    def __init__(self, spec, layer_kind, config, stored_values, seed, device=None) -> None:
        # The band layout must exist before HashedNetsWeight.__init__ builds the index.
        self.kernel_dims: tuple[int, ...] = tuple(range(2, len(spec.shape))) if spec.kernel_numel > 1 else ()
        self.band_sizes: tuple[int, ...] = tuple(band_sizes(spec)) if self.kernel_dims else ()
        self.band_buckets: tuple[int, ...] = (
            tuple(allocate_buckets(self.band_sizes, int(stored_values), config, spec.name)) if self.kernel_dims else ()
        )
        super().__init__(spec, layer_kind, config, stored_values, seed, device)

    @classmethod
    def min_values(cls, spec: LayerSpec, config: FreshNetsConfig) -> int:
        """One bucket per frequency band (G = sum(k_a - 1) + 1); 1 for the HashedNets fallback."""
        return sum(k - 1 for k in spec.kernel_shape) + 1

    def hashed_index(self) -> HashedIndex:
        """One unit per filter, one position per kernel position: band g's keys, K_g and offset o_g per column.

        Locality chunks whole filters (ceil(L / kernel_numel) of them; 0 stays global) per band.
        """
        if not self.kernel_dims:
            return super().hashed_index()
        offsets = [sum(self.band_buckets[:g]) for g in range(len(self.band_buckets))]
        per_band = [
            [mixed_key(layer_key(self.seed, self.spec.name, f"index{g}")) for g in range(len(offsets))],
            [mixed_key(layer_key(self.seed, self.spec.name, f"sign{g}")) for g in range(len(offsets))],
            list(self.band_buckets),
            offsets,
        ]
        band = frequency_sum(self.spec.kernel_shape, range(len(self.spec.kernel_shape))).reshape(-1).tolist()
        columns = [[row[g] for g in band] for row in per_band]
        kernel_numel = self.spec.kernel_numel
        filters = self.spec.numel // kernel_numel
        if not self.locality:
            return HashedIndex(fold_bands, (*columns, self.buckets), filters, kernel_numel)
        tables = [chunk_tables(filters, buckets, -(-self.locality // kernel_numel)) for buckets in self.band_buckets]
        starts = [sum(len(t[1]) for t in tables[:g]) for g in range(len(tables))]
        chunks = [[tables[g][0] for g in band], [1.0 / tables[g][0] for g in band], [starts[g] for g in band]]
        flat = [sum((t[1] for t in tables), []), sum((t[2] for t in tables), [])]
        params = (*columns, self.buckets, *chunks, *flat)
        return HashedIndex(fold_bands_local, params, filters, kernel_numel)

    def _split_align(self) -> int:
        """Bands chunk their filters at different lengths, so no cut avoids sharing a bucket: any cut will do."""
        return super()._split_align() if not self.kernel_dims else 1

    def reconstruct(self, original: torch.Tensor) -> torch.Tensor:
        if not self.kernel_dims:
            return super().reconstruct(original)
        inverse = trailing_idct_matrix(self.spec.shape, self.kernel_dims, original.dtype, original.device)
        if inverse is None or self._plan() is not None:
            return idct(super().reconstruct(original), self.kernel_dims)
        return gather_transform(self._table(original), self.index_source(), inverse).view(self.spec.shape)

    def project(self, weight: torch.Tensor) -> torch.Tensor:
        return super().project(dct(weight, self.kernel_dims))

    def extra_repr(self) -> str:
        if not self.kernel_dims:
            return f"{super().extra_repr()} (hashednets fallback)"
        return f"{super().extra_repr()}, band buckets {list(self.band_buckets)}"
