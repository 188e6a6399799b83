"""Which layer kinds can be compressed, and how each exposes its weight.

Every method works on one canonical layout, ``(out, in, *kernel)``: Linear
is ``(out, in)``, a Conv2d ``(out, in / groups, kh, kw)``. Layer kinds whose
native layout differs (transformers' GPT-2 ``Conv1D`` stores ``(in, out)``)
register a pair of views to and from it, so no method ever special-cases a
layer type. Adding a layer kind is one :func:`register_layer_kind` call.

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

__all__ = ["LayerKind", "register_layer_kind", "find_layer_kind", "layer_kinds"]


def _identity(weight: torch.Tensor) -> torch.Tensor:
    return weight


def _swap_first_two(weight: torch.Tensor) -> torch.Tensor:
    return weight.transpose(0, 1)


def _always_supported(module: nn.Module) -> str | None:
    return None


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


register_layer_kind(LayerKind("linear", nn.Linear))
register_layer_kind(LayerKind("conv1d", nn.Conv1d))
register_layer_kind(LayerKind("conv2d", nn.Conv2d))
register_layer_kind(LayerKind("conv3d", nn.Conv3d))
register_layer_kind(
    LayerKind(
        "transformers_conv1d",
        "transformers.pytorch_utils.Conv1D",
        to_canonical=_swap_first_two,
        to_native=_swap_first_two,
    )
)
register_layer_kind(
    LayerKind("multihead_attention", nn.MultiheadAttention, param_name="in_proj_weight", refusal=_mha_refusal)
)
