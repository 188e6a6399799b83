"""Compression methods, one module each, registered by name on import."""

from __future__ import annotations

from .base import CompressedWeight, LayerSpec, MethodConfig
from .binary_stack import BinaryStackConfig
from .hashednets import HashedNetsConfig
from .registry import available_methods, get_method, register_method, resolve_config

__all__ = [
    "CompressedWeight",
    "LayerSpec",
    "MethodConfig",
    "HashedNetsConfig",
    "BinaryStackConfig",
    "available_methods",
    "get_method",
    "register_method",
    "resolve_config",
]
