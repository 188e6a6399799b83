"""Build the base model a run starts from: with its trained weights unless asked otherwise.

``timm:<name>``, ``timm:<name>.<tag>`` or ``timm:hf-hub:<repo id>`` go through
``timm.create_model(pretrained=True)`` (the zoo's MNIST networks, which have
no weights, are built untrained). ``hf:<repo id or local folder>`` loads the
class that ``config.json``'s ``architectures`` names with transformers'
``from_pretrained`` (``revision``; remote code only with
``trust_remote_code=True``). ``pretrained=False`` builds a randomly
initialised model instead, and only then; ``hf:<model_type>`` (``gpt2``,
``bert``) with ``pretrained=False`` builds one from the model type's default
config without touching the network. Every model built here records where
it came from (:data:`~hf_freqcompress.state.SOURCE_ATTRIBUTE`), which the
report, the run summary and the model card show.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from .state import RECIPE_ATTRIBUTE, SOURCE_ATTRIBUTE
from .zoo import ZOO_MODELS, create_zoo_model

__all__ = ["build_model", "parse_model_args", "model_source", "timm_architecture"]

_HF_AUTO_CLASSES = (
    "AutoModelForImageClassification",
    "AutoModelForCausalLM",
    "AutoModelForSequenceClassification",
    "AutoModel",
)
"""Fallback head choice for a config that names no architecture (a bare model type)."""


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


def timm_architecture(name: str, kwargs: dict[str, Any], pretrained: bool = False) -> nn.Module:
    """A timm (or zoo) model by registry name, recording how to rebuild its architecture."""
    if name in ZOO_MODELS:
        model = create_zoo_model(name, pretrained, **kwargs)
    else:
        import timm

        if not name.startswith("hf-hub:") and not timm.is_model(name):
            close = timm.list_models(f"*{name.partition('.')[0]}*")[:10]
            raise ValueError(f"unknown timm model {name!r}; similar names: {close}")
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or name
    setattr(model, RECIPE_ATTRIBUTE, {"name": architecture, "kwargs": kwargs})
    return model


Built = tuple[nn.Module, bool, "str | None"]
"""(model, whether trained weights were loaded, the Hub id they came from or None)."""


def _build_timm(name: str, pretrained: bool | None, kwargs: dict[str, Any]) -> Built:
    loads = name not in ZOO_MODELS if pretrained is None else pretrained
    model = timm_architecture(name, kwargs, loads)
    hub_id = name.removeprefix("hf-hub:") if name.startswith("hf-hub:") else model.pretrained_cfg.get("hf_hub_id")
    return model, loads, hub_id if loads else None


def _transformers_class(config: Any, trust_remote_code: bool) -> Any:
    """The class ``config.architectures`` names (the saved head), else the first auto class that fits."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        model_class = getattr(transformers, name, None)
        if isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel):
            return model_class
    for class_name in _HF_AUTO_CLASSES:
        auto_class = getattr(transformers, class_name)
        if type(config) in auto_class._model_mapping or (trust_remote_code and getattr(config, "auto_map", None)):
            return auto_class
    raise ValueError(f"no transformers model class accepts a {type(config).__name__}")


def _random_init(model_class: Any, config: Any, trust_remote_code: bool) -> nn.Module:
    if hasattr(model_class, "_model_mapping"):  # an Auto class
        return model_class.from_config(config, trust_remote_code=trust_remote_code)
    return model_class(config)


def _build_transformers(
    name: str, pretrained: bool | None, kwargs: dict[str, Any], revision: str | None, trust_remote_code: bool
) -> Built:
    import transformers

    local = Path(name).is_dir()
    if pretrained is False and not local and name in transformers.CONFIG_MAPPING:
        config = transformers.AutoConfig.for_model(name, **kwargs)
        return _random_init(_transformers_class(config, False), config, False), False, None
    options = {"revision": revision, "trust_remote_code": trust_remote_code, "local_files_only": local}
    config = transformers.AutoConfig.from_pretrained(name, **options, **kwargs)
    model_class = _transformers_class(config, trust_remote_code)
    if pretrained is False:
        return _random_init(model_class, config, trust_remote_code), False, None
    if local and not _has_weights(Path(name)):
        raise ValueError(
            f"{name} holds a config but no weights (model.safetensors, pytorch_model.bin or shards); "
            "pass pretrained=False (--random-init) to build a randomly initialised model from its config"
        )
    return model_class.from_pretrained(name, config=config, **options), True, None if local else name


def _has_weights(folder: Path) -> bool:
    patterns = ("model.safetensors", "model-*.safetensors", "pytorch_model.bin", "pytorch_model-*.bin", "*.index.json")
    return any(next(folder.glob(pattern), None) is not None for pattern in patterns)


def build_model(
    spec: str,
    *,
    pretrained: bool | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """``timm:resnet50.a1_in1k`` or ``hf:user/repo`` (extra kwargs go to the model or config) -> a model.

    ``pretrained``: None (default) loads trained weights wherever the spec has
    them; False builds a random initialisation; True requires weights.
    """
    if pretrained is not None and not isinstance(pretrained, bool):
        raise TypeError(f"pretrained must be True, False or None, got {pretrained!r}")
    source, sep, name = spec.partition(":")
    if not sep or source not in ("timm", "hf") or not name:
        raise ValueError(f"model {spec!r} must be 'timm:<name>[.<tag>]', 'timm:hf-hub:<repo>' or 'hf:<repo id or folder>'")
    if source == "timm":
        if revision is not None or trust_remote_code:
            raise ValueError("revision and trust_remote_code apply to hf: models, not to timm ones")
        model, loaded, hub_id = _build_timm(name, pretrained, kwargs)
    else:
        model, loaded, hub_id = _build_transformers(name, pretrained, kwargs, revision, trust_remote_code)
    setattr(model, SOURCE_ATTRIBUTE, {"spec": spec, "pretrained": loaded, "weights": hub_id})
    return model


def model_source(model: nn.Module) -> dict[str, Any] | None:
    """Where :func:`build_model` took ``model`` from: ``{"spec", "pretrained", "weights"}``, or None."""
    return getattr(model, SOURCE_ATTRIBUTE, None)
