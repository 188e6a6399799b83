"""What every compression method provides: a config and a parametrization.

A method is a :class:`MethodConfig` dataclass (JSON round trip, validated)
and a :class:`CompressedWeight` subclass registered for it. The
parametrization is what ``torch.nn.utils.parametrize`` calls: its
``original`` is the compressed tensor, ``forward`` rebuilds the dense weight
and ``right_inverse`` projects a dense weight onto the compressed space.
Methods only ever see the canonical ``(out, in, *kernel)`` layout; the layer
kind converts to and from the module's native layout here, once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..layers import LayerKind

__all__ = ["LayerSpec", "MethodConfig", "CompressedWeight", "compressed_weights"]


@dataclass(frozen=True)
class LayerSpec:
    """The facts about one targeted weight that a method may depend on.

    ``name`` is the weight's fully qualified name; it keys the hashes, so a
    layer hashes identically wherever the model is rebuilt. ``storage_bits``
    is the width of one stored value in a checkpoint: the planner counts in
    such values, and methods that store integers or bits (codes, binary
    filters) convert their allocation with it.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    storage_bits: int = 32

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return self.shape[2:]

    @property
    def kernel_numel(self) -> int:
        return self.numel // (self.shape[0] * self.shape[1])


@dataclass
class MethodConfig:
    """Base of every method's options; subclasses set ``method`` and add fields."""

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        options = {k: v for k, v in data.items() if k != "method"}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for method {cls.method!r}; valid options: {sorted(fields)}"
            )
        return cls(**options)


