from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.fft
import torch

from hf_freqcompress.dct import dct, dct_matrix, frequency_sum, idct, trailing_idct_matrix, zigzag_order

# (shape, dims): every code path of the transform. Kernel dims fuse into one
# Kronecker basis (3x3, 3x5, 1x1, 8x8 = 64, the fusion limit); 9x9 and long
# dims do not; a dim with trailing dims goes through the batched GEMM.
CASES = [
    ((7,), (0,)),
    ((1,), (0,)),
    ((4, 6, 3, 3), (-2, -1)),
    ((4, 6, 3, 5), (-2, -1)),
    ((4, 6, 1, 1), (-2, -1)),
    ((2, 3, 8, 8), (2, 3)),
    ((2, 3, 9, 9), (-1, -2)),
    ((2, 1, 5), (0, 1, 2)),
    ((3, 4, 5), (0, 1, 2)),
    ((2, 3, 4, 5), (0, 1, 2, 3)),
    ((5, 3, 7), (0, 2)),
    ((3, 2, 3, 4), (1, 2)),
    ((70, 3), (0,)),
    ((2, 70, 3), (1,)),
    ((3, 70), (-1,)),
]


def _scipy(x: torch.Tensor, dims, inverse: bool = False) -> torch.Tensor:
    fn = scipy.fft.idctn if inverse else scipy.fft.dctn
    return torch.from_numpy(fn(x.double().numpy(), type=2, norm="ortho", axes=dims))


@pytest.mark.parametrize("shape,dims", CASES)
def test_dct_and_idct_match_scipy(shape, dims):
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(dct(x, dims), _scipy(x, dims), rtol=0, atol=1e-12)
    torch.testing.assert_close(idct(x, dims), _scipy(x, dims, inverse=True), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape,dims", CASES)
def test_round_trip_float64(shape, dims):
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(idct(dct(x, dims), dims), x, rtol=0, atol=1e-13)
    torch.testing.assert_close(dct(idct(x, dims), dims), x, rtol=0, atol=1e-13)


def test_non_contiguous_input():
    x = torch.randn(5, 3, 4, dtype=torch.float64).transpose(0, 2)
    assert not x.is_contiguous()
    torch.testing.assert_close(dct(x, (0, 1)), _scipy(x, (0, 1)), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "dtype,tol",
    [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)],
)
@pytest.mark.parametrize("shape,dims", [((4, 6, 3, 5), (-2, -1)), ((9, 40), (0, 1)), ((3, 2, 3, 4), (1, 2))])
def test_low_precision_close_to_float64_and_keeps_dtype(dtype, tol, shape, dims):
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    for fn, inverse in ((dct, False), (idct, True)):
        out = fn(x, dims)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), _scipy(x, dims, inverse), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_precision_is_rounded_once_from_float32(dtype):
    x = torch.randn(6, 5, 40, 3).to(dtype)
    assert torch.equal(dct(x, (0, 2, 3)), dct(x.float(), (0, 2, 3)).to(dtype))


@pytest.mark.parametrize("fn", [dct, idct])
def test_gradcheck(fn):
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fn(t, (0, 2)), (x,))
    assert torch.autograd.gradcheck(lambda t: fn(t, (-2, -1)), (x,))


def test_gradient_of_orthonormal_transform_is_its_inverse():
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    (dct(x, (-2, -1)) * w).sum().backward()
    torch.testing.assert_close(x.grad, idct(w, (-2, -1)), rtol=0, atol=1e-12)


def test_basis_built_in_inference_mode_still_trains():
    with torch.inference_mode():
        idct(torch.randn(2, 2, 6, 6), (-2, -1))
    x = torch.randn(2, 2, 6, 6, requires_grad=True)
    idct(x, (-2, -1)).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("n", [1, 2, 3, 8, 33])
def test_dct_matrix_is_orthonormal_and_matches_scipy(n):
    mat = dct_matrix(n, dtype=torch.float64)
    torch.testing.assert_close(mat @ mat.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-13)
    expected = scipy.fft.dct(np.eye(n), type=2, norm="ortho", axis=0)
    torch.testing.assert_close(mat, torch.from_numpy(expected), rtol=0, atol=1e-14)


def test_dct_matrix_size_one_dtype_and_cache():
    torch.testing.assert_close(dct_matrix(1), torch.ones(1, 1))
    mat = dct_matrix(5, dtype=torch.bfloat16)
    assert mat.dtype == torch.bfloat16 and mat.device.type == "cpu"
    assert dct_matrix(5, dtype=torch.bfloat16) is mat


