"""The checkpoint folder format: ``compression_config.json`` + ``model.safetensors``.

This module knows the files and their validation, nothing about the Hub.
The compression record (:class:`CompressionRecord`: format version, plans,
tied tensors) is the part both ``compression_config.json`` and a
transformers ``config.json``'s ``quantization_config`` hold; the loading steps
(:func:`fit_skeleton`, :func:`finish_loading`) serve this library's loader
and the transformers quantizer alike.
Everything a folder claims is checked before a tensor reaches a model: the
JSON schema and format version, that every method is installed, the
safetensors file's size and SHA-256 (so truncation and corruption are
caught), and every tensor's presence, shape and dtype against the rebuilt
skeleton. Reading uses JSON and safetensors only; nothing is unpickled.

Tensors are saved generically from the model's ``state_dict()``: the
compressed storage of every layer (``<layer>.parametrizations.weight.original``
and whatever parameters or persistent buffers the method's module holds)
plus the untargeted parameters and buffers. Floating-point tensors of
compressed layers are cast to the plan's storage dtype; integer or packed
data keeps its dtype. Tied tensors are written once and recorded as aliases.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .dtypes import FLOAT_DTYPES, SAFETENSORS_DTYPES, TENSOR_DTYPES, dtype_name
from .methods import compressed_weights
from .plan import CompressionPlan, plans_of
from .surgery import StoredTensors

__all__ = [
    "FORMAT_VERSION",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "SAFETENSORS_METADATA",
    "CompressionRecord",
    "CheckpointConfig",
    "record_of",
    "read_config",
    "tensors_to_save",
    "write_tensors",
    "read_header",
    "tensor_infos",
    "storage_placeholders",
    "fit_skeleton",
    "load_tensors",
    "finish_loading",
]

FORMAT_VERSION = 1
CONFIG_NAME = "compression_config.json"
WEIGHTS_NAME = "model.safetensors"
LIBRARY = "hf-freqcompress"
FORMAT_METADATA_KEY = "hf_freqcompress_format"
SAFETENSORS_METADATA = {"format": "pt", FORMAT_METADATA_KEY: str(FORMAT_VERSION)}
"""The safetensors header metadata every writer of this library puts in the weights file."""

TensorInfo = tuple[tuple[int, ...], str]
"""A tensor's (shape, dtype name), as the header states it or the skeleton expects it."""


def _storage_prefix(weight_name: str) -> str:
    module_name, _, param_name = weight_name.rpartition(".")
    return f"{module_name}.parametrizations.{param_name}." if module_name else f"parametrizations.{param_name}."


def _storage_dtypes(plans: list[CompressionPlan]) -> dict[str, torch.dtype]:
    """State-dict key prefix of each compressed layer's storage -> its storage dtype."""
    return {_storage_prefix(layer.name): plan.storage_dtype for plan in plans for layer in plan.report.layers}


def _storage_dtype(key: str, dtypes: dict[str, torch.dtype]) -> torch.dtype | None:
    """The storage dtype a floating-point tensor ``key`` is saved in, None for untargeted tensors."""
    return next((dtype for prefix, dtype in dtypes.items() if key.startswith(prefix)), None)


def library_version() -> str:
    from . import __version__

    return __version__


@dataclass(frozen=True)
class CompressionRecord:
    """A model's compression, whatever file holds it: the plans of its ``compress()`` calls and tied tensors.

    ``compression_config.json`` holds it beside the base architecture and the
    weights' checksum; a transformers ``config.json`` holds it as its
    ``quantization_config``. Either alone rebuilds every parametrization.
    """

    library_version: str
    plans: list[CompressionPlan]
    aliases: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "library": LIBRARY,
            "library_version": self.library_version,
            "compressions": [plan.to_dict() for plan in self.plans],
            "tied_tensors": self.aliases,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "CompressionRecord":
        """Validate the record's fields; ``source`` (the file, the field) is named in each error."""
        if not isinstance(data, dict):
            raise ValueError(f"{source} must hold a JSON object, not {type(data).__name__}")
        version = _field(data, "format_version", int, source)
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{source} has format_version {version}, newer than this hf-freqcompress reads "
                f"({FORMAT_VERSION}); upgrade hf-freqcompress (pip install -U hf-freqcompress)"
            )
        if version < 1 or _field(data, "library", str, source) != LIBRARY:
            raise ValueError(f"{source} is not an hf-freqcompress compression record")
        compressions = _field(data, "compressions", list, source)
        if not compressions:
            raise ValueError(f"{source} lists no compression")
        plans = [CompressionPlan.from_dict(item, f"{source} compressions[{i}]") for i, item in enumerate(compressions)]
        aliases = _field(data, "tied_tensors", dict, source)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
            raise ValueError(f"{source} tied_tensors must map tensor names to tensor names")
        return cls(_field(data, "library_version", str, source), plans, aliases)


