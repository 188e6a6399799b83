"""HashedNets (Chen et al., ICML 2015): W[i] = sign(i) * v[h(i)].

Every virtual weight of a layer reads one of K shared bucket values through
an index hash h and a sign hash, both pure functions of (seed, weight name,
flat index). The sign hash makes collisions unbiased: two weights sharing a
bucket with opposite signs cancel in expectation instead of adding up.

Reconstruction is one gather from ``cat([v, -v])`` with the folded index
``h(i) + K * [sign(i) < 0]`` (:func:`fold_signed`). The index is not stored:
it is hashed again wherever it is needed, fused with the gather when
``torch.compile`` works (:mod:`.index`), so a compressed layer holds its K
values and nothing of the dense size. ``cache_indices=True`` keeps it as an
int32 buffer instead (4 bytes per weight: as large as the dense weight).

Least squares (``right_inverse``): minimising sum_i (w_i - s_i v_h(i))^2
decouples per bucket, v_k = mean of s_i w_i over the weights in bucket k.

Tiled layout (``block_size`` = B > 1, after ROAST, Desai et al. 2023). The K
values are read as R = ceil(K / B) rows of B (wrapping around to the start
of ``v`` so every value is used and the budget stays exact); block j of B
consecutive weights reads the whole row h(j) with one sign s(j):

    W[j B + t] = s(j) * v[(h(j) B + t) mod K],   t = 0 .. B-1,

a gather of contiguous rows and B times fewer hashes. B = 1 is per-weight
HashedNets, bit for bit. With ``sign_patterns`` = P > 1 each block also
draws one of P hashed sign patterns r_p of B signs, so blocks that share a
row differ and signs vary inside a block:

    W[j B + t] = s(j) * r_{p(j)}[t] * v[(h(j) B + t) mod K];

the table becomes the P patterned signed copies of the rows (2 P K values,
built every forward), still one gather (:func:`fold_patterned`).

Cache-local hashing (``locality`` = L > 0). A gather or scatter over a
table larger than the CPU caches misses the cache on every weight. With
L > 0 the flat weight is cut into chunks of L consecutive weights and each
chunk hashes, with the same hashes, into its own contiguous slice of the
buckets, proportional to its size (:func:`~hf_freqcompress.hashing.chunk_slices`,
:func:`fold_signed_local`): only which weights may collide changes. The
slices tile the K buckets exactly; chunks grow to ceil(N / K) weights where L
is smaller, so every slice keeps a bucket, and a layer of at most L weights
is one chunk: global hashing, bit for bit. ``"auto"`` uses
:data:`AUTO_LOCALITY` for layers of more than :data:`LOCAL_ABOVE_BUCKETS`
buckets (a signed float32 table beyond 4 MiB) and global hashing for the
rest, as the paper hashes them.

Threads and backward. Large layers scatter their gradient on every CPU
thread, one range of weights each (:mod:`.parallel`); cut at chunk
boundaries the ranges share no bucket, so a cache-local layer's gradient is
the same bits at any thread count. ``backward="sorted"`` (with
``cache_indices``) caches a bucket-sorted plan so the gradient is a
deterministic segment sum instead of a scatter (atomics on CUDA); ``"auto"``
picks it for a cached tiled layout, whose plan is one entry per block.
Measurements behind these defaults: docs/results/perf.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hashing import bucket_of, chunk_length, chunk_tables, floor_divide, hash32, hash_bits, layer_key, sign_bit
from .base import CompressedWeight, MethodConfig
from .gather import SortedRows, gather_rows, sort_rows
from .index import CachedIndex, HashedIndex, IndexSource
from .registry import register_method

__all__ = [
    "HashedNetsConfig", "HashedNetsWeight", "signed_bucket_means", "fold_signed", "fold_signed_local",
    "fold_signed_local_shift", "fold_patterned",
]

BACKWARDS = ("auto", "scatter", "sorted")
AUTO_LOCALITY = 65536
"""Chunk length of ``locality="auto"`` on large layers (the fastest measured, docs/results/perf.md)."""
LOCAL_ABOVE_BUCKETS = 2**19
"""``locality="auto"`` hashes layers with more buckets than this cache-locally: a signed float32 table beyond 4 MiB."""


def fold_signed(
    unit: torch.Tensor, position: torch.Tensor, index_key: torch.Tensor, sign_key: torch.Tensor, buckets: torch.Tensor,
) -> torch.Tensor:
    """h(i) + K [s(i) < 0]: which of the 2K signed values position i reads (global hashing)."""
    return bucket_of(hash_bits(position, index_key), buckets) + buckets * sign_bit(hash_bits(position, sign_key))


def fold_signed_local(
    unit: torch.Tensor, position: torch.Tensor, index_key: torch.Tensor, sign_key: torch.Tensor,
    buckets: torch.Tensor, chunk: torch.Tensor, reciprocal: torch.Tensor, first: torch.Tensor, count: torch.Tensor,
) -> torch.Tensor:
    """:func:`fold_signed` with the index hash mapped into the slice ``first[c], count[c]`` of the buckets that
    the position's chunk c = position // chunk owns (:func:`~hf_freqcompress.hashing.chunk_tables`)."""
    c = floor_divide(position, chunk, reciprocal)
    hashed = first[c] + bucket_of(hash_bits(position, index_key), count[c])
    return hashed + buckets * sign_bit(hash_bits(position, sign_key))


