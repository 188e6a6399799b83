"""Deterministic integer hashes, computed in torch.

Hash indices and signs are never stored in a checkpoint: they are rebuilt
from (seed, layer name, role, flat index) wherever the model is loaded. That
only works if the hash is bit-identical on CPU and CUDA, in every process and
across runs, so it is plain integer arithmetic (no Python ``hash()``, which is
salted per process).

The mixer is a 32-bit avalanche function (two xor-shift-multiply rounds,
constant 0x45d9f3b), a bijection on [0, 2**32) whose output bits each depend
on every input bit. On tensors it runs in int32 with wrapping multiplication
and masked (logical) shifts: the bits of the unsigned 32-bit arithmetic, at
a quarter of the cost of int64 on SIMD units, which is what lets layers hash
their indices on every forward instead of storing them (methods/index.py).
Indices up to 2**64 are supported by mixing the high word into the key
first, which costs nothing for tensors below 2**32 elements.
"""

from __future__ import annotations

import hashlib

import torch

MASK32 = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B

__all__ = [
    "layer_key", "hash32", "hash_bits", "hash_bits_mixed", "mixed_key", "bucket_of", "sign_bit", "chunk_length", "chunk_slices", "floor_divide",
    "chunk_tables",
]


def _mix32(x):
    """Avalanche 32-bit values: a Python int in [0, 2**32), or an int32 tensor holding the same bits."""
    if isinstance(x, int):
        for _ in range(2):
            x = ((x ^ (x >> 16)) * _MULTIPLIER) & MASK32
        return x ^ (x >> 16)
    for _ in range(2):
        x = (x ^ ((x >> 16) & 0xFFFF)) * _MULTIPLIER  # masked: a logical shift; int32 products wrap mod 2**32
    return x ^ ((x >> 16) & 0xFFFF)


def _low_bits(x: torch.Tensor) -> torch.Tensor:
    """The low 32 bits of an int64 tensor, as int32."""
    return x.to(torch.int32)


def _unsigned(bits: torch.Tensor) -> torch.Tensor:
    """int32 bits -> their unsigned value in [0, 2**32), int64."""
    return bits.to(torch.int64) & MASK32


