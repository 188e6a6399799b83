"""Product quantization of weights (the PQ step of Soulie, Gripon & Robert, 2016).

Every row of the canonical weight -- an output unit of a Linear / GPT-2
Conv1D, or one (output channel, kernel position) of a convolution -- is cut
along the input dimension into sub-vectors of ``d`` consecutive inputs (the
last one zero-padded when ``d`` does not divide the input size). The
sub-vector columns are split into ``g`` contiguous groups ("subspaces") and
each group gets a codebook of ``k`` centroids in R^d, found by k-means
(:mod:`hf_freqcompress.kmeans`, seeded from (seed, layer name)). A
sub-vector is stored as the index of its centroid:

    W[r, j*d:(j+1)*d] = C[group(j)][code[r, j]]

``g = ceil(in / d)`` (``codebooks=None``) is classic PQ, one codebook per
subspace; ``g = 1`` (the default) shares one codebook across the layer,
which is what pays at high compression on small layers, where per-subspace
codebooks would cost more than the codes.

Storage, exactly: ``rows * ceil(in / d)`` codes of ``ceil(log2 k)`` bits,
bit-packed into bytes (:mod:`hf_freqcompress.packing`), plus ``g * k * d``
codebook values at the storage dtype:

    bits = 8 * ceil(codes * ceil(log2 k) / 8) + g * k * d * storage_bits

Budget semantics: the planner hands a layer ``A`` values of the storage
dtype, i.e. ``A * storage_bits`` bits; the layer takes the (d, k) with the
most code bits per weight, ``ceil(log2 k) / d`` (finer quantization), that
fits, longer sub-vectors winning ties (vector-quantization gain at equal
rate). ``subvector`` / ``k`` in the config pin either or both; with both
pinned the cost is fixed and ``min_values == max_values`` tell the planner
so, making a too-small budget a clear error. ``stored_values`` counts
codebook values plus codes; ``stored_bits`` is the exact formula above and
never exceeds ``A * storage_bits``.

In the module: the parametrization's ``original`` is the codebook tensor
(g, k, d), trainable, so fine-tuning after PQ moves centroids while codes
stay fixed. The codes are the persistent ``uint8`` buffer ``packed_codes``
(what a checkpoint saves); the forward unpacks them into the gather index
(code + k * group) on every call, so nothing larger than the packed codes is
kept (a cached int32 index would hold 32 bits per code instead of ``ceil(log2 k)``).
``right_inverse`` runs k-means on the given dense weight, so ``compress()``
on a trained model quantizes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator

import torch

from ..hashing import layer_key
from ..kmeans import kmeans
from ..packing import bits_for, pack_bits, packed_size, unpack_bits
from .base import CompressedWeight, LayerSpec, MethodConfig
from .registry import register_method

__all__ = ["PQConfig", "PQLayout", "PQWeight", "choose_layout", "MAX_K"]

MAX_K = 65536
AUTO_MAX_SUBVECTOR = 16
"""Longest sub-vector the budget search tries when ``subvector`` is not pinned."""


@dataclass
class PQConfig(MethodConfig):
    """Options of ``pq``.

    subvector: sub-vector length d along the input dim (None: chosen from the budget, 1..16).
    k: centroids per codebook, 2..65536 (None: a power of two up to ``max_k``, from the budget).
    codebooks: codebooks per layer; the ``ceil(in / d)`` sub-vector columns are split into this
        many equal contiguous groups (must divide them). None: one per column (classic PQ).
    max_k: largest k the budget search tries; k-means costs O(points * k) per iteration.
    iterations: Lloyd iterations of k-means (fixed, for determinism and bounded time).
    """

    method = "pq"
    subvector: int | None = None
    k: int | None = None
    codebooks: int | None = 1
    max_k: int = 256
    iterations: int = 20

    def __post_init__(self) -> None:
        if self.subvector is not None and self.subvector < 1:
            raise ValueError(f"pq subvector must be >= 1, got {self.subvector}")
        if self.k is not None and not 2 <= self.k <= MAX_K:
            raise ValueError(f"pq k must be in [2, {MAX_K}], got {self.k}")
        if not 2 <= self.max_k <= MAX_K:
            raise ValueError(f"pq max_k must be in [2, {MAX_K}], got {self.max_k}")
        if self.codebooks is not None and self.codebooks < 1:
            raise ValueError(f"pq codebooks must be >= 1 or None (one per subspace), got {self.codebooks}")
        if self.iterations < 0:
            raise ValueError(f"pq iterations must be >= 0, got {self.iterations}")


@dataclass(frozen=True)
class PQLayout:
    """How one canonical weight (out, in, *kernel) maps to PQ sub-vectors, codes and codebooks."""

    shape: tuple[int, ...]
    subvector: int
    k: int
    codebooks: int

    @classmethod
    def of(cls, shape: tuple[int, ...], subvector: int, k: int, codebooks: int | None) -> "PQLayout":
        """The layout for ``shape``; ``codebooks=None`` means one per sub-vector column."""
        columns = math.ceil(shape[1] / subvector)
        return cls(tuple(shape), subvector, k, columns if codebooks is None else codebooks)

    @property
    def features(self) -> int:
        return self.shape[1]

    @property
    def rows(self) -> int:
        return math.prod(self.shape) // self.features

    @property
    def columns(self) -> int:
        return math.ceil(self.features / self.subvector)

    @property
    def codes(self) -> int:
        return self.rows * self.columns

    @property
    def code_bits(self) -> int:
        return bits_for(self.k)

    @property
    def codebook_values(self) -> int:
        return self.codebooks * self.k * self.subvector

    @property
    def vectors_per_codebook(self) -> int:
        return self.codes // self.codebooks

    @property
    def rate(self) -> Fraction:
        """Code bits per weight: what sets how finely weights are quantized."""
        return Fraction(self.code_bits, self.subvector)

    def packed_bytes(self) -> int:
        return packed_size(self.codes, self.code_bits)

    def bits(self, storage_bits: int) -> int:
        """Exact checkpoint bits: packed codes plus codebooks at ``storage_bits`` per value."""
        return 8 * self.packed_bytes() + self.codebook_values * storage_bits

    def problem(self) -> str | None:
        """Why this layout cannot be built, or None."""
        if self.columns % self.codebooks:
            return f"{self.codebooks} codebooks do not divide the {self.columns} sub-vector columns"
        if self.k > self.vectors_per_codebook:
            return f"k={self.k} exceeds the {self.vectors_per_codebook} sub-vectors per codebook"
        return None

    # -- tensor views ------------------------------------------------------
    def grid(self, weight: torch.Tensor) -> torch.Tensor:
        """Canonical weight -> (rows, columns, d) sub-vectors, zero-padded along the input dim."""
        matrix = weight.movedim(1, -1).reshape(self.rows, self.features)
        pad = self.columns * self.subvector - self.features
        if pad:
            matrix = torch.nn.functional.pad(matrix, (0, pad))
        return matrix.view(self.rows, self.columns, self.subvector)

    def subvectors(self, weight: torch.Tensor) -> torch.Tensor:
        """Canonical weight -> (codebooks, vectors_per_codebook, d): each codebook's point set."""
        per_group = self.columns // self.codebooks
        grid = self.grid(weight).view(self.rows, self.codebooks, per_group, self.subvector)
        return grid.transpose(0, 1).reshape(self.codebooks, self.vectors_per_codebook, self.subvector)

    def codes_to_grid(self, codes: torch.Tensor) -> torch.Tensor:
        """(codebooks, vectors_per_codebook) codes, as :meth:`subvectors` orders them -> (rows, columns)."""
        per_group = self.columns // self.codebooks
        return codes.view(self.codebooks, self.rows, per_group).transpose(0, 1).reshape(self.rows, self.columns)

    def folded_index(self, grid_codes: torch.Tensor) -> torch.Tensor:
        """Row of ``codebooks.view(-1, d)`` for each sub-vector: code + k * group(column), int32."""
        per_group = self.columns // self.codebooks
        group = torch.arange(self.columns, device=grid_codes.device) // per_group
        return (grid_codes + self.k * group).reshape(-1).to(torch.int32)

    def rebuild(self, vectors: torch.Tensor) -> torch.Tensor:
        """(rows * columns, d) gathered sub-vectors -> the canonical weight (padding dropped)."""
        matrix = vectors.reshape(self.rows, self.columns * self.subvector)[:, : self.features]
        out, *kernel = (self.shape[0], *self.shape[2:])
        return matrix.reshape(out, *kernel, self.features).movedim(-1, 1)


