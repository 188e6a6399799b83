"""Record how to rebuild a model's base architecture, and rebuild it without weights.

A checkpoint folder stores only compressed numbers, so loading must first
build the original architecture: ``timm.create_model(name, **kwargs)`` for
timm models, the transformers class from its config otherwise. Parameters
are created on the meta device (``accelerate.init_empty_weights``), so no
dense weight is ever allocated; buffers stay real, because the
non-persistent ones (position ids, relative-position indices) are never in
a checkpoint and must be computed as the constructor does.

timm does not keep a model's constructor kwargs, so :func:`describe` recovers
the ones that change parameter shapes (``num_classes``, ``in_chans``,
``img_size``) and :func:`check_rebuild` verifies, at save time, that the
record rebuilds the same modules and shapes; a user passes the rest as
``base_model_kwargs``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from torch.nn.utils import parametrize

from .integrations import is_transformers_model
from .methods import CompressedWeight
from .models import timm_architecture
from .state import RECIPE_ATTRIBUTE

__all__ = ["describe", "build", "check_rebuild", "write_hub_config"]

_LOADING_KWARGS = {"pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"}
"""timm.create_model arguments that would load or download weights (torch.load unpickles): never taken from a file."""


def _timm_kwargs(model: nn.Module) -> dict[str, Any]:
    """Shape-changing kwargs readable from a timm model (verified later by :func:`check_rebuild`)."""
    kwargs: dict[str, Any] = {}
    if isinstance(getattr(model, "num_classes", None), int):
        kwargs["num_classes"] = model.num_classes
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None:
        kwargs["in_chans"] = first_conv.in_channels
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        kwargs["img_size"] = list(img_size) if isinstance(img_size, tuple) else img_size
    return kwargs


def describe(model: nn.Module, base_model_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON record from which :func:`build` rebuilds ``model``'s architecture.

    ``{"library": "timm", "name": ..., "kwargs": {...}}`` or
    ``{"library": "transformers", "class": ..., "config": {...}}``.
    """
    if is_transformers_model(model):
        if base_model_kwargs:
            raise ValueError("base_model_kwargs apply to timm models; a transformers model is rebuilt from its config")
        config = json.loads(model.config.to_json_string(use_diff=False))
        config.pop("quantization_config", None)  # the record describes the base architecture, not the compression
        return {"library": "transformers", "class": type(model).__name__, "config": config}
    recipe = getattr(model, RECIPE_ATTRIBUTE, None)
    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if recipe is not None:
        name, kwargs = recipe["name"], dict(recipe["kwargs"])
    elif architecture:
        name, kwargs = architecture, _timm_kwargs(model)
    else:
        raise ValueError(
            f"cannot record how to rebuild a {type(model).__name__}: save_pretrained supports timm models "
            "(made by timm.create_model) and transformers PreTrainedModels"
        )
    return {"library": "timm", "name": name, "kwargs": {**kwargs, **(base_model_kwargs or {})}}


def build(record: dict[str, Any]) -> nn.Module:
    """The architecture ``record`` describes, with parameters on the meta device (no weights allocated).

    Only names are looked up (a timm registry name, a transformers class
    name); nothing from the record is imported or executed.
    """
    library = record.get("library")
    with init_empty_weights(include_buffers=False):
        if library == "timm":
            refused = sorted(_LOADING_KWARGS & set(record["kwargs"]))
            if refused:
                raise ValueError(f"base model kwargs {refused} would load weights from elsewhere; refusing them")
            if record["name"].startswith("hf-hub:"):
                raise ValueError(f"base model {record['name']!r} names a Hub repo; a checkpoint records an architecture")
            return timm_architecture(record["name"], record["kwargs"])
        if library == "transformers":
            import transformers

            model_class = getattr(transformers, record["class"], None)
            if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
                raise ValueError(f"transformers has no model class {record['class']!r}")
            return model_class(model_class.config_class.from_dict(record["config"]))
    raise ValueError(f"unknown base model library {library!r}; expected 'timm' or 'transformers'")


def _layout(model: nn.Module) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every module's type and every parameter/buffer's dense shape, compressed weights included.

    Parametrized modules report their original class and their weights'
    dense shapes (from the layer spec, without reconstructing anything), so
    a compressed model and its bare rebuild compare equal.
    """
    layout: dict[str, tuple[str, tuple[int, ...]]] = {}
    inside_parametrizations = {
        id(part) for module in model.modules() if parametrize.is_parametrized(module)
        for part in module.parametrizations.modules()
    }
    for name, module in model.named_modules():
        if id(module) in inside_parametrizations:
            continue
        cls = type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)
        layout[f"module {name or '<root>'}"] = (cls.__qualname__, ())
        for tensor_name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            layout[f"tensor {name}.{tensor_name}"] = ("", tuple(tensor.shape))
        if parametrize.is_parametrized(module):
            for param_name, chain in module.parametrizations.items():
                compressed = next(p for p in chain if isinstance(p, CompressedWeight))
                native = compressed.layer_kind.to_native(torch.empty(compressed.spec.shape, device="meta"))
                layout[f"tensor {name}.{param_name}"] = ("", tuple(native.shape))
    return layout


def check_rebuild(model: nn.Module, record: dict[str, Any]) -> None:
    """Fail unless ``build(record)`` has the same modules and tensor shapes as ``model``."""
    expected, rebuilt = _layout(model), _layout(build(record))
    differences = [
        f"{key}: saved model {expected.get(key)}, rebuilt {rebuilt.get(key)}"
        for key in sorted(set(expected) | set(rebuilt))
        if expected.get(key) != rebuilt.get(key)
    ]
    if differences:
        shown = "; ".join(differences[:5])
        hint = (
            "pass the constructor arguments timm cannot report as base_model_kwargs={...}"
            if record["library"] == "timm"
            else "the model's config does not describe it"
        )
        raise ValueError(
            f"the recorded base architecture ({record.get('name') or record.get('class')}) does not rebuild this model "
            f"({len(differences)} differences; {shown}): {hint}"
        )


def write_hub_config(model: nn.Module, record: dict[str, Any], dtype: torch.dtype, path: Path) -> None:
    """Write the ``config.json`` the Hub and the base library read for ``model``'s architecture.

    transformers: the model's config as its ``save_pretrained`` writes it
    (``architectures``, ``dtype``: without it ``dtype="auto"`` would take the
    storage dtype of the first stored tensor) with its ``quantization_config``,
    so ``AutoModelFor*.from_pretrained`` rebuilds the compression. timm: the
    config timm's ``push_to_hub`` writes (architecture, num_classes,
    model_args, pretrained_cfg), so the Hub page names the architecture;
    such a folder still loads through ``hf_freqcompress.from_pretrained``.
    """
    if record["library"] == "transformers":
        config = json.loads(model.config.to_json_string())
        config.update(architectures=[type(model).__name__], dtype=str(dtype).removeprefix("torch."))
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return
    from timm.models._hub import save_config_for_hf

    save_config_for_hf(model, str(path), model_args=record["kwargs"])
