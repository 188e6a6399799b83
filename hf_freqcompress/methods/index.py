"""Where each hashed unit of a layer reads its value: cached, or hashed again wherever it is needed.

A hashed method rebuilds a weight as ``table[index]``, one row of a small
table per unit (a weight, a block of weights, or a kernel's coefficients).
The index is a pure function of the unit's position, so it need not be
stored; storing it costs 4 bytes per unit, as much as the dense float32
weight, which is exactly the memory compression is meant to save. An
:class:`IndexSource` gives the rows of any range of units, in one of two ways:

- :class:`HashedIndex` (the default) evaluates the method's *fold*, a torch
  function of a block of int64 positions and a few small int64 tensors (hash
  keys, bucket counts, offsets), every time. Where ``torch.compile`` works,
  the fold and the gather it feeds run as one generated loop (no index tensor
  is ever written) and the backward computes the index chunk by chunk, in
  cache, right before scattering into it; elsewhere the same fold runs eagerly
  in chunks. Integer arithmetic makes both give the same integers, so the
  compiled and eager paths, every device and every process rebuild the same
  weight. ``HF_FREQCOMPRESS_KERNELS=eager`` turns compilation off.
- :class:`CachedIndex` holds the folded index as an int32 tensor (a method's
  ``cache_indices=True``): no hashing per step, 4 bytes per unit of memory.

Folds must use integer torch ops only, take positions below 2**32 and be
module-level functions (one compiled kernel per fold serves every layer: the
per-layer constants are tensor arguments, not Python numbers).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from .parallel import in_worker

__all__ = ["IndexSource", "CachedIndex", "HashedIndex", "Fold", "KERNELS_VARIABLE"]

Param = int | float | Sequence[int] | Sequence[float]
"""A fold constant: ints become int64 tensors, floats float64 (exact reciprocals for :func:`~hf_freqcompress.hashing.floor_divide`)."""

Fold = Callable[..., torch.Tensor]
"""``fold(unit (rows, 1) int64, position (rows, width) int64, *params) -> int64 (rows, width)``: the folded index
of each position; ``unit`` is each row's unit number (position // width, without dividing)."""

KERNELS_VARIABLE = "HF_FREQCOMPRESS_KERNELS"
"""Environment variable: ``compile`` (default) fuses folds with torch.compile where it works; ``eager`` never compiles."""

_CHUNK_UNITS = 2**18
"""Positions per eager chunk: the int64 temporaries stay in cache."""

_failed_devices: set[str] = set()

_RECOMPILES = torch._dynamo.config.patch(recompile_limit=64)
"""One compiled kernel per fold serves every layer; dtypes, table ranks and 0/1-sized ranges each compile a
variant, more than dynamo's default limit of 8 in a process that mixes many (a test suite)."""