def fold_signed_local_shift(
    unit: torch.Tensor, position: torch.Tensor, index_key: torch.Tensor, sign_key: torch.Tensor,
    buckets: torch.Tensor, shift: torch.Tensor, first: torch.Tensor, count: torch.Tensor,
) -> torch.Tensor:
    """:func:`fold_signed_local` for chunks of 2**shift weights (``locality="auto"``'s): a shift, not a division."""
    c = position >> shift
    hashed = first[c] + bucket_of(hash_bits(position, index_key), count[c])
    return hashed + buckets * sign_bit(hash_bits(position, sign_key))


def fold_patterned(
    unit: torch.Tensor, position: torch.Tensor, index_key: torch.Tensor, sign_key: torch.Tensor, rows: torch.Tensor,
    pattern_key: torch.Tensor, patterns: torch.Tensor,
) -> torch.Tensor:
    """:func:`fold_signed` of a block, offset into the copy of the signed table of the block's sign pattern."""
    pattern = bucket_of(hash_bits(position, pattern_key), patterns)
    return fold_signed(unit, position, index_key, sign_key, rows) + 2 * rows * pattern


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
    """Options of ``hashednets`` (the module docstring has the formulas).

    cache_indices: keep the folded index as an int32 buffer (4 B per hashed
    unit) instead of hashing it again on every forward and backward (the
    default: no dense-size state).
    block_size: weights per hashed block; 1 hashes every weight (the paper),
    B > 1 is the tiled layout.
    locality: 0 hashes every weight into all K buckets (the paper); L > 0
    hashes each chunk of L consecutive weights into its own proportional
    slice of the buckets, so the part of the table it touches stays in cache;
    "auto" (default) is ``AUTO_LOCALITY`` for layers of more than
    ``LOCAL_ABOVE_BUCKETS`` buckets and 0 for the rest. Per-weight hashing only.
    backward: "scatter", "sorted" (a cached sorted plan, deterministic segment
    sum; needs ``cache_indices``) or "auto" (sorted iff the index is cached and
    block_size > 1).
    sign_patterns: P hashed sign patterns a block chooses from (tiled layout only).
    """

    method = "hashednets"
    cache_indices: bool = False
    block_size: int = 1
    backward: str = "auto"
    locality: int | str = "auto"
    sign_patterns: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"{self.method} block_size must be an int >= 1 (1 = per-weight hashing), got {self.block_size!r}")
        if isinstance(self.sign_patterns, bool) or not isinstance(self.sign_patterns, int) or self.sign_patterns < 1:
            raise ValueError(f"{self.method} sign_patterns must be an int >= 1 (1 = one sign per block), got {self.sign_patterns!r}")
        if self.sign_patterns > 1 and self.block_size == 1:
            raise ValueError(
                f"{self.method} sign_patterns={self.sign_patterns} needs block_size > 1 (the tiled layout); "
                "per-weight hashing already gives every weight its own sign"
            )
        if self.locality != "auto" and (
            isinstance(self.locality, bool) or not isinstance(self.locality, int) or self.locality < 0
        ):
            raise ValueError(
                f'{self.method} locality must be "auto" or an int >= 0 (0 = global hashing), got {self.locality!r}'
            )
        if self.locality != "auto" and self.locality and self.block_size != 1:
            raise ValueError(f"{self.method} locality needs block_size=1 (the tiled layout reads contiguous rows already)")
        if self.backward not in BACKWARDS:
            raise ValueError(f"unknown {self.method} backward {self.backward!r}; use one of {list(BACKWARDS)}")
        if self.backward == "sorted" and not self.cache_indices:
            raise ValueError(f'{self.method} backward="sorted" needs cache_indices=True (the plan is built from the cached index)')

    def locality_for(self, buckets: int) -> int:
        """The chunk length L used by a layer of ``buckets`` buckets ("auto" resolved; 0 = global)."""
        if self.locality != "auto":
            return self.locality
        return AUTO_LOCALITY if self.block_size == 1 and buckets > LOCAL_ABOVE_BUCKETS else 0

    @property
    def sorted_backward(self) -> bool:
        if self.backward == "auto":
            return self.cache_indices and self.block_size > 1
        return self.backward == "sorted"


