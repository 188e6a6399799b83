"""The ``hf_freqcompress`` quantizer: transformers loads and saves compressed checkpoints natively.

A compressed transformers checkpoint's ``config.json`` carries the whole
compression record (:class:`~hf_freqcompress.checkpoint.CompressionRecord`)
as ``quantization_config`` with ``quant_method: "hf_freqcompress"``. With the
quantizer registered (``import hf_freqcompress``), ``AutoModelFor*.from_pretrained``
builds the model on meta as usual, then (``_process_model_before_weight_loading``)
replays the plans on the skeleton through the one build path
(:func:`~hf_freqcompress.plan.apply_plans`), so the model's state-dict keys are
the checkpoint's and transformers assigns the compressed tensors itself; no
dense weight of a compressed layer is ever allocated. After loading, caches
are rebuilt and tied tensors re-tied (:func:`~hf_freqcompress.checkpoint.finish_loading`).

Saving goes the other way: :func:`attach_quantizer` gives a model compressed
with ``compress()`` the quantizer a loaded model has, and transformers'
``save_pretrained`` asks it for the state dict (``get_state_dict_and_metadata``),
so ``model.save_pretrained`` / ``push_to_hub`` write a complete folder.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..api import materialize
from ..checkpoint import (
    CONFIG_NAME,
    SAFETENSORS_METADATA,
    CompressionRecord,
    TensorInfo,
    finish_loading,
    fit_skeleton,
    read_config,
    read_header,
    record_of,
    storage_placeholders,
    tensor_infos,
    tensors_to_save,
)
from ..plan import apply_plans

__all__ = ["QUANT_METHOD", "HfFreqCompressConfig", "HfFreqCompressQuantizer", "register", "attach_quantizer",
           "detach_quantizer"]

QUANT_METHOD = "hf_freqcompress"
_SOURCE = "config.json quantization_config"
_RECORD_KEYS = frozenset(CompressionRecord("", [], {}).to_dict())


class HfFreqCompressConfig(QuantizationConfigMixin):
    """``quantization_config`` of a compressed checkpoint: ``quant_method`` plus the compression record."""

    def __init__(self, record: CompressionRecord) -> None:
        self.quant_method = QUANT_METHOD
        self.record = record

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, **self.record.to_dict()}

    @classmethod
    def from_dict(cls, config_dict: Any, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """Validate every field (known methods, format version, types); ValueError naming the field otherwise."""
        if not isinstance(config_dict, dict):
            raise ValueError(f"{_SOURCE} must be a JSON object, not {type(config_dict).__name__}")
        data = dict(config_dict)
        method = data.pop("quant_method", None)
        if method != QUANT_METHOD:
            raise ValueError(f"{_SOURCE} has quant_method {method!r}, not {QUANT_METHOD!r}")
        unknown = sorted(set(data) - _RECORD_KEYS)
        if unknown:
            raise ValueError(f"{_SOURCE} has unknown field(s) {unknown}; it was not written by hf-freqcompress")
        config = cls(CompressionRecord.from_dict(data, _SOURCE))
        return (config, kwargs) if return_unused_kwargs else config


class HfFreqCompressQuantizer(HfQuantizer):
    """Loads checkpoints saved compressed; never compresses on load (use ``hf_freqcompress.compress``)."""

    requires_calibration = True

    def __init__(self, quantization_config: HfFreqCompressConfig, **kwargs: Any) -> None:
        if not kwargs.get("pre_quantized", True):
            raise ValueError(
                "the hf_freqcompress quantization_config loads checkpoints saved compressed; to compress a dense "
                "model, load it as usual and call hf_freqcompress.compress(model, budget=..., method=...)"
            )
        super().__init__(quantization_config, **kwargs)
        self.loaded = False  # True once a checkpoint was loaded through this quantizer
        self._deferred: list[str] = []

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("hf_freqcompress checkpoints cannot be offloaded to disk; use device_map='auto' or 'cpu'")

    def _process_model_before_weight_loading(
        self, model: nn.Module, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> nn.Module:
        self._deferred = prepare_skeleton(model, self.quantization_config.record, checkpoint_files)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        finish_loading(model, self.quantization_config.record.aliases)
        _initialize_deferred(model, self._deferred)
        self.loaded = True
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The compressed state to save, with the record refreshed (later compress() calls, tied tensors)."""
        record = record_of(model)
        self.quantization_config = model.config.quantization_config = HfFreqCompressConfig(record)
        return tensors_to_save(model, record), dict(SAFETENSORS_METADATA)

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True  # the stored values are ordinary Parameters: Trainer fine-tunes them, no adapter needed

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        materialize(model)
        return model.to(dtype) if isinstance(dtype, torch.dtype) else model


