"""Orthonormal DCT-II / DCT-III along chosen dims, by small cached matrices.

torch has no DCT op, and the tensors transformed here are weights whose
transformed dims are mostly tiny (3x3 kernels) or at most a few thousand
long, so a basis matrix per dim beats an FFT: the transform is one GEMM per
dim, autograd needs nothing special, and it runs the same on every device
and dtype. Results match ``scipy.fft.dctn(x, type=2, norm="ortho",
axes=dims)`` and ``idctn``.

Adjacent transformed dims whose joint size is small (kernel dims) are fused
into one Kronecker basis: a (512, 512, 3, 3) weight is then a single
(262144, 9) @ (9, 9) GEMM, much faster on CPU than a batched matmul of
262144 tiny 3x3 products. Large dims are never fused, so no basis ever
grows beyond ``max(n, _FUSE_LIMIT) ** 2`` entries.

Bases are built in float64 on the CPU and then cast and moved, so every
device sees the same values, correct to the last bit of the target dtype.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Iterable, Sequence

import torch

__all__ = [
    "dct_matrix", "dct", "idct", "trailing_idct_matrix", "dct_corner", "idct_corner", "zigzag_order", "frequency_sum"]

# Largest joint size of adjacent dims fused into one Kronecker basis. A fused
# basis costs m multiply-adds per element instead of the sum of the factor
# sizes; on CPU the single GEMM still wins up to about 11x11 kernels and
# loses from 16x16 on, so 64 (8x8) keeps a clear margin.
_FUSE_LIMIT = 64

# CPU float16 GEMM is far slower than float32 and both half types would round
# after every dim, so on CPU they are computed in float32 and rounded once.
_CPU_UPCAST = (torch.float16, torch.bfloat16)

_Builder = Callable[..., torch.Tensor]


def _as_device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def _dct_matrix_f64(n: int) -> torch.Tensor:
    """D[k, j] = s_k cos(pi (2j + 1) k / 2n), s_0 = sqrt(1/n), s_k = sqrt(2/n)."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    mat = torch.cos(math.pi * (2 * j + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    mat[0] /= math.sqrt(2.0)
    return mat


def _constant_cache(maxsize: int) -> Callable[[_Builder], _Builder]:
    """lru_cache for builders of constant tensors, safe under torch.compile.

    Entries are built outside inference mode: one first built inside
    torch.inference_mode() would be cached as an inference tensor, which
    autograd later refuses to save for backward when the same layer trains.
    While compiling, dynamo cannot guard a Python-side cache (it warns and
    traces through it), so the builder is traced into the graph instead,
    where it depends on no input and compiles to a constant.
    """

    def decorate(build: _Builder) -> _Builder:
        cached = functools.lru_cache(maxsize=maxsize)(torch.inference_mode(False)(build))

        @functools.wraps(build)
        def lookup(*args):
            return build(*args) if torch.compiler.is_compiling() else cached(*args)

        return lookup

    return decorate


