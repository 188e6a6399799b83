"""When splitting a hashed gather and its scatter over CPU threads pays: the size threshold of ``methods/parallel.py``.

Each row rebuilds a HashedNets-style weight of N values from a table of N/8
(signed, budget 1/16), forward (``gather_rows``) and backward (the scatter),
once on one thread and once split into one range per thread, alternating the
two, and prints split / one thread. Global hashing (random buckets over the
whole table, every range with its own full-size gradient table) is the
harder case; cache-local layers (``locality``) split at least as well.

    python benchmarks/split_gather.py --threads 2
"""

from __future__ import annotations

import torch

from common import alternating_ratio, benchmark_parser, print_table, write_results
from hf_freqcompress.methods import gather, parallel

SIZES = tuple(2**p for p in range(16, 24))
CALLS = 4  # rebuilds per timing, so small sizes still time milliseconds


def split_vs_one_thread(values: int, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(values)
    table = torch.randn(values // 8, generator=generator).requires_grad_()
    index = torch.randint(0, values // 8, (values,), generator=generator, dtype=torch.int32)
    upstream = torch.randn(values, generator=generator)

    def rebuild(min_values_per_thread: int):
        def run() -> None:
            parallel.MIN_VALUES_PER_THREAD = min_values_per_thread
            for _ in range(CALLS):
                torch.autograd.grad(gather.gather_rows(table, index), table, upstream)

        return run

    default = parallel.MIN_VALUES_PER_THREAD
    try:
        ratio = alternating_ratio(rebuild(2**62), rebuild(1), repeats)
    finally:
        parallel.MIN_VALUES_PER_THREAD = default
    ranges = len(parallel.split_rows(values, 1, 1, torch.device("cpu")))
    return {"model": f"{values} values", "method": f"{torch.get_num_threads()} threads", "budget": "1/16",
            "metric": "split_vs_one_thread", "value": round(ratio, 2), "ranges_at_default": ranges}


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [split_vs_one_thread(values, args.repeats) for values in SIZES]
    print_table(rows, ["model", "method", "metric", "value", "ranges_at_default"])
    write_results("split_gather", rows, args.out)


if __name__ == "__main__":
    main()
