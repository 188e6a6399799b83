"""hf-freqcompress: make timm and transformers models 10x-1000x smaller.

``compress(model, budget="1/64", method="freshnets")`` swaps the weights of
conv/linear layers for parametrizations that store a few numbers and rebuild
the weight on the fly; the model still trains, saves and loads as usual.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .api import compress, finalize, get_reports, materialize, on_train_step, regularization
from .budget import parse_budget
from .layers import LayerKind, register_layer_kind
from .methods import (
    BinaryStackConfig,
    CompressedWeight,
    FreqRegConfig,
    FreshNetsConfig,
    FunHashConfig,
    HashedNetsConfig,
    LayerSpec,
    MethodConfig,
    PQConfig,
    available_methods,
    register_method,
)
from .integrations import register_transformers
from .recompute import disable_weight_recompute, enable_weight_recompute, is_weight_recompute_enabled
from .report import CompressionReport, LayerReport

try:
    __version__ = version("hf-freqcompress")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0.dev0"

register_transformers()  # AutoModelFor*.from_pretrained loads compressed checkpoints (transformers imported lazily)

_LAZY = {name: "hub" for name in ("save_pretrained", "from_pretrained", "push_to_hub", "push_folder")}
"""Names imported on first use: saving and loading pull in huggingface_hub, safetensors and accelerate."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "compress",
    "materialize",
    "get_reports",
    "save_pretrained",
    "from_pretrained",
    "push_to_hub",
    "push_folder",
    "on_train_step",
    "finalize",
    "regularization",
    "enable_weight_recompute",
    "disable_weight_recompute",
    "is_weight_recompute_enabled",
    "parse_budget",
    "CompressionReport",
    "LayerReport",
    "MethodConfig",
    "FreqRegConfig",
    "HashedNetsConfig",
    "PQConfig",
    "FunHashConfig",
    "FreshNetsConfig",
    "BinaryStackConfig",
    "available_methods",
    "register_method",
    "CompressedWeight",
    "LayerSpec",
    "LayerKind",
    "register_layer_kind",
    "__version__",
]
