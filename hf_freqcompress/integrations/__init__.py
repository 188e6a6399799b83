"""Integrations with other libraries, wired in without importing them up front.

transformers: ``import hf_freqcompress`` registers the ``hf_freqcompress``
quantizer (:mod:`.transformers`) so that ``AutoModelFor*.from_pretrained``
loads a compressed checkpoint. Importing transformers' quantizers costs more
than this whole package, so :func:`register_transformers` does not: if they
are already imported it registers at once, otherwise a one-shot import hook
registers right after ``transformers.quantizers`` is first imported, which
every transformers ``from_pretrained`` does before it reads a config.
"""

from __future__ import annotations

import sys
import warnings
from functools import cache
from importlib import import_module
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from typing import Callable, Sequence

from torch import nn

__all__ = ["register_transformers", "is_transformers_model", "attach", "detach"]

QUANTIZERS_MODULE = "transformers.quantizers"
MIN_TRANSFORMERS = (5, 0)
"""Oldest transformers whose loading hooks the quantizer relies on (``preprocess_model`` is given the
checkpoint files, ``get_state_dict_and_metadata`` on save)."""


def register_transformers() -> None:
    """Make ``transformers.AutoModel*.from_pretrained`` load hf-freqcompress checkpoints.

    Does nothing when transformers is missing or older than
    :data:`MIN_TRANSFORMERS`; never imports transformers itself.
    """
    if not _transformers_supported():
        return
    if QUANTIZERS_MODULE in sys.modules:
        _register()
    elif not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(QUANTIZERS_MODULE, _register))


@cache
def _transformers_supported() -> bool:
    try:
        release = version("transformers").split(".")
    except PackageNotFoundError:
        return False
    numbers = tuple(int(part) if part.isdigit() else 0 for part in release[:2])
    return numbers >= MIN_TRANSFORMERS


def _register() -> None:
    """Import :mod:`.transformers`, which registers the quantizer as it loads; a failure warns instead of
    breaking the import of transformers. (If that module is itself importing transformers' quantizers right
    now, ``import_module`` returns it half-loaded and it registers when it finishes.)"""
    try:
        import_module(f"{__name__}.transformers")
    except Exception as error:  # noqa: BLE001 - never break the host library's import
        warnings.warn(
            f"hf_freqcompress could not register its transformers quantizer ({error!r}); "
            "load compressed checkpoints with hf_freqcompress.from_pretrained",
            stacklevel=2,
        )


class _AfterImport(MetaPathFinder):
    """A one-shot post-import hook: runs ``callback`` once module ``name`` has finished executing."""

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: object = None) -> ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # find the real spec with the remaining finders
        spec = find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            execute, callback = spec.loader.exec_module, self.callback

            def exec_module(module: object) -> None:
                execute(module)
                callback()

            spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (without importing transformers)."""
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    return modeling_utils is not None and isinstance(model, modeling_utils.PreTrainedModel)


def attach(model: nn.Module, loaded: bool = False) -> None:
    """Give a compressed transformers model the quantizer and ``quantization_config`` a loaded one has.

    transformers' own ``save_pretrained`` / ``push_to_hub`` then write the
    compression record and the compressed state. ``loaded``: the model was
    loaded from a compressed checkpoint (its ``_name_or_path`` is not the
    dense base model). A no-op for other models and older transformers.
    """
    if is_transformers_model(model) and _transformers_supported():
        from .transformers import attach_quantizer

        attach_quantizer(model, loaded)


def detach(model: nn.Module) -> None:
    """Remove everything :func:`attach` (or loading through transformers) added; a no-op for other models."""
    if is_transformers_model(model) and _transformers_supported():
        from .transformers import detach_quantizer

        detach_quantizer(model)
