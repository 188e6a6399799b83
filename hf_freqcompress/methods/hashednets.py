"""HashedNets (Chen et al., ICML 2015): W[i] = sign(i) * v[h(i)].

Every virtual weight of a layer reads one of K shared bucket values through
an index hash h and a sign hash, both pure functions of (seed, weight name,
flat index). The sign hash makes collisions unbiased: two weights sharing a
bucket with opposite signs cancel in expectation instead of adding up.

Reconstruction is one gather from ``cat([v, -v])`` with a folded int32 index
``h(i) + K * [sign(i) < 0]`` (see :func:`~hf_freqcompress.hashing.signed_buckets`).
The index is cached as a non-persistent int32 buffer by default (4 bytes per
virtual weight, reported by ``cache_bytes``); ``cache_indices=False``
recomputes it every forward and holds no cache.

Tiled layout (``block_size`` = B > 1, ROAST: Desai et al. 2023). The K values
are read as R = ceil(K / B) rows of B (wrapping around to the start of ``v``
when B does not divide K, so every stored value is used and the budget stays
exact). The flat weight is cut into blocks of B consecutive weights, and
block j reads the whole row h(j) with one sign s(j), the same hashes as
above applied to the block number:

    W[j B + t] = s(j) * v[(h(j) B + t) mod K],   t = 0 .. B-1.

Reconstruction is then a gather of contiguous rows (near a memory copy), and
the index cache shrinks B-fold. B = 1 is per-weight HashedNets, bit for bit.
Each weight still reads exactly one value with one sign, so the least-squares
projection is the same signed bucket mean over the expanded element index.

Sign patterns (``sign_patterns`` = P > 1, tiled layout only). With one sign
per block, two blocks that read the same row are exact copies of each other
up to sign, and a block's weights cannot differ in sign from the row they
share. ROAST gives every weight its own hashed sign; that would cost a sign
per weight in the cache and a multiply on every rebuild. Here each block
also draws one of P fixed random sign patterns r_p (B signs each, hashed from
the seed):

    W[j B + t] = s(j) * r_{p(j)}[t] * v[(h(j) B + t) mod K],

so blocks sharing a row differ unless they drew the same pattern (chance
1/P), and signs vary inside a block. The table becomes the P patterned
copies of the rows, ``cat([r_p * T, -r_p * T])`` for every p, and the index
folds the pattern in: reconstruction stays one gather of contiguous rows,
from a table P times larger (2 P K values, built on every forward, so keep
P K well under the layer's size). MNIST 784-1000-10 at 1/64, blocks of 64,
3 seeds (docs/results/perf.md, "Sign patterns"): per-weight hashing 3.20%
test error, one sign per block 4.65%, 4 patterns 3.45%, 16 patterns 3.31%.
P = 1 (default) is the layout above, bit for bit, so existing checkpoints
load unchanged.

Cache-local hashing (``locality`` = L > 0). Per-weight hashing reads a
random entry of a table of 2K values for every weight, and the backward
scatters into a random entry again: once the table outgrows the CPU caches
(vgg11_bn's 7x7x512x4096 pre-logits conv: K = 6.4M at 1/16, a 51 MB signed
table) that is one cache miss per weight in each direction. With L > 0 the
flat weight is cut into chunks of L consecutive weights and each chunk hashes
into its own contiguous slice of the buckets, proportional to its size
(:func:`~hf_freqcompress.hashing.chunk_slices`):

    W[i] = s(i) * v[first(c) + h(i) mod* count(c)],   c = i // L,

with the same index and sign hashes as above (mod* is the multiply-shift of
:func:`~hf_freqcompress.hashing.bucket_of`). Every weight still has its own
independent bucket and sign within its slice; only which weights may collide
changes (weights of the same chunk, not of the whole layer). The slices tile
the K buckets exactly, so the budget is unchanged and every bucket is
reachable; a chunk touches K L / N buckets of each half of the signed table
(16 KiB per half at L = 2**16 and 1/16), which stay in L1/L2 while the chunk
is gathered or scattered. Chunks grow to ceil(N / K) weights where L is
smaller, so that every slice keeps a bucket. A layer of at most L weights is
one chunk: global hashing, bit for bit. The least-squares projection is the
same signed bucket mean over the element index.

Threads. Large layers are gathered and scattered on every CPU thread, one
range of weights each (:mod:`.parallel`). Cut at chunk boundaries, the ranges
share no bucket, so the gradient of a cache-local layer is the same bits at
any thread count; under global hashing the ranges' partial gradients of a
shared bucket are summed in a fixed order (same bits per thread count, equal
up to rounding across counts).

Measured (CPU, 1 thread, docs/results/perf.md): rebuilding that vgg11_bn
layer forward and backward costs 14x a ``clone()`` of its dense weight with
global hashing and 2.1-3.4x with any L from 2**12 to 2**18 (no trend beyond
the noise; ``benchmarks/locality.py``); vgg11_bn's train step goes from 1.73x
dense to 1.10x at L = 2**16, and MNIST 784-1000-10 error is unchanged (1.82%
against 1.83% at 1/8, 2.85% both at 1/64, validation split, mean of 5 seeds).
2**16 is the value ``"auto"`` (the default) takes for layers of more than
2**19 buckets, whose signed table (over 4 MiB) leaves a core's cache: the
largest L measured as fast, so collisions stay spread over as many weights as
the cache allows, and its slice still fits L2 up to budget 1/2. Smaller
layers keep global hashing under ``"auto"``, bit for bit as the paper (and
every MNIST result in docs/results) hashes them. The sorted backward was
slower here (4.1x against 2.3x a clone on vgg11_bn, twice the cache memory),
so ``backward="auto"`` keeps the scatter.

Backward. ``backward="sorted"`` caches a bucket-sorted plan of the gather
(:mod:`.gather`) so the gradient is a deterministic segment sum instead of a
scatter (atomics on CUDA). ``"auto"`` (default) picks it for the tiled layout,
whose plan is small (one entry per block), and the scatter for per-weight
hashing, where the plan would cost 4 B per weight and measured no faster on
CPU (docs/results/perf.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hashing import bucket_of, chunk_length, hash32, layer_key, sign_bit, signed_buckets_range
from .base import CompressedWeight, MethodConfig
from .gather import SortedRows, gather_rows, sort_rows
from .registry import register_method

__all__ = ["HashedNetsConfig", "HashedNetsWeight", "signed_bucket_means"]

BACKWARDS = ("auto", "scatter", "sorted")
AUTO_LOCALITY = 65536
"""Chunk length of ``locality="auto"`` on large layers (the fastest measured, docs/results/perf.md)."""
LOCAL_ABOVE_BUCKETS = 2**19
"""``locality="auto"`` hashes layers with more buckets than this cache-locally: a signed float32 table beyond 4 MiB."""


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
    per hashed unit) instead of rehashing on every forward.
    block_size: weights per hashed block; 1 hashes every weight (the paper),
    B > 1 is the tiled ROAST layout (module docstring).
    locality: 0 hashes every weight into all K buckets (the paper); L > 0
    hashes each chunk of L consecutive weights into its own proportional
    slice of the buckets, so the part of the table it touches stays in cache
    (module docstring; 65536 measured as fast as any and as accurate as 0).
    "auto" (default) is 65536 for layers whose signed table outgrows a
    core's cache (more than ``LOCAL_ABOVE_BUCKETS`` buckets) and 0 for the
    rest, so small layers hash exactly as the paper does. Per-weight hashing
    only: the tiled layout's rows are contiguous reads already.
    backward: "scatter" (autograd's index_add_), "sorted" (cached sorted plan,
    deterministic segment sum; needs ``cache_indices``) or "auto" (sorted iff
    block_size > 1 and indices are cached).
    sign_patterns: P random sign patterns a block chooses from (module
    docstring), so weights inside a block and blocks sharing a row differ in
    sign; tiled layout only. 1 (default) is one sign per block; 4 measured
    near per-weight hashing's accuracy.
    """

    method = "hashednets"
    cache_indices: bool = True
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

    def _compute_index(self, device: torch.device | None) -> torch.Tensor:
        """Folded row index in [0, table_rows) of every block (every weight when block_size is 1).

        ``signed row + 2 * rows * pattern``: the signed row as without patterns,
        offset into the block's pattern's copy of the signed table.
        """
        folded = signed_buckets_range(
            self.blocks, self.rows, self._index_key, self._sign_key, locality=self.locality, device=device
        )
        if self.sign_patterns > 1:
            blocks = torch.arange(self.blocks, device=device)
            folded += (2 * self.rows * bucket_of(hash32(blocks, self._pattern_key), self.sign_patterns)).int()
        return folded

    def rebuild_caches(self, device: torch.device | None) -> None:
        self.signed_patterns = self._compute_signed_patterns(device)  # tiny, needed with or without the index cache
        if not self.config.cache_indices:
            return
        self.signed_index = self._compute_index(device)
        if self.config.sorted_backward:
            self.sorted_order, self.row_starts = sort_rows(self.signed_index, self.table_rows)

    def _index(self, device: torch.device) -> torch.Tensor:
        return self.signed_index if self.signed_index is not None else self._compute_index(device)

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
        index = self._index(original.device)
        flat = gather_rows(self._table(original), index, self._plan(), self._split_align()).reshape(-1)
        if flat.numel() != self.spec.numel:  # a partial last block
            flat = flat[: self.spec.numel]
        return flat.view(self.spec.shape)

    def _element_index(self, device: torch.device) -> torch.Tensor:
        """Folded value index in [0, 2K) of every weight: which value and sign it reads."""
        if self.block_size == 1:  # already per weight; skips N int64 divisions when compressing
            return self._index(device)
        folded = self._index(device).long().unsqueeze(1)
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
