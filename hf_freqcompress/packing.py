"""Bit packing: store small non-negative integers in exactly ``bits`` bits each.

Product-quantization codes (``ceil(log2 k)`` bits) and binary filter indices
take far fewer bits than any integer dtype, so checkpoints hold them packed
into a ``uint8`` tensor. The layout is a little-endian bit stream: value
``i`` occupies stream bits ``[i * bits, (i + 1) * bits)``, least significant
bit first, and stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``. For
``bits`` of 8 or 16 that is byte-for-byte the little-endian ``uint8`` /
``uint16`` array, so packing never costs more than the smallest integer
dtype and saves up to 7 bits per value when ``bits`` is not a multiple of 8.
The final byte is zero-padded; ``packed_size`` gives the exact byte count.

Both directions are vectorized (one shift-and-mask per bit position) and
work in chunks of whole bytes so temporaries stay bounded on huge layers.
"""

from __future__ import annotations

import torch

__all__ = ["bits_for", "packed_size", "pack_bits", "unpack_bits"]

MAX_BITS = 32
_CHUNK = 1 << 18  # values per step; a multiple of 8, so every chunk starts on a byte boundary


def bits_for(levels: int) -> int:
    """Bits needed to tell ``levels`` values apart: ``ceil(log2 levels)``, at least 1."""
    if levels < 1:
        raise ValueError(f"need at least one level, got {levels}")
    return max(1, (levels - 1).bit_length())


def packed_size(count: int, bits: int) -> int:
    """Bytes holding ``count`` values of ``bits`` bits: ``ceil(count * bits / 8)``."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits per value must be in [1, {MAX_BITS}], got {bits}")


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the flattened integer tensor ``values`` (each in ``[0, 2**bits)``) into ``uint8``."""
    _check_bits(bits)
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"pack_bits needs an integer tensor, got {values.dtype}")
    flat = values.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(
            f"values must lie in [0, {1 << bits}) to fit {bits} bits; got range [{int(flat.min())}, {int(flat.max())}]"
        )
    count = flat.numel()
    out = torch.empty(packed_size(count, bits), dtype=torch.uint8, device=flat.device)
    value_shifts = torch.arange(bits, dtype=torch.int64, device=flat.device)
    byte_weights = 1 << torch.arange(8, dtype=torch.int32, device=flat.device)
    for start in range(0, count, _CHUNK):
        part = flat[start : start + _CHUNK]
        stream = ((part[:, None] >> value_shifts) & 1).to(torch.int32).reshape(-1)
        pad = (-stream.numel()) % 8
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        packed = (stream.view(-1, 8) * byte_weights).sum(1).to(torch.uint8)
        first = start * bits // 8
        out[first : first + packed.numel()] = packed
    return out


def unpack_bits(packed: torch.Tensor, bits: int, count: int, offset: int = 0) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``count`` values as int64, starting ``offset`` bits into ``packed``.

    ``packed`` must hold exactly ``packed_size(count * bits + offset, 1)``
    bytes (everything up to the last value), so a truncated or mismatched
    tensor (say, from a corrupt checkpoint) is an error instead of garbage
    codes; ``offset`` lets one stream hold several packed sequences.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed bits must be a uint8 tensor, got {packed.dtype}")
    expected = packed_size(count * bits + offset, 1)
    flat = packed.reshape(-1)
    if flat.numel() != expected:
        raise ValueError(
            f"{count} values of {bits} bits after {offset} bits need {expected} packed bytes, got {flat.numel()} "
            "(truncated or mismatched data)"
        )
    out = torch.empty(count, dtype=torch.int64, device=flat.device)
    bit_shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
    value_weights = 1 << torch.arange(bits, dtype=torch.int64, device=flat.device)
    for start in range(0, count, _CHUNK):
        stop = min(start + _CHUNK, count)
        first_bit, last_bit = offset + start * bits, offset + stop * bits
        stream = ((flat[first_bit // 8 : packed_size(last_bit, 1), None] >> bit_shifts) & 1).reshape(-1)
        stream = stream[first_bit % 8 : first_bit % 8 + (stop - start) * bits].view(stop - start, bits)
        out[start:stop] = (stream.to(torch.int64) * value_weights).sum(1)
    return out