@register_method
class HashedNetsWeight(CompressedWeight):
    config_class = HashedNetsConfig
    linear_in_original = True

    def __init__(self, spec, layer_kind, config, stored_values, seed, device=None) -> None:
        super().__init__(spec, layer_kind, config, stored_values, seed, device)
        self.buckets = self.planned_values
        self.block_size = config.block_size
        self.rows = -(-self.buckets // self.block_size)  # table rows of block_size values
        self.blocks = -(-spec.numel // self.block_size)  # hashed units of the flat weight
        self.sign_patterns = config.sign_patterns
        self.table_rows = 2 * self.sign_patterns * self.rows  # signed rows of every pattern
        if self.table_rows >= 2**31:
            raise ValueError(
                f"{spec.name}: {self.table_rows} table rows do not fit an int32 index; use fewer sign_patterns or buckets"
            )
        self._index_key = layer_key(seed, spec.name, "index")
        self._sign_key = layer_key(seed, spec.name, "sign")
        self._pattern_key = layer_key(seed, spec.name, "pattern")
        self.locality = config.locality_for(self.buckets)
        for name in ("signed_index", "sorted_order", "row_starts", "signed_patterns"):
            self.register_buffer(name, None, persistent=False)
        self.rebuild_caches(device)

    def _compute_signed_patterns(self, device: torch.device | None) -> torch.Tensor | None:
        """(P, 2, 1, block_size) float signs: pattern p's sign of each position in a block, then negated;
        broadcast against the (rows, block_size) table it gives the whole signed table. None without patterns."""
        if self.sign_patterns == 1:
            return None
        positions = torch.arange(self.sign_patterns * self.block_size, device=device)
        negative = sign_bit(hash32(positions, layer_key(self.seed, self.spec.name, "pattern_sign")))
        signs = (1 - 2 * negative).float().view(self.sign_patterns, 1, 1, self.block_size)
        return torch.cat([signs, -signs], dim=1)

    def hashed_index(self) -> HashedIndex:
        """Folded row index in [0, table_rows) of every block (every weight when block_size is 1), on demand.

        ``signed row + 2 * rows * pattern``: the signed row as without patterns,
        offset into the block's pattern's copy of the signed table.
        """
        keys = (self._index_key, self._sign_key)
        if self.sign_patterns > 1:
            return HashedIndex(fold_patterned, (*keys, self.rows, self._pattern_key, self.sign_patterns), self.blocks)
        if self.locality:
            chunk, first, count = chunk_tables(self.blocks, self.rows, self.locality)
            if chunk & (chunk - 1) == 0:
                return HashedIndex(fold_signed_local_shift, (*keys, self.rows, chunk.bit_length() - 1, first, count), self.blocks)
            return HashedIndex(fold_signed_local, (*keys, self.rows, chunk, 1.0 / chunk, first, count), self.blocks)
        return HashedIndex(fold_signed, (*keys, self.rows), self.blocks)

    def rebuild_caches(self, device: torch.device | None) -> None:
        self.signed_patterns = self._compute_signed_patterns(device)  # tiny, needed with or without the index cache
        self._hashed = self.hashed_index()
        if not self.config.cache_indices:
            return
        self.signed_index = self._hashed.materialize(device)
        if self.config.sorted_backward:
            self.sorted_order, self.row_starts = sort_rows(self.signed_index, self.table_rows)

    def index_sources(self) -> list[IndexSource]:
        return [self._hashed]

    def index_source(self) -> IndexSource:
        """The cached index when ``cache_indices``, else the hashes, evaluated where they are used."""
        return self._hashed if self.signed_index is None else CachedIndex(self.signed_index, self._hashed.width)

    def _plan(self) -> SortedRows | None:
        return None if self.sorted_order is None else (self.sorted_order, self.row_starts)

    def _table(self, original: torch.Tensor) -> torch.Tensor:
        """``cat([T, -T])`` with T the values as (rows, block_size), wrapped around; 1-D when block_size is 1.

        With sign patterns, that signed table for each pattern p of T's rows times r_p, one after another.
        """
        length = self.rows * self.block_size
        wrapped = original if length == original.numel() else original.repeat(-(-length // original.numel()))[:length]
        table = wrapped.view(self.rows, self.block_size).squeeze(1)
        if self.sign_patterns == 1:
            return torch.cat([table, -table])
        patterned = table * self.signed_patterns.to(table.dtype)  # (P, 2, rows, block_size): one broadcast product
        return patterned.view(self.table_rows, self.block_size)

    def _split_align(self) -> int:
        """Units between places where threads may cut the gather without sharing a bucket: the locality chunk."""
        return chunk_length(self.blocks, self.rows, self.locality) if self.locality else 1

    def reconstruct(self, original: torch.Tensor) -> torch.Tensor:
        flat = gather_rows(self._table(original), self.index_source(), self._plan(), self._split_align()).reshape(-1)
        if flat.numel() != self.spec.numel:  # a partial last block
            flat = flat[: self.spec.numel]
        return flat.view(self.spec.shape)

    def _element_index(self, device: torch.device) -> torch.Tensor:
        """Folded value index in [0, 2K) of every weight: which value and sign it reads."""
        source = self.index_source()
        folded = source.rows(0, source.units, device).long()
        if self.block_size == 1:  # already per weight; skips N int64 divisions when compressing
            return folded.view(-1)
        pattern, signed_row = folded.div(2 * self.rows, rounding_mode="floor"), folded % (2 * self.rows)
        negative = signed_row >= self.rows
        row = signed_row - self.rows * negative
        offset = torch.arange(self.block_size, device=device)
        value = (row * self.block_size + offset) % self.buckets
        if self.signed_patterns is not None:
            negative = negative ^ (self.signed_patterns.to(device)[pattern.squeeze(1), 0, 0] < 0)
        return (value + self.buckets * negative).view(-1)[: self.spec.numel]

    def project(self, weight: torch.Tensor) -> torch.Tensor:
        return signed_bucket_means(weight, self._element_index(weight.device), self.buckets)