class CompressedWeight(nn.Module):
    """Base parametrization: layout conversion plus the planning contract.

    Subclasses implement :meth:`reconstruct` (stored -> canonical dense) and
    :meth:`project` (canonical dense -> stored, least squares where cheap), and
    the class-level planning hooks :meth:`min_values` / :meth:`max_values`
    that tell the budget planner what a layer can take.
    """

    config_class: ClassVar[type[MethodConfig]]
    linear_in_original: ClassVar[bool] = False
    """Whether :meth:`reconstruct` is linear in ``original``: output-aware fits are then a least-squares problem."""

    def __init__(
        self,
        spec: LayerSpec,
        layer_kind: LayerKind,
        config: MethodConfig,
        stored_values: int,
        seed: int,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.layer_kind = layer_kind
        self.config = config
        self.planned_values = int(stored_values)
        self.seed = int(seed)

    # -- parametrize protocol -------------------------------------------------
    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return self.layer_kind.to_native(self.reconstruct(original))

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return self.project(self.layer_kind.to_canonical(weight))

    # -- what methods implement -----------------------------------------------
    def reconstruct(self, original: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def project(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def min_values(cls, spec: LayerSpec, config: MethodConfig) -> int:
        """Fewest stored values this layer can be given (extra parameters included)."""
        return 1

    @classmethod
    def max_values(cls, spec: LayerSpec, config: MethodConfig) -> int:
        """Most stored values worth giving this layer; more would not gain accuracy."""
        return spec.numel

    @classmethod
    def links_layers(cls, config: MethodConfig) -> bool:
        """Whether the layers of one call share stored numbers (so they cannot be fitted one by one)."""
        return False

    @classmethod
    def prepare_group(cls, members: Sequence["CompressedWeight"], weights: Sequence[torch.Tensor]) -> None:
        """Link the layers of one ``compress()`` call that share stored numbers; default: nothing.

        Called once, after every member is built and before any weight is
        replaced, with each member's canonical current weight, both when
        compressing and when loading, so shared state is linked the same way
        on both paths. A method whose layers share state (FunHashNN's shared
        space) sizes it here and fits it jointly to real weights; meta weights
        (a skeleton being loaded) carry no values to fit. Raising here leaves
        the model untouched.
        """

    def index_sources(self) -> list:
        """The hashed :class:`~.index.IndexSource` objects this layer reads through (none by default);
        fits that rebuild many times pin them in memory for the duration."""
        return []

    # -- training hooks (the training loop calls these through the model) ------
    def on_train_step(self, step: int) -> None:
        """Advance a training-time schedule (kept coefficients, annealing) after optimizer step ``step``."""

    def finalize(self) -> None:
        """End any training-time schedule and shrink storage to its final size (before saving)."""

    def regularization(self, original: torch.Tensor) -> torch.Tensor | None:
        """A loss term the method wants minimised during training (None: no term).

        ``original`` is this layer's stored tensor. The training loop adds the
        sum over layers (:func:`hf_freqcompress.regularization`) times the
        recipe's coefficient, so a method with a training-time penalty needs
        no code in the loop.
        """
        return None

    @torch.no_grad()
    def rescale_(self, original: torch.Tensor, factor: float) -> None:
        """Multiply the rebuilt weight by ``factor`` exactly, in place.

        ``compress(init="preserve_norm")`` uses it to give a freshly
        initialised layer back the scale its initialiser chose: projecting
        random weights averages many of them into each stored value and
        shrinks the layer by about sqrt(budget). The default fits every method
        whose reconstruction is linear in ``original``; others override it.
        """
        original.mul_(factor)

    # -- loading ----------------------------------------------------------------
    def rebuild_caches(self, device: torch.device) -> None:
        """Recompute every non-persistent buffer on ``device``.

        A checkpoint holds only persistent state, and a model is loaded by
        building it on the meta device first, so non-persistent buffers
        (hash-index caches, DCT bases) hold no values after loading; the
        loader calls this on every compressed layer afterwards. The default
        builds a fresh twin of this layer on ``device`` and adopts its
        non-persistent buffers, which is right for any method that computes
        its caches in ``__init__``; methods override it when they can do it
        more cheaply.
        """
        if not self._non_persistent_buffers_set:
            return
        twin = type(self)(self.spec, self.layer_kind, self.config, self.planned_values, self.seed, device=device)
        for name in self._non_persistent_buffers_set:
            setattr(self, name, getattr(twin, name))

    def finalize_storage(self, original: torch.Tensor) -> torch.Tensor | None:
        """What ``original`` becomes once training ends, or None to keep it.

        Called after :meth:`finalize` by ``hf_freqcompress.finalize(model)``,
        which swaps the returned tensor into the same Parameter in place. For
        methods whose training-time storage is larger than the stored result
        (a frequency prefix that shrinks on a schedule).
        """
        return None

    # -- accounting -----------------------------------------------------------
    def extra_values(self) -> int:
        """Numbers this parametrization stores besides ``original`` (e.g. a reconstruction net)."""
        return sum(p.numel() for p in self.parameters())

    def stored_values(self, original: torch.Tensor) -> int:
        """Numbers this layer stores once training is finalized: ``original`` plus :meth:`extra_values`."""
        return original.numel() + self.extra_values()

    def training_values(self) -> int:
        """Numbers that exist only while training (e.g. selection logits): not stored, gone after ``finalize()``."""
        return 0

    def stored_bits(self, original: torch.Tensor, storage_dtype: torch.dtype) -> int:
        """Bits the checkpoint spends on this layer at ``storage_dtype``."""
        return self.stored_values(original) * torch.finfo(storage_dtype).bits

    def cache_bytes(self) -> int:
        """Memory of non-persistent caches (e.g. hash indices), reported, never saved."""
        return sum(
            buffer.numel() * buffer.element_size()
            for name, buffer in self.named_buffers(recurse=False)
            if name in self._non_persistent_buffers_set
        )

    def extra_repr(self) -> str:
        return f"{self.spec.name}: {self.spec.shape} -> {self.planned_values} values"


def compressed_weights(model: nn.Module) -> list[tuple[str, nn.Module, str, CompressedWeight]]:
    """(module name, module, parameter name, parametrization) of every compressed weight."""
    found = []
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for param_name, chain in module.parametrizations.items():
            for parametrization in chain:
                if isinstance(parametrization, CompressedWeight):
                    found.append((module_name, module, param_name, parametrization))
    return found
