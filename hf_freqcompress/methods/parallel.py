"""Row ranges of one large CPU gather or scatter, run on several threads.

PyTorch runs ``index_select`` and ``index_add_`` on a 1-D CPU table one
element after another on one thread, while the convolutions around them use
every core: with two threads vgg11_bn's dense step halves and rebuilding its
102.8M-weight conv does not (docs/results/perf.md). Both ops release the GIL,
so cutting the rows into one contiguous range per thread and running the
ranges from a small thread pool uses the other cores too. Forward ranges
write disjoint slices of the output, so the gather is exact; backward ranges
scatter into their own zeroed table and the tables are then summed in range
order, so the gradient never races and is the same in every run with the same
thread count. It equals the single-thread gradient bit for bit when no
bucket receives gradient from two ranges (cuts at chunk boundaries of
cache-local hashing), and up to float rounding of those buckets otherwise.

Only tensors of at least ``MIN_VALUES_PER_THREAD`` values per thread are
split: below that, handing work to a thread costs more than it saves
(``benchmarks/split_gather.py``, docs/results/perf.md).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

__all__ = ["MIN_VALUES_PER_THREAD", "run_ranges", "split_rows", "sum_in_order", "in_worker"]

_worker = threading.local()

MIN_VALUES_PER_THREAD = 2**18
"""Values a thread must get before a gather or scatter is split (1 MiB of float32)."""

Result = TypeVar("Result")


def split_rows(rows: int, values_per_row: int, align: int, device: torch.device) -> list[tuple[int, int]]:
    """[start, stop) ranges covering ``rows``, one per CPU thread, cut only at multiples of ``align`` rows.

    One range (no threads) off the CPU, with one intra-op thread, or when the
    tensor is too small to pay for the hand-off.
    """
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    threads = min(threads, rows * values_per_row // MIN_VALUES_PER_THREAD, -(-rows // align))
    if threads <= 1:
        return [(0, rows)]
    steps = -(-rows // align)
    cuts = [min(rows, steps * part // threads * align) for part in range(threads + 1)]
    return [(start, stop) for start, stop in zip(cuts, cuts[1:]) if stop > start]


def run_ranges(work: Callable[[int, int], Result], ranges: list[tuple[int, int]]) -> list[Result]:
    """``[work(start, stop) for each range]``; several ranges run on pool threads, in the caller's autograd mode."""
    if len(ranges) == 1:
        return [work(*ranges[0])]
    # Grad and inference mode are thread-local: pool threads take the caller's.
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def in_callers_mode(bounds: tuple[int, int]) -> Result:
        _worker.active = True
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return work(*bounds)
        finally:
            _worker.active = False

    return list(_pool(len(ranges)).map(in_callers_mode, ranges))


def in_worker() -> bool:
    """Whether this thread runs one of several ranges: work here should not start threads of its own."""
    return getattr(_worker, "active", False)


def sum_in_order(tables: list[torch.Tensor]) -> torch.Tensor:
    """``tables[0] + tables[1] + ...`` in that order, into ``tables[0]`` (a fixed order: the same bits every run)."""
    total = tables[0]
    for table in tables[1:]:
        total += table
    return total


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="hf_freqcompress")


# A forked child inherits the pool object but not its threads; it must start its own.
os.register_at_fork(after_in_child=_pool.cache_clear)
