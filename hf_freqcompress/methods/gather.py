"""Row gathers from a small table, with a deterministic sorted backward.

Hashed methods rebuild a weight as ``table[index]``: one row of the (signed)
bucket table per hashed unit, a single value for per-weight hashing or a
block of ``block_size`` values for the tiled layout. The gather itself is
cheap; its gradient is the hard part. Autograd's backward of
``index_select`` scatters (``index_add_``) every gradient row into its bucket:
on CPU a serial loop, on CUDA atomics whose summation order, and so result,
changes from run to run.

:func:`sort_rows` precomputes, once per layer, the units sorted by row (a
stable sort, so equal rows keep their original order) and where each row's
run starts: a CSR matrix of shape (rows, units) with every entry 1. The
backward of :func:`gather_rows` is then a segment sum, ``grad_table = S @
grad``, a fixed-order reduction per row: the same bits in every run of a
given device. Its price is 4 bytes per unit plus 4 per row, in
``cache_bytes``. Speed on CPU is mixed (docs/results/perf.md): for per-weight
hashing, whose memory accesses are random either way, it gained nothing; for
the tiled layout it halved vgg11_bn's reconstruction time (large layers) but
lost on resnet18, where the sparse product's per-call overhead dominates small
layers. Its sure gain is determinism where the scatter uses atomics (CUDA).

How the segment sum runs is registered per device type: on CPU a sparse CSR
product (MKL, parallel over rows; each row summed in a fixed order), elsewhere
``torch.segment_reduce`` over the sorted gradient rows (one thread per row and
column, no atomics). Both are exercised by the CPU tests.

:func:`gather_transform` is the gather followed by a small linear map of each
group of ``m`` gathered values (FreshNets' inverse DCT of each filter), done
chunk by chunk: each chunk of gathered values is transformed while it is
still in cache, so the gathered tensor is never written to memory, and the
backward likewise transforms one chunk of gradient at a time before
scattering it. That saves writing and re-reading a tensor the size of the
weight in each direction (docs/results/perf.md, "Current defaults", for
what it buys on vgg11_bn's 102.8M-weight conv). Peak extra memory is one chunk
(``_CHUNK_ELEMENTS`` values).

Narrow maps are widened: CPU BLAS (MKL) multiplies a tall matrix by a small
one slowly when the small one is narrower than 16 columns, so ``k =
ceil(16 / m)`` consecutive groups are multiplied at once by the
block-diagonal ``diag(M, ..., M)`` (k m wide): k times the arithmetic, most
of it on zeros, yet faster for 3x3 kernels (``benchmarks/small_gemm.py``,
docs/results/perf.md).

Large gathers (plain or transformed) run on every intra-op CPU thread, one
contiguous range of units each, with one zeroed gradient table per range in
the backward, summed in range order (:mod:`.parallel`): PyTorch runs both ops
on one thread however many cores the convolutions around them use.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from .index import CachedIndex, IndexSource
from .parallel import run_ranges, split_rows, sum_in_order

__all__ = ["gather_rows", "gather_transform", "segment_sum_csr", "segment_sum_sorted", "sort_rows"]

SortedRows = tuple[torch.Tensor, torch.Tensor]  # (order int32 (units,), starts int32 (rows + 1,))
_CSR_DTYPES = (torch.float32, torch.float64)  # what CPU sparse CSR products support
_CHUNK_ELEMENTS = 2**18  # values per chunk of gather_transform: 1 MiB in float32, inside L2


def sort_rows(index: torch.Tensor, num_rows: int) -> SortedRows:
    """The gather ``index`` (int, values in [0, num_rows)) as CSR: units sorted by row, and row starts.

    Works on the meta device (a model skeleton being loaded has shapes only).
    """
    if num_rows >= 2**31 or index.numel() >= 2**31:
        raise ValueError(f"a sorted plan needs fewer than 2**31 rows and units, got {num_rows} and {index.numel()}")
    rows, order = torch.sort(index.long(), stable=True)
    boundaries = torch.arange(num_rows + 1, dtype=torch.int64, device=index.device)
    starts = torch.searchsorted(rows, boundaries)
    return order.int(), starts.int()


def segment_sum_csr(grad: torch.Tensor, plan: SortedRows) -> torch.Tensor:
    """Per-row sums of ``grad`` rows under ``plan`` as one sparse CSR product (fast on CPU)."""
    order, starts = plan
    compute = grad if grad.dtype in _CSR_DTYPES else grad.float()
    ones = torch.ones((), dtype=compute.dtype, device=grad.device).expand(order.numel())
    with warnings.catch_warnings():  # "sparse CSR support is in beta": expected, not the user's concern
        warnings.simplefilter("ignore", UserWarning)
        matrix = torch.sparse_csr_tensor(starts, order, ones, size=(starts.numel() - 1, order.numel()))
    return (matrix @ compute).to(grad.dtype)


def segment_sum_sorted(grad: torch.Tensor, plan: SortedRows) -> torch.Tensor:
    """Per-row sums of ``grad`` rows under ``plan``: gather in sorted order, then ``segment_reduce``."""
    order, starts = plan
    return torch.segment_reduce(grad.index_select(0, order), "sum", offsets=starts.long(), axis=0, unsafe=True)


SEGMENT_SUMS: dict[str, Callable[[torch.Tensor, SortedRows], torch.Tensor]] = {"cpu": segment_sum_csr}
"""Segment-sum implementation per device type; others use :func:`segment_sum_sorted`."""


class _SortedGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor, order: torch.Tensor, starts: torch.Tensor):
        ctx.save_for_backward(order, starts)
        return table.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        order, starts = ctx.saved_tensors
        segment_sum = SEGMENT_SUMS.get(grad.device.type, segment_sum_sorted)
        return segment_sum(grad.contiguous(), (order, starts)), None, None, None


def _scatter(
    source: IndexSource, shape: torch.Size, like: torch.Tensor, align: int,
    values: Callable[[int, int], torch.Tensor], piece: int,
) -> torch.Tensor:
    """The gather's backward, ``table[index] += values``, the same bits every run.

    Piece by piece (``piece`` units, all of them for a cached index): the
    calling thread computes the piece's index and values (a compiled fold
    runs on every thread by itself and holds the GIL), then each intra-op
    thread scatters its own contiguous part of the piece, cut at multiples of
    ``align``, with ``index_add_`` (which releases it) into its own zeroed
    table; the tables are summed in order (:mod:`.parallel`).
    """
    tables: list[torch.Tensor] = []
    for first in range(0, source.units, piece):
        last = min(first + piece, source.units)
        index, piece_values = source.rows(first, last, like.device).reshape(-1), values(first, last)
        ranges = split_rows(last - first, source.width * math.prod(shape[1:]), align, like.device)
        tables += [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in ranges[len(tables):]]

        def scatter(start: int, stop: int) -> None:
            part = ranges.index((start, stop))
            width = source.width
            tables[part].index_add_(0, index[start * width : stop * width], piece_values[start * width : stop * width])

        run_ranges(scatter, ranges)
    return sum_in_order(tables)


_PIECE_VALUES = 2**20  # values per backward piece of a hashed index: its int32 index takes 4 MiB


def _piece(source: IndexSource, values_per_unit: int) -> int:
    """Units per backward piece: a cached index is sliced for free; a hashed one is computed a piece at a time."""
    return source.units if isinstance(source, CachedIndex) else max(1, _PIECE_VALUES // values_per_unit)


class _SourceGather(torch.autograd.Function):
    """``table`` rows read by every unit of an :class:`~.index.IndexSource`; the backward scatters per range."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, source: IndexSource, ranges: list[tuple[int, int]], align: int):
        ctx.table_shape, ctx.source, ctx.align = table.shape, source, align
        if source.fused(table.device):  # one generated pass over every unit, on every thread
            return source.take(table, 0, source.units)
        width = source.width
        out = torch.empty((source.units * width, *table.shape[1:]), dtype=table.dtype, device=table.device)
        run_ranges(lambda start, stop: source.take_into(table, start, stop, out[start * width : stop * width]), ranges)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        source: IndexSource = ctx.source
        width = source.width

        def values(start: int, stop: int) -> torch.Tensor:
            return grad[start * width : stop * width]

        piece = _piece(source, width * math.prod(ctx.table_shape[1:]))
        return _scatter(source, ctx.table_shape, grad, ctx.align, values, piece), None, None, None


