"""The sorted-plan gather: same gradients as autograd's scatter, deterministic, every device path."""

from __future__ import annotations

import pytest
import torch

from hf_freqcompress.methods import gather
from hf_freqcompress.methods.gather import gather_rows, gather_transform, segment_sum_csr, segment_sum_sorted, sort_rows
from hf_freqcompress.methods.index import CachedIndex


def _case(rows: int, width: int, units: int, dtype=torch.float64, device="cpu"):
    generator = torch.Generator().manual_seed(rows * 7 + width)
    shape = (rows,) if width == 1 else (rows, width)
    table = torch.randn(shape, generator=generator, dtype=dtype).to(device).requires_grad_()
    index = torch.randint(0, rows, (units,), generator=generator, dtype=torch.int32).to(device)
    upstream = torch.randn((units, *shape[1:]), generator=generator, dtype=dtype).to(device)
    return table, index, upstream


def _grad(table, index, upstream, plan):
    table.grad = None
    gather_rows(table, CachedIndex(index), plan).backward(upstream)
    return table.grad.clone()


@pytest.mark.parametrize("chunk_elements", [2**18, 24, 7])  # one chunk; several; chunks of as few rows as allowed
@pytest.mark.parametrize("width", [3, 9, 49])  # multiplied 6, 2 and 1 rows at a time; 23 rows leave a remainder
def test_gather_transform_equals_gather_then_product(monkeypatch, chunk_elements, width):
    monkeypatch.setattr(gather, "_CHUNK_ELEMENTS", chunk_elements)
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(40, generator=generator, dtype=torch.float64).requires_grad_()
    index = torch.randint(0, 40, (23, width), generator=generator, dtype=torch.int32)
    matrix = torch.randn(width, width, generator=generator, dtype=torch.float64)
    upstream = torch.randn(23, width, generator=generator, dtype=torch.float64)
    expected = table.index_select(0, index.view(-1)).view(23, width) @ matrix
    (expected_grad,) = torch.autograd.grad(expected, table, upstream)
    out = gather_transform(table, CachedIndex(index.view(-1), width), matrix)
    (grad,) = torch.autograd.grad(out, table, upstream)
    assert torch.allclose(out, expected, atol=1e-12) and torch.allclose(grad, expected_grad, atol=1e-12)


def test_sort_rows_is_a_stable_csr_of_the_index():
    index = torch.tensor([2, 0, 2, 1, 0], dtype=torch.int32)
    order, starts = sort_rows(index, 4)
    assert order.tolist() == [1, 4, 3, 0, 2] and starts.tolist() == [0, 2, 3, 5, 5]
    assert order.dtype == starts.dtype == torch.int32


@pytest.mark.parametrize("segment_sum", [segment_sum_csr, segment_sum_sorted])
@pytest.mark.parametrize("width", [1, 8])
def test_sorted_backward_equals_autograd_scatter(monkeypatch, segment_sum, width):
    monkeypatch.setitem(gather.SEGMENT_SUMS, "cpu", segment_sum)
    table, index, upstream = _case(rows=50, width=width, units=3000)  # some rows get no unit at all
    plan = sort_rows(index, 50)
    assert torch.equal(gather_rows(table, CachedIndex(index), plan), gather_rows(table, CachedIndex(index)))
    assert torch.allclose(_grad(table, index, upstream, plan), _grad(table, index, upstream, None), rtol=0, atol=1e-12)


@pytest.mark.parametrize("segment_sum", [segment_sum_csr, segment_sum_sorted])
def test_sorted_backward_is_bitwise_repeatable(monkeypatch, segment_sum):
    monkeypatch.setitem(gather.SEGMENT_SUMS, "cpu", segment_sum)
    table, index, upstream = _case(rows=4096, width=4, units=200_000, dtype=torch.float32)
    plan = sort_rows(index, 4096)
    first = _grad(table, index, upstream, plan)
    assert all(torch.equal(first, _grad(table, index, upstream, plan)) for _ in range(3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradients_keep_their_dtype(dtype):
    table, index, upstream = _case(rows=64, width=4, units=500, dtype=dtype)
    grad = _grad(table, index, upstream, sort_rows(index, 64))
    reference = _grad(table.float().detach().requires_grad_(), index, upstream.float(), None)
    assert grad.dtype == dtype
    assert torch.allclose(grad.float(), reference, rtol=2e-2, atol=5e-2)


def test_sort_rows_works_on_the_meta_device():
    order, starts = sort_rows(torch.empty(1000, dtype=torch.int32, device="meta"), 64)
    assert order.shape == (1000,) and starts.shape == (65,) and order.is_meta


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sorted_backward_matches_cpu_and_repeats():
    table, index, upstream = _case(rows=4096, width=4, units=200_000)
    expected = _grad(table, index, upstream, sort_rows(index, 4096))
    table, index, upstream = (t.cuda() for t in (table.detach(), index, upstream))
    table.requires_grad_()
    plan = sort_rows(index, 4096)
    first = _grad(table, index, upstream, plan)
    assert torch.equal(first, _grad(table, index, upstream, plan))
    assert torch.allclose(first.cpu(), expected, rtol=0, atol=1e-12)
