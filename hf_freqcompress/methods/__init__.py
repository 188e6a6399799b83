"""Compression methods, one module each, registered by name on import."""

from __future__ import annotations

from .base import CompressedWeight, LayerSpec, MethodConfig
from .freqreg import FreqRegConfig
from .hashednets import HashedNetsConfig
from .registry import available_methods, get_method, register_method, resolve_config

__all__ = [
    "CompressedWeight",
    "LayerSpec",
    "MethodConfig",
    "FreqRegConfig",
    "HashedNetsConfig",
    "available_methods",
    "get_method",
    "register_method",
    "resolve_config",
]