def _candidates(spec: LayerSpec, config: PQConfig) -> Iterator[PQLayout]:
    features = spec.shape[1]
    subvectors = [config.subvector] if config.subvector else range(1, min(features, AUTO_MAX_SUBVECTOR) + 1)
    ks = [config.k] if config.k else [1 << b for b in range(1, config.max_k.bit_length())]
    for subvector in subvectors:
        for k in ks:
            layout = PQLayout.of(spec.shape, subvector, k, config.codebooks)
            if layout.problem() is None:
                yield layout


def _valid_layouts(spec: LayerSpec, config: PQConfig) -> list[PQLayout]:
    layouts = list(_candidates(spec, config))
    if not layouts:
        reason = PQLayout.of(spec.shape, config.subvector or 1, config.k or 2, config.codebooks).problem()
        raise ValueError(
            f"pq cannot quantize layer {spec.name!r} of shape {spec.shape} with {config}: {reason}; "
            "choose subvector/k/codebooks that fit (codebooks=1 always divides, k <= number of sub-vectors) "
            "or exclude the layer"
        )
    return layouts


def choose_layout(spec: LayerSpec, config: PQConfig, budget_bits: int | None = None) -> PQLayout:
    """The finest layout (max code bits per weight, then longest sub-vector) within ``budget_bits``.

    ``budget_bits=None`` gives the finest layout at any cost (what ``max_values`` reports).
    """
    layouts = _valid_layouts(spec, config)
    fitting = [lay for lay in layouts if budget_bits is None or lay.bits(spec.storage_bits) <= budget_bits]
    if not fitting:
        cheapest = min(lay.bits(spec.storage_bits) for lay in layouts)
        raise ValueError(
            f"pq: {budget_bits} bits cannot hold layer {spec.name!r} {spec.shape}; the cheapest layout "
            f"needs {cheapest} bits ({math.ceil(cheapest / spec.storage_bits)} values): raise the budget"
        )
    return max(fitting, key=lambda lay: (lay.rate, lay.subvector))