def gather_rows(table: torch.Tensor, source: IndexSource, plan: SortedRows | None = None, align: int = 1) -> torch.Tensor:
    """``table.index_select(0, index)`` for the index of every unit of ``source``, differentiable in ``table``.

    With a ``plan`` from :func:`sort_rows` (a cached index only) the backward
    is the sorted segment sum (deterministic); without one it is a scatter,
    split over CPU threads for large gathers (:mod:`.parallel`) at multiples
    of ``align`` units: pass the chunk length of cache-local hashing, so that
    no bucket is scattered into from two threads and the gradient equals the
    single-thread one. A hashed source recomputes its index in the backward.
    """
    if plan is not None:
        return _SortedGather.apply(table, source.index, *plan)
    if torch.compiler.is_compiling():  # traced inline: the compiler fuses the fold and the gather
        return table.index_select(0, source.rows(0, source.units, table.device).reshape(-1))
    ranges = split_rows(source.units, source.width * math.prod(table.shape[1:]), align, table.device)
    if len(ranges) == 1 and isinstance(source, CachedIndex):
        return table.index_select(0, source.index)
    return _SourceGather.apply(table, source, ranges, align)


_MIN_PRODUCT_WIDTH = 16  # narrower right-hand matrices are widened block-diagonally (module docstring)


