"""Compression methods, one module each, registered by name on import."""

from __future__ import annotations

from .base import CompressedWeight, LayerSpec, MethodConfig
from .hashednets import HashedNetsConfig
from .freshnets import FreshNetsConfig
from .registry import available_methods, get_method, register_method, resolve_config

__all__ = [
    "CompressedWeight",
    "LayerSpec",
    "MethodConfig",
    "HashedNetsConfig",
    "FreshNetsConfig",
    "available_methods",
    "get_method",
    "register_method",
    "resolve_config",
]
