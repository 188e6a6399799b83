"""Weight recompute: rebuild compressed weights again in backward instead of keeping them.

A compressed layer's dense weight W is rebuilt from its stored tensors on
every forward. In training the consumer op (``F.linear``, ``F.conv2d``, ...)
saves W for its input gradient and the rebuild saves its own intermediates,
so without recompute every rebuilt weight lives from forward to backward and
peak training memory is about that of the dense model. With
:func:`enable_weight_recompute` nothing of a rebuild outlives the layer's
forward: backward rebuilds W once more, layer by layer, just before the
layer's gradients are computed. Each rebuild runs twice per step (forward,
backward), and gradients are those of the default path bit for bit, because
the same ops run on the same values (a rebuild must be a deterministic
function of the stored tensors, as every method's is).

Design. Saved-tensor hooks, no custom ``autograd.Function``. While a
weight is rebuilt (the parametrization chain's forward, swapped in by
:func:`enable_weight_recompute`), every tensor the rebuild saves is replaced
by its position; while the compressed module runs its forward (a forward
pre-hook pushes, a forward hook registered with ``always_call=True`` pops,
so an exception leaves nothing pushed), a saved tensor sharing the rebuilt
weight's storage is replaced by the view's geometry. The first of these
that backward needs reruns the rebuild with grad enabled, under the
forward's autocast state, and hands out W and the rebuild's saved tensors in
order, each released once used. The graph itself is the ordinary one, so
gradients reach every tensor the rebuild reads (``original``, reconstruction
nets, codebooks, a space shared between layers) through the engine as
usual, which is what DDP's hooks and gradient accumulation expect. A
Function that rebuilds under ``no_grad`` in forward would instead need the
list of those tensors up front (no method states it) and would change what
binary_stack rebuilds (its selection differs with grad disabled).
Checkpointing each module's forward with a selective policy (keep the
matmul/conv output, recompute the rest) holds the same memory but is slower
in eager, where its dispatch mode intercepts every op. Other saved-tensor
hooks active around the module (activation checkpointing, ``save_on_cpu``)
still receive every other tensor the module saves.

Under ``torch.compile`` the hooks stand aside and the rebuild is traced
inside ``torch.utils.checkpoint`` instead: AOTAutograd's partitioner then
recomputes the rebuild in the compiled backward rather than saving the
rebuilt weight (which of the rebuild's small inputs it keeps is its
choice). Eval, ``no_grad`` and ``inference_mode`` record no graph and take
the plain rebuild, as does ``parametrize.cached()``, which keeps every
rebuilt weight on purpose.

Memory. Under ``torch.inference_mode()`` or ``no_grad`` and outside
``parametrize.cached()``, each layer's rebuilt weight is freed once the
layer has run: peak memory is the resident stored tensors plus the largest
rebuilt layer plus activations, whether or not recompute is enabled. Inside
``with torch.nn.utils.parametrize.cached():`` every weight is rebuilt once
and all are kept until the block ends: dense-size memory, the fastest way to
run many batches. In training, recompute brings the weights' share of peak
memory down to one or two layers' dense weights (and their rebuild
intermediates), at the price of the second rebuild.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from typing import Any, ContextManager, NamedTuple

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from .methods import CompressedWeight, compressed_weights

__all__ = ["enable_weight_recompute", "disable_weight_recompute", "is_weight_recompute_enabled"]

_calls = threading.local()
"""``stack``: the :class:`_ModuleCall` of each compressed-module forward now running in this thread (None: inactive)."""


def _call_stack() -> list["_ModuleCall | None"]:
    if not hasattr(_calls, "stack"):
        _calls.stack = []
    return _calls.stack


def _plain() -> bool:
    """No recompute now: no graph is recorded (eval, no_grad, inference_mode) or parametrize.cached() keeps weights.

    ``parametrize._cache_enabled`` is the counter ``cached()`` itself keeps; torch has no public query for it.
    """
    return not torch.is_grad_enabled() or bool(parametrize._cache_enabled)


class _Layout(NamedTuple):
    shape: torch.Size
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype
    device: torch.device
    storage_bytes: int


def _layout(tensor: torch.Tensor) -> _Layout:
    storage_bytes = tensor.untyped_storage().nbytes()
    return _Layout(tensor.shape, tensor.stride(), tensor.storage_offset(), tensor.dtype, tensor.device, storage_bytes)


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype] | None:
    if not torch.amp.is_autocast_available(device_type):
        return None
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _never_unpacked(packed: Any) -> torch.Tensor:
    raise RuntimeError("internal error: the graph of a weight recompute was used (it is discarded)")


class _WeightView(NamedTuple):
    """What a compressed module's forward saves in place of (a view of) its rebuilt weight."""

    rebuild: "_Rebuild"
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class _Rebuild:
    """One weight rebuild whose saved tensors are dropped in forward and recomputed in backward.

    ``drop`` / ``restore`` are the saved-tensor hooks of the rebuild itself:
    each tensor it saves is replaced by its position. ``pack_weight`` /
    ``unpack_weight`` serve the module's uses of the rebuilt weight. The first
    ``restore`` or ``unpack_weight`` reruns the rebuild (:meth:`_recompute`).
    """

    def __init__(self, chain: parametrize.ParametrizationList) -> None:
        self.chain = chain
        self.dropped = 0
        self.recomputed: dict[int, torch.Tensor] = {}
        self.layout: _Layout | None = None
        self.storage: StorageWeakRef | None = None
        self.autocast: tuple[str, bool, torch.dtype] | None = None
        self.weight: torch.Tensor | None = None
        self.weight_uses = 0
        self.weight_left = 0

    def adopt(self, weight: torch.Tensor) -> None:
        """Remember the rebuilt weight's storage (weakly), its layout and the autocast state it was built under."""
        self.layout = _layout(weight)
        self.storage = StorageWeakRef(weight.untyped_storage())
        self.autocast = _autocast_state(weight.device.type)

    def drop(self, tensor: torch.Tensor) -> int:
        self.dropped += 1
        return self.dropped - 1

    def restore(self, position: int) -> torch.Tensor:
        if position not in self.recomputed:
            self._recompute()
        return self.recomputed.pop(position)

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` views the rebuilt weight's storage (alive: the weak reference pins its identity)."""
        if self.storage is None or type(tensor) is not torch.Tensor or tensor.layout is not torch.strided:
            return False
        return tensor.device == self.layout.device and StorageWeakRef(tensor.untyped_storage()) == self.storage

    def pack_weight(self, tensor: torch.Tensor) -> _WeightView:
        self.weight_uses += 1
        return _WeightView(self, tensor.size(), tensor.stride(), tensor.storage_offset())

    def unpack_weight(self, view: _WeightView) -> torch.Tensor:
        """The saved view, cut from the weight rebuilt again; the weight is released after its last use."""
        if self.weight is None:
            self.weight, self.weight_left = self._recompute(), self.weight_uses
        weight = self.weight
        self.weight_left -= 1
        if self.weight_left <= 0:
            self.weight = None
        return weight.as_strided(view.size, view.stride, view.offset)

    def _recompute(self) -> torch.Tensor:
        """Rebuild again with grad enabled, recording the saved tensors in order; returns the weight, detached."""
        saved: list[torch.Tensor] = []

        def record(tensor: torch.Tensor) -> None:
            saved.append(tensor.detach())

        autocast: ContextManager = nullcontext()
        if self.autocast is not None:
            device_type, enabled, dtype = self.autocast
            autocast = torch.autocast(device_type, dtype=dtype, enabled=enabled)
        with torch.enable_grad(), autocast, saved_tensors_hooks(record, _never_unpacked):
            weight = parametrize.ParametrizationList.forward(self.chain).detach()
        if len(saved) != self.dropped or _layout(weight) != self.layout:
            raise RuntimeError(
                f"weight recompute: {_layer_name(self.chain)} was rebuilt differently in backward than in forward "
                f"({len(saved)} saved tensors and layout {_layout(weight)}, forward: {self.dropped} and "
                f"{self.layout}); recompute needs a deterministic rebuild: call disable_weight_recompute(model)"
            )
        self.recomputed = dict(enumerate(saved))
        return weight


def _layer_name(chain: parametrize.ParametrizationList) -> str:
    names = [f"layer {p.spec.name!r}" for p in chain if isinstance(p, CompressedWeight)]
    return names[0] if names else "a compressed layer"


class _Kept(NamedTuple):
    """A tensor a compressed module saves as is, with its version: autograd skips that check for hooked tensors."""

    tensor: torch.Tensor
    version: int

    def unpack(self) -> torch.Tensor:
        if self.tensor._version != self.version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace operation: "
                f"a {tuple(self.tensor.shape)} tensor saved at version {self.version} is now at version "
                f"{self.tensor._version} (saved in the forward of a layer with weight recompute)"
            )
        return self.tensor


class _ModuleCall:
    """The saved-tensor hooks of one forward of a compressed module.

    Views of a weight rebuilt during this forward are saved as
    :class:`_WeightView`; every other tensor goes to the saved-tensor hooks
    that were active around the module (so activation checkpointing or CPU
    offloading still see it), or is kept as is (:class:`_Kept`) when there were none.
    """

    def __init__(self) -> None:
        self.rebuilds: list[_Rebuild] = []
        self.outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        self.hooks = saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, tensor: torch.Tensor) -> Any:
        for rebuild in self.rebuilds:
            if rebuild.holds(tensor):
                return rebuild.pack_weight(tensor)
        return self.outer[0](tensor) if self.outer else _Kept(tensor.detach(), tensor._version)

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, _WeightView):  # ours, or an enclosing compressed module's: the same release
            return packed.rebuild.unpack_weight(packed)
        return self.outer[1](packed) if self.outer else packed.unpack()


class _WeightHooks:
    """Forward pre-hook (:meth:`enter`) and forward hook (:meth:`exit`) of a compressed module."""

    def enter(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():
            return
        call = None if _plain() or not parametrize.is_parametrized(module) else _ModuleCall()
        _call_stack().append(call)
        if call is not None:
            call.hooks.__enter__()

    def exit(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        stack = _call_stack()
        call = stack.pop() if stack else None
        if call is not None:
            call.hooks.__exit__(None, None, None)


class _RecomputingList(parametrize.ParametrizationList):
    """A compressed weight's parametrization chain whose rebuild is recomputed in backward."""

    def forward(self) -> torch.Tensor:
        if _plain():
            return super().forward()
        if torch.compiler.is_compiling():
            return checkpoint(super().forward, use_reentrant=False)
        return _rebuild(self)


def _rebuild(chain: _RecomputingList) -> torch.Tensor:
    """Rebuild the weight dropping everything it saves, and tell the running module call about it."""
    rebuild = _Rebuild(chain)
    with saved_tensors_hooks(rebuild.drop, rebuild.restore):
        weight = parametrize.ParametrizationList.forward(chain)
    rebuild.adopt(weight)
    stack = _call_stack()
    if stack and stack[-1] is not None:
        stack[-1].rebuilds.append(rebuild)
    return weight


def _is_ours(hook: Any) -> bool:
    return isinstance(getattr(hook, "__self__", None), _WeightHooks)


def _remove_hooks(module: nn.Module) -> None:
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [key for key, hook in hooks.items() if _is_ours(hook)]:
            del hooks[key]
            module._forward_hooks_always_called.pop(key, None)


def _add_hooks(module: nn.Module) -> None:
    if any(_is_ours(hook) for hook in module._forward_pre_hooks.values()):
        return
    hooks = _WeightHooks()
    module.register_forward_pre_hook(hooks.enter)
    module.register_forward_hook(hooks.exit, always_call=True)


def _chains(model: nn.Module) -> list[tuple[str, nn.Module, parametrize.ParametrizationList]]:
    """(weight name, module, parametrization chain) of every compressed weight."""
    return [
        (f"{name}.{param}" if name else param, module, module.parametrizations[param])
        for name, module, param, _ in compressed_weights(model)
    ]


def enable_weight_recompute(model: nn.Module) -> nn.Module:
    """Rebuild every compressed weight again in backward instead of keeping it from forward; in place, idempotent.

    Gradients are unchanged (bit for bit); training keeps at most about one
    or two layers' dense weights alive at a time, for a second rebuild per
    layer and step. Eval and no_grad forwards are unaffected. Layers
    compressed later are not covered: call this again after ``compress()``.
    A runtime setting, like ``train()``: ``save_pretrained`` does not record
    it, so enable it again after loading.
    """
    chains = _chains(model)
    if not chains:
        raise ValueError(
            "enable_weight_recompute: the model has no compressed layer, so there is no weight to recompute; "
            "call hf_freqcompress.compress(model, ...) first"
        )
    for name, _, chain in chains:
        if type(chain) not in (parametrize.ParametrizationList, _RecomputingList):
            raise TypeError(
                f"enable_weight_recompute: the parametrizations of {name!r} are a {type(chain).__name__}, not torch's "
                "ParametrizationList; recompute cannot wrap them: leave this model's recompute off"
            )
    for _, module, chain in chains:
        chain.__class__ = _RecomputingList
        _add_hooks(module)
    return model


def disable_weight_recompute(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_weight_recompute`: the default forward and backward again; in place, idempotent."""
    for _, _, chain in _chains(model):
        if type(chain) is _RecomputingList:
            chain.__class__ = parametrize.ParametrizationList
    for module in model.modules():
        _remove_hooks(module)
    return model


def is_weight_recompute_enabled(model: nn.Module) -> bool:
    """True when the model has compressed layers and every one of them recomputes its weight in backward."""
    chains = _chains(model)
    return bool(chains) and all(type(chain) is _RecomputingList for _, _, chain in chains)
