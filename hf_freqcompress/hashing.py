"""Deterministic integer hashes, computed in torch.

Hash indices and signs are never stored in a checkpoint: they are rebuilt
from (seed, layer name, role, flat index) wherever the model is loaded. That
only works if the hash is bit-identical on CPU and CUDA, in every process and
across runs, so it is plain integer arithmetic on int64 tensors with every
intermediate kept below 2**63 (no overflow, no platform-dependent wrap-around,
no Python ``hash()`` which is salted per process).

The mixer is a 32-bit avalanche function (two xor-shift-multiply rounds,
constant 0x45d9f3b), a bijection on [0, 2**32) whose output bits each depend
on every input bit. Indices up to 2**64 are supported by mixing the high word
into the key first, which costs nothing for tensors below 2**32 elements.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch

MASK32 = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B  # < 2**27, so a 32-bit value times it stays < 2**59
_CHUNK = 1 << 24  # bounds the int64 temporaries to ~128 MiB per step

__all__ = [
    "layer_key", "hash32", "bucket_of", "sign_bit", "chunk_length", "chunk_slices", "local_bucket", "signed_buckets",
    "signed_buckets_range", "int32_range_map"]


def _mix32(x):
    """Avalanche 32-bit values: a Python int, or an int64 tensor updated in place.

    Augmented assignments rebind ints and mutate tensors, so one body serves
    both; in place halves the memory traffic on large layers.
    """
    for _ in range(2):
        x ^= x >> 16
        x *= _MULTIPLIER
        x &= MASK32
    x ^= x >> 16
    return x


def layer_key(seed: int, name: str, role: str) -> int:
    """A 32-bit key for one hash function of one layer.

    blake2b of the text makes the key stable across processes and Python
    versions; ``role`` separates independent functions of the same layer
    (e.g. "index" and "sign", or one per frequency group).
    """
    digest = hashlib.blake2b(f"{int(seed)}\x00{name}\x00{role}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def hash32(index: torch.Tensor, key: int | torch.Tensor) -> torch.Tensor:
    """Hash int64 flat indices to uniform values in [0, 2**32) under ``key``.

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
        inner = _mix32(high ^ key)
    else:
        inner = _mix32(key & MASK32)
    return _mix32((index & MASK32) ^ inner)


def bucket_of(hashed: torch.Tensor, buckets: int | torch.Tensor) -> torch.Tensor:
    """Map uniform 32-bit hashes to [0, buckets) by multiply-shift (no modulo bias beyond 2**-32).

    ``buckets`` may be an int64 tensor broadcastable to ``hashed`` (a bucket
    count per element); the product stays below 2**63 as long as counts are < 2**31.
    A tensor of counts is the caller's to validate (once, not per chunk; it may
    live on the meta device while a model skeleton is built).
    """
    if isinstance(buckets, int) and not 1 <= buckets < 2**31:
        raise ValueError(f"bucket count must be in [1, 2**31), got {buckets}")
    return (hashed * buckets) >> 32


def sign_bit(hashed: torch.Tensor) -> torch.Tensor:
    """0 for +1, 1 for -1: the low bit of an independent hash."""
    return hashed & 1


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


def local_bucket(
    hashed: torch.Tensor, index: torch.Tensor, numel: int, buckets: int | torch.Tensor, locality: int
) -> torch.Tensor:
    """``bucket_of(hashed, buckets)``, or for ``locality`` > 0 the same hash mapped into the index's chunk slice.

    A chunk covering all ``numel`` indices is the whole table: the global bucket, bit for bit.
    """
    if not locality:
        return bucket_of(hashed, buckets)
    first, count = chunk_slices(index, numel, buckets, locality)
    return first + bucket_of(hashed, count)


def signed_buckets(
    index: torch.Tensor, buckets: int, index_key: int, sign_key: int, *, numel: int = 0, locality: int = 0
) -> torch.Tensor:
    """Bucket and sign of each flat index, folded into one integer in [0, 2 * buckets).

    ``b + buckets * s`` (s = 1 for a negative sign) lets a reconstruction be a
    single gather from the table ``cat([v, -v])`` and caches in one int32.
    ``locality`` > 0 maps the same index hash into the index's chunk slice of
    a tensor of ``numel`` weights (:func:`local_bucket`); 0 hashes globally.
    """
    folded = local_bucket(hash32(index, index_key), index, numel, buckets, locality)
    folded += sign_bit(hash32(index, sign_key)) * buckets
    return folded


def signed_buckets_range(
    numel: int,
    buckets: int,
    index_key: int,
    sign_key: int,
    *,
    locality: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """:func:`signed_buckets` of 0..numel-1 as int32, chunked so peak memory stays bounded."""
    if 2 * buckets >= 2**31:
        raise ValueError(f"{buckets} buckets do not fit an int32 signed index; use fewer than 2**30")

    def fold(index: torch.Tensor) -> torch.Tensor:
        return signed_buckets(index, buckets, index_key, sign_key, numel=numel, locality=locality)

    return int32_range_map(numel, fold, device=device)


def int32_range_map(
    numel: int,
    fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    row: int = 1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``fn(arange(numel).view(-1, row)).view(-1)`` as int32, in chunks of whole rows.

    Chunking keeps the int64 temporaries near ``_CHUNK`` elements however large
    the tensor. ``fn`` maps int64 flat indices to integers that fit int32,
    elementwise; ``row`` lets it broadcast small per-column tables (say one
    hash key per kernel position) against a (rows, row) block of indices
    instead of gathering them per element.
    """
    if row < 1 or numel % row:
        raise ValueError(f"row length {row} must be >= 1 and divide numel={numel}")
    rows = numel // row
    out = torch.empty(rows, row, dtype=torch.int32, device=device)
    step = max(1, _CHUNK // row)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        out[start:stop] = fn(torch.arange(start * row, stop * row, dtype=torch.int64, device=device).view(-1, row))
    return out.view(-1)