def _values_for(bits: int, storage_bits: int) -> int:
    return math.ceil(bits / storage_bits)


@register_method
class PQWeight(CompressedWeight):
    """W = codebooks gathered by fixed codes; the codebooks are the trainable ``original``."""

    config_class = PQConfig
    linear_in_original = True  # in the codebooks, for the codes k-means chose

    def __init__(self, spec, layer_kind, config, stored_values, seed, device=None) -> None:
        super().__init__(spec, layer_kind, config, stored_values, seed, device)
        self.layout = choose_layout(spec, config, self.planned_values * spec.storage_bits)
        self._kmeans_key = layer_key(seed, spec.name, "kmeans")
        packed = torch.zeros(self.layout.packed_bytes(), dtype=torch.uint8, device=device)
        self.register_buffer("packed_codes", packed)

    @classmethod
    def min_values(cls, spec: LayerSpec, config: PQConfig) -> int:
        cheapest = min(lay.bits(spec.storage_bits) for lay in _valid_layouts(spec, config))
        return _values_for(cheapest, spec.storage_bits)

    @classmethod
    def max_values(cls, spec: LayerSpec, config: PQConfig) -> int:
        return _values_for(choose_layout(spec, config).bits(spec.storage_bits), spec.storage_bits)

    # -- codes ----------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """The stored codes as a (rows, columns) int64 grid, unpacked from ``packed_codes``."""
        flat = unpack_bits(self.packed_codes, self.layout.code_bits, self.layout.codes)
        return flat.view(self.layout.rows, self.layout.columns)

    def set_codes(self, grid_codes: torch.Tensor) -> None:
        """Store (rows, columns) codes, packed into the persistent buffer."""
        self.packed_codes.copy_(pack_bits(grid_codes, self.layout.code_bits))

    # -- parametrization --------------------------------------------------------
    def reconstruct(self, original: torch.Tensor) -> torch.Tensor:
        index = self.layout.folded_index(self.codes())
        vectors = original.reshape(-1, self.layout.subvector).index_select(0, index)
        return self.layout.rebuild(vectors)

    @torch.no_grad()
    def project(self, weight: torch.Tensor) -> torch.Tensor:
        """k-means on the weight's sub-vectors: sets the codes, returns the codebooks (g, k, d)."""
        generator = torch.Generator(device=weight.device).manual_seed(self._kmeans_key)
        centroids, codes = kmeans(
            self.layout.subvectors(weight), self.layout.k, generator=generator, iterations=self.config.iterations
        )
        self.set_codes(self.layout.codes_to_grid(codes))
        return centroids

    # -- accounting -------------------------------------------------------------
    def extra_values(self) -> int:
        """One stored number per code (besides the codebook values in ``original``)."""
        return self.layout.codes

    def stored_bits(self, original: torch.Tensor, storage_dtype: torch.dtype) -> int:
        return 8 * self.packed_codes.numel() + original.numel() * torch.finfo(storage_dtype).bits

    def extra_repr(self) -> str:
        lay = self.layout
        return (
            f"{self.spec.name}: {self.spec.shape}, d={lay.subvector}, k={lay.k}, codebooks={lay.codebooks}, "
            f"{lay.codes} codes x {lay.code_bits} bits"
        )
