"""Build base models by name, from configs only (never downloads weights).

``timm:<name>`` goes through ``timm.create_model(name, pretrained=False)``;
``hf:<model_type>`` (or ``hf:<local config dir>``) builds a transformers
model from its config, picking the first task head that fits the config
(image classification, causal LM, sequence classification, bare model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from . import zoo  # noqa: F401  registers the MNIST networks (timm:mnist_mlp, timm:mnist_lenet) in timm

__all__ = ["build_model", "parse_model_args", "RECIPE_ATTRIBUTE"]

RECIPE_ATTRIBUTE = "hf_freqcompress_recipe"
"""Set on timm models built here: ``{"name", "kwargs"}``, so a checkpoint can record exactly how to
rebuild the architecture (timm itself does not keep constructor kwargs). ``materialize`` removes it."""

_HF_AUTO_CLASSES = (
    "AutoModelForImageClassification",
    "AutoModelForCausalLM",
    "AutoModelForSequenceClassification",
    "AutoModel",
)


def parse_model_args(pairs: list[str] | None) -> dict[str, Any]:
    """``["num_classes=10", "img_size=32"]`` -> kwargs; values are read as JSON when they parse."""
    kwargs: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"model argument {pair!r} must look like key=value")
        try:
            kwargs[key] = json.loads(raw)
        except json.JSONDecodeError:
            kwargs[key] = raw
    return kwargs


def _build_timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:10]
        raise ValueError(f"unknown timm model {name!r}; similar names: {close}")
    model = timm.create_model(name, pretrained=False, **kwargs)
    setattr(model, RECIPE_ATTRIBUTE, {"name": name, "kwargs": kwargs})
    return model


def _build_transformers(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import transformers

    path = Path(name)
    if path.exists():
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, **kwargs)
    else:
        try:
            config = transformers.AutoConfig.for_model(name, **kwargs)
        except ValueError as error:
            raise ValueError(f"unknown transformers model type {name!r} (and no such local config dir): {error}") from None
    for class_name in _HF_AUTO_CLASSES:
        auto_class = getattr(transformers, class_name)
        if type(config) in auto_class._model_mapping:
            return auto_class.from_config(config)
    raise ValueError(f"no transformers model class accepts a {type(config).__name__}")


_BUILDERS = {"timm": _build_timm, "hf": _build_transformers}


def build_model(spec: str, **kwargs: Any) -> nn.Module:
    """``timm:resnet18`` or ``hf:gpt2`` (extra kwargs go to the model or config) -> a fresh model."""
    source, sep, name = spec.partition(":")
    if not sep or source not in _BUILDERS or not name:
        raise ValueError(f"model {spec!r} must be 'timm:<name>' or 'hf:<model_type or config dir>'")
    return _BUILDERS[source](name, kwargs)
