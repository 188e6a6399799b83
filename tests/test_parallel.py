"""Large gathers and scatters split over CPU threads: same weights, same or equal-up-to-rounding gradients."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch
from torch import nn

from hf_freqcompress import compress
from hf_freqcompress.methods import FreshNetsConfig, FunHashConfig, HashedNetsConfig, gather, parallel
from hf_freqcompress.methods import index
from hf_freqcompress.methods.index import CachedIndex
from hf_freqcompress.methods.parallel import split_rows

CPU = torch.device("cpu")


@pytest.fixture
def threads(monkeypatch):
    """Pretend to have ``n`` intra-op threads, split anything of 32+ values per thread, and count the ranges run."""
    runs: list[int] = []

    def set_threads(n: int, kernels: str = "eager") -> list[int]:
        monkeypatch.setenv(index.KERNELS_VARIABLE, kernels)  # compiled folds fuse the forward into one pass
        monkeypatch.setattr(torch, "get_num_threads", lambda: n)
        monkeypatch.setattr(parallel, "MIN_VALUES_PER_THREAD", 32)
        return runs

    def counting(work, ranges):
        runs.append(len(ranges))
        return parallel.run_ranges(work, ranges)

    monkeypatch.setattr(gather, "run_ranges", counting)
    return set_threads


@pytest.mark.parametrize("rows, values_per_row, align", [(1000, 1, 1), (1000, 7, 64), (999, 3, 100), (130, 1, 64)])
def test_split_rows_covers_the_rows_cut_only_at_multiples_of_align(monkeypatch, rows, values_per_row, align):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(parallel, "MIN_VALUES_PER_THREAD", 32)
    ranges = split_rows(rows, values_per_row, align, CPU)
    assert len(ranges) == min(4, -(-rows // align))
    assert ranges[0][0] == 0 and ranges[-1][1] == rows
    assert all(stop == start for (_, stop), (start, _) in zip(ranges, ranges[1:]))
    assert all(start % align == 0 and stop > start for start, stop in ranges)


def test_split_rows_keeps_one_range_without_threads_work_or_a_cpu(monkeypatch):
    monkeypatch.setattr(parallel, "MIN_VALUES_PER_THREAD", 100)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert split_rows(10**6, 1, 1, CPU) == [(0, 10**6)]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert split_rows(150, 1, 1, CPU) == [(0, 150)]  # 1.5 threads' worth of work
    assert len(split_rows(200, 1, 1, CPU)) == 2
    assert split_rows(10**6, 1, 1, torch.device("meta")) == [(0, 10**6)]


def _rebuild(config, shape, threads_fixture, n, kernels="eager"):
    """Weight and bucket gradient of one compressed layer, with ``n`` pretended threads."""
    runs = threads_fixture(n, kernels)
    layer = nn.Conv2d(shape[1], shape[0], shape[2:]) if len(shape) == 4 else nn.Linear(shape[1], shape[0])
    torch.manual_seed(0)
    compress(nn.Sequential(layer), budget=1 / 8, exclude=[], method=config, seed=3)
    runs.clear()  # compress() rebuilds the weight too (its report); count the timed rebuild only
    values = layer.parametrizations.weight.original
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    weight = layer.weight
    (grad,) = torch.autograd.grad(weight, values, upstream)
    return weight.detach(), grad, list(runs)


def test_hashednets_split_at_chunk_boundaries_is_bit_identical_to_one_thread(threads):
    config = HashedNetsConfig(locality=100)
    weight, grad, runs = _rebuild(config, (40, 60), threads, 3)
    assert runs == [3, 3]  # forward and backward each ran three ranges
    serial_weight, serial_grad, serial_runs = _rebuild(config, (40, 60), threads, 1)
    assert serial_runs == [1, 1]  # one range each way
    assert torch.equal(weight, serial_weight) and torch.equal(grad, serial_grad)


def test_freshnets_split_is_exact_forward_and_deterministic_backward(threads, monkeypatch):
    monkeypatch.setattr(gather, "_CHUNK_ELEMENTS", 50)  # several chunks, cut between them
    monkeypatch.setattr(gather, "_PIECE_VALUES", 200)  # and several backward pieces
    config = FreshNetsConfig(locality=0)  # global hashing: every range scatters into every band
    weight, grad, runs = _rebuild(config, (8, 6, 3, 3), threads, 4)
    assert runs[0] == 4 and len(runs) > 2 and runs[1] == 4  # forward: 4 ranges; backward: pieces, each cut in 4
    again_weight, again_grad, _ = _rebuild(config, (8, 6, 3, 3), threads, 4)
    serial_weight, serial_grad, serial_runs = _rebuild(config, (8, 6, 3, 3), threads, 1)
    assert set(serial_runs) == {1}
    assert torch.equal(weight, serial_weight) and torch.equal(weight, again_weight)
    assert torch.equal(grad, again_grad)
    assert torch.allclose(grad, serial_grad, rtol=1e-5, atol=1e-6)


def test_funhash_gathers_split_like_hashednets(threads):
    funhash = FunHashConfig(num_hashes=1, reconstruction="sum")  # HashedNets, bit for bit
    weight, grad, runs = _rebuild(funhash, (40, 60), threads, 3)
    assert runs == [3, 3]
    hashed_weight, hashed_grad, _ = _rebuild(HashedNetsConfig(), (40, 60), threads, 3)
    assert torch.equal(weight, hashed_weight) and torch.equal(grad, hashed_grad)


def test_split_gather_of_tiled_rows_matches_autograd(threads):
    runs = threads(2)
    table = torch.randn(30, 4, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 30, (500,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    upstream = torch.randn(500, 4, dtype=torch.float64)
    out = gather.gather_rows(table, CachedIndex(index))
    (grad,) = torch.autograd.grad(out, table, upstream)
    expected = table.index_select(0, index)
    (expected_grad,) = torch.autograd.grad(expected, table, upstream)
    assert runs == [2, 2]  # forward and backward, two ranges each
    assert torch.equal(out, expected) and torch.allclose(grad, expected_grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("config", [HashedNetsConfig(locality=100), FreshNetsConfig()], ids=["hashednets", "freshnets"])
def test_split_rebuild_runs_under_inference_mode(threads, config, monkeypatch):
    monkeypatch.setattr(gather, "_CHUNK_ELEMENTS", 50)  # FreshNets cuts between chunks: make several
    runs = threads(2)
    layer = nn.Conv2d(6, 8, 3) if isinstance(config, FreshNetsConfig) else nn.Linear(60, 40)
    compress(nn.Sequential(layer), budget=1 / 8, exclude=[], method=config)
    runs.clear()
    with torch.inference_mode():  # pool threads must not write the caller's inference tensors outside it
        inferred = layer.weight
    with torch.no_grad():
        expected = layer.weight
    assert runs == [2, 2] and torch.equal(inferred, expected)


def _split_sum_in_child(queue) -> None:
    queue.put(sum(parallel.run_ranges(lambda start, stop: stop - start, [(0, 3), (3, 10)])))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_a_working_pool():
    for _ in range(5):  # the parent's pool: threads that are idle, as far as the executor knows
        assert parallel.run_ranges(lambda start, stop: stop - start, [(0, 3), (3, 10)]) == [3, 7]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_split_sum_in_child, args=(queue,))
    child.start()
    child.join(timeout=30)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0 and queue.get(timeout=5) == 10  # an inherited pool without threads would hang


def test_compiled_fold_fuses_the_forward_and_splits_the_backward(threads):
    eager_weight, eager_grad, eager_runs = _rebuild(HashedNetsConfig(locality=100), (40, 60), threads, 3)
    weight, grad, runs = _rebuild(HashedNetsConfig(locality=100), (40, 60), threads, 3, kernels="compile")
    assert eager_runs == [3, 3] and runs == [3]  # forward: one generated pass; backward: three ranges
    assert torch.equal(weight, eager_weight) and torch.equal(grad, eager_grad)
