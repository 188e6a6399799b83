"""Method registry: config type -> parametrization, keyed by the method's name.

Like torchao's ``quantize_`` handlers, the config object picks the code that
runs; nothing outside ``methods/`` branches on a method's name.

Methods from other packages are found through the entry-point group
:data:`ENTRY_POINT_GROUP`: a plugin declares
``[project.entry-points."hf_freqcompress.methods"] mymethod = "mypkg.mymethod:MyWeight"``
and its module is imported the first time a config or checkpoint names
``mymethod`` (importing it runs its ``@register_method``).
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from .base import CompressedWeight, MethodConfig

__all__ = ["register_method", "get_method", "available_methods", "resolve_config", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "hf_freqcompress.methods"

_METHODS: dict[str, type[CompressedWeight]] = {}


def register_method(parametrization: type[CompressedWeight]) -> type[CompressedWeight]:
    """Class decorator: make ``parametrization.config_class.method`` a usable method name."""
    name = parametrization.config_class.method
    if not name:
        raise ValueError(f"{parametrization.config_class.__name__} must set a non-empty `method` name")
    if name in _METHODS and _METHODS[name] is not parametrization:
        raise ValueError(f"method {name!r} is already registered by {_METHODS[name].__qualname__}")
    _METHODS[name] = parametrization
    return parametrization


def available_methods() -> list[str]:
    """Registered methods and the ones installed plugins declare (not imported until used)."""
    return sorted(set(_METHODS) | {point.name for point in entry_points(group=ENTRY_POINT_GROUP)})


def get_method(name: str) -> type[CompressedWeight]:
    """The parametrization class of method ``name``, importing the plugin that declares it if needed."""
    if name not in _METHODS:
        for point in entry_points(group=ENTRY_POINT_GROUP, name=name):
            point.load()  # the plugin module registers its methods as it is imported
    if name not in _METHODS:
        raise ValueError(
            f"unknown method {name!r}; available methods: {available_methods()} (a checkpoint that names another "
            f"method needs the package that provides it, declared under the {ENTRY_POINT_GROUP!r} entry points)"
        )
    return _METHODS[name]


def resolve_config(method: str | MethodConfig | dict[str, Any]) -> MethodConfig:
    """Accept a method name, a config object or its ``to_dict()`` form."""
    if isinstance(method, MethodConfig):
        get_method(method.method)
        return method
    if isinstance(method, dict):
        if "method" not in method:
            raise ValueError(f"a method config dict needs a 'method' key; got keys {sorted(method)}")
        return get_method(method["method"]).config_class.from_dict(method)
    if isinstance(method, str):
        return get_method(method).config_class()
    raise TypeError(f"method must be a name, a MethodConfig or a dict, got {type(method).__name__}")