def layer_key(seed: int, name: str, role: str) -> int:
    """A 32-bit key for one hash function of one layer.

    blake2b of the text makes the key stable across processes and Python
    versions; ``role`` separates independent functions of the same layer
    (e.g. "index" and "sign", or one per frequency group).
    """
    digest = hashlib.blake2b(f"{int(seed)}\x00{name}\x00{role}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def hash32(index: torch.Tensor, key: int | torch.Tensor) -> torch.Tensor:
    """Hash int64 flat indices to uniform values in [0, 2**32) (int64) under ``key``.

    h(i) = mix(mix(hi(i) ^ key) ^ lo(i)); for indices below 2**32 the inner
    mix is a constant, so the common case costs a single mix per element.
    ``key`` may also be an int64 tensor of 32-bit keys broadcastable to
    ``index``: one hash function per element (e.g. per frequency group),
    identical to hashing each element with its own int key.
    """
    if index.dtype != torch.int64:
        raise TypeError(f"hash32 needs int64 indices, got {index.dtype}")
    high = index >> 32
    # Meta tensors (a model skeleton being loaded) have no values to inspect;
    # both branches give the same shape, so either is right there.
    if index.numel() and not index.is_meta and bool(high.any()):
        key_bits = _low_bits(key if isinstance(key, torch.Tensor) else torch.tensor(key, dtype=torch.int64))
        return _unsigned(_mix32(_low_bits(index) ^ _mix32(_low_bits(high) ^ key_bits)))
    return _unsigned(hash_bits(index, key))


def hash_bits(index: torch.Tensor, key: int | torch.Tensor) -> torch.Tensor:
    """:func:`hash32` as int32 bits, for indices the caller knows are below 2**32.

    No data-dependent branch, so it compiles into one loop; :func:`bucket_of`
    and :func:`sign_bit` take the bits directly.
    """
    inner = mixed_key(key) if isinstance(key, int) else _mix32(_low_bits(key))
    return hash_bits_mixed(index, inner)


def mixed_key(key: int) -> int:
    """The inner mix of a 32-bit ``key`` as the int32 value with its bits: what :func:`hash_bits_mixed` takes, so a
    fold with one key per column mixes them once, not once per element."""
    inner = _mix32(key & MASK32)
    return inner - (1 << 32) if inner >= 1 << 31 else inner


def hash_bits_mixed(index: torch.Tensor, inner: int | torch.Tensor) -> torch.Tensor:
    """:func:`hash_bits` given the key's inner mix (:func:`mixed_key`) instead of the key."""
    return _mix32(_low_bits(index) ^ (_low_bits(inner) if isinstance(inner, torch.Tensor) else inner))


def bucket_of(hashed: torch.Tensor, buckets: int | torch.Tensor) -> torch.Tensor:
    """Map uniform 32-bit hashes (values from :func:`hash32` or bits from :func:`hash_bits`) to [0, buckets).

    Multiply-shift, floor(h * buckets / 2**32): no modulo bias beyond 2**-32.
    ``buckets`` may be an int64 tensor broadcastable to ``hashed`` (a bucket
    count per element); the product stays below 2**63 as long as counts are < 2**31.
    A tensor of counts is the caller's to validate (once, not per chunk; it may
    live on the meta device while a model skeleton is built).
    """
    if isinstance(buckets, int) and not 1 <= buckets < 2**31:
        raise ValueError(f"bucket count must be in [1, 2**31), got {buckets}")
    value = _unsigned(hashed) if hashed.dtype == torch.int32 else hashed
    return (value * buckets) >> 32


def sign_bit(hashed: torch.Tensor) -> torch.Tensor:
    """0 for +1, 1 for -1 (int64): the low bit of an independent hash's value or bits."""
    return (hashed & 1).to(torch.int64)


def chunk_length(numel: int, buckets: int | torch.Tensor, locality: int) -> int | torch.Tensor:
    """Indices per chunk for ``locality`` L: L, or ceil(numel / buckets) if larger, so every chunk gets a bucket.

    ``buckets`` may be an int64 tensor (one count per element, as in :func:`bucket_of`): one length per count.
    """
    fewest = -(-numel // buckets)
    return fewest.clamp(min=locality) if isinstance(fewest, torch.Tensor) else max(locality, fewest)


def chunk_slices(
    index: torch.Tensor, numel: int, buckets: int | torch.Tensor, locality: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(first bucket, bucket count) of the slice of [0, buckets) that each flat index's chunk hashes into.

    The indices 0..numel-1 are cut into chunks of C = :func:`chunk_length`
    consecutive ones; chunk [s, e) owns buckets [floor(s K / N), floor(e K / N)).
    The slices tile [0, K) exactly (the first starts at 0, the last ends at K,
    each starts where the previous ends), are proportional to the chunk sizes
    (so a partial last chunk gets its share), and hold at least one bucket
    each: floor(e K / N) - floor(s K / N) >= 1 because (e - s) K / N >= 1 for
    full chunks (C >= N / K) and s < N = e for the last. ``buckets`` may be an
    int64 tensor broadcastable to ``index`` (one table per element, e.g. per
    frequency band); the caller keeps numel * buckets below 2**63 then.
    """
    if isinstance(buckets, int) and numel * buckets >= 2**63:
        raise ValueError(f"{numel} weights times {buckets} buckets overflows int64 chunk slices")
    chunk = chunk_length(numel, buckets, locality)
    start = index - index % chunk
    first = start * buckets // numel
    last = (start + chunk).clamp(max=numel) * buckets // numel
    return first, last - first


def floor_divide(x: torch.Tensor, divisor: torch.Tensor, reciprocal: torch.Tensor) -> torch.Tensor:
    """``x // divisor`` for int64 ``x`` in [0, 2**33) and positive ``divisor``, without an integer division.

    SIMD units have no integer divide, and a scalar one costs tens of cycles
    per element. ``floor(x * reciprocal)`` in float64 (``reciprocal`` = 1 /
    divisor) is within one of the quotient for these magnitudes (relative
    error 2**-52 on a quotient below 2**33), and one exact integer check
    each way corrects it: the same integers as ``//``, on any device.
    """
    quotient = (x.to(torch.float64) * reciprocal).floor().to(torch.int64)
    quotient += (x >= (quotient + 1) * divisor).to(torch.int64)
    quotient -= (x < quotient * divisor).to(torch.int64)
    return quotient


def chunk_tables(numel: int, buckets: int, locality: int) -> tuple[int, list[int], list[int]]:
    """(chunk length C, first bucket, bucket count) of every chunk of :func:`chunk_slices`, as Python lists.

    A hashed layer's fold then looks its chunk's slice up (chunk = position // C)
    instead of dividing per element.
    """
    chunk = chunk_length(numel, buckets, locality)
    starts = torch.arange(0, numel, chunk, dtype=torch.int64)
    first, count = chunk_slices(starts, numel, buckets, locality)
    return chunk, first.tolist(), count.tolist()