@dataclass(frozen=True)
class CheckpointConfig:
    """What ``compression_config.json`` holds, validated: the record, the base architecture, the weights file."""

    record: CompressionRecord
    base_model: dict[str, Any]
    dtype: str
    weights_sha256: str
    weights_size: int

    @property
    def plans(self) -> list[CompressionPlan]:
        return self.record.plans

    @property
    def aliases(self) -> dict[str, str]:
        return self.record.aliases

    @property
    def library_version(self) -> str:
        return self.record.library_version

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.record.to_dict(),
            "base_model": self.base_model,
            "dtype": self.dtype,
            "files": {WEIGHTS_NAME: {"size": self.weights_size, "sha256": self.weights_sha256}},
        }

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "CheckpointConfig":
        """Validate every field; ``source`` (the file) is named in each error."""
        record = CompressionRecord.from_dict(data, source)
        base = _field(data, "base_model", dict, source)
        if base.get("library") == "timm":
            _field(base, "name", str, f"{source} base_model")
            _field(base, "kwargs", dict, f"{source} base_model")
        elif base.get("library") == "transformers":
            _field(base, "class", str, f"{source} base_model")
            _field(base, "config", dict, f"{source} base_model")
        else:
            raise ValueError(f"{source} base_model.library must be 'timm' or 'transformers', got {base.get('library')!r}")
        dtype = _field(data, "dtype", str, source)
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"{source} dtype {dtype!r} is not a floating-point dtype name")
        weights = _field(_field(data, "files", dict, source), WEIGHTS_NAME, dict, f"{source} files")
        return cls(
            record=record,
            base_model=base,
            dtype=dtype,
            weights_sha256=_field(weights, "sha256", str, f"{source} files.{WEIGHTS_NAME}"),
            weights_size=_field(weights, "size", int, f"{source} files.{WEIGHTS_NAME}"),
        )


