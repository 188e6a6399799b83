"""Which layer kinds can be compressed, and how each exposes its weight.

Every method works on one canonical layout, ``(out, in, *kernel)``: Linear
is ``(out, in)``, a Conv2d ``(out, in / groups, kh, kw)``. Layer kinds whose
native layout differs (transformers' GPT-2 ``Conv1D`` stores ``(in, out)``)
register a pair of views to and from it, so no method ever special-cases a
layer type. Adding a layer kind is one :func:`register_layer_kind` call.

A kind may also say which input rows its canonical weight multiplies
(``calibration_rows``): calibration-aware compression (``compress(...,
calibration=...)``) fits the stored values to the layer's output on those
rows instead of to the weight alone.

Kinds are matched along the module's MRO, so subclasses (timm's StdConv2d,
Conv2dSame, ScaledStdConv2d; torch's NonDynamicallyQuantizableLinear) are
covered by their base registration. Types may be given by qualified name so
optional libraries are never imported just to be recognised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

__all__ = ["LayerKind", "CalibrationRows", "register_layer_kind", "find_layer_kind", "layer_kinds"]


def _identity(weight: torch.Tensor) -> torch.Tensor:
    return weight


def _swap_first_two(weight: torch.Tensor) -> torch.Tensor:
    return weight.transpose(0, 1)


def _always_supported(module: nn.Module) -> str | None:
    return None


CalibrationRows = Callable[[nn.Module, torch.Tensor], "torch.Tensor | None"]
"""``rows(module, input)``: (groups, n, fan_in) rows that the canonical weight, viewed as (groups, out / groups,
fan_in), multiplies on this input; None when the module's forward does more than that product."""


def _feature_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Linear-like layers: every position's feature vector is a row."""
    return x.reshape(1, -1, x.shape[-1])


def _conv_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Conv1d/2d with zero padding and torch's own forward: the unfolded patches of each group."""
    if type(module).forward not in (nn.Conv1d.forward, nn.Conv2d.forward) or module.padding_mode != "zeros":
        return None
    if isinstance(module.padding, str):  # "same" / "valid": resolved inside torch's forward
        return None
    def as_2d(values: tuple[int, ...], height: int) -> tuple[int, ...]:  # Conv1d is a Conv2d of height 1
        return tuple(values) if len(values) == 2 else (height, *values)

    patches = torch.nn.functional.unfold(
        x if x.dim() == 4 else x.unsqueeze(-2),
        as_2d(module.kernel_size, 1), dilation=as_2d(module.dilation, 1),
        padding=as_2d(module.padding, 0), stride=as_2d(module.stride, 1),
    )  # (batch, channels * kernel, positions), channel-major like the weight
    groups = module.groups
    batch, features, positions = patches.shape
    grouped = patches.view(batch, groups, features // groups, positions)
    return grouped.permute(1, 0, 3, 2).reshape(groups, batch * positions, features // groups)


@dataclass(frozen=True)
class LayerKind:
    """How one module type exposes a compressible weight.

    ``refusal(module)`` returns a reason when a particular instance cannot be
    compressed (say, attention with separate q/k/v projections), else None.
    """

    name: str
    module_type: type | str
    param_name: str = "weight"
    to_canonical: Callable[[torch.Tensor], torch.Tensor] = _identity
    to_native: Callable[[torch.Tensor], torch.Tensor] = _identity
    refusal: Callable[[nn.Module], str | None] = field(default=_always_supported)
    calibration_rows: CalibrationRows | None = None

    def matches(self, cls: type) -> bool:
        if isinstance(self.module_type, str):
            return f"{cls.__module__}.{cls.__qualname__}" == self.module_type
        return cls is self.module_type


_REGISTRY: list[LayerKind] = []


def register_layer_kind(kind: LayerKind) -> LayerKind:
    """Make a module type compressible; later registrations win over earlier ones."""
    _REGISTRY.insert(0, kind)
    return kind


def layer_kinds() -> tuple[LayerKind, ...]:
    return tuple(_REGISTRY)


def find_layer_kind(module: nn.Module) -> LayerKind | None:
    """The registered kind of ``module``, searching its class hierarchy nearest first."""
    for cls in type(module).__mro__:
        for kind in _REGISTRY:
            if kind.matches(cls):
                return kind
    return None


def _mha_refusal(module: nn.Module) -> str | None:
    if not getattr(module, "_qkv_same_embed_dim", True):
        return "MultiheadAttention with kdim/vdim != embed_dim keeps separate q/k/v weights; target them by name instead"
    return None


register_layer_kind(LayerKind("linear", nn.Linear, calibration_rows=_feature_rows))
register_layer_kind(LayerKind("conv1d", nn.Conv1d, calibration_rows=_conv_rows))
register_layer_kind(LayerKind("conv2d", nn.Conv2d, calibration_rows=_conv_rows))
register_layer_kind(LayerKind("conv3d", nn.Conv3d))
register_layer_kind(
    LayerKind(
        "transformers_conv1d",
        "transformers.pytorch_utils.Conv1D",
        to_canonical=_swap_first_two,
        to_native=_swap_first_two,
        calibration_rows=_feature_rows,
    )
)
register_layer_kind(
    LayerKind("multihead_attention", nn.MultiheadAttention, param_name="in_proj_weight", refusal=_mha_refusal)
)
