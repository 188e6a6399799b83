"""Find the layers to compress and swap their weights for parametrizations.

Selection follows PEFT's habits: ``targets`` / ``exclude`` are name patterns
(exact name, dotted suffix, glob or regex), a pattern naming a container
selects every layer below it, and the layer registry decides what can be
compressed. Application is all-or-nothing: every parametrization is built
and checked before the model is touched, and a failure while registering
puts back the very Parameter objects the model had.
"""

from __future__ import annotations

import fnmatch
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .layers import LayerKind, find_layer_kind, layer_kinds
from .methods.base import CompressedWeight, LayerSpec

__all__ = [
    "Target",
    "select_targets",
    "targets_by_name",
    "classifier_names",
    "apply_parametrizations",
    "restore_parametrizations",
    "trial_parametrization",
]

MIN_LAYER_VALUES = 1024
"""By default layers with fewer weights are left dense: their savings are noise."""

Patterns = str | Sequence[str] | None

StoredTensors = torch.Tensor | tuple[torch.Tensor, ...]
"""What a parametrization's ``right_inverse`` returns: ``original`` or ``original0, original1, ...``."""


@dataclass
class Target:
    """One weight chosen for compression."""

    module_name: str
    module: nn.Module
    kind: LayerKind

    @property
    def param_name(self) -> str:
        return self.kind.param_name

    @property
    def weight_name(self) -> str:
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.param_name)

    def spec(self, storage_bits: int) -> LayerSpec:
        canonical = self.kind.to_canonical(self.weight)
        return LayerSpec(
            name=self.weight_name,
            kind=self.kind.name,
            shape=tuple(canonical.shape),
            storage_bits=storage_bits,
        )


def _as_list(patterns: Patterns) -> list[str]:
    if patterns is None:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)


