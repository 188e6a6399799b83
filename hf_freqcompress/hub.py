"""Save, load and push compressed models, the way PEFT ships adapters.

``save_pretrained`` writes a small folder (see :mod:`.checkpoint`): the
compressed numbers and untargeted tensors in ``model.safetensors``, the
recipe in ``compression_config.json``, a model card, and ``config.json`` for
transformers models. ``from_pretrained`` rebuilds the base architecture with
meta parameters, replays the recorded compression plan and assigns the
saved tensors, so dense weights never exist as parameters.
``push_to_hub`` / ``push_folder`` upload with huggingface_hub; a repo id
passed to ``from_pretrained`` is fetched with ``snapshot_download`` (cache,
offline mode, endpoints and tokens all work as elsewhere in the ecosystem).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch import nn

from . import architecture
from .card import build_card
from .checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointConfig,
    fit_skeleton,
    load_tensors,
    read_config,
    read_header,
    storage_placeholders,
    tensors_to_save,
    write_tensors,
)
from .dtypes import dtype_name
from .plan import apply_plans, plans_of

__all__ = ["save_pretrained", "from_pretrained", "push_to_hub", "push_folder", "describe_folder"]

TRANSFORMERS_CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
_FOLDER_FILES = [CONFIG_NAME, WEIGHTS_NAME, TRANSFORMERS_CONFIG_NAME, CARD_NAME]


def _library_version() -> str:
    from . import __version__

    return __version__


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
    card_name: str | None = None,
) -> Path:
    """Write the compressed ``model`` to ``save_directory``; returns the folder.

    Everything is checked (the model is compressed, its architecture can be
    rebuilt from the record) before a file is written, and the folder
    appears at once or not at all (written to a temporary sibling, then
    renamed). An existing checkpoint folder is replaced only with
    ``overwrite=True``.

    Args:
        base_model_kwargs: timm constructor arguments the model cannot report
            (anything besides num_classes, in_chans, img_size).
        base_model / datasets / metrics: model card metadata (Hub repo id of
            the dense model, dataset ids, ``{"accuracy": 0.98}``).
        card_name: the name the card's load snippet uses (default: folder name).
    """
    plans = plans_of(model)
    if not plans:
        raise ValueError("the model has no compression to save; call compress(model, ...) first")
    record = architecture.describe(model, base_model_kwargs)
    architecture.check_rebuild(model, record)
    dtype = _model_dtype(model)
    target = Path(save_directory)
    _check_target(target, overwrite)
    tensors, aliases = tensors_to_save(model, plans)
    with _atomic_folder(target) as folder:
        size, sha256 = write_tensors(tensors, folder / WEIGHTS_NAME)
        config = CheckpointConfig(_library_version(), record, dtype_name(dtype), plans, aliases, sha256, size)
        (folder / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
        if record["library"] == "transformers":
            (folder / TRANSFORMERS_CONFIG_NAME).write_text(model.config.to_json_string(), encoding="utf-8")
        build_card(config, card_name or target.name, base_model, datasets, metrics).save(folder / CARD_NAME)
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
) -> Path:
    """A local checkpoint folder, or a Hub repo id downloaded (or found in the cache) by huggingface_hub."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    text = str(name_or_path)
    try:
        validate_repo_id(text)
    except HFValidationError:
        raise FileNotFoundError(f"{text!r} is neither a local folder nor a valid Hub repo id") from None
    return Path(
        snapshot_download(
            text, revision=revision, token=token, cache_dir=cache_dir, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]
        )
    )


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """Load a compressed model from a folder or Hub repo id, in eval mode, on ``device``.

    The folder is validated entirely (config schema and version, installed
    methods, file size and checksum, every tensor's name, shape and dtype)
    before any tensor is read; loading uses JSON and safetensors only.
    """
    folder = resolve_folder(name_or_path, revision, token, cache_dir)
    config = read_config(folder)
    weights = folder / WEIGHTS_NAME
    header = read_header(weights, config)
    skeleton = architecture.build(config.base_model)
    build_dtype = next(p.dtype for p in skeleton.parameters() if p.is_floating_point())
    apply_plans(skeleton, config.plans, storage_placeholders(config.plans, header, build_dtype))
    skeleton.to(getattr(torch, config.dtype))
    fit_skeleton(skeleton, header, config.plans, config.aliases, weights)
    load_tensors(skeleton, weights, config.aliases, torch.device(device))
    return skeleton.eval()


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload compressed model with hf-freqcompress",
) -> str:
    """Validate a saved checkpoint folder, create the repo if needed, upload it; returns the commit URL."""
    folder = Path(folder)
    read_header(folder / WEIGHTS_NAME, read_config(folder))
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        repo_id=repo.repo_id,
        folder_path=folder,
        revision=revision,
        commit_message=commit_message,
        allow_patterns=_FOLDER_FILES,
    )
    return commit.commit_url


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload compressed model with hf-freqcompress",
    **save_kwargs: Any,
) -> str:
    """``save_pretrained`` into a temporary folder, then :func:`push_folder`; returns the commit URL."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(model, Path(tmp) / "checkpoint", card_name=repo_id, **save_kwargs)
        return push_folder(
            folder, repo_id, token=token, private=private, revision=revision, commit_message=commit_message
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
