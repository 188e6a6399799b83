"""Frequency Regularization (Zhao et al., 2023): a zigzag prefix of the whole tensor's DCT.

A weight W of canonical shape (out, in/groups, *kernel) is stored as the
first n coefficients of its orthonormal N-D DCT over every dim (4 for a 2-D
conv, 2 for a linear layer), taken in zigzag order (ascending index sum,
ties lexicographic; :func:`~hf_freqcompress.dct.zigzag_order`):

    v_i = DCT(W)[p_i],  i < n;     W_hat = IDCT(C),  C[p_i] = v_i, C = 0 elsewhere.

The positions p_i follow from the shape and n alone, so the stored tensor is
exactly the n coefficients. Because the DCT is orthonormal, keeping a subset
of coefficients is the least-squares projection onto that subspace.

Fast reconstruction. The first n zigzag positions all have index sum <= s
for a small s, so they lie in a corner box [0, b_0) x [0, b_1) x ... with
b_d <= s + 1. The prefix is scattered into that box (cached int32 positions,
a non-persistent buffer reported by ``cache_bytes``; nothing is sorted on the
hot path) and expanded by :func:`~hf_freqcompress.dct.idct_corner`, one
(n_d x b_d) product per dim: no dense N-D basis, no full-size spectrum.

Training schedule (the paper's, off by default). With ``drop_rate > 0`` the
layer starts from ``start`` coefficients (the whole tensor by default) and
after optimizer step t keeps

    kept_t = final + floor((start - final) * (1 - drop_rate) ** t),

which is the paper's keep_t = minrate + (1 - minrate)(1 - droprate)^t with
minrate = final / numel when start = numel. ``original`` keeps the start-size
prefix for the whole schedule (one fixed tensor for the optimizer); the
forward zeroes coefficients past ``kept`` (so they get no gradient), and
``kept`` is a persistent int64 buffer, so a state_dict taken mid-schedule
resumes exactly. ``hf_freqcompress.finalize(model)`` then cuts ``original``
down to the final prefix in place; an optimizer built before that must be
rebuilt to keep training. The coefficients past the final count are
training-only state: reports count the final prefix, the planned budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..dct import dct_corner, idct_corner, zigzag_order
from .base import CompressedWeight, LayerSpec, MethodConfig, compressed_weights
from .registry import register_method

__all__ = [
    "FreqRegConfig",
    "FreqRegWeight",
    "zigzag_prefix",
    "drop_rate_reaching",
    "draw_coefficients",
    "PAPER_CONV_FLOOR",
    "PAPER_LINEAR_FLOOR",
    "PAPER_INIT_STD",
]

PAPER_CONV_FLOOR = 128
PAPER_LINEAR_FLOOR = 256
"""The per-layer floors of kept coefficients in the authors' released code."""

PAPER_INIT_STD = 0.1
"""The std of the N(0, std) draw the authors' released code gives every frequency-domain weight."""


def _count_by_index_sum(shape: tuple[int, ...]) -> torch.Tensor:
    """int64 counts[L] = number of positions of ``shape`` whose indices sum to L.

    The coefficients of prod_d (1 + x + ... + x^(n_d - 1)); each factor is a
    moving-window sum, done with a cumulative sum, so no position is listed.
    """
    counts = torch.ones(1, dtype=torch.int64)
    for n in shape:
        prefix = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        level = torch.arange(len(counts) + n - 1)
        high = (level + 1).clamp(max=len(counts))
        low = (level - n + 1).clamp(min=0, max=len(counts))
        counts = prefix[high] - prefix[low]
    return counts


def _level_bound(shape: tuple[int, ...], cumulative: torch.Tensor, count: int) -> tuple[int, ...]:
    """The box [0, min(n_d, s + 1)) for the smallest level s with #(index sum <= s) >= count."""
    level = int(torch.searchsorted(cumulative, count))
    return tuple(min(n, level + 1) for n in shape)


def zigzag_prefix(shape: tuple[int, ...], count: int) -> tuple[tuple[int, ...], torch.Tensor]:
    """The corner box holding the first ``count`` zigzag positions of ``shape``, and those positions in it.

    Returns (box, positions): positions are row-major flat indices into the
    box, in zigzag order, int32 on the CPU. Only the box is sorted, never the
    whole tensor: the smallest level s with #(index sum <= s) >= count bounds
    every index by s, and zigzag order restricted to the box is the box's own
    zigzag order (same sums, same index tuples). The box is then tightened to
    the largest index actually used along each dim.
    """
    numel = math.prod(shape)
    if not 1 <= count <= numel:
        raise ValueError(f"a zigzag prefix of shape {shape} keeps 1..{numel} coefficients, got {count}")
    bound = _level_bound(shape, _count_by_index_sum(shape).cumsum(0), count)
    order = zigzag_order(bound)[:count]
    index = torch.unravel_index(order, bound)
    box = tuple(int(i.max()) + 1 for i in index)
    flat = torch.zeros_like(order)
    for i, n in zip(index, box):
        flat = flat * n + i
    return box, flat.to(torch.int32)