def _matmul_count(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(event.name in ("aten::mm", "aten::bmm") for event in prof.events())


@pytest.mark.parametrize(
    "shape,dims,expected",
    [
        ((64, 64, 3, 3), (-2, -1), 1),  # kernel dims fuse into one 9x9 basis
        ((300, 200), (0, 1), 2),  # one GEMM per large dim
        ((8, 8, 5, 5), (0, 1, 2, 3), 2),  # 8x8 channels fuse, 5x5 kernel fuses
        ((8, 8, 1, 1), (-2, -1), 0),  # size-1 dims are the identity
    ],
)
def test_one_gemm_per_fused_group(shape, dims, expected):
    x = torch.randn(shape)
    dct(x, dims)  # build the cached bases outside the count
    assert _matmul_count(lambda: dct(x, dims)) == expected


@pytest.mark.parametrize("shape, dims", [((6, 4, 3, 3), (2, 3)), ((5, 2, 7, 7), (-2, -1)), ((4, 3, 1, 5), (2, 3)),
                                         ((4, 3, 5), (2,)), ((2, 3, 2, 2, 2), (2, 3, 4))])
def test_trailing_idct_matrix_is_the_idct_as_one_product(shape, dims):
    x = torch.randn(shape, dtype=torch.float64)
    matrix = trailing_idct_matrix(shape, dims, torch.float64)
    m = matrix.shape[0]
    assert torch.allclose((x.reshape(-1, m) @ matrix).reshape(shape), idct(x, dims), atol=1e-12)


@pytest.mark.parametrize("shape, dims, dtype", [
    ((4, 3, 9, 9), (2, 3), torch.float32),  # 81 > 64: idct uses one GEMM per dim
    ((4, 3, 5, 5), (1, 2), torch.float32),  # not the trailing dims
    ((4, 3, 5, 5), (), torch.float32),  # nothing to transform
    ((4, 3, 5, 5), (2, 3), torch.bfloat16),  # CPU rounds half precision from float32
])
def test_trailing_idct_matrix_is_none_where_idct_is_not_one_product(shape, dims, dtype):
    assert trailing_idct_matrix(shape, dims, dtype) is None


def test_empty_dims_is_identity():
    x = torch.randn(3, 4)
    assert dct(x, ()) is x


@pytest.mark.parametrize(
    "dims,match",
    [
        ((1, 1), "more than once"),
        ((1, -2), "more than once"),
        ((3,), "out of range"),
        ((-4,), "out of range"),
    ],
)
def test_bad_dims_raise(dims, match):
    x = torch.randn(2, 3, 4)
    for fn in (dct, idct):
        with pytest.raises(ValueError, match=match):
            fn(x, dims)
    with pytest.raises(ValueError, match=match):
        frequency_sum((2, 3, 4), dims)


@pytest.mark.parametrize("n", [0, -3])
def test_dct_matrix_rejects_small_n(n):
    with pytest.raises(ValueError, match=f"n={n}"):
        dct_matrix(n)


def test_bad_tensors_raise():
    with pytest.raises(ValueError, match="floating-point"):
        dct(torch.arange(6).view(2, 3), (1,))
    with pytest.raises(ValueError, match="size 0"):
        dct(torch.randn(0, 3), (0,))


def _brute_force_zigzag(shape) -> list[int]:
    strides = [math.prod(shape[k + 1 :]) for k in range(len(shape))]
    tuples = sorted(itertools.product(*(range(n) for n in shape)), key=lambda t: (sum(t), t))
    return [sum(i * s for i, s in zip(t, strides)) for t in tuples]


@pytest.mark.parametrize(
    "shape",
    [(), (1,), (6,), (3, 4), (4, 3), (1, 5), (5, 1), (2, 3, 4), (3, 1, 2), (2, 3, 1, 4), (3, 2, 2, 3), (0, 3)],
)
def test_zigzag_matches_brute_force(shape):
    order = zigzag_order(shape)
    assert order.dtype == torch.int64
    assert order.tolist() == _brute_force_zigzag(shape)


def test_zigzag_large_is_a_frequency_sorted_permutation():
    shape = (200, 300, 3, 3)
    order = zigzag_order(shape)
    assert torch.equal(order.sort().values, torch.arange(math.prod(shape)))
    sums = frequency_sum(shape, range(4)).expand(shape).reshape(-1)[order]
    assert bool((sums[1:] >= sums[:-1]).all())
    # within one sum the flat index (row-major = lexicographic) increases
    same = sums[1:] == sums[:-1]
    assert bool((order[1:][same] > order[:-1][same]).all())
    assert zigzag_order(shape) is order


def test_zigzag_rejects_negative_size():
    with pytest.raises(ValueError, match="negative"):
        zigzag_order((3, -1))


@pytest.mark.parametrize("shape,dims", [((4, 6, 3, 5), (-2, -1)), ((4, 6, 3), (0, 2)), ((5,), (0,)), ((2, 3), ())])
def test_frequency_sum_matches_index_grid(shape, dims):
    sums = frequency_sum(shape, dims)
    assert sums.dtype == torch.int64
    assert sums.shape == tuple(n if k in {d % len(shape) for d in dims} else 1 for k, n in enumerate(shape))
    grid = np.indices(shape)[list(dims)].sum(axis=0)
    assert torch.equal(sums.expand(shape), torch.from_numpy(grid).long())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "dtype,tol",
    [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.float16, 4e-3), (torch.bfloat16, 3e-2)],
)
def test_cuda_matches_cpu(dtype, tol):
    for shape, dims in [((64, 32, 3, 3), (-2, -1)), ((96, 80), (0, 1)), ((3, 2, 3, 4), (1, 2))]:
        x = torch.randn(shape, dtype=torch.float64).to(dtype)
        for fn in (dct, idct):
            out = fn(x.cuda(), dims)
            assert out.dtype == dtype and out.is_cuda
            torch.testing.assert_close(out.cpu().double(), fn(x, dims).double(), rtol=tol, atol=tol)
    assert torch.equal(zigzag_order((4, 5, 3), device="cuda").cpu(), zigzag_order((4, 5, 3)))
    assert torch.equal(frequency_sum((4, 5), (0, 1), device="cuda").cpu(), frequency_sum((4, 5), (0, 1)))