def _field(data: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{where}: field {key!r} must be a {kind.__name__}, got {value!r:.80}")
    return value


def read_config(folder: Path) -> CheckpointConfig:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {folder} is not an hf-freqcompress checkpoint folder (a compressed model saved "
            "with transformers' save_pretrained loads with AutoModelFor*.from_pretrained after import hf_freqcompress)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); the file is corrupted") from None
    return CheckpointConfig.from_dict(data, str(path))


# -- saving -------------------------------------------------------------------


def record_of(model: nn.Module) -> CompressionRecord:
    """The record of a compressed ``model``: its plans (checked against its parametrizations) and tied tensors."""
    return CompressionRecord(library_version(), plans_of(model), tied_aliases(model.state_dict()))


def tied_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{alias: first name}`` for state-dict entries that are the very same tensor as an earlier one (tied weights)."""
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, tensor in state.items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape, tensor.stride())
        if tensor.numel() and identity in seen:
            aliases[key] = seen[identity]
        else:
            seen[identity] = key
    return aliases


def tensors_to_save(model: nn.Module, record: CompressionRecord) -> dict[str, torch.Tensor]:
    """The model's state, compressed floats cast to their storage dtype, tied tensors once (``record.aliases``)."""
    storage_dtypes = _storage_dtypes(record.plans)
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, tensor in model.state_dict().items():
        if key in record.aliases:
            continue
        dtype = _storage_dtype(key, storage_dtypes)
        saved = tensor.detach().cpu()
        if dtype is not None and saved.is_floating_point():
            saved = saved.to(dtype)
        if saved.untyped_storage().data_ptr() in storages or not saved.is_contiguous():
            saved = saved.clone(memory_format=torch.contiguous_format)  # safetensors refuses shared memory
        storages.add(saved.untyped_storage().data_ptr())
        tensors[key] = saved
    return tensors


def write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> tuple[int, str]:
    """Write ``tensors`` as safetensors; returns the file's size and SHA-256 for the config."""
    save_file(tensors, str(path), metadata=SAFETENSORS_METADATA)
    return path.stat().st_size, _sha256(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- loading ------------------------------------------------------------------


def read_header(path: Path, config: CheckpointConfig) -> dict[str, TensorInfo]:
    """Every tensor's (shape, dtype) from the safetensors header, after checking size and checksum."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the checkpoint folder is incomplete")
    size = path.stat().st_size
    if size != config.weights_size:
        raise ValueError(
            f"{path} has {size} bytes but the config records {config.weights_size}: the file is truncated or "
            "was replaced; download or save it again"
        )
    if _sha256(path) != config.weights_sha256:
        raise ValueError(f"{path} does not match the SHA-256 its config records: the file is corrupted")
    return tensor_infos(path)


def tensor_infos(path: Path) -> dict[str, TensorInfo]:
    """Every tensor's (shape, dtype) from a safetensors header, which must not come from a newer format version."""
    try:
        with safe_open(str(path), framework="pt") as file:
            _check_format_metadata(path, file.metadata() or {})
            header = {}
            for key in file.keys():
                view = file.get_slice(key)
                if view.get_dtype() not in SAFETENSORS_DTYPES:
                    raise ValueError(f"{path}: tensor {key!r} has dtype {view.get_dtype()}, which this loader does not read")
                header[key] = (tuple(view.get_shape()), SAFETENSORS_DTYPES[view.get_dtype()])
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from None
    return header


def _check_format_metadata(path: Path, metadata: dict[str, str]) -> None:
    """The header's ``hf_freqcompress_format`` (absent in files saved before it existed) must be one this version reads."""
    version = metadata.get(FORMAT_METADATA_KEY)
    if version is None:
        return
    if not version.isdigit() or not 1 <= int(version) <= FORMAT_VERSION:
        raise ValueError(
            f"{path} was written in hf-freqcompress format {version!r}, which this version (format "
            f"{FORMAT_VERSION}) cannot read; upgrade hf-freqcompress (pip install -U hf-freqcompress)"
        )


def storage_placeholders(plans: list[CompressionPlan], header: dict[str, TensorInfo], dtype: torch.dtype) -> dict[str, StoredTensors]:
    """Meta tensors shaped like each layer's saved ``original`` (or ``original0, original1, ...``).

    They are what each parametrization adopts when the plans are replayed on
    the skeleton; the values come later from the file.
    """
    storage: dict[str, StoredTensors] = {}
    for plan in plans:
        for layer in plan.report.layers:
            prefix = _storage_prefix(layer.name)
            if prefix + "original" in header:
                storage[layer.name] = torch.empty(header[prefix + "original"][0], dtype=dtype, device="meta")
                continue
            parts = []
            while f"{prefix}original{len(parts)}" in header:
                parts.append(torch.empty(header[f"{prefix}original{len(parts)}"][0], dtype=dtype, device="meta"))
            if not parts:
                raise ValueError(f"the checkpoint lacks tensor {prefix}original, the storage of layer {layer.name!r}")
            storage[layer.name] = tuple(parts)
    return storage


def fit_skeleton(
    skeleton: nn.Module,
    header: dict[str, TensorInfo],
    plans: list[CompressionPlan],
    aliases: dict[str, str],
    path: Path,
    cast_floats: bool = False,
) -> None:
    """Check the file's tensors against ``skeleton`` and let its modules adapt to them, on meta only.

    Runs PyTorch's own load protocol with meta tensors shaped like the file
    (no data is read), so a method whose state layout changes when it is
    finalized (selection logits replaced by integer indices, say) adapts in
    its ``_load_from_state_dict`` exactly as in a plain ``load_state_dict``.
    Then every tensor's presence, shape and dtype is checked: floating-point
    storage of compressed layers at its plan's storage dtype, everything
    else at the skeleton's own dtype, or any float dtype with ``cast_floats``
    (the caller casts untargeted floats while loading, as transformers does).
    """
    dangling = {alias: source for alias, source in aliases.items() if source not in header}
    if dangling:
        raise ValueError(f"{path}: tied tensors {dangling} refer to tensors the file does not hold")
    before = skeleton.state_dict()
    for key in sorted(header.keys() & before.keys()):
        if header[key][0] != tuple(before[key].shape):
            raise ValueError(
                f"{path}: tensor {key!r} has shape {list(header[key][0])} but the model's is {list(before[key].shape)}: "
                "the folder was saved from another architecture or configuration"
            )
    meta = {
        key: torch.empty(shape, dtype=before[key].dtype if key in before else TENSOR_DTYPES[dtype], device="meta")
        for key, (shape, dtype) in header.items()
    }
    meta.update({alias: meta[source] for alias, source in aliases.items()})
    try:
        result = skeleton.load_state_dict(meta, strict=False, assign=True)
    except RuntimeError as error:
        raise ValueError(f"{path} does not fit the model: {error}") from None
    if result.missing_keys:
        missing = sorted(result.missing_keys)
        raise ValueError(f"{path} lacks tensor(s) {missing[:5]} ({len(missing)} in all) that this model needs")
    if result.unexpected_keys:
        unexpected = sorted(result.unexpected_keys)
        raise ValueError(
            f"{path} holds tensor(s) {unexpected[:5]} ({len(unexpected)} in all) that the model does not have: "
            "the folder was saved from another architecture"
        )
    state = {key: tensor for key, tensor in skeleton.state_dict().items() if key not in aliases}
    for key, expected in _wrong_dtypes(state, header, _storage_dtypes(plans), cast_floats):
        raise ValueError(
            f"{path}: tensor {key!r} is {header[key][1]} {list(header[key][0])}, expected {expected} "
            f"{list(state[key].shape)}: the folder was saved with another configuration"
        )


def _wrong_dtypes(state: dict[str, torch.Tensor], header: dict[str, TensorInfo], storage_dtypes: dict[str, torch.dtype],
                  cast_floats: bool) -> list[tuple[str, str]]:
    """(key, expected dtype) of every file tensor whose shape or dtype is not what the skeleton expects."""
    wrong = []
    for key, tensor in state.items():
        stored = _storage_dtype(key, storage_dtypes) if tensor.is_floating_point() else None
        expected = dtype_name(stored or tensor.dtype)
        shape, dtype = header[key]
        castable = cast_floats and stored is None and tensor.is_floating_point() and dtype in FLOAT_DTYPES
        if shape != tuple(tensor.shape) or (dtype != expected and not castable):
            wrong.append((key, expected))
    return wrong


def load_tensors(skeleton: nn.Module, path: Path, aliases: dict[str, str], device: torch.device) -> None:
    """Fill the fitted skeleton from the file: assign tensors, then :func:`finish_loading`.

    Tensors are assigned rather than copied (``assign=True``), so meta
    parameters become real ones without a dense allocation first; stored
    values are cast to the skeleton's compute dtype. Each tensor gets its own
    freshly allocated (aligned) memory: safetensors hands out views at
    arbitrary offsets of one buffer, and CPU kernels choose their summation
    order by alignment, so a view would change the logits in the last bit.
    """
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device=str(device)) as file:
        for key, target in skeleton.state_dict().items():
            if key not in aliases:
                state[key] = file.get_tensor(key).to(target.dtype, copy=True)
    for alias, source in aliases.items():
        state[alias] = state[source]
    skeleton.load_state_dict(state, strict=True, assign=True)
    finish_loading(skeleton, aliases)
    skeleton.to(device)


def finish_loading(model: nn.Module, aliases: dict[str, str]) -> None:
    """After the tensors are in place: re-tie tied tensors, rebuild every layer's caches where its storage lives.

    Shared by this library's loader and the transformers quantizer, so both
    leave a model in the same state; fails if any tensor is still on meta.
    """
    _retie(model, aliases)
    for _, module, param_name, parametrization in compressed_weights(model):
        storage = next(module.parametrizations[param_name].parameters())  # original (or original0)
        parametrization.rebuild_caches(storage.device)
    _check_no_meta(model)


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make each alias the very Parameter/buffer object of its source again (tied weights stay tied)."""
    for alias, source in aliases.items():
        owner_name, _, name = alias.rpartition(".")
        source_name, _, source_attr = source.rpartition(".")
        owner, source_owner = model.get_submodule(owner_name), model.get_submodule(source_name)
        table = "_parameters" if name in owner._parameters else "_buffers"
        getattr(owner, table)[name] = getattr(source_owner, table)[source_attr]


def _check_no_meta(model: nn.Module) -> None:
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        owners = {type(p).__name__ for _, _, _, p in compressed_weights(model)}
        raise RuntimeError(
            f"tensors {left[:5]} hold no values after loading; a non-persistent buffer must be rebuilt by the "
            f"method's rebuild_caches() (methods in this model: {sorted(owners)})"
        )