def register() -> None:
    """Register the config and quantizer under ``quant_method="hf_freqcompress"`` (once; done on import)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(HfFreqCompressConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(HfFreqCompressQuantizer)


# -- loading --------------------------------------------------------------------


def prepare_skeleton(model: nn.Module, record: CompressionRecord, checkpoint_files: list[str] | None) -> list[str]:
    """Validate the checkpoint against the record and replay the plans on ``model``'s meta skeleton.

    Reads the safetensors headers only (no tensor data), cross-checks a
    ``compression_config.json`` beside the weights when there is one (and
    then the weights' size and SHA-256), and fits the skeleton to the
    file's tensors so transformers' loading finds every key it expects.
    Returns the modules whose initialization waits for the loaded model
    (:func:`_defer_initialization`).
    """
    paths = _weight_files(checkpoint_files)
    _check_architecture(model)
    header = _model_names(model, _cross_checked_header(paths, record))
    build_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    with torch.device("cpu"):  # transformers builds under a meta default device; methods plan with real tensors
        apply_plans(model, record.plans, storage_placeholders(record.plans, header, build_dtype))
    fit_skeleton(model, header, record.plans, record.aliases, paths[0], cast_floats=True)
    return _defer_initialization(model)


def _weight_files(checkpoint_files: list[str] | None) -> list[Path]:
    paths = [Path(name) for name in checkpoint_files or []]
    if not paths or any(path.suffix != ".safetensors" for path in paths):
        raise ValueError(
            f"an hf_freqcompress checkpoint loads from safetensors files, got {[p.name for p in paths]}; "
            "save it with hf_freqcompress.save_pretrained or model.save_pretrained (transformers >= 5)"
        )
    return paths


def _check_architecture(model: nn.Module) -> None:
    """The record names layers by their path in the saved class: loading into another head cannot work."""
    saved = getattr(model.config, "architectures", None) or []
    if saved and type(model).__name__ not in saved:
        raise ValueError(
            f"this hf_freqcompress checkpoint was saved from {saved[0]} and stores only compressed numbers for its "
            f"layers; load it with {saved[0]} (or the AutoModelFor* class that builds it), not {type(model).__name__}"
        )


def _cross_checked_header(paths: list[Path], record: CompressionRecord) -> dict[str, TensorInfo]:
    """The files' tensor infos; with ``compression_config.json`` beside them, both records must agree."""
    config_path = paths[0].parent / CONFIG_NAME
    if not config_path.is_file():
        header: dict[str, TensorInfo] = {}
        for path in paths:
            header.update(tensor_infos(path))
        return header
    saved = read_config(paths[0].parent)
    if saved.record.to_dict() != record.to_dict() or len(paths) != 1:
        raise ValueError(
            f"{_SOURCE} and {config_path} describe different compressions (or weight files): the folder mixes "
            "two saves; save the model again with one writer (hf_freqcompress.save_pretrained writes both)"
        )
    return read_header(paths[0], saved)


def _model_names(model: nn.Module, header: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """The file's tensors under the names the model gives them.

    transformers renames legacy checkpoint keys while loading (the model's
    conversion mapping) and its ``save_pretrained`` writes them back in the
    legacy form; the same renaming applies here. Converters that merge or
    split tensors cannot apply to compressed storage, so they are refused.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    renamed: dict[str, TensorInfo] = {}
    for key, info in header.items():
        name, converted = rename_source_key(key, renamings, converters)
        if converted is not None:
            raise ValueError(
                f"transformers converts checkpoint tensor {key!r} while loading ({converted!r}), which compressed "
                "storage cannot go through; save with hf_freqcompress.save_pretrained"
            )
        renamed[name] = info
    return renamed


def _defer_initialization(model: nn.Module) -> list[str]:
    """Keep transformers' weight initialization away from compressed layers; returns the modules to init later.

    Every tensor is loaded from the checkpoint (``fit_skeleton`` checked), but
    ``_init_weights`` reads ``module.weight`` of a compressed layer, or of a
    child (T5, CLIP's embeddings), which would rebuild a dense weight from
    caches not computed yet. Compressed modules and their ancestors are
    marked initialized; the ancestors that own non-persistent buffers (which
    their init computes) are returned, to be initialized once caches exist.
    """
    compressed = {name for name, module in model.named_modules() if parametrize.is_parametrized(module)}
    ancestors = {".".join(name.split(".")[:depth]) for name in compressed for depth in range(name.count(".") + 1)}
    deferred = []
    for name, module in model.named_modules():
        if name in compressed or name in ancestors:
            module._is_hf_initialized = True
            if module._non_persistent_buffers_set:
                deferred.append(name)
    return deferred


def _initialize_deferred(model: nn.Module, names: list[str]) -> None:
    """Run each deferred module's ``_init_weights`` (its owning PreTrainedModel's) now that caches exist.

    Loaded tensors carry transformers' ``_is_hf_initialized`` flag and stay
    untouched; the non-persistent buffers get their values. An init that reads
    a compressed child's weight (CLIP's patch embedding) rebuilds that one
    weight transiently, as any forward would.
    """
    from transformers import PreTrainedModel
    from transformers import initialization

    owners = {name: module for name, module in model.named_modules() if isinstance(module, PreTrainedModel)}
    with torch.no_grad(), initialization.guard_torch_init_functions():
        for name in names:
            owner = max((o for o in owners if not o or name == o or name.startswith(f"{o}.")), key=len)
            owners[owner]._init_weights(model.get_submodule(name))


# -- saving: hook a compressed model into transformers ------------------------------------


def attach_quantizer(model: nn.Module, loaded: bool = False) -> None:
    """Set ``config.quantization_config``, ``hf_quantizer`` and the flags a quantizer-loaded model has."""
    existing = getattr(model, "hf_quantizer", None)
    if existing is not None and not isinstance(existing, HfFreqCompressQuantizer):
        warnings.warn(
            f"the model is also quantized with {existing.quantization_config.quant_method!r}: transformers' "
            "save_pretrained follows that quantizer and will not save the compression; use "
            "hf_freqcompress.save_pretrained",
            stacklevel=3,
        )
        return
    try:
        config = HfFreqCompressConfig(record_of(model))
    except ValueError as error:  # an inconsistent record must not fail compress() after it changed the model
        warnings.warn(f"transformers' save_pretrained cannot save this model: {error}", stacklevel=3)
        return
    quantizer = HfFreqCompressQuantizer(config)
    quantizer.loaded = loaded or getattr(existing, "loaded", False)
    model.config.quantization_config = config
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD


def detach_quantizer(model: nn.Module) -> None:
    """Undo :func:`attach_quantizer` and what loading through transformers set: a plain model again."""
    if not isinstance(getattr(model, "hf_quantizer", None), HfFreqCompressQuantizer):
        return
    for owner, attribute in [(model, "hf_quantizer"), (model, "is_quantized"), (model, "quantization_method"),
                             (model.config, "quantization_config"), (model.config, "_is_quantized")]:
        if attribute in vars(owner):
            delattr(owner, attribute)


register()
