"""Compression methods, one module each, registered by name on import."""

from __future__ import annotations

from .base import CompressedWeight, LayerSpec, MethodConfig, compressed_weights
from .binary_stack import BinaryStackConfig
from .freqreg import FreqRegConfig
from .freshnets import FreshNetsConfig
from .funhash import FunHashConfig
from .hashednets import HashedNetsConfig
from .pq import PQConfig, PQLayout
from .registry import available_methods, get_method, register_method, resolve_config

__all__ = [
    "CompressedWeight",
    "compressed_weights",
    "LayerSpec",
    "MethodConfig",
    "FreqRegConfig",
    "HashedNetsConfig",
    "PQConfig",
    "PQLayout",
    "FunHashConfig",
    "FreshNetsConfig",
    "BinaryStackConfig",
    "available_methods",
    "get_method",
    "register_method",
    "resolve_config",
]