def drop_rate_reaching(gap: int, steps: int) -> float:
    """The drop rate whose schedule removes ``gap`` coefficients in ``steps`` steps.

    floor(gap * (1 - r)^steps) = 0 needs (1 - r)^steps < 1 / gap; r = 1 - (gap + 1)^(-1 / steps)
    gives gap / (gap + 1) < 1. Pass the largest start - final gap over the layers.
    """
    if gap < 0 or steps < 1:
        raise ValueError(f"drop_rate_reaching needs gap >= 0 and steps >= 1, got gap={gap}, steps={steps}")
    return 1.0 - (gap + 1) ** (-1.0 / steps)


def draw_coefficients(model: nn.Module, std: float = PAPER_INIT_STD, seed: int = 0) -> int:
    """Redraw every freqreg layer's stored coefficients from N(0, std): the init for training from scratch.

    ``compress()`` projects the current weight, which is right for a trained
    model but keeps almost nothing of a fresh one: a random init spreads its
    energy evenly over the whole spectrum, so an n-coefficient prefix of an
    N-weight tensor keeps ~n/N of it (264 of FC 2048->196's 401,408 weights:
    the norm falls from ~8.1 to ~0.2) and the network starts near zero. The
    authors' code draws the frequency-domain weights directly, N(0, 0.1)
    (``PAPER_INIT_STD``). Every stored coefficient is drawn, those past
    ``kept`` during a schedule included; other layers and biases are left
    alone. Returns the number of coefficients drawn.
    """
    if not std > 0:
        raise ValueError(f"draw_coefficients needs std > 0, got {std}; the paper's init is PAPER_INIT_STD = {PAPER_INIT_STD}")
    generator = torch.Generator().manual_seed(seed)
    drawn = 0
    with torch.no_grad():
        for _, module, param_name, parametrization in compressed_weights(model):
            if isinstance(parametrization, FreqRegWeight):
                original = module.parametrizations[param_name].original
                draw = torch.randn(original.shape, generator=generator, dtype=torch.float32) * std
                original.copy_(draw)
                drawn += original.numel()
    if drawn == 0:
        raise ValueError("draw_coefficients found no freqreg layer in the model; compress it with method='freqreg' first")
    return drawn


@dataclass
class FreqRegConfig(MethodConfig):
    """Options of ``freqreg``.

    drop_rate: per-step geometric decay of the kept count (the paper's
        droprate); 0 (default) compresses one-shot to the planned count.
    start_fraction: fraction of the tensor kept when the schedule starts
        (the paper starts from the whole tensor, 1.0).
    conv_floor / linear_floor: fewest coefficients the planner gives a conv
        (>2-D) or linear (2-D) weight; the paper's recipe uses
        ``PAPER_CONV_FLOOR`` (128) and ``PAPER_LINEAR_FLOOR`` (256).
    """

    method = "freqreg"
    drop_rate: float = 0.0
    start_fraction: float = 1.0
    conv_floor: int = 1
    linear_floor: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"freqreg drop_rate must be in [0, 1), got {self.drop_rate}; 0 turns the schedule off")
        if not 0.0 < self.start_fraction <= 1.0:
            raise ValueError(f"freqreg start_fraction must be in (0, 1], got {self.start_fraction}")
        for name in ("conv_floor", "linear_floor"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"freqreg {name} must be >= 1, got {getattr(self, name)}")

    def floor(self, spec: LayerSpec) -> int:
        """Fewest kept coefficients for this layer (never more than it has)."""
        floor = self.linear_floor if len(spec.shape) == 2 else self.conv_floor
        return min(int(floor), spec.numel)


