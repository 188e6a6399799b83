"""Method registry: config type -> parametrization, keyed by the method's name.

Like torchao's ``quantize_`` handlers, the config object picks the code that
runs; nothing outside ``methods/`` branches on a method's name.
"""

from __future__ import annotations

from typing import Any

from .base import CompressedWeight, MethodConfig

__all__ = ["register_method", "get_method", "available_methods", "resolve_config"]

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
    return sorted(_METHODS)


def get_method(name: str) -> type[CompressedWeight]:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available methods: {available_methods()}") from None


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
