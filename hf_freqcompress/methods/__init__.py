"""Compression methods, one module each, registered by name on import."""

from __future__ import annotations

from .base import CompressedWeight, LayerSpec, MethodConfig
from .freshnets import FreshNetsConfig
from .funhash import FunHashConfig
from .hashednets import HashedNetsConfig
from .pq import PQConfig
from .registry import available_methods, get_method, register_method, resolve_config

__all__ = [
    "CompressedWeight",
    "LayerSpec",
    "MethodConfig",
    "HashedNetsConfig",
    "PQConfig",
    "FunHashConfig",
    "FreshNetsConfig",
    "available_methods",
    "get_method",
    "register_method",
    "resolve_config",
]