class IndexSource:
    """The folded index of ``units`` rows of ``width`` positions each; row r holds positions r*width ..."""

    units: int
    width: int

    def rows(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """The index of units ``start`` .. ``stop - 1``, shape (stop - start, width), int32."""
        raise NotImplementedError

    def take_into(self, table: torch.Tensor, start: int, stop: int, out: torch.Tensor) -> None:
        """Write the table rows that units ``start`` .. ``stop - 1`` read into ``out`` (one row per position)."""
        torch.index_select(table, 0, self.rows(start, stop, table.device).reshape(-1), out=out)

    def fused(self, device: torch.device) -> bool:
        """Whether :meth:`take` of every unit is one generated pass that uses every thread by itself."""
        return False

    def take(self, table: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The table rows units ``start`` .. ``stop - 1`` read, ``((stop - start) * width, *table.shape[1:])``."""
        out = torch.empty(((stop - start) * self.width, *table.shape[1:]), dtype=table.dtype, device=table.device)
        self.take_into(table, start, stop, out)
        return out

    def materialize(self, device: torch.device | None) -> torch.Tensor:
        """The whole index as int32, ``(units * width,)``, built in chunks: what ``cache_indices=True`` keeps."""
        device = torch.device("cpu") if device is None else torch.device(device)
        out = torch.empty(self.units * self.width, dtype=torch.int32, device=device)
        step = max(1, 16 * _CHUNK_UNITS // self.width)
        for first in range(0, self.units, step):
            last = min(first + step, self.units)
            out[first * self.width : last * self.width] = self.rows(first, last, device).reshape(-1)
        return out

    def cache_bytes(self) -> int:
        return 0


class CachedIndex(IndexSource):
    """A folded index held in memory as int32 (``width`` positions per unit)."""

    def __init__(self, index: torch.Tensor, width: int = 1) -> None:
        self.index = index
        self.width = width
        self.units = index.numel() // width

    def rows(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        return self.index[start * self.width : stop * self.width].view(-1, self.width)

    def materialize(self, device: torch.device | None) -> torch.Tensor:
        return self.index

    def cache_bytes(self) -> int:
        return self.index.numel() * self.index.element_size()


class HashedIndex(IndexSource):
    """The folded index computed from ``fold`` on demand; nothing per unit is kept."""

    def __init__(self, fold: Fold, params: Sequence[Param], units: int, width: int = 1) -> None:
        if units * width >= 2**32:
            raise ValueError(f"a hashed layer holds fewer than 2**32 positions, got {units * width}")
        self.fold = fold
        self.units, self.width = units, width
        self._params = {"cpu": tuple(_constant(p) for p in params)}
        self._pinned: CachedIndex | None = None

    @contextmanager
    def pinned(self, device: torch.device) -> Iterator[None]:
        """Serve the index from memory for the block: for many rebuilds in a row (iterative fits at compress time)."""
        self._pinned = CachedIndex(self.materialize(device), self.width)
        try:
            yield
        finally:
            self._pinned = None

    def params(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The fold's constants on ``device`` (copied there once)."""
        key = str(device)
        if key not in self._params:
            self._params[key] = tuple(p.to(device) for p in self._params["cpu"])
        return self._params[key]

    def rows(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        if self._pinned is not None:
            return self._pinned.rows(start, stop, device)
        if _compiles(device):
            return _run_compiled(device, _compiled(self.fold).rows, HashedIndex._eager_rows, self, start, stop, device)
        return self._eager_rows(start, stop, device)

    def fused(self, device: torch.device) -> bool:
        return self._pinned is None and _compiles(device)

    def take(self, table: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if not self.fused(table.device):
            return super().take(table, start, stop)
        return _run_compiled(table.device, _compiled(self.fold).take, HashedIndex._eager_take, self, table, start, stop)

    def take_into(self, table: torch.Tensor, start: int, stop: int, out: torch.Tensor) -> None:
        if self._pinned is not None:
            self._pinned.take_into(table, start, stop, out)
            return
        if self.fused(table.device):
            out.copy_(self.take(table, start, stop))
            return
        step = max(1, _CHUNK_UNITS // self.width)  # the int64 positions and index never exceed a chunk
        for first in range(start, stop, step):
            last = min(first + step, stop)
            index = self._eager_rows(first, last, table.device).reshape(-1)
            torch.index_select(table, 0, index, out=out[(first - start) * self.width : (last - start) * self.width])

    def _eager_rows(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """The fold chunk by chunk into an int32 result: the int64 temporaries never exceed a chunk."""
        out = torch.empty(stop - start, self.width, dtype=torch.int32, device=device)
        step = max(1, _CHUNK_UNITS // self.width)
        for first in range(start, stop, step):
            last = min(first + step, stop)
            out[first - start : last - start] = _fold_rows(self.fold, first, last, self.width, device, *self.params(device))
        return out

    def _eager_take(self, table: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return IndexSource.take(self, table, start, stop)  # compiling has failed by now: the eager chunks run


def _constant(value: Param) -> torch.Tensor:
    first = value[0] if isinstance(value, Sequence) and value else value
    return torch.tensor(value, dtype=torch.float64 if isinstance(first, float) else torch.int64)


def _fold_rows(fold: Fold, start: int, stop: int, width: int, device: torch.device, *params: torch.Tensor) -> torch.Tensor:
    unit = torch.arange(start, stop, dtype=torch.int64, device=device).view(-1, 1)
    return fold(unit, unit * width + torch.arange(width, dtype=torch.int64, device=device), *params)


def _take(fold: Fold, table: torch.Tensor, start: int, stop: int, width: int, *params: torch.Tensor) -> torch.Tensor:
    index = _fold_rows(fold, start, stop, width, table.device, *params).reshape(-1)
    return torch.ops.aten._unsafe_index(table, [index])  # in range by construction: no per-element check


def _compiles(device: torch.device) -> bool:
    """Whether folds run compiled here: on by default, off on meta, inside a user's compile (traced inline
    instead) and on a device type where compiling failed once."""
    return (
        os.environ.get(KERNELS_VARIABLE, "compile") != "eager"
        and device.type not in _failed_devices
        and device.type != "meta"
        and not torch.compiler.is_compiling()
    )


class _Kernels:
    """The compiled ``take`` and ``rows`` of one fold, shared by every layer that uses the fold.

    Each comes twice: one generated loop that uses every thread, and a serial
    one for calls from a pool thread that already runs one range of a split
    gather (:func:`~.parallel.in_worker`), where a parallel loop per thread
    would oversubscribe the cores.
    """

    def __init__(self, fold: Fold) -> None:
        # Separate functions (not one compiled twice): dynamo keys its cache on the code object.
        def take(table: torch.Tensor, start: int, stop: int, width: int, *params: torch.Tensor) -> torch.Tensor:
            return _take(fold, table, start, stop, width, *params)

        def take_serial(table: torch.Tensor, start: int, stop: int, width: int, *params: torch.Tensor) -> torch.Tensor:
            return _take(fold, table, start, stop, width, *params)

        def rows(start: int, stop: int, width: int, *params: torch.Tensor) -> torch.Tensor:
            return _fold_rows(fold, start, stop, width, params[0].device, *params).to(torch.int32)

        def rows_serial(start: int, stop: int, width: int, *params: torch.Tensor) -> torch.Tensor:
            return _fold_rows(fold, start, stop, width, params[0].device, *params).to(torch.int32)

        serial = {"cpp.threads": 1}
        self._take = (torch.compile(take, dynamic=True, fullgraph=True),
                      torch.compile(take_serial, dynamic=True, fullgraph=True, options=serial))
        self._rows = (torch.compile(rows, dynamic=True, fullgraph=True),
                      torch.compile(rows_serial, dynamic=True, fullgraph=True, options=serial))

    def take(self, source: HashedIndex, table: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        with torch.no_grad(), _RECOMPILES:
            return self._take[in_worker()](table, start, stop, source.width, *source.params(table.device))

    def rows(self, source: HashedIndex, start: int, stop: int, device: torch.device) -> torch.Tensor:
        with torch.no_grad(), _RECOMPILES:
            return self._rows[in_worker()](start, stop, source.width, *source.params(device))


@functools.cache
def _compiled(fold: Fold) -> _Kernels:
    return _Kernels(fold)


def _run_compiled(device: torch.device, compiled: Callable, eager: Callable, *args):
    """``compiled(*args)``; if compiling fails (no C++ compiler, no Triton), ``eager(*args)`` from then on."""
    try:
        return compiled(*args)
    except Exception as error:  # torch.compile raises many types; every one means "use the eager fold"
        _failed_devices.add(device.type)
        warnings.warn(
            f"hf_freqcompress: compiling the hash index on {device.type} failed ({type(error).__name__}: "
            f"{str(error)[:200]}); hashing eagerly instead (same results, slower). Set "
            f"{KERNELS_VARIABLE}=eager to skip the attempt.",
            RuntimeWarning,
            stacklevel=3,
        )
        return eager(*args)