@register_method
class FreqRegWeight(CompressedWeight):
    config_class = FreqRegConfig
    linear_in_original = True

    def __init__(self, spec, layer_kind, config, stored_values, seed, device=None) -> None:
        super().__init__(spec, layer_kind, config, stored_values, seed, device)
        self.final = self.planned_values
        if config.drop_rate > 0:
            self.start = max(self.final, math.ceil(config.start_fraction * spec.numel))
        else:
            self.start = self.final
        self.stored = self.start
        self.register_buffer("kept", torch.tensor(self.start, dtype=torch.int64, device=device))
        self.register_buffer("positions", None, persistent=False)
        self.box: tuple[int, ...] = ()
        self._kept_count = self.start  # Python mirror of `kept`, so stepping never syncs with the device
        self._cumulative = _count_by_index_sum(spec.shape).cumsum(0) if self.start > self.final else None
        self._lay_out(self.start, device)

    def _lay_out(self, count: int, device: torch.device | None) -> None:
        """Scatter positions for the first ``count`` coefficients, and their corner box.

        During the schedule the layout follows ``kept`` down (:meth:`_follow`),
        so the IDCT works on a corner that shrinks with it instead of the
        start-size one.
        """
        self.box, positions = zigzag_prefix(self.spec.shape, count)
        self.positions = positions if device is None else positions.to(device)

    def _layout_count(self, kept: int) -> int:
        """Coefficients laid out while ``kept`` are: all up to index sum 2^j - 1 >= the level of ``kept``.

        A pure function of ``kept`` (a resumed model computes bit-identical
        weights), and each rung halves the corner along every truncated dim,
        so the layout changes only ~log2(sum of dims) times over a schedule.
        """
        level = int(torch.searchsorted(self._cumulative, kept))
        rung = min(2 ** math.ceil(math.log2(level + 1)) - 1, len(self._cumulative) - 1)
        return min(self.stored, int(self._cumulative[rung]))

    def _follow(self, kept: int) -> None:
        """Set the schedule's kept count and cut the layout to its rung."""
        self._kept_count = kept
        self.kept.fill_(kept)
        count = self._layout_count(kept)
        if count != self.positions.numel():
            self._lay_out(count, self.positions.device)

    def _adopt(self, count: int, device: torch.device | None) -> None:
        """Take storage of ``count`` coefficients: the schedule's start (mid-schedule checkpoint) or the final one."""
        if count not in (self.start, self.final):
            raise ValueError(
                f"layer {self.spec.name!r}: the stored tensor has {count} coefficients, but this freqreg layer "
                f"keeps {self.final} (or {self.start} during its schedule): build it with the plan it was saved with"
            )
        self.stored = count
        self._lay_out(count, device)

    # -- parametrization ------------------------------------------------------
    def reconstruct(self, original: torch.Tensor) -> torch.Tensor:
        if original.shape[0] != self.stored:  # a checkpoint's storage
            self._adopt(original.shape[0], original.device)
        count = self.positions.numel()
        coefficients = original[:count]
        if count > self.final:  # the schedule runs: coefficients past `kept` are dropped (and get no gradient)
            coefficients = coefficients * (torch.arange(count, device=original.device) < self.kept)
        corner = original.new_zeros(math.prod(self.box)).index_put((self.positions,), coefficients)
        return idct_corner(corner.view(self.box), self.spec.shape)

    def project(self, weight: torch.Tensor) -> torch.Tensor:
        box, positions = self.box, self.positions
        if positions.numel() != self.stored:  # the layout has followed the schedule down
            box, positions = zigzag_prefix(self.spec.shape, self.stored)
        return dct_corner(weight, box).reshape(-1)[positions.to(weight.device)]

    @classmethod
    def min_values(cls, spec: LayerSpec, config: FreqRegConfig) -> int:
        return config.floor(spec)

    # -- schedule -------------------------------------------------------------
    def kept_at(self, step: int) -> int:
        """kept_t = final + floor((start - final) (1 - drop_rate)^t): the count after step t."""
        decay = (1.0 - self.config.drop_rate) ** step
        return self.final + math.floor((self.start - self.final) * decay)

    def on_train_step(self, step: int) -> None:
        """Shrink ``kept`` to the schedule's count; it never grows back (resumes keep their progress).

        Only Python arithmetic and a buffer fill: no device sync per step.
        """
        if self.stored > self.final:
            self._follow(min(self._kept_count, self.kept_at(step)))

    def finalize(self) -> None:
        self._kept_count = self.final
        self.kept.fill_(self.final)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.stored > self.final and not self.kept.is_meta:  # resume mid-schedule with the same layout
            self._follow(int(self.kept))

    def rebuild_caches(self, device: torch.device) -> None:
        """Lay the positions out for the current state: the schedule's rung while it runs, else the storage."""
        self._lay_out(self._layout_count(self._kept_count) if self.stored > self.final else self.stored, device)

    def finalize_storage(self, original: torch.Tensor) -> torch.Tensor | None:
        if original.shape[0] == self.final:
            return None
        self._adopt(self.final, original.device)
        return original.detach()[: self.final].clone()

    # -- accounting -----------------------------------------------------------
    def stored_values(self, original: torch.Tensor) -> int:
        """The final prefix: coefficients past it exist only while the schedule runs."""
        return min(original.numel(), self.final) + self.extra_values()

    def extra_repr(self) -> str:
        schedule = f", schedule from {self.start}" if self.start > self.final else ""
        return f"{self.spec.name}: {self.spec.shape} -> {self.final} zigzag DCT coefficients in box {self.box}{schedule}"