def name_matches(name: str, pattern: str) -> bool:
    """Exact name, dotted suffix (PEFT style), glob, or full regex match."""
    if name == pattern or name.endswith("." + pattern):
        return True
    if any(ch in pattern for ch in "*?[") and fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _selected(name: str, patterns: Iterable[str]) -> bool:
    """True if ``name`` or any of its parent module names matches a pattern."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))] if name else [""]
    return any(name_matches(prefix, pattern) for prefix in prefixes for pattern in patterns)


def classifier_names(model: nn.Module) -> set[str]:
    """Module names of the classifier head, found the way timm and transformers expose it.

    timm's ``get_classifier()``, transformers' ``get_output_embeddings()`` and
    ``classifier`` attribute; for a plain module with none of these, the last
    Linear layer (the output layer of an MLP).
    """
    names = {id(module): name for name, module in model.named_modules()}
    heads: list[nn.Module] = []
    for getter in ("get_classifier", "get_output_embeddings"):
        try:
            head = getattr(model, getter)() if hasattr(model, getter) else None
        except (NotImplementedError, AttributeError, TypeError):
            head = None
        if isinstance(head, nn.Module):
            heads.append(head)
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Module):
        heads.append(classifier)
    found = {names[id(head)] for head in heads if id(head) in names}
    if not found:
        linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        found = set(linears[-1:])
    return found


def _check_compressible(target: Target) -> None:
    module, name = target.module, target.weight_name
    if parametrize.is_parametrized(module, target.param_name):
        raise ValueError(f"layer {name!r} is already compressed; compress() each layer once")
    weight = target.weight
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"layer {name!r} has no {target.param_name} tensor to compress")
    if not weight.is_floating_point():
        raise ValueError(
            f"layer {name!r} has a {weight.dtype} weight; only floating-point weights can be compressed "
            "(dequantize the model first)"
        )


def _check_not_shared(model: nn.Module, chosen: list[Target]) -> None:
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            owners.setdefault(id(param), []).append(full)
    for target in chosen:
        names = sorted(set(owners.get(id(target.weight), [])))
        if len(names) > 1:
            raise ValueError(
                f"weight {target.weight_name!r} is shared (tied) with {[n for n in names if n != target.weight_name]}; "
                "compressing it would silently untie them: exclude these layers or untie the weights first"
            )


def select_targets(
    model: nn.Module,
    targets: Patterns = None,
    exclude: Patterns = None,
    min_layer_values: int = MIN_LAYER_VALUES,
) -> list[Target]:
    """The weights ``compress()`` will replace, validated.

    With ``targets=None`` every registered layer kind is a candidate; the
    default ``exclude=None`` then also skips the classifier head and layers
    below ``min_layer_values`` weights. Any explicit ``exclude`` list (even
    ``[]``) replaces those defaults. Explicit targets that match nothing, or
    only unsupported layers, are errors rather than silent no-ops.
    """
    target_patterns, exclude_patterns = _as_list(targets), _as_list(exclude)
    modules = list(model.named_modules())
    if exclude is None and targets is None:
        exclude_patterns = sorted(classifier_names(model))
    chosen: list[Target] = []
    for name, module in modules:
        if target_patterns and not _selected(name, target_patterns):
            continue
        if exclude_patterns and _selected(name, exclude_patterns):
            continue
        kind = find_layer_kind(module)
        if kind is None:
            if target_patterns and _is_weighted_leaf(module):
                supported = sorted({k.name for k in layer_kinds()})
                raise ValueError(
                    f"layer {name!r} ({type(module).__name__}) is not a supported layer kind "
                    f"(supported: {supported}); register it with hf_freqcompress.register_layer_kind"
                )
            continue
        if (reason := kind.refusal(module)) is not None:
            if target_patterns:
                raise ValueError(f"layer {name!r} cannot be compressed: {reason}")
            continue
        target = Target(name, module, kind)
        _check_compressible(target)
        if targets is None and exclude is None and target.weight.numel() < min_layer_values:
            continue
        chosen.append(target)
    _check_patterns_used(modules, target_patterns, chosen)
    if not chosen:
        raise ValueError(
            "no layer to compress: no supported conv/linear layer is left after targets/exclude "
            "(pass exclude=[] to include the classifier head and small layers)"
        )
    _check_not_shared(model, chosen)
    return chosen


def targets_by_name(model: nn.Module, layers: Sequence[tuple[str, str]]) -> list[Target]:
    """The weights named in a recorded plan, as ``(weight name, layer kind name)`` pairs.

    Exact names only (no pattern matching, no default exclusions): a loaded
    checkpoint must compress precisely the layers it was saved with, and any
    layer the model lacks or that has another kind means the folder was
    made for another architecture.
    """
    chosen = []
    for weight_name, kind_name in layers:
        module_name, _, param_name = weight_name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise ValueError(
                f"the checkpoint compresses {weight_name!r} but the model has no module {module_name!r}: "
                "the folder was saved from another architecture"
            ) from None
        kind = find_layer_kind(module)
        if kind is None or kind.name != kind_name or kind.param_name != param_name:
            found = kind.name if kind else type(module).__name__
            raise ValueError(
                f"the checkpoint compresses {weight_name!r} as a {kind_name!r} layer but the model's "
                f"{module_name!r} is {found!r}: the folder was saved from another architecture"
            )
        target = Target(module_name, module, kind)
        _check_compressible(target)
        chosen.append(target)
    return chosen


def _is_weighted_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None and isinstance(getattr(module, "weight", None), torch.Tensor)


def _check_patterns_used(modules: list[tuple[str, nn.Module]], patterns: list[str], chosen: list[Target]) -> None:
    chosen_names = [target.module_name for target in chosen]
    for pattern in patterns:
        if any(_selected(name, [pattern]) for name in chosen_names):
            continue
        examples = [name for name, _ in modules if name][:8]
        if any(name_matches(name, pattern) for name, _ in modules):
            raise ValueError(f"target pattern {pattern!r} matches only layers that are excluded or not compressible")
        raise ValueError(f"target pattern {pattern!r} matches no module; module names look like {examples}")


def apply_parametrizations(
    pairs: Sequence[tuple[Target, CompressedWeight]],
    preserve_norm: bool = False,
    stored: Sequence[StoredTensors | None] | None = None,
) -> list[float]:
    """Register every parametrization, or none; returns each layer's relative projection error.

    Each layer's storage is the projection of its dense weight
    (``right_inverse``), or ``stored[i]`` where given (a fit computed
    beforehand, e.g. from calibration data). ``preserve_norm`` rescales each
    layer so the rebuilt weight has the Frobenius norm of the dense one (see
    ``compress(init=...)``).
    """
    errors: list[float] = []

    def register(i: int, target: Target, parametrization: CompressedWeight, dense: torch.Tensor) -> None:
        with _adopting(parametrization, None if stored is None else stored[i]):
            parametrize.register_parametrization(target.module, target.param_name, parametrization)
        if preserve_norm:
            _restore_norm(target, parametrization, dense)
        errors.append(_relative_error(dense, target.weight))

    _register_all(pairs, register)
    return errors


@torch.no_grad()
def _restore_norm(target: Target, parametrization: CompressedWeight, dense: torch.Tensor) -> None:
    rebuilt_norm = float(target.weight.norm())
    if rebuilt_norm > 0:
        original = target.module.parametrizations[target.param_name].original
        parametrization.rescale_(original, float(dense.norm()) / rebuilt_norm)


def restore_parametrizations(pairs: Sequence[tuple[Target, CompressedWeight]], stored: Sequence[StoredTensors]) -> None:
    """Register every parametrization adopting ``stored`` as its storage, without projecting, or none.

    Loading a checkpoint overwrites the storage anyway, so the projection
    would be wasted work, and many projections (k-means, data-dependent
    loops) cannot run on the meta tensors of a skeleton model. Registration
    still runs the parametrization's forward once, so shapes and dtypes are
    checked against the layer.
    """
    def register(i: int, target: Target, parametrization: CompressedWeight, dense: torch.Tensor) -> None:
        with _adopting(parametrization, stored[i]):
            parametrize.register_parametrization(target.module, target.param_name, parametrization)

    if len(stored) != len(pairs):
        raise ValueError(f"{len(stored)} stored tensors given for {len(pairs)} layers")
    _register_all(pairs, register)


@contextmanager
def _adopting(parametrization: CompressedWeight, stored: StoredTensors | None) -> Iterator[None]:
    """While registering, ``right_inverse`` returns ``stored`` instead of projecting (None: project as usual)."""
    if stored is None:
        yield
        return
    parametrization.right_inverse = lambda weight: stored  # shadows the method for this one registration
    try:
        yield
    finally:
        del parametrization.right_inverse


@contextmanager
def trial_parametrization(target: Target, parametrization: CompressedWeight, stored: StoredTensors) -> Iterator[None]:
    """``target`` compressed by ``parametrization`` (adopting ``stored``) for the block; the model's own Parameter
    object is back afterwards, whatever happens inside."""
    dense = target.module._parameters[target.param_name]
    apply_parametrizations([(target, parametrization)], stored=[stored])
    try:
        yield
    finally:
        _restore(target, dense)


def _register_all(
    pairs: Sequence[tuple[Target, CompressedWeight]],
    register: Callable[[int, Target, CompressedWeight, torch.Tensor], None],
) -> None:
    """Run ``register`` on every pair, or undo them all if one fails.

    The model's weight Parameter is swapped for a detached alias before
    registering, because ``register_parametrization`` reuses (``set_``) the
    Parameter it finds; the user's object stays intact so a rollback can put
    it back untouched.
    """
    done: list[tuple[Target, nn.Parameter]] = []
    try:
        for i, (target, parametrization) in enumerate(pairs):
            dense = target.weight
            alias = nn.Parameter(dense.detach(), requires_grad=dense.requires_grad)
            target.module._parameters[target.param_name] = alias
            done.append((target, dense))
            register(i, target, parametrization, dense)
    except BaseException:
        for target, dense in reversed(done):
            _restore(target, dense)
        raise


def _relative_error(dense: torch.Tensor, rebuilt: torch.Tensor) -> float:
    with torch.no_grad():
        reference = dense.detach().double()
        norm = torch.linalg.vector_norm(reference)
        difference = torch.linalg.vector_norm(rebuilt.detach().double() - reference)
        return float(difference / norm) if norm > 0 else float(difference)


def _restore(target: Target, dense: nn.Parameter) -> None:
    module, name = target.module, target.param_name
    if parametrize.is_parametrized(module, name):
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    module._parameters[name] = dense
