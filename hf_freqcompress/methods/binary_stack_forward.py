"""SLBF's split-transform-merge forward for Conv2d, and picking the faster forward per layer.

Path (a), the default, materializes W (stack the chosen bank filters, scale)
through parametrize and runs the module's own conv. Path (b), the paper's:
split the input into groups of d channels, convolve every group with all M
bank filters once, then each output channel gathers the S feature maps its
selection names and sums them, scaled::

    Y[b, s, m] = x[b, s*d:(s+1)*d] * B[m]                     (one conv, batch B*S, d -> M channels)
    out[b, n]  = sum_s alpha[n, s] * Y[b, S*group(n) + s, idx[n, s]] + bias[n]

Multiply-adds per output pixel and image, groups = 1: (a) N * C * K, (b)
C * M * K for the transform plus N * S adds for the merge, so (b) can only win
when M < N, and in practice also needs large spatial maps and batches for
the gather to amortize: a conv with only d input channels and the
memory-bound merge run far below oneDNN's dense-conv throughput, so on CPU
(b) lost to (a) on every MNIST layer measured (benchmarks/mnist_slbf.py,
docs/results/mnist_slbf.md); the MAC saving is real only for M well below N. :func:`choose_conv_forward` therefore measures both
on the real activations and installs the faster one per layer (``mode``
forces a path). The two agree to float rounding (different summation order).

Path (b) uses the hard selection and serves frozen layers (after
``finalize()``): it passes gradients to the bank and scales but not to
selection logits, so layers still learning their selection are refused.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .base import compressed_weights
from .binary_stack import BinaryStackWeight

__all__ = ["binary_stack_conv2d", "ForwardChoice", "choose_conv_forward", "split_forward_layers"]

FORWARD_MODES = ("autotune", "materialize", "split")


def _check_plain_conv2d(conv: nn.Module) -> None:
    if not (isinstance(conv, nn.Conv2d) and type(conv).forward is nn.Conv2d.forward):
        raise ValueError(
            f"split-transform-merge needs a plain nn.Conv2d forward, got {type(conv).__name__} "
            "(custom forwards such as timm's Conv2dSame pad dynamically); keep the materialized forward"
        )


def binary_stack_conv2d(x: torch.Tensor, parametrization: BinaryStackWeight, conv: nn.Conv2d) -> torch.Tensor:
    """Path (b): ``conv(x)`` computed from the bank without materializing W.

    The merge is one ``embedding_bag(mode="sum")``: the transformed maps are
    the table's rows, each output channel a bag of its S row indices,
    weighted by its scales.
    """
    _check_plain_conv2d(conv)
    layout = parametrization.layout
    original = conv.parametrizations.weight.original
    bank = parametrization.binary_bank(original)
    padding: Any = conv.padding
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    batch, _, height, width = x.shape
    parts = conv.groups * layout.slices
    maps = F.conv2d(x.reshape(batch * parts, layout.depth, height, width), bank, None, conv.stride, padding, conv.dilation)
    out_h, out_w = maps.shape[-2:]
    table = maps.view(batch, parts * layout.bank_size, out_h * out_w).transpose(0, 1).reshape(parts * layout.bank_size, -1)
    group = torch.arange(layout.filters, device=x.device) // (layout.filters // conv.groups)
    part = group[:, None] * layout.slices + torch.arange(layout.slices, device=x.device)
    rows = part * layout.bank_size + parametrization.selection()
    scales = parametrization.slice_scales().to(table.dtype)
    out = F.embedding_bag(rows, table, mode="sum", per_sample_weights=scales)
    out = out.view(layout.filters, batch, out_h, out_w).transpose(0, 1)
    return out if conv.bias is None else out + conv.bias.view(1, -1, 1, 1)


def _split_forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return binary_stack_conv2d(x, conv.parametrizations.weight[0], conv)


def _install(conv: nn.Conv2d, split: bool) -> None:
    """Route ``conv``'s forward through path (b) (an instance attribute) or back to its class forward."""
    if split:
        conv.forward = functools.partial(_split_forward, conv)
    else:
        conv.__dict__.pop("forward", None)


def split_forward_layers(model: nn.Module) -> list[str]:
    """Names of the convs currently running the split-transform-merge forward."""
    return [name for name, module in model.named_modules() if isinstance(module.__dict__.get("forward"), functools.partial)]


@dataclass(frozen=True)
class ForwardChoice:
    """Measured milliseconds per call of both paths on one layer's real input, and the one installed."""

    layer: str
    materialize_ms: float
    split_ms: float
    chosen: str


def _milliseconds(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, kernel selection)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


@torch.no_grad()
def choose_conv_forward(model: nn.Module, *example_args: Any, mode: str, repeats: int = 3) -> list[ForwardChoice]:
    """Install path (b) (``mode="split"``) or (a) (``"materialize"``) on every frozen binary_stack Conv2d, or
    time both and install the faster per layer (``"autotune"``: timings, so the choice may differ between runs).

    One forward of ``model(*example_args)`` captures each layer's input; both
    paths are then timed on it (best of ``repeats``; path (a) includes
    rebuilding W, as an uncached forward does). Non-plain convs keep path (a)
    and are not listed. Call again after changing batch size or resolution.
    """
    if mode not in FORWARD_MODES:
        raise ValueError(f"mode must be one of {FORWARD_MODES}, got {mode!r}")
    convs = {}
    for name, module, param_name, parametrization in compressed_weights(model):
        if param_name != "weight" or not isinstance(parametrization, BinaryStackWeight):
            continue
        try:
            _check_plain_conv2d(module)
        except ValueError:
            continue
        if not parametrization.frozen:
            raise ValueError(f"layer {name!r} still learns its selection; call hf_freqcompress.finalize(model) first")
        _install(module, False)
        convs[name] = module
    inputs: dict[str, torch.Tensor] = {}
    hooks = [conv.register_forward_pre_hook(functools.partial(_capture, inputs, name)) for name, conv in convs.items()]
    try:
        model(*example_args)
    finally:
        for hook in hooks:
            hook.remove()
    choices = []
    for name, conv in convs.items():
        x = inputs[name]
        materialize_ms = _milliseconds(lambda: conv(x), repeats)
        split_ms = _milliseconds(lambda: binary_stack_conv2d(x, conv.parametrizations.weight[0], conv), repeats)
        split = mode == "split" or (mode == "autotune" and split_ms < materialize_ms)
        _install(conv, split)
        choices.append(ForwardChoice(name, materialize_ms, split_ms, "split" if split else "materialize"))
    return choices


def _capture(store: dict[str, torch.Tensor], name: str, module: nn.Module, args: tuple) -> None:
    store[name] = args[0]
