"""Save, load and push compressed models, the way PEFT ships adapters.

``save_pretrained`` writes a small folder (see :mod:`.checkpoint`): the
compressed numbers and untargeted tensors in ``model.safetensors``, the
recipe in ``compression_config.json``, a model card, and ``config.json``
(transformers: the model's config with the ``quantization_config`` that
``AutoModelFor*.from_pretrained`` reads after ``import hf_freqcompress``;
timm: the config timm's ``push_to_hub`` writes). ``from_pretrained``
rebuilds the base architecture with meta parameters, replays the recorded
compression plan and assigns the saved tensors, so dense weights never exist
as parameters. ``push_to_hub`` / ``push_folder`` upload with huggingface_hub
(merging into a README already on the Hub); a repo id passed to
``from_pretrained`` is fetched with ``snapshot_download`` (cache, offline
mode, endpoints and tokens all work as elsewhere in the ecosystem).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import torch
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch import nn

from . import architecture
from .card import build_card, infer_base_model, infer_license, merge_cards
from .checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointConfig,
    fit_skeleton,
    load_tensors,
    read_config,
    read_header,
    record_of,
    storage_placeholders,
    tensors_to_save,
    write_tensors,
)
from .dtypes import dtype_name, float_dtype
from .integrations import attach
from .plan import apply_plans

__all__ = ["save_pretrained", "from_pretrained", "push_to_hub", "push_folder", "describe_folder"]

TRANSFORMERS_CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
_FOLDER_FILES = [CONFIG_NAME, WEIGHTS_NAME, TRANSFORMERS_CONFIG_NAME, CARD_NAME]


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The one floating dtype of the model's tensors; loading recreates it."""
    dtypes = {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}
    if len(dtypes) != 1:
        raise ValueError(
            f"the model mixes floating dtypes {sorted(map(dtype_name, dtypes))}; cast it with model.to(dtype) "
            "before saving (storage_dtype already sets the checkpoint's precision)"
        )
    return dtypes.pop()


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    overwrite: bool = False,
    base_model_kwargs: dict[str, Any] | None = None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    metrics: dict[str, float] | None = None,
    license: str | None = None,
    card_name: str | None = None,
) -> Path:
    """Write the compressed ``model`` to ``save_directory``; returns the folder.

    Everything is checked (the model is compressed, its architecture can be
    rebuilt from the record) before a file is written, and the folder
    appears at once or not at all (written to a temporary sibling, then
    renamed). An existing checkpoint folder is replaced only with
    ``overwrite=True``. ``config.json`` is the transformers config with the
    ``quantization_config`` that ``AutoModelFor*.from_pretrained`` reads, or
    a timm-style config for timm models.

    Args:
        base_model_kwargs: timm constructor arguments the model cannot report
            (anything besides num_classes, in_chans, img_size).
        base_model / datasets / metrics / license: model card metadata (Hub
            repo id of the dense model, dataset ids, ``{"accuracy": 0.98}``,
            a license id); ``base_model`` and ``license`` are inferred when the
            model knows them (:func:`~hf_freqcompress.card.infer_base_model`).
        card_name: the name the card's load snippets use (default: folder name).
    """
    record = record_of(model)
    if not record.plans:
        raise ValueError("the model has no compression to save; call compress(model, ...) first")
    base_record = architecture.describe(model, base_model_kwargs)
    architecture.check_rebuild(model, base_record)
    dtype = _model_dtype(model)
    target = Path(save_directory)
    _check_target(target, overwrite)
    base_model = base_model or infer_base_model(model)
    card_metadata = {"base_model": base_model, "datasets": datasets, "metrics": metrics,
                     "license": license or infer_license(model, base_model)}
    attach(model)  # transformers models: config.json's quantization_config is the fresh record
    with _atomic_folder(target) as folder:
        size, sha256 = write_tensors(tensors_to_save(model, record), folder / WEIGHTS_NAME)
        config = CheckpointConfig(record, base_record, dtype_name(dtype), sha256, size)
        (folder / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
        architecture.write_hub_config(model, base_record, dtype, folder / TRANSFORMERS_CONFIG_NAME)
        build_card(config, card_name or target.name, **card_metadata).save(folder / CARD_NAME)
    return target


def _check_target(target: Path, overwrite: bool) -> None:
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder; choose another save_directory")
    if not (target / CONFIG_NAME).is_file():
        raise FileExistsError(
            f"{target} is a non-empty folder that is not an hf-freqcompress checkpoint; refusing to replace it"
        )
    if not overwrite:
        raise FileExistsError(
            f"{target} already holds a checkpoint; pass overwrite=True (--overwrite on the command line) to replace it"
        )


@contextmanager
def _atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder, then swap it in for ``target`` in two renames.

    A crash or error before the swap leaves ``target`` untouched; the old
    folder is moved aside first and restored if the second rename fails.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield folder
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        if target.exists():
            target.rename(old)
        try:
            folder.rename(target)
        except BaseException:
            if old.exists():
                old.rename(target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def resolve_folder(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    subfolder: str | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local checkpoint folder (never the network), or a Hub repo id downloaded or found in the cache."""
    sub = _subfolder(subfolder)
    path = Path(name_or_path)
    if path.is_dir():
        return path / sub
    text = str(name_or_path)
    try:
        validate_repo_id(text)
    except HFValidationError:
        raise FileNotFoundError(f"{text!r} is neither a local folder nor a valid Hub repo id") from None
    files = [str(PurePosixPath(sub, name)) for name in (CONFIG_NAME, WEIGHTS_NAME)]
    snapshot = snapshot_download(
        text, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only, allow_patterns=files
    )
    return Path(snapshot) / sub


def _subfolder(subfolder: str | None) -> str:
    """A relative path inside the folder or repo; refuses absolute paths and '..' (they would leave it)."""
    if not subfolder:
        return ""
    path = PurePosixPath(subfolder.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"subfolder {subfolder!r} must be a relative path inside the repo, without '..'")
    return str(path)


def _load_device(device: str | torch.device | None, device_map: str | dict[str, Any] | torch.device | None) -> torch.device:
    """Where the whole model goes: ``device``, or ``device_map`` ("cpu", "auto": the accelerator if any, a device,
    or ``{"": device}``); a compressed model is small, so it is never split across devices."""
    if device is not None and device_map is not None:
        raise ValueError("pass device or device_map, not both")
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError(
                f"device_map {device_map} splits the model; a compressed model loads on one device: "
                "pass device_map='auto', 'cpu', a device, or {'': device}"
            )
        device_map = device_map[""]
    if device_map == "auto":
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        return accelerator or torch.device("cpu")
    return torch.device(device or device_map or "cpu")


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    device_map: str | dict[str, Any] | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """Load a compressed model from a folder or Hub repo id, in eval mode.

    The keyword arguments mean what they mean in transformers'
    ``from_pretrained``: ``device_map`` ("cpu", "auto", a device; the model is
    never split), ``dtype`` (None or "auto": the saved dtype), ``revision``,
    ``subfolder``, ``local_files_only``, ``token``, ``cache_dir``. The folder
    is validated entirely (config schema and version, installed methods,
    file size and checksum, every tensor's name, shape and dtype) before any
    tensor is read; loading uses JSON and safetensors only.
    """
    target = _load_device(device, device_map)
    cast = None if dtype in (None, "auto") else float_dtype(str(dtype).removeprefix("torch."), "dtype")
    folder = resolve_folder(name_or_path, revision, token, cache_dir, subfolder, local_files_only)
    config = read_config(folder)
    weights = folder / WEIGHTS_NAME
    header = read_header(weights, config)
    skeleton = architecture.build(config.base_model)
    build_dtype = next(p.dtype for p in skeleton.parameters() if p.is_floating_point())
    apply_plans(skeleton, config.plans, storage_placeholders(config.plans, header, build_dtype))
    skeleton.to(getattr(torch, config.dtype))
    fit_skeleton(skeleton, header, config.plans, config.aliases, weights)
    if cast is not None:
        skeleton.to(cast)
    load_tensors(skeleton, weights, config.aliases, target)
    attach(skeleton, loaded=True)
    return skeleton.eval()


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload compressed model with hf-freqcompress",
    replace_card: bool = False,
) -> str:
    """Validate a saved checkpoint folder, create the repo if needed, upload it; returns the commit URL.

    A README.md already in the repo (say, edited on the Hub) is merged with
    the folder's card (:func:`~hf_freqcompress.card.merge_cards`: the user's
    metadata and text stay, the generated section is refreshed) unless
    ``replace_card=True``, which uploads the folder's card as it is.
    """
    folder = Path(folder)
    read_header(folder / WEIGHTS_NAME, read_config(folder))
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
        for name in _FOLDER_FILES
        if (folder / name).is_file()
    ]
    existing = None if replace_card else _existing_card(repo.repo_id, revision, token)
    if existing is not None and (folder / CARD_NAME).is_file():
        merged = merge_cards(existing, ModelCard.load(folder / CARD_NAME))
        operations = [op for op in operations if op.path_in_repo != CARD_NAME]
        operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=str(merged).encode()))
    commit = api.create_commit(
        repo_id=repo.repo_id, operations=operations, commit_message=commit_message, revision=revision
    )
    return commit.commit_url


def _existing_card(repo_id: str, revision: str | None, token: str | None) -> str | None:
    """The repo's README.md text, or None when it has none (or the branch does not exist yet)."""
    try:
        path = hf_hub_download(repo_id, CARD_NAME, revision=revision, token=token)
    except (EntryNotFoundError, RevisionNotFoundError):
        return None
    return Path(path).read_text(encoding="utf-8")


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload compressed model with hf-freqcompress",
    replace_card: bool = False,
    **save_kwargs: Any,
) -> str:
    """``save_pretrained`` into a temporary folder, then :func:`push_folder` (which merges the card into one
    already on the Hub unless ``replace_card=True``); returns the commit URL."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(model, Path(tmp) / "checkpoint", card_name=repo_id, **save_kwargs)
        return push_folder(
            folder, repo_id, token=token, private=private, revision=revision, commit_message=commit_message,
            replace_card=replace_card,
        )


def describe_folder(folder: str | os.PathLike) -> str:
    """A readable summary of a checkpoint folder (validated), for ``hf-freqcompress info``."""
    folder = Path(folder)
    config = read_config(folder)
    read_header(folder / WEIGHTS_NAME, config)
    base = config.base_model
    lines = [
        f"{folder}: hf-freqcompress checkpoint (saved by version {config.library_version})",
        f"base model: {base['library']} {base.get('name') or base.get('class')}, dtype {config.dtype}",
        "files: " + ", ".join(f"{p.name} {p.stat().st_size:,} B" for p in sorted(folder.iterdir()) if p.is_file()),
    ]
    lines += [f"\n{plan.report}" for plan in config.plans]
    return "\n".join(lines)
