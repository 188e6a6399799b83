"""Pack small unsigned integers into a dense bit stream, and back.

Methods that store codes or binary filters (PQ codes, binary filter banks and
their selections) save them at their true width: ``count`` values of ``bits``
bits take exactly ``ceil(count * bits / 8)`` bytes. Layout: value i occupies
stream bits [i * bits, (i + 1) * bits), least significant bit first, and
stream bit j is bit ``j % 8`` of byte ``j // 8`` (also LSB first); the last
byte is zero-padded. Vectorized torch, no Python loop over values.
"""

from __future__ import annotations

import torch

__all__ = ["pack_bits", "unpack_bits"]

_MAX_BITS = 32


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= _MAX_BITS:
        raise ValueError(f"bits must be in [1, {_MAX_BITS}], got {bits}")


def pack_bits(ints: torch.Tensor, bits: int) -> torch.Tensor:
    """Flatten ``ints`` (values in [0, 2**bits)) into a uint8 tensor of ``ceil(n * bits / 8)`` bytes."""
    _check_bits(bits)
    if ints.is_floating_point() or ints.is_complex():
        raise TypeError(f"pack_bits needs an integer or bool tensor, got {ints.dtype}")
    flat = ints.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"values must be in [0, {1 << bits}) to pack in {bits} bits; got [{int(flat.min())}, {int(flat.max())}]")
    shifts = torch.arange(bits, device=flat.device)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, -stream.numel() % 8))
    weights = torch.arange(8, device=flat.device)
    return (stream.view(-1, 8) << weights).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` values of ``bits`` bits from :func:`pack_bits` output, as int64."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits needs a uint8 tensor, got {packed.dtype}")
    needed = (count * bits + 7) // 8
    if packed.numel() != needed:
        raise ValueError(f"{count} values of {bits} bits take {needed} bytes, got {packed.numel()} (corrupt or truncated)")
    shifts = torch.arange(8, device=packed.device)
    stream = ((packed.reshape(-1).to(torch.int64)[:, None] >> shifts) & 1).reshape(-1)[: count * bits]
    weights = torch.arange(bits, device=packed.device)
    return (stream.view(count, bits) << weights).sum(1)
