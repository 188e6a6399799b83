"""Why FreshNets' fused rebuild widens small inverse-DCT products: tall x narrow GEMMs on CPU.

FreshNets rebuilds a conv weight chunk by chunk as ``gathered (rows, m) @
M (m, m)``, m the kernel size (9 for 3x3, 49 for 7x7). CPU BLAS is slow on
such products when m is small, so ``gather.gather_transform`` multiplies k
consecutive rows at once by the block-diagonal ``diag(M, ..., M)``. Each row
of this table times one chunk-sized product (``2**18`` values, the fused
rebuild's chunk) with k = 1 (the plain product) and the widened k, forward
(``M``) and backward (``M.T``), against a copy of the same number of values,
alternating the two.

    python benchmarks/small_gemm.py --threads 1
"""

from __future__ import annotations

import torch

from common import alternating_ratio, benchmark_parser, print_table, write_results

CHUNK_VALUES = 2**18
WIDTHS = (3, 4, 9, 16, 25, 49)
GROUPS = (1, 2, 3, 4, 6, 8)
CALLS = 40  # products per timing, so each timing is milliseconds, not microseconds


def product_rows(m: int, groups: int, repeats: int) -> list[dict]:
    rows = CHUNK_VALUES // m // 24 * 24  # divisible by every group count
    generator = torch.Generator().manual_seed(m)
    matrix = torch.linalg.qr(torch.randn(m, m, generator=generator))[0]
    values = torch.randn(rows, m, generator=generator)
    out = torch.empty(rows, m)
    source, target = torch.randn(rows * m), torch.empty(rows * m)

    def copy() -> None:
        for _ in range(CALLS):
            target.copy_(source)

    result = []
    for direction, right in (("forward", matrix), ("backward", matrix.mT)):
        wide = torch.block_diag(*[right] * groups)
        wide_values, wide_out = values.view(-1, groups * m), out.view(-1, groups * m)

        def product() -> None:
            for _ in range(CALLS):
                torch.mm(wide_values, wide, out=wide_out)

        ratio = alternating_ratio(copy, product, repeats)
        result.append({"model": f"({rows}, {m}) @ ({m}, {m})", "method": f"k={groups}", "budget": direction,
                       "metric": "product_vs_copy", "value": round(ratio, 2)})
    return result


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row for m in args.widths for groups in GROUPS if groups * m <= 96
            for row in product_rows(m, groups, args.repeats)]
    print_table(rows, ["model", "method", "budget", "metric", "value"])
    write_results("small_gemm", rows, args.out)


if __name__ == "__main__":
    main()