class _RowMap:
    """``rows @ matrix`` for (rows, m) blocks, as ``rows.view(-1, k m) @ diag(matrix, ..., matrix)`` on CPU.

    Other devices keep k = 1: the slow narrow product is MKL's, and GPU BLAS was not measured.
    """

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix
        self.groups = -(-_MIN_PRODUCT_WIDTH // matrix.shape[0]) if matrix.device.type == "cpu" else 1
        self.wide = torch.block_diag(*[matrix] * self.groups) if self.groups > 1 else matrix

    def product(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        whole = rows.shape[0] - rows.shape[0] % self.groups
        width = self.wide.shape[0]
        torch.mm(rows[:whole].view(-1, width), self.wide, out=out[:whole].view(-1, width))
        if whole < rows.shape[0]:
            torch.mm(rows[whole:], self.matrix, out=out[whole:])


def _chunk_rows(width: int, groups: int) -> int:
    """Rows per chunk: about ``_CHUNK_ELEMENTS`` values, in whole ``groups``."""
    return max(1, _CHUNK_ELEMENTS // width // groups) * groups


def _chunks(
    first: int, last: int, width: int, groups: int, like: torch.Tensor
) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """[start, stop) chunks of rows ``first`` .. ``last`` (:func:`_chunk_rows` each), and a buffer for one chunk."""
    step = _chunk_rows(width, groups)
    buffer = torch.empty(min(last - first, step), width, dtype=like.dtype, device=like.device)
    return [(start, min(start + step, last)) for start in range(first, last, step)], buffer


class _GatherTransform(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: torch.Tensor, source: IndexSource, matrix: torch.Tensor):
        ctx.save_for_backward(matrix)
        ctx.table_shape, ctx.source = table.shape, source
        rows, width = source.units, source.width
        row_map = _RowMap(matrix)
        ctx.ranges = split_rows(rows, width, _chunk_rows(width, row_map.groups), table.device)
        out = torch.empty(rows, width, dtype=table.dtype, device=table.device)
        # a compiled fold and the products use every thread themselves; the pool serves the eager kernels
        ranges = [(0, rows)] if source.fused(table.device) else ctx.ranges

        def transform(first: int, last: int) -> None:
            chunks, gathered = _chunks(first, last, width, row_map.groups, table)
            for start, stop in chunks:
                chunk = gathered[: stop - start]
                source.take_into(table, start, stop, chunk.view(-1))
                row_map.product(chunk, out[start:stop])

        run_ranges(transform, ranges)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (matrix,) = ctx.saved_tensors
        source: IndexSource = ctx.source
        grad = grad.contiguous()
        width = source.width
        row_map = _RowMap(matrix.mT)

        def values(start: int, stop: int) -> torch.Tensor:
            transformed = torch.empty(stop - start, width, dtype=grad.dtype, device=grad.device)
            row_map.product(grad[start:stop], transformed)
            return transformed.view(-1)

        return _scatter(source, ctx.table_shape, grad, 1, values, _piece(source, width)), None, None


def gather_transform(table: torch.Tensor, source: IndexSource, matrix: torch.Tensor) -> torch.Tensor:
    """``table.index_select(0, index.view(-1)).view(units, m) @ matrix``, differentiable in ``table``.

    ``table`` is 1-D, ``source`` gives m positions per unit (one filter's
    kernel) and ``matrix`` (m, m) is a constant. Computed in cache-sized
    chunks (module docstring), large tensors on several CPU threads
    (:mod:`.parallel`), cut between chunks; the backward scatters like
    autograd's, a hashed source recomputing each chunk's index. Under
    ``torch.compile`` the plain expression is traced instead, for the
    compiler to schedule.
    """
    if torch.compiler.is_compiling():
        index = source.rows(0, source.units, table.device)
        return table.index_select(0, index.reshape(-1)).view(index.shape) @ matrix
    return _GatherTransform.apply(table, source, matrix)
