"""Stacked low-dimensional binary filters, SLBF (Lan & Lan, AAAI 2020).

A layer's canonical weight ``(N, C, *kernel)`` (C = input channels per group)
is cut along the input channels into ``S = C / d`` slices of ``d`` channels.
Every slice of every output filter is one filter of a bank of ``M`` binary
filters (entries +-1, shape ``(d, *kernel)``) shared by the whole layer,
times a scale::

    W[n, s*d:(s+1)*d] = alpha[n, s] * B[idx[n, s]]       B[m] in {-1, +1}^(d x kh x kw)

What is stored (the frozen form, after :meth:`BinaryStackWeight.finalize`)::

    stored_bits = M * d * K                      the bank, one bit per entry (K = kh * kw)
                + N * S * ceil(log2 M)           one bank index per slice
                + scales * storage_bits          alpha in the storage dtype

with ``scales`` = N ("filter", default), 1 ("layer") or N * S ("slice").
:meth:`~BinaryStackWeight.pack` writes exactly that: bank bits and index bits
in one uint8 stream (:mod:`hf_freqcompress.packing`) plus the scales, so a
layer takes ``ceil(stored_bits / 8)`` bytes. ``stored_values`` counts stored
numbers, one per bank bit, per index and per scale; ``stored_bits`` is the
authoritative size.

Training state, not stored: the bank is trained as a real-valued latent
(``original``, binarized by sign with a straight-through estimator: the
gradient passes unchanged), and the selection as ``N x S x M`` logits: the
forward uses the hard argmax, the backward the gradient of a softmax at an
annealed temperature (straight-through argmax). ``freeze()`` (at
``freeze_step``, or at the latest in ``finalize()``) replaces the logits by
integer indices; from then on the bank and scales keep training. The report
always counts the frozen form; while logits exist it says so in
``training_values``. ``pack`` stores ``sign(original)``; the latent's
magnitude is training state too.

Packed form: ``hf_freqcompress.finalize(model)`` ends training for good. The
layer then keeps the :meth:`pack` stream as its persistent ``packed`` buffer,
``original`` becomes empty (``finalize_storage``) and every forward decodes
the +-1 bank and the indices from the stream (:meth:`BinaryStackWeight.decode`),
so the state dict, a saved checkpoint and the memory the layer holds are
exactly the stream plus the scales. The scales
still train; the bank and selection are fixed.

Layers: any conv (groups and depthwise included: C is the per-group input
width) and Linear (a 1x1 kernel). When C is not divisible by ``depth`` the
layer uses the largest divisor of C below it (the first conv of an MNIST net,
C = 1, gets d = 1); ``describe()`` shows the chosen d and M. The paper's
split-transform-merge forward for Conv2d is in :mod:`.binary_stack_forward`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..hashing import layer_key
from ..packing import pack_bits, unpack_bits
from .base import CompressedWeight, LayerSpec, MethodConfig
from .registry import register_method

__all__ = ["BinaryStackConfig", "BinaryStackWeight", "BankLayout", "bank_layout", "bank_sizes"]

SCALE_GRANULARITIES = ("filter", "layer", "slice")
PROJECTION_ITERATIONS = 10
"""Rounds of binary k-means when projecting a dense weight onto a bank (it converges in a few)."""


@dataclass
class BinaryStackConfig(MethodConfig):
    """Options of ``binary_stack``.

    bank_size: most bank filters M per layer. Each layer takes the largest
        power of two <= bank_size (or bank_size itself) that its budget share
        affords, and never more than there are slices or binary patterns.
    depth: input channels d per binary sub-filter; layers whose C is not a
        multiple use the largest divisor of C below ``depth``.
    scale: one float scale per output "filter" (default), per "layer", or
        per "slice". Before a BatchNorm a per-filter scale is redundant and
        "layer" saves N values.
    temperature / final_temperature / anneal_steps: softmax temperature of
        the selection's straight-through gradient, annealed geometrically
        over ``anneal_steps`` optimizer steps (0: constant).
    freeze_step: after this optimizer step the selection is frozen to
        integer indices (None: only at ``finalize()``).
    """

    method = "binary_stack"
    bank_size: int = 256
    depth: int = 8
    scale: str = "filter"
    temperature: float = 1.0
    final_temperature: float = 0.1
    anneal_steps: int = 0
    freeze_step: int | None = None

    def __post_init__(self) -> None:
        if self.bank_size < 2:
            raise ValueError(f"binary_stack bank_size must be >= 2, got {self.bank_size}")
        if self.depth < 1:
            raise ValueError(f"binary_stack depth must be >= 1, got {self.depth}")
        if self.scale not in SCALE_GRANULARITIES:
            raise ValueError(f"binary_stack scale must be one of {SCALE_GRANULARITIES}, got {self.scale!r}")
        if not 0 < self.final_temperature <= self.temperature:
            raise ValueError("binary_stack needs 0 < final_temperature <= temperature")
        if self.anneal_steps < 0 or (self.freeze_step is not None and self.freeze_step < 0):
            raise ValueError("binary_stack anneal_steps and freeze_step must be >= 0")


@dataclass(frozen=True)
class BankLayout:
    """Shapes and exact storage of one layer for a given bank size (the formulas of the module docstring)."""

    filters: int  # N
    channels: int  # C, per group
    kernel: tuple[int, ...]
    depth: int  # d
    bank_size: int  # M
    scale: str
    storage_bits: int

    @property
    def slices(self) -> int:  # S = C / d
        return self.channels // self.depth

    @property
    def filter_numel(self) -> int:  # D = d * K
        return self.depth * math.prod(self.kernel)

    @property
    def index_bits(self) -> int:  # ceil(log2 M)
        return (self.bank_size - 1).bit_length()

    @property
    def scale_shape(self) -> tuple[int, int, int]:
        rows = 1 if self.scale == "layer" else self.filters
        return rows, self.slices if self.scale == "slice" else 1, 1

    @property
    def scale_count(self) -> int:
        return math.prod(self.scale_shape)

    @property
    def stream_bits(self) -> int:
        """Bank bits plus index bits: the packed uint8 stream."""
        return self.bank_size * self.filter_numel + self.filters * self.slices * self.index_bits

    def stored_bits(self, storage_bits: int | None = None) -> int:
        return self.stream_bits + self.scale_count * (storage_bits or self.storage_bits)

    @property
    def stored_values(self) -> int:
        """Numbers stored: each bank bit, each index and each scale counts one."""
        return self.bank_size * self.filter_numel + self.filters * self.slices + self.scale_count

    @property
    def planned_values(self) -> int:
        """The allocation, in storage-dtype values, this layout needs."""
        return -(-self.stored_bits() // self.storage_bits)


def _depth_for(channels: int, depth: int) -> int:
    """Largest divisor of ``channels`` not above ``depth``."""
    return max(d for d in range(1, min(depth, channels) + 1) if channels % d == 0)


def bank_layout(spec: LayerSpec, config: BinaryStackConfig, bank_size: int) -> BankLayout:
    if len(spec.shape) < 2:
        raise ValueError(f"binary_stack needs an (out, in, *kernel) weight; layer {spec.name!r} has shape {spec.shape}")
    filters, channels, *kernel = spec.shape
    depth = _depth_for(channels, config.depth)
    return BankLayout(filters, channels, tuple(kernel), depth, bank_size, config.scale, spec.storage_bits)


def bank_sizes(spec: LayerSpec, config: BinaryStackConfig) -> list[int]:
    """Bank sizes a layer may take, ascending: powers of two up to the cap, and the cap.

    The cap is ``min(bank_size, N * S, 2 ** D)``: more filters than slices or
    than distinct binary patterns cannot be used. Powers of two fill the
    ``ceil(log2 M)`` index bits completely.
    """
    layout = bank_layout(spec, config, 2)
    cap = min(config.bank_size, layout.filters * layout.slices, 2 ** min(layout.filter_numel, 62))
    cap = max(cap, 2)
    return sorted({1 << i for i in range(1, cap.bit_length()) if 1 << i <= cap} | {cap})


def _straight_through_sign(latent: torch.Tensor) -> torch.Tensor:
    """+-1 (sign, 0 -> +1) forward, identity gradient; the value is exactly +-1."""
    hard = torch.where(latent >= 0, 1.0, -1.0).to(latent.dtype)
    return hard + (latent - latent.detach())


def _straight_through_argmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """One-hot argmax forward, softmax(logits / T) gradient; the value is exactly one-hot."""
    soft = torch.softmax(logits / temperature, dim=-1)
    hard = torch.zeros_like(soft).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return hard + (soft - soft.detach())


@register_method
class BinaryStackWeight(CompressedWeight):
    """Parametrization: ``original`` is the latent bank ``(M, d, *kernel)``; scales, logits / indices live here."""

    config_class = BinaryStackConfig

    def __init__(self, spec, layer_kind, config, stored_values, seed, device=None) -> None:
        super().__init__(spec, layer_kind, config, stored_values, seed, device)
        fitting = [m for m in bank_sizes(spec, config) if bank_layout(spec, config, m).planned_values <= stored_values]
        if not fitting:
            need = self.min_values(spec, config)
            raise ValueError(
                f"layer {spec.name!r} got {stored_values} values but binary_stack needs at least {need}; "
                "raise the budget or the depth"
            )
        self.layout = bank_layout(spec, config, fitting[-1])
        layout = self.layout
        self.scale = nn.Parameter(torch.ones(layout.scale_shape, device=device))
        self.logits = nn.Parameter(torch.zeros(layout.filters, layout.slices, layout.bank_size, device=device))
        self.register_buffer("indices", None)
        self.register_buffer("packed", None)
        self.temperature = config.temperature

    # -- planning -----------------------------------------------------------------
    @classmethod
    def min_values(cls, spec: LayerSpec, config: MethodConfig) -> int:
        return bank_layout(spec, config, bank_sizes(spec, config)[0]).planned_values

    @classmethod
    def max_values(cls, spec: LayerSpec, config: MethodConfig) -> int:
        return bank_layout(spec, config, bank_sizes(spec, config)[-1]).planned_values

    # -- the weight ---------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        return self.indices is not None or self.is_packed

    @property
    def is_packed(self) -> bool:
        return self.packed is not None

    def binary_bank(self, original: torch.Tensor) -> torch.Tensor:
        """The +-1 bank ``(M, d, *kernel)``; gradients reach the latent through the straight-through sign.

        In the packed form the bank is the decoded stream (``original`` is empty).
        """
        if self.is_packed or original.numel() == 0:
            if not self.is_packed:  # a packed checkpoint's empty storage, before its stream is loaded
                self._enter_packed_form(torch.empty(self._stream_bytes(), dtype=torch.uint8, device=original.device))
            return self.decode(self.packed)[0].to(original.dtype)
        return _straight_through_sign(original)

    def selection(self) -> torch.Tensor:
        """Bank index of every slice, ``(N, S)`` int64: decoded from the stream, the frozen indices, or the logits' argmax."""
        if self.is_packed:
            return self.decode(self.packed)[1]
        return self.indices.long() if self.indices is not None else self.logits.detach().argmax(-1)

    def slice_scales(self) -> torch.Tensor:
        """The scale of every slice, ``(N, S)``."""
        return self.scale.expand(self.layout.filters, self.layout.slices, 1)[..., 0]

    def reconstruct(self, original: torch.Tensor) -> torch.Tensor:
        layout = self.layout
        bank = self.binary_bank(original).reshape(layout.bank_size, layout.filter_numel)
        if not self.frozen and self.logits.requires_grad and torch.is_grad_enabled():
            choice = _straight_through_argmax(self.logits, self.temperature).to(bank.dtype)
            slices = (choice.reshape(-1, layout.bank_size) @ bank).view(layout.filters, layout.slices, -1)
        else:
            slices = bank.index_select(0, self.selection().reshape(-1)).view(layout.filters, layout.slices, -1)
        return (slices * self.scale.to(bank.dtype)).reshape(self.spec.shape)

    @torch.no_grad()
    def rescale_(self, original: torch.Tensor, factor: float) -> None:
        """The bank is binary; the learned scales carry the magnitude."""
        self.scale.mul_(factor)

    def project(self, weight: torch.Tensor) -> torch.Tensor:
        """Least-squares fit of bank, selection and scales to ``weight`` by binary k-means.

        With scales a > 0 fixed, ||x - a b||^2 over b in {-1,1}^D is minimal for
        the bank filter with the largest <x, b> (assignment) and, per bank
        filter, b = sign(sum of a x over its slices) (update). The bank starts
        from the signs of M slices drawn with the layer's seed; after the
        rounds the scales are refit, a = <x, b> / ||b||^2 summed per scale.
        Sets the scales and the selection (logits = cosine similarity, so
        their argmax is the assignment, or the frozen indices) and returns the
        latent bank: sign from k-means, magnitude that of the cluster's mean
        slice in weight units, so an optimizer tuned for the dense weights
        flips latent signs at a sensible rate (a latent of magnitude ~1 would
        hardly ever flip).
        """
        layout = self.layout
        x = weight.detach().float().reshape(layout.filters, layout.slices, layout.filter_numel)
        rows = x.reshape(-1, layout.filter_numel)
        reduce = {"layer": (0, 1, 2), "filter": (1, 2), "slice": (2,)}[layout.scale]
        alpha = x.abs().mean(reduce, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        weighted = (x * alpha).reshape(-1, layout.filter_numel)
        generator = torch.Generator().manual_seed(layer_key(self.seed, self.spec.name, "bank"))
        start = torch.randperm(rows.shape[0], generator=generator)[: layout.bank_size].to(rows.device)
        bank = torch.where(rows[start] >= 0, 1.0, -1.0)
        for _ in range(PROJECTION_ITERATIONS):
            assign = (rows @ bank.T).argmax(1)
            sums = torch.zeros_like(bank).index_add_(0, assign, weighted)
            updated = torch.where(sums > 0, 1.0, torch.where(sums < 0, -1.0, bank))
            if torch.equal(updated, bank):
                break
            bank = updated
        assign = (rows @ bank.T).argmax(1)
        sums = torch.zeros_like(bank).index_add_(0, assign, weighted)
        chosen = bank.index_select(0, assign).view_as(x)
        if self.is_packed:
            raise ValueError(f"layer {self.spec.name!r} is finalized (packed): its bank and selection are fixed")
        with torch.no_grad():
            self.scale.data = ((x * chosen).sum(reduce, keepdim=True) / chosen.abs().sum(reduce, keepdim=True)).to(weight.dtype)
            if self.frozen:
                self.indices.copy_(assign.view(layout.filters, layout.slices))
            else:
                norms = rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
                cosine = (rows @ bank.T) / (norms * math.sqrt(layout.filter_numel))
                self.logits.data = cosine.view_as(self.logits.data).to(self.logits.device)
        typical = alpha.mean()
        counts = torch.bincount(assign, minlength=layout.bank_size)[:, None]
        magnitude = torch.where(counts > 0, sums.abs() / (counts.clamp_min(1) * typical), typical)
        latent = bank * magnitude.clamp_min(1e-3 * typical)
        return latent.view(layout.bank_size, layout.depth, *layout.kernel).to(weight.dtype)

    # -- training ------------------------------------------------------------------
    def on_train_step(self, step: int) -> None:
        """Anneal the selection temperature; freeze the selection once ``freeze_step`` is reached."""
        config: BinaryStackConfig = self.config
        progress = min(step / config.anneal_steps, 1.0) if config.anneal_steps else 0.0
        self.temperature = config.temperature * (config.final_temperature / config.temperature) ** progress
        if config.freeze_step is not None and step >= config.freeze_step:
            self.freeze()

    def freeze(self) -> None:
        """Replace the selection logits by their argmax as int32 indices; idempotent.

        Afterwards ``logits`` is gone from ``parameters()`` and ``state_dict()``
        (an optimizer built earlier keeps a stale reference that gets no more
        gradients) and ``indices`` is a persistent buffer.
        """
        if self.frozen:
            return
        self.indices = self.selection().to(torch.int32)
        self.logits = None

    def finalize(self) -> None:
        self.freeze()

    def finalize_storage(self, original: torch.Tensor) -> torch.Tensor | None:
        """Switch to the packed form: keep the :meth:`pack` stream, empty ``original``."""
        if self.is_packed:
            return None
        self.freeze()
        self._enter_packed_form(self.pack(original)["bits"])
        return original.detach().new_empty(0)

    def _stream_bytes(self) -> int:
        return -(-self.layout.stream_bits // 8)

    def _enter_packed_form(self, stream: torch.Tensor) -> None:
        """Adopt ``stream`` as the persistent state; bank and indices are decoded from it on every use."""
        self.logits = None
        self.indices = None
        self.packed = stream

    def decode(self, stream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The +-1 bank ``(M, d, *kernel)`` (float) and the ``(N, S)`` int64 indices a :meth:`pack` stream holds."""
        layout = self.layout
        bank_bits = layout.bank_size * layout.filter_numel
        bank = unpack_bits(stream[: -(-bank_bits // 8)], 1, bank_bits).to(self.scale.dtype) * 2 - 1
        indices = unpack_bits(stream, layout.index_bits, layout.filters * layout.slices, offset=bank_bits)
        return bank.view(layout.bank_size, layout.depth, *layout.kernel), indices.view(layout.filters, layout.slices)

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        # a frozen (indices) or packed (stream) checkpoint loads into a freshly compressed layer
        if prefix + "packed" in state_dict and not self.is_packed:
            stream = state_dict[prefix + "packed"]
            self._enter_packed_form(torch.empty(stream.shape, dtype=torch.uint8, device=self.scale.device))
        elif prefix + "indices" in state_dict:
            self.freeze()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- accounting -----------------------------------------------------------------
    def extra_values(self) -> int:
        """Indices and scales (the bank is ``original``); the training-only logits are not stored."""
        return self.layout.filters * self.layout.slices + self.layout.scale_count

    def training_values(self) -> int:
        return 0 if self.frozen else self.logits.numel()

    def stored_values(self, original: torch.Tensor) -> int:
        """The frozen form's numbers, whether the bank is the latent ``original`` or the packed stream."""
        return self.layout.stored_values

    def stored_bits(self, original: torch.Tensor, storage_dtype: torch.dtype) -> int:
        return self.layout.stored_bits(torch.finfo(storage_dtype).bits)

    def describe(self) -> str:
        layout = self.layout
        return (
            f"M={layout.bank_size} filters of {layout.depth}x{'x'.join(map(str, layout.kernel)) or '1'}, "
            f"S={layout.slices} slices/filter, {layout.index_bits}-bit indices, {layout.scale_count} scales"
            f"{'' if self.frozen else ', selection not frozen yet'}"
        )

    def extra_repr(self) -> str:
        return f"{self.spec.name}: {self.spec.shape} -> {self.describe()}"

    # -- saved format -------------------------------------------------------------------
    def pack(self, original: torch.Tensor, storage_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The stored form: ``bits`` (uint8: bank bits, 1 = +1, then the indices) and ``scale``.

        Takes exactly ``ceil(stored_bits / 8)`` bytes.
        """
        layout = self.layout
        dtype = storage_dtype or self.scale.dtype
        if self.is_packed:
            return {"bits": self.packed.clone(), "scale": self.scale.detach().to(dtype).clone()}
        bank_bits = (original.detach() >= 0).reshape(-1).to(torch.int64)
        index_bits = unpack_bits(pack_bits(self.selection(), layout.index_bits), 1, layout.filters * layout.slices * layout.index_bits)
        return {"bits": pack_bits(torch.cat([bank_bits, index_bits.to(bank_bits.device)]), 1),
                "scale": self.scale.detach().to(dtype).clone()}

    def unpack(self, packed: dict[str, torch.Tensor]) -> torch.Tensor:
        """Load :meth:`pack` output: freezes the selection, sets indices and scales, returns the +-1 bank for ``original``."""
        layout = self.layout
        scale = packed["scale"]
        if tuple(scale.shape) != layout.scale_shape:
            raise ValueError(f"layer {self.spec.name!r}: packed scale has shape {tuple(scale.shape)}, expected {layout.scale_shape}")
        bank, indices = self.decode(packed["bits"])
        if indices.numel() and int(indices.max()) >= layout.bank_size:
            raise ValueError(f"layer {self.spec.name!r}: packed index {int(indices.max())} >= bank size {layout.bank_size}")
        self.freeze()
        with torch.no_grad():
            self.indices.copy_(indices)
            self.scale.data = scale.to(self.scale.device, self.scale.dtype).clone()
        return bank.to(self.scale.device)