@_constant_cache(maxsize=32)
def _basis(sizes: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Kronecker product of the DCT-II matrices of ``sizes`` (row-major fused dims)."""
    mat = functools.reduce(torch.kron, (_dct_matrix_f64(n) for n in sizes))
    return mat.to(device=device, dtype=dtype)


def dct_matrix(
    n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """The (n, n) orthonormal DCT-II matrix D: ``D @ x`` transforms each column of x.

    Its transpose is the inverse (DCT-III). The tensor is cached and shared by
    every caller asking for the same (n, dtype, device): treat it as read-only,
    and ``.clone()`` it before any in-place change.
    """
    n = operator.index(n)
    if n < 1:
        raise ValueError(f"DCT size n must be >= 1, got n={n}; a transformed dim needs at least one element")
    return _basis((n,), dtype, _as_device(device))


def _normalize_dims(dims: Iterable[int], ndim: int) -> tuple[int, ...]:
    """Sorted non-negative dims; rejects out-of-range and repeated entries."""
    dims = tuple(operator.index(d) for d in dims)
    for d in dims:
        if not -ndim <= d < ndim:
            raise ValueError(
                f"dim {d} is out of range for a tensor with {ndim} dims; "
                f"use dims in [{-ndim}, {ndim - 1}]"
            )
    normalized = tuple(sorted(d % ndim for d in dims))
    if len(set(normalized)) != len(normalized):
        raise ValueError(
            f"dims {dims} name the same dim more than once; list each dim to transform exactly once"
        )
    return normalized


def _fused_groups(shape: torch.Size, axes: tuple[int, ...]) -> list[tuple[int, int]]:
    """Split sorted ``axes`` into [start, stop) runs, one basis each.

    Adjacent dims join a run while its joint size stays <= _FUSE_LIMIT; runs of
    joint size 1 are the identity and are dropped.
    """
    groups: list[tuple[int, int]] = []
    for d in axes:
        if groups and groups[-1][1] == d and math.prod(shape[groups[-1][0] : d + 1]) <= _FUSE_LIMIT:
            groups[-1] = (groups[-1][0], d + 1)
        else:
            groups.append((d, d + 1))
    return [(a, b) for a, b in groups if math.prod(shape[a:b]) > 1]


def _apply(y: torch.Tensor, start: int, stop: int, inverse: bool) -> torch.Tensor:
    """Transform the fused dims [start, stop) of y with one (batched) GEMM."""
    shape = y.shape
    sizes = tuple(shape[start:stop])
    m, trailing = math.prod(sizes), math.prod(shape[stop:])
    basis = _basis(sizes, y.dtype, y.device)
    mat = basis.mT if inverse else basis
    if trailing == 1:  # last dims: fold every leading dim into the GEMM rows
        out = y.reshape(-1, m) @ mat.mT
    else:  # batched over leading dims; a single GEMM when there are none
        out = mat @ y.reshape(-1, m, trailing)
    return out.reshape(shape)


def _transform(x: torch.Tensor, dims: Sequence[int], inverse: bool) -> torch.Tensor:
    if not x.is_floating_point():
        raise ValueError(f"DCT needs a floating-point tensor, got dtype {x.dtype}; convert it with x.float()")
    axes = _normalize_dims(dims, x.dim())
    empty = [d for d in axes if x.shape[d] == 0]
    if empty:
        raise ValueError(f"cannot transform dims {empty} of size 0 (tensor shape {tuple(x.shape)})")
    upcast = x.device.type == "cpu" and x.dtype in _CPU_UPCAST
    y = x.float() if upcast else x
    for start, stop in _fused_groups(x.shape, axes):
        y = _apply(y, start, stop, inverse)
    return y.to(x.dtype)


def dct(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Orthonormal DCT-II of x along ``dims`` (negative dims allowed), in x's dtype.

    Equals ``scipy.fft.dctn(x, type=2, norm="ortho", axes=dims)``. Gradients
    flow to x. When every listed dim has size 1 (or dims is empty) the
    transform is the identity and x itself is returned.
    """
    return _transform(x, dims, inverse=False)


def idct(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`dct` (orthonormal DCT-III), ``scipy.fft.idctn(..., norm="ortho")``."""
    return _transform(x, dims, inverse=True)


def trailing_idct_matrix(
    shape: Sequence[int], dims: Sequence[int], dtype: torch.dtype, device: torch.device | str | None = None
) -> torch.Tensor | None:
    """M with ``idct(x, dims) == (x.reshape(-1, m) @ M).reshape(shape)`` for x of ``shape``, or None.

    Exists when ``dims`` are the trailing dims of ``shape`` and :func:`idct`
    would transform them with one fused basis in ``dtype`` itself (joint size
    m <= 64, no CPU half-precision upcast): then a caller may fold the inverse
    transform into its own GEMMs, e.g. chunk by chunk while the rows are still
    in cache, and get what :func:`idct` computes. M is cached and read-only.
    """
    shape = _checked_shape(shape)
    axes = _normalize_dims(dims, len(shape))
    device = _as_device(device)
    trailing = axes == tuple(range(len(shape) - len(axes), len(shape)))
    if not axes or not trailing or (device.type == "cpu" and dtype in _CPU_UPCAST):
        return None
    groups = _fused_groups(torch.Size(shape), axes)
    if len(groups) != 1 or groups[0] != (axes[0], len(shape)):
        return None
    return _basis(tuple(shape[axes[0]:]), dtype, device)


def _index_sum(
    shape: tuple[int, ...], dims: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Sum of the indices along ``dims``, shaped to broadcast against ``shape``."""
    total = torch.zeros((1,) * len(shape), dtype=dtype, device=device)
    for d in dims:
        view = [1] * len(shape)
        view[d] = shape[d]
        total = total + torch.arange(shape[d], dtype=dtype, device=device).view(view)
    return total


def _checked_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(operator.index(n) for n in shape)
    if any(n < 0 for n in shape):
        raise ValueError(f"shape {shape} has a negative size; sizes must be >= 0")
    return shape


def frequency_sum(
    shape: Sequence[int], dims: Sequence[int], device: torch.device | str | None = None
) -> torch.Tensor:
    """int64 j_a + j_b + ... over ``dims``, broadcastable to ``shape``.

    Coefficients with equal index sum lie on one anti-diagonal of the spectrum
    and have similar spatial frequency, which is how FreshNets groups them.
    The result has size shape[d] along each listed dim and 1 elsewhere.
    """
    shape = _checked_shape(shape)
    return _index_sum(shape, _normalize_dims(dims, len(shape)), torch.int64, _as_device(device))


# Orders reach 8 bytes per element (800 MB at 10**8), so only a few are kept.
@_constant_cache(maxsize=4)
def _zigzag(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # Row-major enumeration is already lexicographic in the index tuple, so a
    # stable sort by index sum yields the (sum, i0, i1, ...) order. int32 keys
    # halve the sort's memory; index sums never approach 2**31.
    key = _index_sum(shape, tuple(range(len(shape))), torch.int32, device)
    return torch.sort(key.expand(shape).reshape(-1), stable=True).indices


def zigzag_order(shape: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Flat row-major indices of a tensor of ``shape``, low frequencies first.

    Sorted by ascending index sum, ties by the index tuple: the N-D zigzag
    scan that Frequency Regularization keeps a prefix of. Returns an int64
    tensor of numel(shape) entries, cached per (shape, device): treat it as
    read-only and ``.clone()`` it before any in-place change.
    """
    return _zigzag(_checked_shape(shape), _as_device(device))


# -- low-frequency corners ------------------------------------------------------
# A signal whose spectrum is zero outside a corner box [0, b_0) x ... x [0, b_k)
# needs only the first b_d rows of each DCT matrix: along dim d,
#   x_j = sum_{k < b_d} D[k, j] c_k   (inverse, an (n_d x b_d) product)
#   c_k = sum_j D[k, j] x_j, k < b_d  (forward, a (b_d x n_d) product).
# Expanding dim d from b_d to n_d on a tensor of S elements costs S * n_d
# multiply-adds and leaves S * n_d / b_d; an adjacent swap shows that the
# expansion order with the fewest multiply-adds sorts dims by 1/b_d - 1/n_d
# ascending (least growth per cost first). The forward pass is the transpose
# chain, so it runs the same dims in reverse. Untruncated dims (b_d = n_d) go
# through the fused path above, at the corner's smallest size.


def _corner_dims(full: Sequence[int], corner: Sequence[int]) -> tuple[list[int], list[int]]:
    """(untruncated dims, truncated dims in the cheapest inverse order)."""
    untruncated = [d for d, (n, b) in enumerate(zip(full, corner)) if b == n]
    truncated = [d for d, (n, b) in enumerate(zip(full, corner)) if b < n]
    return untruncated, sorted(truncated, key=lambda d: 1 / corner[d] - 1 / full[d])


def _check_corner(full: Sequence[int], corner: Sequence[int]) -> None:
    if len(full) != len(corner) or any(not 1 <= b <= n for n, b in zip(full, corner)):
        raise ValueError(
            f"corner {tuple(corner)} does not fit shape {tuple(full)}: give one size per dim with 1 <= corner <= shape"
        )


def _along(y: torch.Tensor, dim: int, mat: torch.Tensor) -> torch.Tensor:
    """Contract dim ``dim`` of y with the rows of ``mat``; its columns become the new dim."""
    return torch.movedim(torch.tensordot(y, mat, dims=([dim], [0])), -1, dim)


def _corner_transform(x: torch.Tensor, full: tuple[int, ...], corner: tuple[int, ...], inverse: bool) -> torch.Tensor:
    if not x.is_floating_point():
        raise ValueError(f"DCT needs a floating-point tensor, got dtype {x.dtype}; convert it with x.float()")
    _check_corner(full, corner)
    untruncated, truncated = _corner_dims(full, corner)
    upcast = x.device.type == "cpu" and x.dtype in _CPU_UPCAST
    y = x.float() if upcast else x
    if inverse:
        y = _transform(y, untruncated, inverse=True)
    for d in truncated if inverse else reversed(truncated):
        rows = _basis((full[d],), y.dtype, y.device)[: corner[d]]
        y = _along(y, d, rows if inverse else rows.mT)
    if not inverse:
        y = _transform(y, untruncated, inverse=False)
    return y.to(x.dtype)


def dct_corner(x: torch.Tensor, corner: Sequence[int]) -> torch.Tensor:
    """The low-frequency corner ``dct(x, all dims)[:corner[0], :corner[1], ...]``.

    Computed with the first ``corner[d]`` rows of each DCT matrix, so the full
    spectrum is never formed: for a (4096, 4096) weight and a 64 x 64 corner it
    costs about 64 / 8192 of the full transform.
    """
    return _corner_transform(x, tuple(x.shape), tuple(operator.index(b) for b in corner), inverse=False)


def idct_corner(corner: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``idct`` over every dim of ``corner`` zero-padded at the high frequencies to ``shape``.

    The inverse of :func:`dct_corner` on signals whose spectrum lives in the
    corner (and the least-squares adjoint on all others); no zero padding or
    full-size spectrum is ever materialized.
    """
    return _corner_transform(corner, _checked_shape(shape), tuple(corner.shape), inverse=True)
